"""Learning and multi-task forward benchmark (not a test): `make bench` or `python benchmarks/learn.py`.

Measures, with the default MiniLM backbone on this machine:
  1. seconds to learn a 1,000-example task with the default settings, evaluation (fp32 and int8) and
     registration included: short texts (BBC headlines' topic, all under 64 tokens; the target is
     under 120 s) and whole articles (BBC topic, cut at the default 128 tokens), each in a store of
     its own;
  2. bytes each task adds to the model (task module, and the version on disk);
  3. forward throughput with 1, 50 and 1,000 tasks loaded, the batch's rows spread over all of them,
     and the model's memory at each size.
Writes benchmarks/results/learn.json and learn.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402

from model.backbone import load_backbone  # noqa: E402
from model.ctt import SITES, ContinualTinyTransformer, Task  # noqa: E402
from model.registry import ModelConfig  # noqa: E402
from model.store import get_version  # noqa: E402
from training.demo import export_tasks  # noqa: E402
from training.learn import LearnSettings, learn  # noqa: E402
from training.settings import DEFAULT_MAX_LENGTH  # noqa: E402


# (task, what its texts are): short texts carry the 120 s target, long ones are reported beside.
LEARNING_TASKS = (("bbc-headline-topic", "short: headlines, under 64 tokens"),
                  ("bbc-topic", "long: whole articles, cut at max_length"))


def bench_learning(train_limit: int) -> list[dict]:
    import os

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, texts in LEARNING_TASKS:
            files = export_tasks(Path(folder), (name,), train_limit=train_limit)
            os.environ["CTT_MODEL_NAME"] = f"ctt-learn-{name}"  # a fresh lineage: no older task to re-measure
            settings = LearnSettings(progress=True)
            started = time.perf_counter()
            report = learn(name, *files[name], settings=settings)
            seconds = time.perf_counter() - started
            version = get_version(report.tag)
            rows.append({
                "task": name, "texts": texts, "examples": train_limit, "max_length": settings.max_length or DEFAULT_MAX_LENGTH,
                "seconds": seconds, "accuracy": report.accuracy[name],
                "int8_accuracy": report.precision_accuracy["int8"][name],
                "probe_accuracy": report.probe_accuracy[name], "epochs_run": report.epochs_run,
                "best_epoch": report.best_epoch, "module_parameters": report.module_parameters,
                "module_bytes": report.module_bytes, "backbone_parameters": report.backbone_parameters,
                "task_weights_file_bytes": (version.path / "tasks.safetensors").stat().st_size})
    return rows


def model_with_tasks(backbone, count: int, labels: int = 5, max_length: int = DEFAULT_MAX_LENGTH) -> ContinualTinyTransformer:
    """A model holding ``count`` tasks with random modules (speed does not depend on the values)."""
    generator = torch.Generator().manual_seed(count)
    info = backbone.info
    widths = {"key": info.hidden_size, "value": info.hidden_size, "ffn": info.intermediate_size}
    bank = {site: 1 + 0.1 * torch.randn(count, info.num_layers, widths[site], generator=generator) for site in SITES}
    bank["head_weight"] = torch.randn(count, labels, info.hidden_size, generator=generator)
    bank["head_bias"] = torch.zeros(count, labels)
    tasks = [Task(f"task{i}", [f"label{j}" for j in range(labels)]) for i in range(count)]
    return ContinualTinyTransformer(backbone, ModelConfig(max_length=max_length), max_tasks=count, tasks=tasks,
                                    bank=bank)


def model_bytes(model: ContinualTinyTransformer) -> int:
    backbone = sum(t.numel() * t.element_size() for t in model.encoder.state_dict().values())
    return backbone + model.bank_bytes()


def bench_forward(task_counts: list[int], batch_size: int, rounds: int, seconds_per_round: float) -> list[dict]:
    backbone = load_backbone("minilm")
    texts = [f"Story {i}: shares in the company rose after the chancellor's budget speech on growth "
             f"and the striker scored twice as the home side won the cup final in the rain." for i in range(batch_size)]
    models = {count: model_with_tasks(backbone, count) for count in task_counts}
    encoded = models[task_counts[0]].tokenize(texts)
    rates: dict[int, list[float]] = {count: [] for count in task_counts}
    with torch.inference_mode():
        for round_index in range(rounds):  # round-robin, so drift on a shared machine hits all alike
            for count, model in models.items():
                task_ids = torch.arange(batch_size) % count
                model(**encoded, task_ids=task_ids)  # warm-up
                done, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds_per_round:
                    model(**encoded, task_ids=task_ids)
                    done += batch_size
                rates[count].append(done / (time.perf_counter() - started))
            print(f"forward round {round_index + 1}/{rounds}: " +
                  ", ".join(f"{c} tasks {rates[c][-1]:.1f}/s" for c in task_counts), file=sys.stderr, flush=True)
    base = models[task_counts[0]]
    return [{"tasks": count, "sequences_per_second": max(rates[count]), "all_rounds": rates[count],
             "relative_to_one_task": max(rates[count]) / max(rates[task_counts[0]]),
             "model_bytes": model_bytes(model), "bank_bytes": model.bank_bytes(),
             "memory_growth_vs_one_task": model_bytes(model) / model_bytes(base) - 1.0,
             "tokens_per_sequence": int(encoded["input_ids"].shape[1])}
            for count, model in models.items()]


def plot(forward: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(row["tasks"]) for row in forward]
    left.bar(labels, [row["sequences_per_second"] for row in forward], color="#4477aa")
    left.set_xlabel("tasks loaded and mixed in each batch")
    left.set_ylabel("sequences / second")
    left.set_title("Forward throughput")
    right.bar(labels, [row["model_bytes"] / 2**20 for row in forward], color="#cc6677")
    right.set_xlabel("tasks loaded")
    right.set_ylabel("MiB (backbone + task bank)")
    right.set_title("Model memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 50, 1000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per configuration per round")
    parser.add_argument("--skip-learning", action="store_true")
    args = parser.parse_args()

    learning = None if args.skip_learning else bench_learning(args.examples)
    forward = bench_forward(args.tasks, args.batch_size, args.rounds, args.seconds)
    for row in learning or []:
        target = " (target < 120 s)" if row["texts"].startswith("short") else ""
        print(f"\nlearning a {row['examples']}-example task, {row['texts']}: {row['seconds']:.1f} s{target}, "
              f"accuracy {row['accuracy']:.4f} (int8 {row['int8_accuracy']:.4f}, probe {row['probe_accuracy']:.4f}, "
              f"epoch {row['best_epoch']} of {row['epochs_run']}); task module {row['module_parameters']} parameters = "
              f"{row['module_bytes'] / 1024:.1f} KiB "
              f"({100 * row['module_parameters'] / row['backbone_parameters']:.3f} % of the backbone)")
    print()
    print_table(["tasks", "seq/s", "vs 1 task", "model MiB", "growth vs 1 task"],
                [[r["tasks"], r["sequences_per_second"], r["relative_to_one_task"], r["model_bytes"] / 2**20,
                  f"{100 * r['memory_growth_vs_one_task']:.1f} %"] for r in forward])
    document = {"machine": machine(), "learning": learning, "forward": forward,
                "batch_size": args.batch_size}
    print(f"\nwrote {save('learn', document)}")
    plot(forward, RESULTS / "learn.png")
    print(f"wrote {RESULTS / 'learn.png'}")


if __name__ == "__main__":
    main()
