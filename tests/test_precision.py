"""The int8 fast path: a quantised copy of the shared encoder, per-row task scaling kept, accuracy
measured per precision, and fp32 wherever a version did not measure int8 close enough."""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import pytest
import torch

from model.backbone import load_backbone
from model.ctt import SITES, ContinualTinyTransformer, Task
from model.registry import ModelConfig
from model.precision import (MAX_ACCURACY_LOSS, MIXED_BATCH_LABEL_AGREEMENT, MIXED_BATCH_MEDIAN_DRIFT,
                             fast_path_verdicts, int8_encoder, served_precisions, warm_up_or_fall_back)
from tests.conftest import MONEY, QUESTION, SPORT, STATEMENT, TOPIC_ROWS, QUESTION_ROWS, micro_model
from training.cli import precision_report

TEXTS = SPORT + MONEY + QUESTION + STATEMENT


def three_task_model() -> ContinualTinyTransformer:
    """Three tasks with distinct, non-trivial modules on the micro backbone."""
    backbone = load_backbone("micro")
    info = backbone.info
    generator = torch.Generator().manual_seed(7)
    widths = {"key": info.hidden_size, "value": info.hidden_size, "ffn": info.intermediate_size}
    bank = {site: 1 + 0.3 * torch.randn(3, info.num_layers, widths[site], generator=generator) for site in SITES}
    bank["head_weight"] = torch.randn(3, 3, info.hidden_size, generator=generator)
    bank["head_bias"] = torch.zeros(3, 3)
    tasks = [Task("a", ["x", "y", "z"]), Task("b", ["x", "y"]), Task("c", ["x", "y", "z"])]
    bank["head_weight"][1, 2] = 0.0
    return ContinualTinyTransformer(backbone, ModelConfig(max_length=64), tasks=tasks, bank=bank)


def test_the_int8_copy_leaves_the_shared_encoder_alone_and_keeps_the_task_scaling():
    model = three_task_model()
    before = model.logits(TEXTS[:8], ["a"] * 8)
    quantised = int8_encoder(model.encoder)
    assert int8_encoder(model.encoder) is quantised, "quantised once per process, then shared"
    assert quantised is not model.encoder and quantised.embeddings is not model.encoder.embeddings
    assert quantised.embeddings.word_embeddings.weight is model.encoder.embeddings.word_embeddings.weight
    # Modules are the copy's own: training mode set on the shared encoder never reaches the copy.
    model.encoder.train()
    try:
        assert not quantised.training and not quantised.embeddings.dropout.training
    finally:
        model.encoder.eval()
    assert all(type(layer.attention.self.key) is torch.nn.Linear for layer in model.encoder.encoder.layer)
    assert torch.equal(model.logits(TEXTS[:8], ["a"] * 8), before), "fp32 changed after quantising a copy"
    int8 = model.logits(TEXTS[:8], ["a"] * 8, precision="int8")
    assert not torch.equal(int8, before) and torch.allclose(int8, before, atol=0.5)
    # The hooks survived the swap: different tasks still give different int8 logits.
    assert not torch.allclose(model.logits(TEXTS[:8], ["a"] * 8, precision="int8"),
                              model.logits(TEXTS[:8], ["c"] * 8, precision="int8"))


def test_mixed_task_batches_agree_with_rows_served_alone_in_each_precision():
    model = three_task_model()
    rng = random.Random(0)
    texts = TEXTS + [" ".join(rng.sample(TEXTS, 6)) for _ in range(10)]  # short and long rows mixed
    tasks = [rng.choice("abc") for _ in texts]
    precisions = {"a": "int8", "b": "int8", "c": "fp32"}
    mixed = model.predict(texts, tasks, precisions=precisions)
    alone = [model.predict([text], [task], precisions=precisions)[0] for text, task in zip(texts, tasks)]
    fp32 = model.predict(texts, tasks)

    drift = [max(abs(m.probabilities[k] - a.probabilities[k]) for k in a.probabilities) for m, a in zip(mixed, alone)]
    for row, task in enumerate(tasks):
        if task == "c":  # fp32 rows are exact up to float rounding, whatever shares their call
            assert drift[row] < 1e-5 and mixed[row].label == alone[row].label
    int8_rows = [row for row, task in enumerate(tasks) if task != "c"]
    assert statistics.median(drift[r] for r in int8_rows) <= MIXED_BATCH_MEDIAN_DRIFT
    agreement = sum(mixed[r].label == alone[r].label for r in int8_rows) / len(int8_rows)
    assert agreement >= MIXED_BATCH_LABEL_AGREEMENT
    # int8 rows really took the fast path: they differ from fp32, slightly.
    assert any(mixed[r].probabilities != fp32[r].probabilities for r in int8_rows)
    assert all(mixed[r].task == tasks[r] and set(mixed[r].probabilities) == set(model.task(tasks[r]).labels)
               for r in range(len(texts)))


def test_a_version_without_paired_counts_is_served_in_int8_only_within_half_a_point_of_fp32():
    record = {"accuracy": {"kept": 0.90, "edge": 0.90, "lossy": 0.90, "unmeasured": 0.90},
              "precision_accuracy": {"int8": {"kept": 0.91, "edge": 0.90 - MAX_ACCURACY_LOSS, "lossy": 0.89}}}
    tasks = ["kept", "edge", "lossy", "unmeasured"]
    assert served_precisions("int8", tasks, record) == {
        "kept": "int8", "edge": "int8", "lossy": "fp32", "unmeasured": "fp32"}
    assert served_precisions("fp32", tasks, record) == dict.fromkeys(tasks, "fp32")
    assert served_precisions("int8", tasks, {}) == dict.fromkeys(tasks, "fp32"), "an older version: fp32"
    for damaged in ({"int8": {"kept": None}}, {"int8": {"kept": "0.9"}}, {"int8": ["kept"]}, ["int8"],
                    {"int8": {"kept": float("nan")}}, {"int8": {"kept": True}}):
        broken = {"accuracy": {"kept": 0.9}, "precision_accuracy": damaged}
        assert served_precisions("int8", ["kept"], broken) == {"kept": "fp32"}, damaged
    assert served_precisions("int8", ["kept"], ["not", "a", "record"]) == {"kept": "fp32"}
    report = SimpleNamespace(accuracy=record["accuracy"], precision_accuracy=record["precision_accuracy"],
                             precision_paired={})
    assert {name: verdict["loss"] for name, verdict in precision_report(report).items()} == {
        "lossy": pytest.approx(0.01)}


def test_int8_is_refused_only_where_the_examples_fp32_and_int8_classify_differently_show_int8_worse():
    """One example in 200 no longer decides: a sign test on the discordant examples does."""
    def record(fp32_only: int, int8_only: int, n: int = 200) -> dict:
        return {"accuracy": {"t": 0.8}, "precision_accuracy": {"int8": {"t": 0.8 - (fp32_only - int8_only) / n}},
                "precision_paired": {"int8": {"t": {"examples": n, "fp32_only_right": fp32_only,
                                                    "fast_only_right": int8_only}}}}

    served = {pair: served_precisions("int8", ["t"], record(*pair))["t"]
              for pair in [(0, 0), (2, 0), (3, 1), (4, 0), (5, 0), (9, 2), (20, 10), (10, 10), (0, 7)]}
    # 2 against 0 is a 1-point loss the half-point rule refused; 5 against 0 (z = 2.24) is refused.
    assert served == {(0, 0): "int8", (2, 0): "int8", (3, 1): "int8", (4, 0): "int8", (5, 0): "fp32",
                      (9, 2): "fp32", (20, 10): "int8", (10, 10): "int8", (0, 7): "int8"}
    assert served_precisions("int8", ["t"], record(0, 0)) == {"t": "int8"}
    verdict = fast_path_verdicts(record(5, 0), "int8", ["t"])["t"]
    assert not verdict["kept"] and verdict["fp32_only_right"] == 5 and verdict["loss"] == pytest.approx(0.025)
    # Damaged counts fall back to the accuracy rule, never to int8 on no evidence.
    for damaged in ({"fp32_only_right": -1, "fast_only_right": 0}, {"fp32_only_right": "3", "fast_only_right": 0},
                    {"fp32_only_right": True, "fast_only_right": 0}, {}, None, ["counts"]):
        broken = record(0, 0)
        broken["precision_paired"]["int8"]["t"] = damaged
        broken["precision_accuracy"]["int8"]["t"] = 0.79
        assert served_precisions("int8", ["t"], broken) == {"t": "fp32"}, damaged


def test_counts_that_disagree_with_the_recorded_accuracies_or_overflow_keep_fp32():
    def record(int8_accuracy, counts) -> dict:
        return {"accuracy": {"t": 0.9}, "precision_accuracy": {"int8": {"t": int8_accuracy}},
                "precision_paired": {"int8": {"t": counts}}}

    # No discordant example, yet int8 measured 70 points lower: not one measurement.
    inconsistent = record(0.2, {"examples": 200, "fp32_only_right": 0, "fast_only_right": 0})
    assert served_precisions("int8", ["t"], inconsistent) == {"t": "fp32"}
    assert "disagree" in fast_path_verdicts(inconsistent, "int8", ["t"])["t"]["rule"]
    # No int8 accuracy at all, or counts no evaluation set could hold.
    assert served_precisions("int8", ["t"], record(None, {"examples": 200, "fp32_only_right": 0,
                                                         "fast_only_right": 0})) == {"t": "fp32"}
    for counts in ({"examples": 10 ** 400, "fp32_only_right": 10 ** 400, "fast_only_right": 0},
                   {"examples": 2, "fp32_only_right": 5, "fast_only_right": 0}):
        # Counts that cannot be are no counts: the accuracy rule decides, without an overflow.
        assert served_precisions("int8", ["t"], record(0.85, counts)) == {"t": "fp32"}
        assert served_precisions("int8", ["t"], record(0.9, counts)) == {"t": "int8"}


def test_learn_records_every_task_in_every_precision(tmp_path):
    from model.store import get_version

    with micro_model("ctt-precision", tmp_path, {"topic": TOPIC_ROWS, "question": QUESTION_ROWS}):
        record = get_version().record()
    assert set(record["precision_accuracy"]["int8"]) == {"topic", "question"}
    assert all(0.0 <= value <= 1.0 for value in record["precision_accuracy"]["int8"].values())


def test_a_fast_path_that_fails_to_warm_up_falls_back_to_fp32_but_a_broken_model_still_fails():
    calls, logged = [], []

    def int8_breaks(precisions):
        calls.append(dict(precisions))
        if "int8" in precisions.values():
            raise RuntimeError("no int8 kernels here")

    served = warm_up_or_fall_back(int8_breaks, {"a": "int8", "b": "fp32"}, logged.append)
    assert served == {"a": "fp32", "b": "fp32"} and calls[-1] == served and len(logged) == 1

    def everything_breaks(precisions):
        raise RuntimeError("the model itself is broken")

    with pytest.raises(RuntimeError):
        warm_up_or_fall_back(everything_breaks, {"a": "fp32"}, logged.append)
    with pytest.raises(RuntimeError):
        warm_up_or_fall_back(everything_breaks, {"a": "int8"}, logged.append)


def test_int8_is_measured_in_mixed_passes_as_the_service_serves_them():
    from training.data import Example
    from training.evaluate import accuracies_as_served, accuracy

    model = three_task_model()
    sets = {name: [Example(text, model.task(name).labels[i % len(model.task(name).labels)])
                   for i, text in enumerate(TEXTS[k::3])] for k, name in enumerate(model.task_names)}
    fp32 = accuracies_as_served(model, sets, "fp32")
    assert fp32 == {name: accuracy(model, name, examples) for name, examples in sets.items()}
    int8 = accuracies_as_served(model, sets, "int8")
    assert set(int8) == set(sets) and all(abs(int8[n] - fp32[n]) <= 0.2 for n in sets)


def test_the_int8_copy_follows_the_versions_fast_path_and_needs_the_scaling_hooks():
    from model.backbone import _load_micro
    from model.errors import CTTError

    model = three_task_model()
    legacy = model.with_config(ModelConfig(max_length=64, fast_path="int8-dynamic"))
    rows, dynamic = model.encoder_in("int8"), legacy.encoder_in("int8")
    assert rows is not dynamic and rows is int8_encoder(model.encoder, "int8-rows")
    assert type(rows.encoder.layer[0].attention.self.key).__name__ == "RowScaledDynamicLinear"
    assert type(dynamic.encoder.layer[0].attention.self.key).__name__ == "Linear"
    # Q, K and V scale their shared input once, in a memo of each thread's own.
    attention = rows.encoder.layer[0].attention.self
    assert attention.query.shared_input is attention.key.shared_input is attention.value.shared_input
    # An encoder copied before any model installed the scaling hooks would serve the bare backbone.
    with pytest.raises(CTTError, match="no task scaling hooks"):
        int8_encoder(_load_micro().encoder)


def test_the_fast_path_agrees_with_fp32_on_mixed_task_batches_within_the_stated_tolerance():
    model = three_task_model()
    rng = random.Random(1)
    texts = TEXTS + [" ".join(rng.sample(TEXTS, 6)) for _ in range(10)]
    tasks = [rng.choice("abc") for _ in texts]
    fp32 = model.predict(texts, tasks)
    int8 = model.predict(texts, tasks, precisions=dict.fromkeys("abc", "int8"))
    drift = [max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) for a, b in zip(fp32, int8)]
    assert statistics.median(drift) <= MIXED_BATCH_MEDIAN_DRIFT
    assert sum(a.label == b.label for a, b in zip(fp32, int8)) / len(texts) >= MIXED_BATCH_LABEL_AGREEMENT
    assert any(d > 0 for d in drift), "the int8 rows really took the fast path"
