"""Calibrated scores: a temperature per task, fitted on held-out examples, stored in the version and
applied in every precision; labels never change, and tasks of older versions stay as they were."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import store
from model.backbone import load_backbone
from model.ctt import SITES, ContinualTinyTransformer, Task
from model.errors import CTTError
from model.registry import CONFIG_FILE, ModelConfig
from tests.conftest import MONEY, QUESTION, SPORT, STATEMENT
from training.calibration import (MAX_TEMPERATURE, MIN_TEMPERATURE, ece_floor, expected_calibration_error, fit_temperature,
                                  reliability)
from training.learn import HELD_OUT_LOGITS_FILE, UNCALIBRATED, learn

TEXTS = SPORT + MONEY + QUESTION + STATEMENT


def model_with_temperatures(temperatures: list[float]) -> ContinualTinyTransformer:
    """Tasks with distinct modules on the micro backbone and the given calibration temperatures."""
    backbone = load_backbone("micro")
    info = backbone.info
    count = len(temperatures)
    generator = torch.Generator().manual_seed(11)
    widths = {"key": info.hidden_size, "value": info.hidden_size, "ffn": info.intermediate_size}
    bank = {site: 1 + 0.3 * torch.randn(count, info.num_layers, widths[site], generator=generator) for site in SITES}
    bank["head_weight"] = 3 * torch.randn(count, 3, info.hidden_size, generator=generator)
    bank["head_bias"] = torch.zeros(count, 3)
    bank["temperature"] = torch.tensor(temperatures, dtype=torch.float32)
    tasks = [Task(f"t{i}", ["x", "y", "z"][: 2 + i % 2]) for i in range(count)]
    return ContinualTinyTransformer(backbone, ModelConfig(max_length=64), tasks=tasks, bank=bank)


UNCALIBRATED_MODEL = model_with_temperatures([1.0, 1.0, 1.0])


@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(min_value=MIN_TEMPERATURE, max_value=MAX_TEMPERATURE), min_size=3, max_size=3),
       st.sampled_from(["fp32", "int8"]))
def test_calibration_never_changes_a_label_in_any_precision(temperatures, precision):
    calibrated = model_with_temperatures(temperatures)
    texts = TEXTS[::2]
    tasks = [f"t{i % 3}" for i in range(len(texts))]
    precisions = dict.fromkeys(calibrated.task_names, precision)
    raw = UNCALIBRATED_MODEL.predict(texts, tasks, precisions=precisions)
    got = calibrated.predict(texts, tasks, precisions=precisions)
    assert [p.label for p in got] == [p.label for p in raw]
    for before, after, task in zip(raw, got, tasks):
        temperature = temperatures[int(task[1:])]
        # A temperature above one softens a score, below one sharpens it, and never moves the label.
        if temperature > 1 + 1e-6:
            assert after.score <= before.score + 1e-6
        elif temperature < 1 - 1e-6:
            assert after.score >= before.score - 1e-6


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_stored_temperature_is_applied_after_saving_and_loading_in_each_precision(tmp_path, precision):
    model = model_with_temperatures([2.5, 1.0, 7.0])
    model.save(tmp_path)
    loaded = ContinualTinyTransformer.load(tmp_path)
    assert loaded.bank["temperature"].tolist() == [2.5, 1.0, 7.0]
    tasks = ["t0", "t1", "t2"] * 4
    texts = TEXTS[: len(tasks)]
    raw = loaded.logits(texts, tasks, precision=precision, calibrated=False)
    calibrated = loaded.logits(texts, tasks, precision=precision)
    temperatures = torch.tensor([[2.5], [1.0], [7.0]] * 4)
    finite = torch.isfinite(raw)
    torch.testing.assert_close(calibrated[finite], (raw / temperatures).expand_as(raw)[finite])
    served = loaded.predict(texts, tasks, precisions=dict.fromkeys(loaded.task_names, precision))
    for row, prediction in enumerate(served):
        labels = loaded.task(tasks[row]).labels
        expected = torch.softmax(raw[row, : len(labels)] / temperatures[row], -1)
        assert [prediction.probabilities[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-3)


def test_the_temperature_is_the_held_out_likelihoods_and_never_sharpens():
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(4000, 3, generator=generator)
    targets = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.08)
    # Every held-out example right and far from the boundary: the likelihood alone would say T → 0.
    separable = torch.tensor([[5.0, -5.0], [-4.0, 4.0]] * 15)
    assert fit_temperature(separable, torch.tensor([0, 1] * 15)) == MIN_TEMPERATURE
    assert fit_temperature(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == MIN_TEMPERATURE


def test_ece_bins_answers_by_score_and_has_a_floor_on_small_sets():
    probabilities = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 0, 1])
    # Bins: two answers at 0.95 (one right), one at 0.6 (right), one at 0.7 (right).
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probabilities, targets) == pytest.approx(expected)
    assert sum(row["count"] for row in reliability(probabilities.max(-1).values, torch.ones(4))) == 4
    # Perfectly calibrated scores still show an ECE on 200 examples, far less on 20,000.
    scores = torch.full((200,), 0.8)
    assert 0.01 < ece_floor(scores) < 0.06
    assert ece_floor(torch.full((20000,), 0.8), draws=20) < 0.01


def test_learning_calibrates_the_new_task_and_records_what_recalibration_needs(empty_store, topic_files,
                                                                             micro_settings):
    report = learn("topic", *topic_files, settings=micro_settings())
    version = store.get_version(report.tag)
    record = version.record()
    calibration = record["calibration"]["topic"]
    assert calibration["method"] == "temperature" and calibration["temperature"] >= MIN_TEMPERATURE
    assert calibration["fitted_examples"] == record["examples"]["topic"]["held_out_examples"]
    assert {"ece_before", "ece_after", "ece_floor"} <= set(calibration) and calibration["ece_in_sample"] is False
    assert report.calibration == record["calibration"]
    assert version.load().bank["temperature"].tolist() == [pytest.approx(calibration["temperature"])]
    kept = json.loads((version.path / HELD_OUT_LOGITS_FILE).read_text())
    assert len(kept["topic"]["targets"]) == calibration["fitted_examples"]
    assert fit_temperature(torch.tensor(kept["topic"]["logits"]), torch.tensor(kept["topic"]["targets"])) == \
        pytest.approx(calibration["temperature"], rel=1e-4)
    assert store.task_summaries(version.path)[0]["calibration"] == calibration


def test_a_task_learned_before_calibration_keeps_its_scores_and_is_marked_uncalibrated(
        empty_store, topic_files, question_files, micro_settings, monkeypatch):
    legacy = learn("topic", *topic_files, settings=micro_settings())
    legacy_version = store.get_version(legacy.tag)
    # Rewrite the version as the previous code wrote it: format 1, no temperatures, no calibration
    # in the record, no held-out logits (re-registered, so its manifest is whole).
    folder = legacy_version.path
    old = legacy_version.load()
    registry = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("fast_path", "calibration", "padded_logit"):
        registry.pop(key)
    registry["format_version"] = 1
    record = legacy_version.record()
    for key in ("calibration", "precision_paired"):
        record.pop(key)
    bank = {k: v for k, v in old.bank.items() if k != "temperature"}

    def save_format_1(self, target):
        from safetensors.torch import save_file
        target.mkdir(parents=True, exist_ok=True)
        save_file(bank, str(target / "tasks.safetensors"))
        (target / CONFIG_FILE).write_text(json.dumps(registry))

    def write_record(target, tag):
        (target / store.METRICS_FILE).write_text(json.dumps({**record, "tag": tag}))

    with monkeypatch.context() as patched:
        patched.setattr(ContinualTinyTransformer, "save", save_format_1)
        older = store.register_version(old, eval_sets=[legacy_version.eval_set(0)], metadata={}, labels={},
                                       write_extra=write_record)
    store.delete_version(legacy.tag, force=True)
    loaded = older.load()
    assert loaded.config.fast_path == "int8-dynamic" and loaded.bank["temperature"].tolist() == [1.0]

    child = learn("question", *question_files, settings=micro_settings())
    child_record = store.get_version(child.tag).record()
    assert child_record["calibration"]["topic"]["method"] == "none"
    assert child_record["calibration"]["topic"]["reason"] == UNCALIBRATED
    assert child_record["calibration"]["topic"]["ece_before"] == child_record["calibration"]["topic"]["ece_after"]
    assert child_record["calibration"]["question"]["method"] == "temperature"
    new = store.get_version(child.tag).load()
    assert new.config.fast_path == "int8-rows"  # every task measured again on this code's path
    assert torch.equal(new.logits(TEXTS, ["topic"] * len(TEXTS)), loaded.logits(TEXTS, ["topic"] * len(TEXTS)))
    assert "topic" not in json.loads((store.get_version(child.tag).path / HELD_OUT_LOGITS_FILE).read_text())
    assert math.isclose(new.bank["temperature"][0].item(), 1.0)


@pytest.mark.parametrize("temperature", [1e-45, 0.5, MAX_TEMPERATURE * 1.01, 1e30, float("nan"), float("inf"), 0.0, -1.0])
def test_a_bank_with_a_temperature_ctt_learn_cannot_write_is_refused(temperature):
    with pytest.raises(CTTError, match="temperatures are damaged"):
        model_with_temperatures([1.0, temperature, 1.0])


def test_an_integer_temperature_tensor_is_refused():
    model = UNCALIBRATED_MODEL
    bank = {**model.bank, "temperature": torch.ones(len(model.tasks), dtype=torch.int64)}
    with pytest.raises(CTTError, match="temperatures are damaged"):
        ContinualTinyTransformer(model.backbone, model.config, tasks=model.tasks, bank=bank)


@pytest.mark.parametrize("temperature", [1.0, 37.0, MAX_TEMPERATURE])
def test_the_label_is_the_raw_argmax_even_where_softmax_rounds_a_near_tie(temperature):
    model = model_with_temperatures([temperature, 1.0, 1.0])
    # A head whose two classes differ by less than float32 softmax resolves after dividing by T.
    model.bank["head_weight"][0] = 0.0
    model.bank["head_bias"][0, :2] = torch.tensor([0.3, 0.3000001])
    prediction = model.predict(["any text"], ["t0"])[0]
    assert prediction.label == "y"


@pytest.mark.parametrize("registry", [
    {"format_version": 2, "max_length": 64},  # format 2 must name every field
    {"format_version": 2, "max_length": 64, "fast_path": "int8-rows", "calibration": "temperature"},
    {"format_version": 2, "max_length": 10 ** 30, "fast_path": "int8-rows", "calibration": "temperature",
     "padded_logit": "-inf"},
    {"format_version": 1, "max_length": 0},
    {"format_version": 1},
])
def test_a_damaged_configuration_is_one_clear_error(registry):
    with pytest.raises(CTTError):
        ModelConfig.from_registry(registry)


def test_a_format_1_configuration_is_measured_on_the_legacy_int8_path_whatever_it_names():
    from model.precision import LEGACY_FAST_PATH

    config = ModelConfig.from_registry({"format_version": 1, "max_length": 64, "fast_path": "int8-rows"})
    assert config.fast_path == LEGACY_FAST_PATH


def test_a_max_length_beyond_what_the_backbone_reads_is_refused(monkeypatch):
    backbone = load_backbone("micro")
    monkeypatch.setattr(backbone.encoder.config, "max_position_embeddings", 32)
    with pytest.raises(CTTError, match="more than the backbone reads"):
        ContinualTinyTransformer(backbone, ModelConfig(max_length=64))


@pytest.mark.parametrize("damage", [
    {"calibration": None}, {"calibration": ["x"]}, {"calibration": {"topic": "warm"}},
    {"calibration": {"topic": {"method": "temperature", "temperature": float("nan")}}},
    {"accuracy": "high"}, {"examples": {"topic": [1]}}, {"labels": {"topic": ["not", "these"]}},
])
def test_a_damaged_record_leaves_tasks_with_names_labels_and_what_still_reads(empty_store, topic_files,
                                                                              micro_settings, damage):
    from model.serving.schemas import TaskSummary

    version = store.get_version(learn("topic", *topic_files, settings=micro_settings()).tag)
    labels = version.load().task("topic").labels
    metrics = version.path / store.METRICS_FILE
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), **damage}))
    summary = store.task_summaries(version.path)[0]
    assert summary["name"] == "topic" and summary["labels"] == labels
    try:
        TaskSummary.model_validate(summary)
    except Exception:  # what the service then does: names and labels only
        TaskSummary.model_validate({"name": summary["name"], "labels": summary["labels"]})


def test_a_record_that_is_not_an_object_is_one_clear_error(empty_store, topic_files, micro_settings):
    version = store.get_version(learn("topic", *topic_files, settings=micro_settings()).tag)
    (version.path / store.METRICS_FILE).write_text("[1, 2]")
    with pytest.raises(CTTError, match="not a JSON object"):
        store.read_record(version.path)
