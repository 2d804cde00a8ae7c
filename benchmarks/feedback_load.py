"""Feedback under load (not a test): `python benchmarks/feedback_load.py`.

A feedback table of 2 M rows (90 days of four tasks, three served versions, both sources); then,
at once, 30 threads asking for the stats (what `GET /feedback/stats` runs) and 8 threads storing
8 rows a request (what `POST /feedback` runs), for a fixed time, on SQLite and on a real
PostgreSQL (Debian's, as for the tests). Each call's outcome is what the route answers:
200, 503 (FeedbackUnavailable: the route adds Retry-After) or 500 (any other exception: the
route has no answer for it).

The load drives ``FeedbackEndpoint``, the object the routes call, with threads in one process:
one worker with its own connection pool (CTT_DB_TIMEOUT_S 5 s), as a BentoML worker runs the
routes in its thread pool. Not over HTTP: the routes are being rewritten for credentials, and
HTTP would add the same cost to every variant. Each thread waits ``--think-ms`` (1 ms) between its
calls, about a client's round trip, so that a cached answer cannot spin one thread at full speed.
The writers send reviews with a reviewer's credential (on main, which has none, without).

Variants, each on its own copy of the same 2 M rows:

- ``main``: the feedback code of ``--baseline-ref`` (``git archive``; by default the landing
  before issue 20): stats scan the rows;
- ``main-cached``: the same, with each worker caching the stats document for 10 s (one refresh
  at a time): the alternative of a short-lived cache with a stated staleness;
- ``counts``: this tree: stats read the counts kept in the same transaction as the rows
  (model/feedback/counts.py); the migration that fills them from the 2 M rows is timed.

Writes benchmarks/results/feedback_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from benchmarks.common import machine, print_table, save  # noqa: E402

VARIANTS = ("main", "main-cached", "counts")
TASKS = ("topic", "sentiment", "intent", "language")
ROWS_PER_REQUEST = 8
CACHE_S = 10.0
DAYS = 90


# ----- the child: one variant against one database ----------------------------------------
def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_variant(variant: str, url: str, seconds: float, readers: int, writers: int, think_s: float) -> dict:
    """Import the feedback code (this tree's or main's, whichever is first on sys.path) and load it."""
    import inspect
    from types import SimpleNamespace

    from model.feedback.database import FeedbackDatabase, FeedbackItem, FeedbackUnavailable

    try:  # where the feedback endpoint lives since issue 18's HTTP runtime took it in
        from model.serving.feedback import FeedbackEndpoint, FeedbackMetrics
    except ImportError:  # the baseline's layout
        from model.feedback.api import FeedbackMetrics
        from model.feedback.endpoint import FeedbackEndpoint

    database = FeedbackDatabase(url, timeout_s=5.0)
    started = time.perf_counter()
    revision = database.migrate()
    migrate_s = time.perf_counter() - started
    endpoint = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:bench", {task: 0.9 for task in TASKS})
    reviewer = SimpleNamespace(id="key:bench-reviewer", permissions=frozenset({"classify", "feedback", "review"}))
    credential = {"principal": reviewer} if "principal" in inspect.signature(endpoint.store).parameters else {}
    stats = endpoint.stats
    if variant == "main-cached":
        cached: dict = {}
        refresh = threading.Lock()

        def stats(since):  # noqa: F811  (the cached variant's stats)
            if cached and time.monotonic() - cached["at"] < CACHE_S:
                return cached["document"]
            with refresh:  # one refresh at a time; the others wait for it and take its document
                if not cached or time.monotonic() - cached["at"] >= CACHE_S:
                    cached.update(document=endpoint.stats(since), at=time.monotonic())
                return cached["document"]

    started = time.perf_counter()
    endpoint.stats(None)
    stats_alone_s = time.perf_counter() - started

    outcomes = {"stats": Counter(), "write": Counter()}
    latencies: dict[str, list[float]] = {"stats": [], "write": []}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    written = [0]

    def call(kind: str, function) -> None:
        began = time.perf_counter()
        try:
            function()
            outcome = "200"
        except FeedbackUnavailable:
            outcome = "503"
        except Exception as exc:  # what the route cannot answer: a 500
            outcome = f"500 {type(exc).__name__}"
        with lock:
            outcomes[kind][outcome] += 1
            latencies[kind].append(time.perf_counter() - began)

    def reader() -> None:
        while time.monotonic() < deadline:
            call("stats", lambda: json.dumps(stats(None)))  # the route encodes the document
            time.sleep(think_s)

    def writer(number: int) -> None:
        sequence = 0
        while time.monotonic() < deadline:
            sequence += 1
            batch = [FeedbackItem(f"writer {number} request {sequence} row {i}: the bank cut its rates again", "topic",
                                  ("money", "sport")[i % 2], prediction=("money", "sport")[(i // 3) % 2],
                                  source="review" if i % 4 == 0 else "correction", id=f"w{number}-{sequence}-{i}")
                     for i in range(ROWS_PER_REQUEST)]

            def store(batch=batch) -> None:
                endpoint.store(batch, **credential)
                with lock:
                    written[0] += len(batch)

            call("write", store)
            time.sleep(think_s)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    threads += [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started

    total = database.count()
    counted = sum(task["rows"] for task in endpoint.stats(None)["tasks"])
    database.close()
    summary = {"variant": variant, "revision": revision, "migrate_s": round(migrate_s, 2),
               "stats_alone_ms": round(1000 * stats_alone_s, 1), "seconds": round(elapsed, 1),
               "rows_at_end": total, "stats_rows_at_end": counted, "rows_written_per_s": round(written[0] / elapsed, 1)}
    for kind in ("stats", "write"):
        values = latencies[kind]
        summary[kind] = {"calls": len(values), "outcomes": dict(outcomes[kind]),
                         "p50_ms": round(1000 * statistics.median(values), 1) if values else None,
                         "p99_ms": round(1000 * percentile(values, 0.99), 1) if values else None,
                         "max_ms": round(1000 * max(values), 1) if values else None}
    return summary


# ----- the parent: databases, seeding, one child process per variant ------------------------
def seed_sql(dialect: str, first: int, last: int) -> str:
    """Rows first..last (numbers) over the last DAYS days, in the columns of migration 0001."""
    task = "CASE i % 4 " + " ".join(f"WHEN {n} THEN '{name}'" for n, name in enumerate(TASKS)) + " END"
    label = "CASE WHEN i % 2 = 0 THEN 'money' ELSE 'sport' END"
    # A fifth without the served prediction; of the rest, one in eight disagrees with the label.
    prediction = f"CASE WHEN i % 5 = 0 THEN NULL WHEN i % 8 = 1 THEN 'money' ELSE {label} END"
    values = (f"'seed-' || i, {task}, 'seeded text number ' || i || ' about rates, goals and the weather', "
              f"{label}, {prediction}, CASE WHEN i % 4 = 0 THEN 'review' ELSE 'correction' END, NULL, "
              f"'ctt:v' || (i % 3)")
    minutes = DAYS * 24 * 60
    columns = "key, task, text, label, prediction, source, request_id, model_tag, created_at"
    if dialect == "sqlite":
        return (f"INSERT INTO ctt_feedback ({columns}) "
                f"WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i < {last}) "
                f"SELECT {values}, strftime('%Y-%m-%d %H:%M:%S', 'now', '-' || (i % {minutes}) || ' minutes') "
                f"|| '.000000' FROM n")
    return (f"INSERT INTO ctt_feedback ({columns}) "
            f"SELECT {values}, (now() at time zone 'utc') - (i % {minutes}) * interval '1 minute' "
            f"FROM generate_series({first}, {last}) AS i")


def seed(url: str, rows: int) -> float:
    """An empty database at migration 0001 filled with ``rows`` rows; returns the seconds taken."""
    from sqlalchemy import text

    from model.feedback.database import FeedbackDatabase, is_sqlite

    database = FeedbackDatabase(url, timeout_s=600)
    started = time.perf_counter()
    database.migrate("0001")
    dialect = "sqlite" if is_sqlite(url) else "postgresql"
    chunk = 250_000
    for first in range(1, rows + 1, chunk):
        with database.engine.begin() as connection:
            if dialect == "postgresql":
                connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text(seed_sql(dialect, first, min(rows, first + chunk - 1))))
        print(f"  seeded {min(rows, first + chunk - 1):,} rows", flush=True)
    with database.engine.begin() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)" if dialect == "sqlite" else "ANALYZE"))
    database.close()
    return time.perf_counter() - started


def main_code(folder: Path, ref: str) -> Path:
    """The ``model`` package of ``ref`` (git archive), to import instead of this tree's."""
    target = folder / f"code-{ref.replace('/', '-')}"
    target.mkdir()
    archive = subprocess.run(["git", "archive", ref, "model"], cwd=PROJECT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_child(variant: str, url: str, code: Path | None, args, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--url", url, "--seconds", str(args.seconds),
               "--readers", str(args.readers), "--writers", str(args.writers), "--think-ms", str(args.think_ms),
               "--out", str(out)]
    if code is not None:
        command += ["--code", str(code)]
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: the child failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--readers", type=int, default=30)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--think-ms", type=float, default=1.0, help="each thread's pause between its calls")
    parser.add_argument("--databases", nargs="*", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    # The landing before issue 20: stats scanned the rows.
    parser.add_argument("--baseline-ref", default="03fcb21", help="the git ref whose feedback code is 'today's'")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.code:
            sys.path.insert(0, args.code)
        result = run_variant(args.child, args.url, args.seconds, args.readers, args.writers, args.think_ms / 1000)
        Path(args.out).write_text(json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="ctt-feedback-load-"))
    baseline = main_code(work, args.baseline_ref) if {"main", "main-cached"} & set(args.variants) else None
    results = []
    for name in args.databases:
        print(f"{name}: seeding {args.rows:,} rows", flush=True)
        if name == "sqlite":
            template = work / "template.sqlite3"
            seed_s = seed(f"sqlite:///{template}", args.rows)

            def copy(variant: str) -> str:
                target = work / f"{variant}.sqlite3"
                shutil.copy(template, target)
                return f"sqlite:///{target}"

            postgres = None
        else:
            from deploy.local_postgres import start_postgres

            postgres = start_postgres()
            template_url = postgres.create_database("feedback_template")
            seed_s = seed(template_url, args.rows)

            def copy(variant: str) -> str:
                return postgres.create_database(f"feedback_{variant.replace('-', '_')}", template="feedback_template")

        try:
            for variant in args.variants:
                url = copy(variant)
                print(f"{name}: {variant}: {args.readers} stats readers beside {args.writers} writers for "
                      f"{args.seconds:g} s", flush=True)
                result = run_child(variant, url, baseline if variant.startswith("main") else None, args,
                                   work / f"{name}-{variant}.json")
                results.append({"database": name, "seed_s": round(seed_s, 1), **result})
                print(json.dumps(results[-1]), flush=True)
        finally:
            if postgres is not None:
                postgres.remove()

    def errors(outcomes: dict) -> str:
        failed = sorted((outcome, count) for outcome, count in outcomes.items() if outcome != "200")
        return ", ".join(f"{count} × {outcome}" for outcome, count in failed) or "-"

    print_table(["database", "variant", "stats alone ms", "stats calls", "stats p50 ms", "stats p99 ms", "stats errors",
                 "writes", "write p50 ms", "write p99 ms", "write errors", "rows/s", "migrate s"],
                [[r["database"], r["variant"], r["stats_alone_ms"], r["stats"]["calls"], r["stats"]["p50_ms"],
                  r["stats"]["p99_ms"], errors(r["stats"]["outcomes"]), r["write"]["calls"], r["write"]["p50_ms"],
                  r["write"]["p99_ms"], errors(r["write"]["outcomes"]), r["rows_written_per_s"], r["migrate_s"]]
                 for r in results])
    path = save("feedback_load", {"machine": machine(), "rows": args.rows, "readers": args.readers,
                                  "writers": args.writers, "seconds": args.seconds, "think_ms": args.think_ms,
                                  "rows_per_request": ROWS_PER_REQUEST,
                                  "cache_s": CACHE_S, "baseline_ref": args.baseline_ref, "results": results})
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
