"""Feedback durability benchmark (not a test): `python benchmarks/feedback_durability.py`.

32 clients send `POST /feedback` at full speed (8 rows per request, every row with its own id) to
a real `bentoml serve`; the server is killed with SIGKILL (its whole process group, workers and
all) at random moments, several times, and restarted. A client keeps every request that got no
200 and sends it again, with the same ids, once the server is back: what a careful client does.
At the end the database is read directly and compared with what was acknowledged:

  - every row acknowledged with a 200 is present (a 200 means committed);
  - no row is present twice (ids are unique; a retry of a stored row adds nothing).

Runs on SQLite (the default file) and on a real PostgreSQL (Debian's, as for the tests). Writes
benchmarks/results/feedback_durability.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import httpx  # noqa: E402

from deploy.local import BENTOML, PROJECT, free_port, wait_ready  # noqa: E402

MODEL_NAME = "ctt-feedback-bench"
ROWS_PER_REQUEST = 8
LABELS = ("money", "sport")


def register_model(folder: Path) -> None:
    from training.learn import LearnSettings, learn

    os.environ["CTT_MODEL_NAME"] = MODEL_NAME
    rows = [(f"match {i} goal", "sport") for i in range(10)] + [(f"shares {i} fell", "money") for i in range(10)]
    train = folder / "topic.jsonl"
    train.write_text("".join(f'{{"text": "{t}", "label": "{l}"}}\n' for t, l in rows), encoding="utf-8")
    learn("topic", train, settings=LearnSettings(backbone="micro", epochs=1, progress=False))


class Server:
    """`bentoml serve` in its own process group, so SIGKILL takes the supervisor and every worker."""

    def __init__(self, env: dict, log: Path, workers: int):
        self.env = {**os.environ, **env, "CTT_MODEL_NAME": MODEL_NAME, "CTT_WORKERS": str(workers),
                    "ENVIRONMENT": "test", "API_KEY": "", "JWT_SECRET": ""}
        self.log = log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([BENTOML, "serve", "service:CTT", "--host", "127.0.0.1", "--port", str(port)],
                                            cwd=PROJECT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_ready(self.url, self.process, timeout=180)

    def kill(self) -> None:
        """SIGKILL to the supervisor and every worker at once. BentoML starts each worker in a
        session of its own, so killing the process group would leave the workers serving."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()
        psutil.wait_procs(processes, timeout=30)

    def stop(self) -> None:
        """A graceful stop (SIGTERM: BentoML stops its workers)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


class Clients:
    def __init__(self, count: int):
        self.count = count
        self.acknowledged: set[str] = set()
        self.pending: list[list[dict]] = []  # requests that got no 200: sent again later
        self.sequence = 0
        self.requests = self.failures = self.retried = 0
        self.up_seconds = 0.0
        self.rows_while_up = 0

    def next_body(self, client: int) -> list[dict]:
        if self.pending:
            self.retried += 1
            return self.pending.pop()
        self.sequence += 1
        return [{"id": f"c{client}-{self.sequence}-{i}", "text": f"client {client} request {self.sequence} row {i}",
                 "task": "topic", "label": LABELS[i % 2], "prediction": LABELS[(i // 2) % 2],
                 "source": "review" if i % 4 == 0 else "correction"} for i in range(ROWS_PER_REQUEST)]

    async def run(self, url: str, seconds: float) -> None:
        """Full speed for ``seconds`` (or until the server dies under them)."""
        stop = time.monotonic() + seconds
        started, acknowledged_before = time.monotonic(), len(self.acknowledged)

        async def client(number: int, http: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                body = self.next_body(number)
                self.requests += 1
                try:
                    response = await http.post(f"{url}/feedback", json={"items": body})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.acknowledged.update(item["id"] for item in body)
                else:
                    self.failures += 1
                    self.pending.append(body)
                    await asyncio.sleep(0.05)

        limits = httpx.Limits(max_connections=self.count)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            await asyncio.gather(*(client(n, http) for n in range(self.count)))
        self.up_seconds += time.monotonic() - started
        self.rows_while_up += len(self.acknowledged) - acknowledged_before


async def one_database(name: str, env: dict, database_url: str, kills: int, workers: int, clients_count: int,
                       log: Path, rng: random.Random) -> dict:
    server = Server(env, log, workers)
    clients = Clients(clients_count)
    kill_times = []
    for round_number in range(kills):
        server.start()
        # Kill at a random moment while every client has requests in flight.
        moment = rng.uniform(1.0, 5.0)
        kill_times.append(round(moment, 2))
        load = asyncio.create_task(clients.run(server.url, seconds=moment + 1.0))
        await asyncio.sleep(moment)
        server.kill()
        await load
        print(f"{name}: kill {round_number + 1}/{kills} after {moment:.2f} s; "
              f"{len(clients.acknowledged)} rows acknowledged, {len(clients.pending)} requests pending", flush=True)
    # The last round: no kill, until every pending request is through.
    server.start()
    await clients.run(server.url, seconds=3.0)
    while clients.pending:
        await clients.run(server.url, seconds=1.0)
    server.stop()

    from sqlalchemy import text

    from model.feedback.database import FeedbackDatabase

    database = FeedbackDatabase(database_url)
    with database.engine.connect() as connection:
        keys = [row[0] for row in connection.execute(text("SELECT key FROM ctt_feedback"))]
        texts = connection.execute(text("SELECT count(DISTINCT text) FROM ctt_feedback")).scalar()
    database.close()
    stored = set(keys)
    return {"database": name, "kills": kills, "kill_after_s": kill_times, "clients": clients_count,
            "workers": workers, "requests": clients.requests, "failed_requests": clients.failures,
            "retried_requests": clients.retried, "acknowledged_rows": len(clients.acknowledged),
            "stored_rows": len(keys), "missing_acknowledged": len(clients.acknowledged - stored),
            "stored_twice": len(keys) - len(stored) + (len(keys) - texts),
            "rows_per_s": round(clients.rows_while_up / clients.up_seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--databases", nargs="*", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ctt-feedback-bench-"))
    register_model(work)
    results = []
    for name in args.databases:
        if name == "sqlite":
            data = work / "data"
            env, url = {"CTT_DATA_DIR": str(data)}, f"sqlite:///{data / 'feedback.sqlite3'}"
            results.append(asyncio.run(one_database(name, env, url, args.kills, args.workers, args.clients,
                                                    work / f"{name}.log", rng)))
        else:
            from deploy.local_postgres import start_postgres

            postgres = start_postgres()
            try:
                url = postgres.create_database("feedback_bench")
                results.append(asyncio.run(one_database(name, {"DATABASE_URL": url}, url, args.kills, args.workers,
                                                        args.clients, work / f"{name}.log", rng)))
            finally:
                postgres.remove()
    print_table(["database", "kills", "acknowledged", "stored", "missing", "twice", "rows/s", "failed requests"],
                [[r["database"], r["kills"], r["acknowledged_rows"], r["stored_rows"], r["missing_acknowledged"],
                  r["stored_twice"], r["rows_per_s"], r["failed_requests"]] for r in results])
    path = save("feedback_durability", {"machine": machine(), "rows_per_request": ROWS_PER_REQUEST, "results": results})
    print(f"wrote {path}")
    return 0 if all(r["missing_acknowledged"] == 0 and r["stored_twice"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
