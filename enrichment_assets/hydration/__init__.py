"""Hydration: per-source HTTP clients with rate limits, retries and circuit breaking."""

from enrichment_assets.hydration.client import Fetched, SourceClient, encode_segment
from enrichment_assets.hydration.limits import CircuitBreaker, RateLimiter

__all__ = ["CircuitBreaker", "Fetched", "RateLimiter", "SourceClient", "encode_segment"]
