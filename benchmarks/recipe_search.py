"""How the recipe's defaults were chosen: a few recipes on a few tasks, every epoch scored (not a test).

    python benchmarks/recipe_search.py --tasks tweet-sentiment bbc-headline-topic --recipes old new

For each task, recipe and seed it trains one module (training/recipe.py) through the whole
schedule and records, after every epoch (epoch 0 is the probe), the held-out scores and the test
accuracy, so that every selection rule (the last epoch, raw loss, temperature-scaled loss,
accuracy) can be compared on the same runs; --mixes also scores weight-space mixes of the last
epoch with the probe. Appends to benchmarks/results/continual-recipe.json; --summary prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, isolated_bentoml_home  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402

from model.backbone import load_backbone  # noqa: E402
from model.ctt import ContinualTinyTransformer  # noqa: E402
from model.registry import ModelConfig  # noqa: E402
from training import recipe  # noqa: E402
from training.corpora import make_tasks  # noqa: E402
from training.data import label_set, stratified_split  # noqa: E402
from training.learn import LearnSettings  # noqa: E402
from training.settings import DEFAULT_MAX_LENGTH  # noqa: E402

RECIPES = {
    # what `ctt learn` did before: one learning rate, constant, raw held-out loss
    "old": dict(learning_rate=3e-3, head_learning_rate=3e-3, warmup=None, vector_pull=0.0),
    "new": dict(learning_rate=1e-2, head_learning_rate=1e-3, warmup=0.1, vector_pull=0.0),
    "fast": dict(learning_rate=3e-2, head_learning_rate=1e-3, warmup=0.1, vector_pull=0.0),
    "pull": dict(learning_rate=3e-2, head_learning_rate=1e-3, warmup=0.1, vector_pull=1.0),
    "head": dict(learning_rate=1e-2, head_learning_rate=1e-2, warmup=0.1, vector_pull=0.0),
    "slow-vectors": dict(learning_rate=3e-3, head_learning_rate=1e-3, warmup=0.1, vector_pull=0.0),
    "slow-head": dict(learning_rate=1e-2, head_learning_rate=1e-4, warmup=0.1, vector_pull=0.0),
}


def run(model, name, train, test, recipe_name, seed, epochs, mix_alphas=()):
    values = dict(RECIPES[recipe_name])
    constant = values["warmup"] is None
    values["warmup"] = 0.0 if constant else values["warmup"]
    settings = LearnSettings(backbone="minilm", epochs=epochs, patience=epochs + 1, seed=seed, progress=True,
                             **values)
    labels = label_set(train)
    fit, held_out = stratified_split(train, settings.holdout, seed)
    index = {label: i for i, label in enumerate(labels)}
    targets = torch.tensor([index[e.label] for e in test])
    test_accuracy = []

    held_targets = torch.tensor([index[e.label] for e in held_out])
    states = {}  # the probe's (epoch 0) and the latest epoch's, for the mixes

    def on_epoch(epoch, module):
        logits = recipe.held_out_logits(model, module, test)
        test_accuracy.append(int((logits.argmax(-1) == targets).sum()) / len(test))
        if mix_alphas:
            states["probe" if epoch == 0 else "last"] = copy.deepcopy(module.state_dict())

    original = recipe.lr_lambda
    if constant:
        recipe.lr_lambda = lambda total, warmup: (lambda step: 1.0)
    started = time.perf_counter()
    try:
        trained, info = recipe.train_task_module(model, labels, fit, held_out, settings, on_epoch=on_epoch)
    finally:
        recipe.lr_lambda = original
    history = info["history"]
    for row, acc in zip(history, test_accuracy):
        row["test_accuracy"] = acc
    # Weight-space mixes of the last epoch with the probe (epoch 0), WiSE-FT style: every
    # parameter at (1 - alpha) * probe + alpha * trained.
    mixes = []
    module = copy.deepcopy(trained)
    for alpha in mix_alphas:
        module.load_state_dict({k: (1 - alpha) * states["probe"][k] + alpha * states["last"][k]
                                for k in states["probe"]})
        held = recipe.score(recipe.held_out_logits(model, module, held_out), held_targets)
        logits = recipe.held_out_logits(model, module, test)
        mixes.append({"alpha": alpha, **held.__dict__,
                      "test_accuracy": int((logits.argmax(-1) == targets).sum()) / len(test)})
    picked = {"last": {"epoch": history[-1]["epoch"], "test_accuracy": history[-1]["test_accuracy"]}}
    for rule in ("loss", "calibrated-loss", "accuracy"):
        best = max(history, key=lambda r: recipe.Score(r["accuracy"], r["loss"], r["calibrated_loss"]).key(rule))
        picked[rule] = {"epoch": best["epoch"], "test_accuracy": best["test_accuracy"]}
    return {"task": name, "recipe": recipe_name, "seed": seed, "seconds": time.perf_counter() - started,
            "history": history, "picked": picked, "mixes": mixes}


def summary(runs: list[dict]) -> None:
    """Per recipe and selection rule: test accuracy minus the probe's, per task (mean over seeds)
    and over tasks. ("last" is the last epoch before recipe.py's sign-test guard, which can only
    fall back to the probe where the held-out slice shows the last epoch clearly worse.)"""
    by: dict = {}
    for r in runs:
        probe = r["history"][0]["test_accuracy"]
        for rule, chosen in r["picked"].items():
            recipe_split = f"{r['recipe']}/split {r.get('split_seed', 0)}"
            by.setdefault(recipe_split, {}).setdefault(rule, {}).setdefault(r["task"], []).append(
                chosen["test_accuracy"] - probe)
    for recipe_name, rules in by.items():
        for rule, tasks in rules.items():
            means = {task: 100 * sum(v) / len(v) for task, v in tasks.items()}
            print(f"{recipe_name:20s} {rule:15s} mean over tasks {sum(means.values()) / len(means):+5.2f}  "
                  + "  ".join(f"{task} {m:+.1f} (n={len(tasks[task])})" for task, m in means.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["tweet-sentiment", "bbc-headline-topic"])
    parser.add_argument("--recipes", nargs="+", default=["old", "new"])
    parser.add_argument("--train-limit", type=int, default=500)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mixes", type=float, nargs="*", default=[],
                        help="also score weight-space mixes of the last epoch with the probe at these alphas")
    parser.add_argument("--out", default=str(RESULTS / "continual-recipe.json"))
    parser.add_argument("--split-seed", type=int, default=0,
                        help="which split of the corpora into train and test documents (the continual benchmark uses 0)")
    parser.add_argument("--summary", action="store_true", help="print the saved runs' summary, run nothing")
    args = parser.parse_args()
    if args.summary:
        summary(json.loads(Path(args.out).read_text())["runs"])
        return

    model = ContinualTinyTransformer(load_backbone("minilm"), ModelConfig(max_length=args.max_length))
    tasks = make_tasks(tuple(args.tasks), args.train_limit, args.test_limit, seed=args.split_seed)
    out = Path(args.out)
    results = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [(seed, name, recipe_name) for seed in args.seeds for name in tasks for recipe_name in args.recipes]
    for seed, name, recipe_name in runs:
        result = run(model, name, *tasks[name], recipe_name, seed, args.epochs, args.mixes)
        result["max_length"] = args.max_length
        result["split_seed"] = args.split_seed
        results.append(result)
        curve = " ".join(f"{r['test_accuracy']:.3f}" for r in result["history"])
        mixes = " ".join(f"a{m['alpha']:g} {m['test_accuracy']:.3f}" for m in result["mixes"])
        print(f"{name:22s} {recipe_name:5s} seed {seed} {result['seconds']:6.0f}s test by epoch: {curve}  "
              f"{'mixes: ' + mixes + '  ' if mixes else ''}picked: "
              + ", ".join(f"{k}→e{v['epoch']} {v['test_accuracy']:.3f}" for k, v in result["picked"].items()),
              flush=True)
        out.write_text(json.dumps({"runs": results}, indent=1))

if __name__ == "__main__":
    main()
