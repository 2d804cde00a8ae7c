"""How each task's scores are calibrated: the candidates compared on the continual benchmark's task-seeds.

    python benchmarks/calibration.py                   (the 8 tasks × 3 seeds' modules, 200 / 200)
    python benchmarks/calibration.py --quick           (the quick suite's 4 tasks, 1 seed, 80 / 100)
    python benchmarks/calibration.py --from-continual  (reads benchmarks/results/continual[-quick].json)

Per task-seed it needs the held-out logits a version's calibration is fitted on (the module never
trained on them) and the raw logits of the test set. By default they come from the modules `ctt
learn` would train (benchmarks/task_modules.py, cached; the same ones benchmarks/fast_path.py
measures), in fp32; with --from-continual, from what benchmarks/continual.py kept. Each candidate is fitted on the held-out logits and judged on the test set by the ECE of
its top label (15 equal-width bins; training/calibration.py), as the mean over task-seeds and
pooled over every test example, with 95 % bootstrap intervals over test examples:

- none: the module's raw scores;
- temperature (kept): the held-out likelihood's temperature, at least 1 (training/calibration.py);
- temperature, free: the same without the lower bound;
- temperature with a prior: a log-normal prior on T around the median temperature of the *other*
  tasks (leave-one-task-out, so no task is judged with a prior fitted on it), width 0.5 in ln T;
- vector scaling: a scale and an offset per class (L2-regularised towards the identity); it can
  change labels, so the accuracy it moves is reported beside it;
- temperature fitted on the test set itself: not a method, the best any single temperature does.
Writes benchmarks/results/calibration[-quick].json and a reliability diagram (.png) of the raw and kept scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, print_table, save  # noqa: E402

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from training.calibration import (MAX_TEMPERATURE, bootstrap_interval, ece_floor, ece_of,  # noqa: E402
                                  fit_temperature, probabilities, reliability, top_label)


def vector_scaling(logits: torch.Tensor, targets: torch.Tensor, l2: float = 1.0):
    width = logits.shape[1]
    scale = torch.ones(width, dtype=torch.double, requires_grad=True)
    offset = torch.zeros(width, dtype=torch.double, requires_grad=True)
    optimiser = torch.optim.LBFGS([scale, offset], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = (F.cross_entropy(logits.double() * scale + offset, targets, reduction="sum")
                + l2 * ((scale - 1).pow(2).sum() + offset.pow(2).sum()))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return lambda z: torch.softmax(z.double() * scale.detach() + offset.detach(), -1)


def task_seeds(document: dict) -> list[dict]:
    rows = []
    for seed, info in enumerate(document["ctt"]):
        for name in document["tasks"]:
            scores = info["scores"][name]
            rows.append({"task": name, "seed": seed,
                         "held_logits": torch.tensor(scores["held_out"]["logits"]),
                         "held_targets": torch.tensor(scores["held_out"]["targets"]),
                         "logits": torch.tensor(scores["logits"]), "targets": torch.tensor(scores["targets"])})
    return rows


def task_seeds_from_modules(quick: bool, seeds: int) -> list[dict]:
    from benchmarks.task_modules import model_of, suite, trained_tasks
    from training.evaluate import task_logits

    names, seed_list, train_limit, test_limit = suite(quick, seeds)
    rows = []
    for seed, tasks in trained_tasks(names, seed_list, train_limit, test_limit).items():
        model = model_of(tasks)
        for task in tasks:
            held_logits, held_targets = task_logits(model, task.name, task.held_out, calibrated=False)
            logits, targets = task_logits(model, task.name, task.test, calibrated=False)
            # task_logits runs in inference mode; vector scaling fits with autograd on copies.
            rows.append({"task": task.name, "seed": seed, "held_logits": held_logits.clone(),
                         "held_targets": held_targets.clone(), "logits": logits.clone(), "targets": targets.clone()})
    return rows


def candidates(rows: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Per candidate, each task-seed's test probabilities."""
    free = {id(row): fit_temperature(row["held_logits"], row["held_targets"], lowest=1 / MAX_TEMPERATURE) for row in rows}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "none", "temperature (kept)", "temperature, free", "temperature with a prior", "vector scaling",
        "temperature fitted on the test set")}
    for row in rows:
        logits = row["logits"]
        out["none"].append(probabilities(logits))
        out["temperature (kept)"].append(probabilities(logits, fit_temperature(row["held_logits"], row["held_targets"])))
        out["temperature, free"].append(probabilities(logits, free[id(row)]))
        others = sorted(math.log(free[id(other)]) for other in rows if other["task"] != row["task"])
        centre = others[len(others) // 2] if others else 0.0
        out["temperature with a prior"].append(probabilities(logits, _map_temperature(row, centre, 0.5)))
        out["vector scaling"].append(vector_scaling(row["held_logits"], row["held_targets"])(logits))
        out["temperature fitted on the test set"].append(
            probabilities(logits, fit_temperature(logits, row["targets"], lowest=1 / MAX_TEMPERATURE)))
    return out


def _map_temperature(row: dict, centre: float, width: float) -> float:
    """The temperature maximising the held-out likelihood times a log-normal prior (a grid in ln T)."""
    logits, targets = row["held_logits"].double(), row["held_targets"]
    grid = [centre + step / 100 for step in range(-400, 401)]
    return math.exp(min(grid, key=lambda log_t: float(F.cross_entropy(logits / math.exp(log_t), targets, reduction="sum"))
                        + (log_t - centre) ** 2 / (2 * width ** 2)))


def judge(rows: list[dict], probabilities_by_row: list[torch.Tensor], samples: int, seed: int = 0) -> dict:
    answers = [top_label(p, row["targets"]) for p, row in zip(probabilities_by_row, rows)]
    per_row = [ece_of(*a) for a in answers]
    generator = torch.Generator().manual_seed(seed)
    means, pooled = [], []
    for _ in range(samples):
        picks = [torch.randint(len(c), (len(c),), generator=generator) for c, _ in answers]
        values = [ece_of(c[p], r[p]) for (c, r), p in zip(answers, picks)]
        means.append(sum(values) / len(values))
        pooled.append(ece_of(torch.cat([c[p] for (c, _), p in zip(answers, picks)]),
                             torch.cat([r[p] for (_, r), p in zip(answers, picks)])))
    confidence, correct = torch.cat([c for c, _ in answers]), torch.cat([r for _, r in answers])
    mean_ece, pooled_ece = sum(per_row) / len(per_row), ece_of(confidence, correct)
    return {"mean_ece": mean_ece, "mean_interval": bootstrap_interval(mean_ece, means),
            "pooled_ece": pooled_ece, "pooled_interval": bootstrap_interval(pooled_ece, pooled),
            "accuracy": float(correct.mean()), "mean_score": float(confidence.mean()),
            # What a client auto-accepting `score > 0.99` would accept wrongly.
            "wrong_answers_above_0.99": float((confidence[~correct.bool()] > 0.99).float().mean()),
            "mean_floor": sum(ece_floor(c, draws=50) for c, _ in answers) / len(answers),
            "per_task_seed": {f"{row['task']}/{row['seed']}": value for row, value in zip(rows, per_row)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--from-continual", action="store_true", help="read the logits benchmarks/continual.py kept")
    parser.add_argument("--samples", type=int, default=300, help="bootstrap resamples")
    args = parser.parse_args()
    if args.from_continual:
        name = f"continual{'-quick' if args.quick else ''}.json"
        rows = task_seeds(json.loads((RESULTS / name).read_text()))
    else:
        name = "benchmarks/task_modules.py (fp32)"
        rows = task_seeds_from_modules(args.quick, args.seeds)
    probabilities_of = candidates(rows)
    results = {method: judge(rows, probs, args.samples) for method, probs in probabilities_of.items()}
    print_table(["candidate", "mean ECE over task-seeds", "pooled ECE", "mean score", "accuracy", "ECE floor",
                 "wrong answers > 0.99"],
                [[method, f"{r['mean_ece']:.4f} [{r['mean_interval'][0]:.3f}, {r['mean_interval'][1]:.3f}]",
                  f"{r['pooled_ece']:.4f} [{r['pooled_interval'][0]:.3f}, {r['pooled_interval'][1]:.3f}]",
                  f"{r['mean_score']:.3f}", f"{r['accuracy']:.3f}", f"{r['mean_floor']:.3f}",
                  f"{100 * r['wrong_answers_above_0.99']:.1f} %"]
                 for method, r in results.items()])
    from benchmarks.continual import reliability_diagram

    diagram = {"reliability": {}, "pooled": {}}
    for kind, method in (("before", "none"), ("after", "temperature (kept)")):
        answers = [top_label(p, row["targets"]) for p, row in zip(probabilities_of[method], rows)]
        diagram["reliability"][kind] = reliability(torch.cat([c for c, _ in answers]), torch.cat([r for _, r in answers]))
        diagram["pooled"][kind] = {"ece": results[method]["pooled_ece"], "interval": results[method]["pooled_interval"]}
    png = RESULTS / f"calibration{'-quick' if args.quick else ''}.png"
    reliability_diagram(diagram, png, f"{len(rows)} task-seeds, test sets, {sum(len(r['targets']) for r in rows)} answers")
    print(f"wrote {png}")
    save(f"calibration{'-quick' if args.quick else ''}", {"source": name, "task_seeds": len(rows),
                                                          "results": results})


if __name__ == "__main__":
    main()
