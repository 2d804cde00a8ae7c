"""Fast-path candidates on the continual benchmark's tasks: agreement with fp32 per task-seed, and forward speed.

    python benchmarks/fast_path.py            (8 tasks × 3 seeds, 200 training / 200 test examples)
    python benchmarks/fast_path.py --quick    (the quick suite's 4 tasks, 1 seed, 80 / 100)

The task modules are the ones `ctt learn` would train (benchmarks/task_modules.py, cached). For each
seed one model holds every task, and every candidate serves each task's test set in passes that mix
all tasks' rows, as the service's passes do (training/evaluate.py predictions_as_served). Per
task-seed: the examples only fp32 classifies right (b) and only the candidate does (c), the accuracy
loss (b − c) / n, and whether each gate keeps the fast path: the sign test (b − c > 2·√(b + c)
refuses; model/precision.py) and the earlier half-point rule. Then forward speed: every candidate
on the same mixed-task batches of 32 test texts, one torch thread, interleaved rounds, the median
of its rate over int8-dynamic's in each round.

Candidates:
- int8-dynamic: PyTorch's dynamic quantisation of every linear layer (served before; one
  activation scale per call);
- int8-cls: the same, with the [CLS] rows quantised in a call of their own (their activations are
  2.5-4× any other token's);
- int8-rows: every row scaled to [-1, 1] before quantisation (model/precision.py: kept);
- int8-rows-asym: each row shifted and scaled to [-1, 1] (its minimum to -1), the shift added back
  after; more exact for skewed rows, two more passes over each output.
Writes benchmarks/results/fast_path[-quick].json.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import isolated_bentoml_home, machine, print_table, save  # noqa: E402

isolated_bentoml_home()

import torch  # noqa: E402
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # noqa: E402

from benchmarks.task_modules import model_of, suite, trained_tasks  # noqa: E402
from model.ctt import ContinualTinyTransformer  # noqa: E402
from model.precision import (FAST_PATH_Z, LEGACY_FAST_PATH, MAX_ACCURACY_LOSS, int8_encoder,  # noqa: E402
                             quantised_copy, worse_by_sign_test)
from model.registry import ModelConfig  # noqa: E402
from training.evaluate import predictions_as_served  # noqa: E402
from training.settings import DEFAULT_MAX_LENGTH  # noqa: E402


# ----- candidates this script defines (the served ones live in model/precision.py) ---------------
class ClsApartLinear(DynamicLinear):
    """Dynamic int8 linear layer whose first position (the [CLS] token) is quantised apart."""

    def forward(self, x):
        if x.dim() == 3 and x.shape[1] > 1:
            return torch.cat([super().forward(x[:, :1]), super().forward(x[:, 1:])], 1)
        return super().forward(x)


class RowAsymmetricLinear(DynamicLinear):
    """Each row shifted and scaled into [-1, 1]; the weights carry no bias (``row_bias``), and
    ``weight_sums`` (the row sums of the dequantised weights) add the shift back."""

    row_bias = weight_sums = None

    def forward(self, x):
        low, high = torch.aminmax(x, dim=-1, keepdim=True)
        middle = (high + low) * 0.5
        half = ((high - low) * 0.5).clamp_(min=1e-12)
        y = super().forward((x - middle) / half)
        return torch.addcmul(torch.addcmul(self.row_bias, middle, self.weight_sums), y, half)


class Candidate(ContinualTinyTransformer):
    """A model whose int8 precision runs the encoder given to ``use`` (kept out of the module tree:
    a plain list, so nn.Module does not register it as a submodule)."""

    def use(self, encoder) -> None:
        self.__dict__["_fast"] = [encoder]

    def encoder_in(self, precision: str):
        return self.encoder if precision == "fp32" else self.__dict__["_fast"][0]


def candidate_encoders(model: ContinualTinyTransformer) -> dict:
    encoder = model.encoder
    return {"fp32": encoder,
            "int8-dynamic": int8_encoder(encoder, LEGACY_FAST_PATH),
            "int8-cls": quantised_copy(encoder, ClsApartLinear),
            "int8-rows": int8_encoder(encoder, "int8-rows"),
            "int8-rows-asym": with_weight_sums(quantised_copy(encoder, RowAsymmetricLinear))}


def with_weight_sums(quantised):
    for module in quantised.modules():
        if isinstance(module, RowAsymmetricLinear):
            module.weight_sums = module.weight().dequantize().sum(1)
    return quantised


# ----- accuracy -----------------------------------------------------------------------------------
def paired(model, trained, encoder, fp32: dict) -> dict:
    model.use(encoder)
    fast = predictions_as_served(model, {task.name: task.test for task in trained}, "int8")
    out = {}
    for task in trained:
        truth = [e.label for e in task.test]
        ref = [p.label == t for p, t in zip(fp32[task.name], truth)]
        got = [p.label == t for p, t in zip(fast[task.name], truth)]
        b = sum(r and not g for r, g in zip(ref, got))
        c = sum(g and not r for r, g in zip(ref, got))
        n = len(truth)
        out[task.name] = {"examples": n, "fp32_only_right": b, "fast_only_right": c, "loss": (b - c) / n,
                          "disagree": sum(p.label != q.label for p, q in zip(fp32[task.name], fast[task.name])),
                          "kept_sign_test": not worse_by_sign_test(b, c, FAST_PATH_Z),
                          "kept_half_point": (b - c) / n <= MAX_ACCURACY_LOSS + 1e-12}
    return out


def summary(results: dict) -> dict:
    rows = [r for seed in results.values() for r in seed.values()]
    b = sum(r["fp32_only_right"] for r in rows)
    c = sum(r["fast_only_right"] for r in rows)
    kept = [r for r in rows if r["kept_sign_test"]]
    kb, kc = sum(r["fp32_only_right"] for r in kept), sum(r["fast_only_right"] for r in kept)
    n = sum(r["examples"] for r in rows)
    return {"task_seeds": len(rows), "kept_sign_test": len(kept), "kept_half_point": sum(r["kept_half_point"] for r in rows),
            "mean_loss_points": 100 * statistics.mean(r["loss"] for r in rows),
            "worst_loss_points": 100 * max(r["loss"] for r in rows),
            "disagree_per_200": 200 * sum(r["disagree"] for r in rows) / n,
            "pooled": {"fp32_only_right": b, "fast_only_right": c, "z": (b - c) / math.sqrt(b + c) if b + c else 0.0},
            "pooled_kept": {"fp32_only_right": kb, "fast_only_right": kc, "loss_points": 100 * (kb - kc) / max(1, sum(r["examples"] for r in kept)),
                            "z": (kb - kc) / math.sqrt(kb + kc) if kb + kc else 0.0}}


# ----- speed --------------------------------------------------------------------------------------
def speed(model, encoders: dict, trained, rounds: int, seed: int = 0) -> dict:
    """Forward passes per second over the same mixed-task batches, each candidate in turn, rounds
    interleaved; ratios to int8-dynamic per round, medians."""
    rng = random.Random(seed)
    rows = [(task.name, e.text) for task in trained for e in task.test]
    rng.shuffle(rows)
    batches = [rows[i:i + 32] for i in range(0, min(len(rows), 32 * 8), 32)]
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    torch.set_num_threads(1)
    with torch.inference_mode():
        for name, encoder in encoders.items():  # warm every path once
            model.use(encoder)
            model.predict([t for _, t in batches[0]], [n for n, _ in batches[0]],
                          precisions=dict.fromkeys(model.task_names, "fp32" if name == "fp32" else "int8"))
        for _ in range(rounds):
            for name, encoder in encoders.items():
                model.use(encoder)
                precisions = dict.fromkeys(model.task_names, "fp32" if name == "fp32" else "int8")
                started = time.perf_counter()
                for batch in batches:
                    model.predict([t for _, t in batch], [n for n, _ in batch], precisions=precisions)
                rates[name].append(sum(len(b) for b in batches) / (time.perf_counter() - started))
    return {name: {"texts_per_s": statistics.median(values),
                   "ratio_to_int8_dynamic": statistics.median(v / d for v, d in zip(values, rates["int8-dynamic"]))}
            for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7, help="speed rounds (interleaved)")
    parser.add_argument("--retrain", action="store_true", help="train the modules even when cached")
    args = parser.parse_args()
    names, seeds, train_limit, test_limit = suite(args.quick, args.seeds)
    started = time.perf_counter()
    trained = trained_tasks(names, seeds, train_limit, test_limit, retrain=args.retrain)
    results: dict[str, dict] = {}
    speeds = None
    for seed, tasks in trained.items():
        model = model_of(tasks, ModelConfig(max_length=DEFAULT_MAX_LENGTH), cls=Candidate)
        encoders = candidate_encoders(model)
        fp32 = predictions_as_served(model, {task.name: task.test for task in tasks}, "fp32")
        for name, encoder in encoders.items():
            if name == "fp32":
                continue
            results.setdefault(name, {})[str(seed)] = paired(model, tasks, encoder, fp32)
            line = " ".join(f"{t[:12]} {r['fp32_only_right']}/{r['fast_only_right']}"
                            for t, r in results[name][str(seed)].items())
            print(f"seed {seed} {name:15s} only fp32 / only fast right: {line}", flush=True)
        if speeds is None:
            speeds = speed(model, encoders, tasks, args.rounds)
    summaries = {name: summary(r) for name, r in results.items()}
    print()
    print_table(["candidate", "kept (sign test)", "kept (0.5 point)", "mean loss (points)", "worst", "disagree /200",
                 "pooled b/c (z)", "speed ÷ int8-dynamic"],
                [[name, f"{s['kept_sign_test']}/{s['task_seeds']}", f"{s['kept_half_point']}/{s['task_seeds']}",
                  f"{s['mean_loss_points']:+.2f}", f"{s['worst_loss_points']:+.1f}", f"{s['disagree_per_200']:.1f}",
                  f"{s['pooled']['fp32_only_right']}/{s['pooled']['fast_only_right']} ({s['pooled']['z']:+.2f})",
                  f"{speeds[name]['ratio_to_int8_dynamic']:.3f}"] for name, s in summaries.items()])
    print(f"fp32: {speeds['fp32']['ratio_to_int8_dynamic']:.3f} of int8-dynamic's rate; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    save("fast_path-quick" if args.quick else "fast_path",
         {"machine": machine(), "tasks": list(names), "seeds": list(seeds), "train": train_limit, "test": test_limit,
          "gate_z": FAST_PATH_Z, "results": results, "summary": summaries, "speed": speeds,
          "minutes": (time.perf_counter() - started) / 60})


if __name__ == "__main__":
    main()
