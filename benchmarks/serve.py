"""Serving benchmark (not a test): `make bench` or `python benchmarks/serve.py`.

Side by side, in one run, on loopback only, with the default MiniLM backbone and texts of 20-60
tokens (one text per request):
  - in-process batched forward rate of the same model: the practical ceiling on this CPU;
  - the BentoML service under closed-loop load at several concurrencies (throughput, p50/p95/p99);
  - a plain FastAPI + uvicorn server running the model once per request (benchmarks/plain_server.py);
  - the service with traffic on 1 task and spread over 50 tasks.
Every load level is bounded in time. Writes benchmarks/results/serve.json and serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import httpx  # noqa: E402
import torch  # noqa: E402

from benchmarks.learn import model_with_tasks  # noqa: E402
from model.backbone import load_backbone  # noqa: E402
from model.store import register_version  # noqa: E402
from deploy.local import bentoml_serve, free_port, server_process  # noqa: E402

MODEL_NAME = "ctt-bench"
WORDS = ("the government said on monday that shares in the bank rose after the striker scored twice "
         "while the film won awards and the new phone sold well in the shops despite higher prices").split()


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(18, 55))) for _ in range(count)]


def register_bench_model(task_count: int) -> None:
    model = model_with_tasks(load_backbone("minilm"), task_count)
    os.environ["CTT_MODEL_NAME"] = MODEL_NAME
    register_version(model, eval_sets=[[] for _ in model.tasks], metadata={"benchmark": True}, labels={"stage": "benchmark"})


def in_process_rate(task_count: int, seconds: float, threads: int, batch_size: int = 32) -> float:
    torch.set_num_threads(threads)
    model = model_with_tasks(load_backbone("minilm"), task_count)
    pool = texts(512, seed=1)
    done, started, i = 0, time.perf_counter(), 0
    with torch.inference_mode():
        while time.perf_counter() - started < seconds:
            batch = [pool[(i + j) % len(pool)] for j in range(batch_size)]
            model.logits(batch, [f"task{(i + j) % task_count}" for j in range(batch_size)])
            done, i = done + batch_size, i + batch_size
    return done / (time.perf_counter() - started)


async def closed_loop(url: str, concurrency: int, seconds: float, tasks: int, max_requests: int) -> dict:
    pool = texts(512, seed=2)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < stop_at and len(latencies) + errors < max_requests:
            body = {"items": [{"text": pool[i % len(pool)], "task": f"task{i % tasks}"}]}
            started = time.perf_counter()
            response = await client.post(f"{url}/classify", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await client.post(f"{url}/classify", json={"items": [{"text": pool[0], "task": "task0"}]})  # warm
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"concurrency": concurrency, "tasks": tasks, "requests": len(latencies), "errors": errors,
            "throughput": len(latencies) / elapsed, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan")}


def load_levels(url: str, label: str, levels: list[int], seconds: float, tasks: int, max_requests: int) -> list[dict]:
    rows = []
    for concurrency in levels:
        row = {"server": label, **asyncio.run(closed_loop(url, concurrency, seconds, tasks, max_requests))}
        print(f"{label:>22} c={concurrency:<3} tasks={tasks:<3} {row['throughput']:7.1f} req/s "
              f"p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:7.1f} ms errors {row['errors']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for server in sorted({r["server"] for r in rows}):
        points = [r for r in rows if r["server"] == server]
        axes.plot([p["throughput"] for p in points], [p["p99_ms"] for p in points], marker="o", label=f"{server} p99")
        axes.plot([p["throughput"] for p in points], [p["p50_ms"] for p in points], marker=".", linestyle="--",
                  label=f"{server} p50")
        for p in points:
            axes.annotate(f"c={p['concurrency']}", (p["throughput"], p["p99_ms"]), fontsize=7)
    axes.set_xlabel("throughput (requests/s, one text each)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title("Latency against throughput, closed-loop load")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="per load level")
    parser.add_argument("--max-requests", type=int, default=5000, help="per load level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    # One single-threaded worker per core measured best here (2 cores: 0.85 of the in-process rate,
    # against 0.68 for one worker with two threads).
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="BentoML workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()

    register_bench_model(50)
    ceiling = in_process_rate(50, args.seconds, threads=args.threads * args.workers)
    print(f"in-process batched forward: {ceiling:.1f} sequences/s", file=sys.stderr, flush=True)

    # Random task modules and no accuracy record: served in fp32, said explicitly (benchmarks/peers.py
    # measures int8).
    env = {"CTT_MODEL_NAME": MODEL_NAME, "CTT_PRECISION": "fp32", "CTT_WORKERS": str(args.workers),
           "CTT_TORCH_THREADS": str(args.threads),
           "API_KEY": "", "JWT_SECRET": "", "LOG_LEVEL": "WARNING", "CTT_MAX_BATCH_SIZE": "32"}
    rows = []
    with bentoml_serve(env=env) as url:
        rows += load_levels(url, "bentoml (1 task)", args.levels, args.seconds, 1, args.max_requests)
        rows += load_levels(url, "bentoml (50 tasks)", [32], args.seconds, 50, args.max_requests)
    port = free_port()
    plain = [sys.executable, str(Path(__file__).with_name("plain_server.py")), "--port", str(port)]
    with server_process(plain, port, env={**env, "CTT_TORCH_THREADS": str(args.threads * args.workers)}) as url:
        rows += load_levels(url, "fastapi per-request", [level for level in args.levels if level <= 32],
                            args.seconds, 1, args.max_requests)

    print()
    print_table(["server", "concurrency", "tasks", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
                [[r["server"], r["concurrency"], r["tasks"], r["throughput"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
                  r["errors"]] for r in rows])

    def find(server: str, concurrency: int) -> dict:
        return next(r for r in rows if r["server"] == server and r["concurrency"] == concurrency)

    saturation = max(r["throughput"] for r in rows if r["server"] == "bentoml (1 task)")
    ratios = {
        "saturation / in-process (target >= 0.80)": saturation / ceiling,
        "bentoml / fastapi at c=32 (target >= 1.5)": find("bentoml (1 task)", 32)["throughput"] / find("fastapi per-request", 32)["throughput"],
        "50-task / 1-task at c=32 (target >= 0.90)": find("bentoml (50 tasks)", 32)["throughput"] / find("bentoml (1 task)", 32)["throughput"],
        "p99 at c=8, ms (target < 200)": find("bentoml (1 task)", 8)["p99_ms"],
    }
    print(f"\nin-process ceiling {ceiling:.1f} sequences/s ({args.threads * args.workers} threads)")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    document = {"machine": machine(), "workers": args.workers, "threads": args.threads,
                "in_process_sequences_per_second": ceiling, "rows": rows, "ratios": ratios}
    print(f"\nwrote {save('serve', document)}")
    plot(rows, RESULTS / "serve.png")
    print(f"wrote {RESULTS / 'serve.png'}")


if __name__ == "__main__":
    main()
