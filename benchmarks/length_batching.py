"""Length-grouped batching (not a test): `python benchmarks/length_batching.py`.

In-process, MiniLM, texts cut at 256 tokens, traffic of 80 % short texts (10-30 words) and 20 %
long ones (150-300 words) in random order, batches of 32 as a worker receives them. Compares a
forward pass padded to each arriving batch's longest text with `predict`, which groups each
batch's texts by length into passes within a padded-token budget (model/ctt.py). Rounds are interleaved; medians reported. Writes
benchmarks/results/length_batching.json.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402

from benchmarks.learn import model_with_tasks  # noqa: E402
from benchmarks.serve import WORDS  # noqa: E402
from model.backbone import load_backbone  # noqa: E402

BATCH = 32
ROUNDS = 5


def mixed_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300) if rng.random() < 0.2 else rng.randint(10, 30)))
            for _ in range(count)]


def padded_to_longest(model, texts, tasks) -> None:
    for start in range(0, len(texts), BATCH):
        model.logits(texts[start:start + BATCH], tasks[start:start + BATCH])


def grouped(model, texts, tasks) -> None:
    for start in range(0, len(texts), BATCH):
        model.predict(texts[start:start + BATCH], tasks[start:start + BATCH], batch_size=BATCH)


def main() -> None:
    torch.set_num_threads(2)
    model = model_with_tasks(load_backbone("minilm"), 5, max_length=256)
    texts = mixed_texts(256, seed=4)
    tasks = [f"task{i % 5}" for i in range(len(texts))]
    timings: dict[str, list[float]] = {"padded to the longest": [], "grouped by length, token budget": []}
    for _ in range(ROUNDS):
        for name, run in (("padded to the longest", padded_to_longest), ("grouped by length, token budget", grouped)):
            started = time.perf_counter()
            run(model, texts, tasks)
            timings[name].append(len(texts) / (time.perf_counter() - started))
    medians = {name: statistics.median(rates) for name, rates in timings.items()}
    base = medians["padded to the longest"]
    rows = [[name, rate, rate / base] for name, rate in medians.items()]
    print_table(["forward", "texts/s (median)", "ratio"], rows)
    save("length_batching", {"machine": machine(), "max_length": 256, "batch": BATCH, "rounds": ROUNDS,
                             "texts_per_s": timings, "median_texts_per_s": medians,
                             "ratio": medians["grouped by length, token budget"] / base})


if __name__ == "__main__":
    main()
