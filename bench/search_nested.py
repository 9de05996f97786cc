"""What a nested relationship costs the search server: bulk rate against relationships per document.

The entity documents carry their relationships as ``nested`` objects (``search/mappings.py``), and
Elasticsearch indexes every nested object as a hidden document of its own. This script measures what
that costs on the server at hand, so the re-index figures and the document relationship cap can be
read against it.

For each count K in ``--nested`` (default 0, 10, 25, 50, 100, 200), a fresh index with the entity
mappings gets documents shaped like the real ones (K incoming derived relationships, each with a
3-entity path), written with external versions through ``helpers.bulk`` in requests of 500, first as
new documents and then rewritten with a newer version (what a re-index of a changed hub does).
Documents per K: ``--nested-objects`` / K (bounded to 200..3,000), so every row writes about the same
number of nested objects. The baseline is K = 0 in the same run: the rate of the same documents with no
relationships. Printed: documents/s, nested objects/s, and documents/s as a share of the K = 0 rate.
Timings are printed, never asserted.

Run: ``.venv/bin/python bench/search_nested.py`` (about a minute; ``BENCH_ELASTICSEARCH_URL`` to measure
an existing server instead of a local noida-db).
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Sequence
from typing import Any

from _common import console, describe_search, elasticsearch_server, median, print_table
from elasticsearch import Elasticsearch, helpers

from enrichment_assets.search.mappings import MAPPINGS, SETTINGS


def document(n: int, nested: int) -> dict[str, Any]:
    relationships = [
        {
            "relation": "evaluated_in",
            "direction": "in",
            "derived": True,
            "other_type": "model_instance",
            "other_id": f"mi-{n * 7 + j}",
            "other_name": f"model instance {n * 7 + j}",
            "path": [f"model_instance:mi-{n * 7 + j}", f"pipeline_run:pr-{j}", f"ab_test:ab-{n}"],
        }
        for j in range(nested)
    ]
    return {
        "entity_type": "ab_test",
        "entity_id": f"ab-{n}",
        "name": f"A/B test {n}",
        "state": "fully_enriched",
        "version": 1,
        "first_seen_at": "2026-11-28T00:00:00+00:00",
        "attributes": {"status": "running"},
        "relationships": relationships,
        "relationship_totals": [{"relation": "evaluated_in", "direction": "in", "derived": True, "total": nested}],
    }


def write(client: Elasticsearch, index: str, docs: list[dict[str, Any]], version: int) -> float:
    actions = [
        {
            "_index": index,
            "_id": d["entity_id"],
            "_version": version,
            "_version_type": "external",
            "_source": {**d, "version": version},
        }
        for d in docs
    ]
    started = time.perf_counter()
    ok, errors = helpers.bulk(client, actions, chunk_size=500, raise_on_error=False, stats_only=True)
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{errors} documents were refused; the figures would not mean anything")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nested",
        type=int,
        nargs="+",
        default=[0, 10, 25, 50, 100, 200],
        help="relationships per document to measure (0 is the baseline and is always run)",
    )
    parser.add_argument(
        "--nested-objects",
        type=int,
        default=60_000,
        help="nested objects per row, which sets its document count (default 60,000)",
    )
    args = parser.parse_args(argv)
    counts = sorted({0, *args.nested})
    if counts[0] < 0 or args.nested_objects < 1:
        parser.error("--nested counts must not be negative, --nested-objects must be positive")

    rows: list[tuple[int, int, float, float]] = []  # (K, documents, new s, rewrite s)
    with elasticsearch_server() as url:
        client = Elasticsearch(url, request_timeout=300)
        server = describe_search(client)
        prefix = f"bench-nested-{secrets.token_hex(3)}"
        with console.status("bulk-writing documents with growing relationship counts") as status:
            for nested in counts:
                size = max(200, min(3_000, args.nested_objects // max(nested, 1)))
                index = f"{prefix}-{nested}"
                status.update(f"{size:,} documents with {nested} relationships each")
                client.indices.create(index=index, mappings=MAPPINGS, settings=SETTINGS)
                try:
                    docs = [document(n, nested) for n in range(size)]
                    rows.append((nested, size, write(client, index, docs, 1), write(client, index, docs, 2)))
                finally:
                    client.indices.delete(index=index)
        client.close()

    flat = median([size / new for nested, size, new, _ in rows if nested == 0])
    print_table(
        "Bulk rate against nested relationships per document",
        [
            "relationships per document",
            "documents",
            "new docs/s",
            "rewritten docs/s",
            "nested objects/s",
            "new docs/s vs none",
        ],
        [
            [
                f"{nested}",
                f"{size:,}",
                f"{size / new:,.0f}",
                f"{size / rewrite:,.0f}",
                f"{size * nested / new:,.0f}" if nested else "-",
                f"{size / new / flat:.0%}",
            ]
            for nested, size, new, rewrite in rows
        ],
        caption=f"{server}; requests of 500 documents, external versions, refresh_interval "
        f"{SETTINGS['refresh_interval']}",
    )


if __name__ == "__main__":
    main()
