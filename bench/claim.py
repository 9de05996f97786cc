"""Claim latency as the entities table grows: ``FactStore.claim`` of 1,000 candidates at 10k, 100k, 1M rows.

For each size (ascending, the table is topped up in place with ``INSERT ... SELECT generate_series``
rows shaped like the ones FactStore writes, then ``ANALYZE``d), after warm-ups, ``--repeats`` times:

- ``FactStore.claim(type, limit=1000, owner=..., lease=5 min)``, then ``FactStore.release`` of what it
  got, so every repetition sees the same table;
- the baseline, in the same run: a straightforward SQLAlchemy Core claim,
  ``UPDATE entities SET claim_owner, claim_expires_at WHERE (entity_type, entity_id) IN (SELECT ...
  WHERE entity_type = :t AND state IN pending AND next_attempt_at <= now() ORDER BY first_seen_at
  LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING``, undone the same way;
- ``FactStore.due_work()`` (discovery).

The two claims alternate within each repetition so drift on a noisy machine hits both alike. After
the timed runs at each size, both claim statements (FactStore's captured as it is sent) are run under
``EXPLAIN (ANALYZE, BUFFERS)`` in a rolled-back transaction: the report says which indexes each reads,
whether FactStore's reads the partial index ``ix_entities_pending_due``, and whether either scans the
whole table; the full plan is printed for the largest size (and for the first size with a table scan).

Targets: claim median at 1M <= 50 ms and within 2x of the 10k figure. Timings are printed, never asserted.

Run: ``.venv/bin/python bench/claim.py [--sizes 10000,100000,1000000] [--repeats 15]``
(``BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres`` to use an existing server).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from _common import bench_database, console, describe_server, median, percentile, print_table, verdict

from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.factstore.schema import PENDING_STATES, EntityState, entities
from enrichment_assets.factstore.types import UTCDateTime

ENTITY_TYPE = "bench_a"
OWNER = "bench-claim"
BASELINE_OWNER = "bench-baseline"
LEASE = timedelta(minutes=5)
SPREAD = timedelta(days=30)
PENDING_EVERY = 5  # one entity in five is uncached and due: 20% pending, 80% fully enriched
ENRICHED_AFTER = timedelta(minutes=5)
FILL_CHUNK = 250_000
TARGET_MS = 50.0
TARGET_GROWTH = 2.0
PLAN_LINES = 25
PARTIAL_INDEX = "ix_entities_pending_due"
T = TypeVar("T")
MIX = (
    f"one entity type ({ENTITY_TYPE}); 80% fully_enriched (version 2, small JSON attributes, "
    f"last_enriched_at = first_seen_at + {ENRICHED_AFTER.seconds // 60} min, next_attempt_at NULL), "
    "20% uncached and due (version 1, next_attempt_at = first_seen_at); "
    f"first_seen_at spread evenly over the last {SPREAD.days} days"
)


@dataclass(frozen=True)
class SizeResult:
    size: int
    pending: int
    claimed: int
    claim_ms: list[float]
    baseline_ms: list[float]
    due_work_ms: list[float]
    due_windows: int


# -- the table ------------------------------------------------------------------------------------


def fill_statement() -> sa.Insert:
    """Rows ``n`` in ``[:lo, :hi]``, shaped as FactStore writes an ingested (for most, enriched) entity."""
    series = sa.func.generate_series(sa.bindparam("lo"), sa.bindparam("hi")).table_valued("n").render_derived()
    n = series.c.n
    pending = n % PENDING_EVERY == 0
    # A fixed scramble of n over [0, 1): ages spread evenly and independently of the pending pattern.
    fraction = sa.cast((n % 10007) * 7919 % 10007, sa.Float) / 10007.0
    now_epoch = sa.bindparam("now_epoch", type_=sa.Float)
    first_epoch = now_epoch - fraction * SPREAD.total_seconds()
    first_seen = sa.func.to_timestamp(first_epoch, type_=UTCDateTime)
    enriched = sa.func.to_timestamp(first_epoch + ENRICHED_AFTER.total_seconds(), type_=UTCDateTime)
    entity_id = sa.literal("e") + sa.func.lpad(sa.cast(n, sa.Text), 9, "0")
    owner_team = sa.literal("team-") + sa.cast(n % 97, sa.Text)
    columns = {
        "entity_type": sa.literal(ENTITY_TYPE),
        "entity_id": entity_id,
        "state": sa.case((pending, EntityState.UNCACHED.value), else_=EntityState.FULLY_ENRICHED.value),
        "version": sa.case((pending, 1), else_=2),
        "attributes": sa.case(
            (pending, sa.null()), else_=sa.func.jsonb_build_object("name", entity_id, "owner", owner_team)
        ),
        "first_seen_at": first_seen,
        "updated_at": sa.case((pending, first_seen), else_=enriched),
        "last_event_at": first_seen,
        "hydrated_at": sa.case((pending, sa.null()), else_=enriched),
        "last_enriched_at": sa.case((pending, sa.null()), else_=enriched),
        "attempts": sa.literal(0),
        "next_attempt_at": sa.case((pending, first_seen), else_=sa.null()),
    }
    return sa.insert(entities).from_select(list(columns), sa.select(*columns.values()).select_from(series))


def grow_to(engine: sa.Engine, current: int, size: int) -> float:
    """Add entities ``current+1 .. size`` and ANALYZE; returns the seconds it took."""
    started = time.perf_counter()
    stmt = fill_statement()
    now_epoch = datetime.now(UTC).timestamp()
    for lo in range(current + 1, size + 1, FILL_CHUNK):
        with engine.begin() as conn:
            conn.execute(stmt, {"lo": lo, "hi": min(lo + FILL_CHUNK - 1, size), "now_epoch": now_epoch})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE entities"))
    return time.perf_counter() - started


def count_pending(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(
                entities.c.entity_type == ENTITY_TYPE, entities.c.state.in_(PENDING_STATES)
            )
        ).scalar_one()


# -- the two claims -------------------------------------------------------------------------------


def baseline_claim(limit: int, expires: datetime) -> sa.Update:
    """The straightforward claim, returning the same columns ``FactStore.claim`` returns."""
    pick = (
        sa.select(entities.c.entity_type, entities.c.entity_id)
        .where(
            entities.c.entity_type == ENTITY_TYPE,
            entities.c.state.in_(PENDING_STATES),
            entities.c.next_attempt_at <= sa.func.now(),
        )
        .order_by(entities.c.first_seen_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(entities)
        .where(sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(pick))
        .values(claim_owner=BASELINE_OWNER, claim_expires_at=expires)
        .returning(
            entities.c.entity_type,
            entities.c.entity_id,
            entities.c.version,
            entities.c.state,
            entities.c.attempts,
            entities.c.first_seen_at,
        )
    )


def undo_baseline(engine: sa.Engine, keys: Sequence[EntityKey]) -> None:
    """Clear exactly what the baseline claim set, on exactly the rows it claimed."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(entities)
            .where(
                sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(keys),
                entities.c.claim_owner == BASELINE_OWNER,
            )
            .values(claim_owner=None, claim_expires_at=None)
        )


def timed(action: Callable[[], T]) -> tuple[float, T]:
    """Milliseconds ``action`` took, and what it returned."""
    started = time.perf_counter()
    result = action()
    return (time.perf_counter() - started) * 1000, result


def measure(store: FactStore, size: int, pending: int, limit: int, repeats: int, warmups: int) -> SizeResult:
    engine = store.engine

    def factstore_claim() -> list[EntityKey]:
        return [c.key for c in store.claim(ENTITY_TYPE, limit=limit, owner=OWNER, lease=LEASE)]

    def plain_claim() -> list[EntityKey]:
        with engine.begin() as conn:
            rows = conn.execute(baseline_claim(limit, store.now() + LEASE))
            return [(r.entity_type, r.entity_id) for r in rows]

    claim_ms: list[float] = []
    baseline_ms: list[float] = []
    claimed = min(limit, pending)
    for rep in range(warmups + repeats):
        elapsed, keys = timed(factstore_claim)
        if len(keys) != claimed:
            raise RuntimeError(f"FactStore.claim returned {len(keys)} candidates, expected {claimed}")
        store.release(OWNER, keys)
        base_elapsed, base_keys = timed(plain_claim)
        if len(base_keys) != claimed:
            raise RuntimeError(f"the baseline claim returned {len(base_keys)} candidates, expected {claimed}")
        undo_baseline(engine, base_keys)
        if rep >= warmups:
            claim_ms.append(elapsed)
            baseline_ms.append(base_elapsed)

    due_work_ms: list[float] = []
    windows = 0
    for rep in range(warmups + repeats):
        elapsed, due = timed(store.due_work)
        windows = len(due)
        if rep >= warmups:
            due_work_ms.append(elapsed)
    return SizeResult(size, pending, claimed, claim_ms, baseline_ms, due_work_ms, windows)


# -- plans ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plans:
    """``EXPLAIN (ANALYZE, BUFFERS)`` lines of FactStore's claim and of the baseline at one size."""

    size: int
    claim: list[str]
    baseline: list[str]


@contextmanager
def captured_updates(engine: sa.Engine) -> Iterator[list[tuple[str, Any]]]:
    """Collect the ``UPDATE entities`` statements (with their parameters) sent while the block runs."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE ENTITIES"):
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)


def explain(engine: sa.Engine, statement: str, parameters: Any) -> list[str]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of an executed statement, in a transaction that is rolled back."""
    with engine.connect() as conn:
        plan = [row[0] for row in conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters)]
        conn.rollback()
    return plan


def explain_claims(store: FactStore, size: int, limit: int) -> Plans:
    """Plans of both claims exactly as they are sent (FactStore's is captured from a real claim)."""
    with captured_updates(store.engine) as claim_sent:
        claims = store.claim(ENTITY_TYPE, limit=limit, owner=OWNER, lease=LEASE)
    store.release(OWNER, [c.key for c in claims])
    with captured_updates(store.engine) as baseline_sent, store.engine.connect() as conn:
        conn.execute(baseline_claim(limit, store.now() + LEASE))
        conn.rollback()
    if not claim_sent or not baseline_sent:
        raise RuntimeError("could not capture the claim statements to explain them")
    return Plans(size, explain(store.engine, *claim_sent[0]), explain(store.engine, *baseline_sent[0]))


def reads(plan: Sequence[str]) -> str:
    """What a plan reads ``entities`` through: its indexes, and ``SEQ SCAN`` if it scans the table."""
    text = "\n".join(plan)
    found = re.findall(r"(?:Index|Index Only|Bitmap Index) Scan(?: Backward)?(?: using| on) (\w+)", text)
    parts = list(dict.fromkeys(found))
    if re.search(r"Seq Scan on entities\b", text):
        parts.append("SEQ SCAN")
    return " + ".join(parts) or "nothing"


def execution_ms(plan: Sequence[str]) -> str:
    match = re.search(r"Execution Time: ([\d.]+) ms", "\n".join(plan))
    return f"{float(match[1]):.1f}" if match else "?"


def print_plan(plans: Plans) -> None:
    console.print(f"[bold]FactStore.claim plan at {plans.size:,} entities[/bold] (first {PLAN_LINES} lines):")
    for line in plans.claim[:PLAN_LINES]:
        console.print(f"  {line}", markup=False, highlight=False)


def show_plans(plans: Sequence[Plans]) -> None:
    print_table(
        "What each claim reads (EXPLAIN ANALYZE after the timed runs, rolled back)",
        ["entities", "FactStore.claim reads", "exec ms", "baseline reads", "exec ms"],
        [
            [f"{p.size:,}", reads(p.claim), execution_ms(p.claim), reads(p.baseline), execution_ms(p.baseline)]
            for p in plans
        ],
    )
    scanned = [p for p in plans if "SEQ SCAN" in reads(p.claim)]
    if scanned and scanned[0] is not plans[-1]:
        print_plan(scanned[0])
    print_plan(plans[-1])
    missing = [f"{p.size:,}" for p in plans if PARTIAL_INDEX not in reads(p.claim)]
    answer = "[green]yes[/green], at every size"
    if missing:
        answer = f"[red]NO[/red] at {', '.join(missing)} entities"
    console.print(f"FactStore.claim reads the partial index {PARTIAL_INDEX}: {answer}")
    if scanned:
        console.print(
            "[red]FactStore.claim also reads the whole entities table (Seq Scan)[/red] at "
            f"{', '.join(f'{p.size:,}' for p in scanned)} entities: see the plan above for how it is joined"
        )


# -- report ---------------------------------------------------------------------------------------


def report(results: Sequence[SizeResult], server: str) -> None:
    smallest = median(results[0].claim_ms)
    rows = []
    for r in results:
        claim, base = median(r.claim_ms), median(r.baseline_ms)
        rows.append(
            [
                f"{r.size:,}",
                f"{r.pending:,}",
                f"{claim:.1f}",
                f"{percentile(r.claim_ms, 90):.1f}",
                f"{claim / smallest:.2f}x",
                f"{base:.1f}",
                f"{percentile(r.baseline_ms, 90):.1f}",
                f"{claim / base:.2f}x",
                f"{median(r.due_work_ms):.1f}",
                f"{r.due_windows}",
            ]
        )
    runs = len(results[0].claim_ms)
    print_table(
        f"Claim up to {max(r.claimed for r in results):,} candidates (ms; median and p90 of {runs} runs)",
        [
            "entities",
            "pending",
            "claim med",
            "claim p90",
            f"vs {results[0].size:,}",
            "baseline med",
            "baseline p90",
            "claim / baseline",
            "due_work med",
            "due windows",
        ],
        rows,
        caption=f"{server}\nmix: {MIX}",
    )
    largest = results[-1]
    claim = median(largest.claim_ms)
    growth = claim / smallest
    console.print(
        f"Claim at {largest.size:,} entities: [bold]{claim:.1f} ms[/bold] median, "
        f"{verdict(claim <= TARGET_MS)} target <= {TARGET_MS:.0f} ms; "
        f"{growth:.2f}x the {results[0].size:,} figure, "
        f"{verdict(growth <= TARGET_GROWTH)} target <= {TARGET_GROWTH:.0f}x"
    )


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, not {text!r}") from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError("--sizes needs at least one positive size")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[10_000, 100_000, 1_000_000],
        help="table sizes, comma-separated (default 10000,100000,1000000)",
    )
    parser.add_argument("--limit", type=int, default=1_000, help="candidates per claim (default 1000)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per size (default 15)")
    parser.add_argument("--warmups", type=int, default=2, help="untimed repetitions first (default 2)")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.repeats < 1 or args.warmups < 0:
        parser.error("--limit and --repeats must be positive, --warmups not negative")

    results: list[SizeResult] = []
    plans: list[Plans] = []
    with bench_database() as url:
        store = FactStore.from_url(url)
        store.migrate()
        server = describe_server(store.engine)
        current = 0
        for size in args.sizes:
            with console.status(f"filling entities to {size:,}"):
                seconds = grow_to(store.engine, current, size)
            console.print(
                f"filled {size - current:,} entities in {seconds:.1f} s "
                f"({(size - current) / seconds:,.0f} rows/s, incl. ANALYZE)"
            )
            current = size
            pending = count_pending(store.engine)
            with console.status(f"claiming at {size:,} entities"):
                results.append(measure(store, size, pending, args.limit, args.repeats, args.warmups))
                plans.append(explain_claims(store, size, args.limit))
        store.dispose()
    report(results, server)
    show_plans(plans)


if __name__ == "__main__":
    main()
