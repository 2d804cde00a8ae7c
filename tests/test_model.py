"""The model's promises: tiny task modules, mixed-task batches, zero interference between tasks."""

from __future__ import annotations

import json

import pytest
import torch

from model.backbone import load_backbone
from model.ctt import ContinualTinyTransformer, Task, TaskModule
from model.errors import CTTError
from model.registry import ModelConfig

CONFIG = ModelConfig(max_length=64)

TEXTS = ["the striker scored twice", "shares in the bank fell sharply after the results",
         "is it raining?", "a long sentence " * 12, "tennis"]


def random_module(backbone, num_labels: int, seed: int) -> TaskModule:
    torch.manual_seed(seed)
    module = TaskModule.for_backbone(backbone, num_labels)
    with torch.no_grad():
        for parameter in (module.key, module.value, module.ffn):
            parameter.add_(0.2 * torch.randn_like(parameter))
    return module


@pytest.fixture
def micro():
    return load_backbone("micro")


def model_with(backbone, label_counts, max_tasks=None) -> ContinualTinyTransformer:
    model = ContinualTinyTransformer(backbone, CONFIG, max_tasks=max_tasks)
    for i, count in enumerate(label_counts):
        model = model.with_task(Task(f"task{i}", [f"label{j}" for j in range(count)]),
                                random_module(backbone, count, seed=i))
    return model


def test_task_module_is_below_a_thousandth_of_the_backbone(micro):
    module = TaskModule.for_backbone(micro, 6)
    assert module.num_parameters() < 0.001 * micro.info.parameters


def test_mixed_task_batch_equals_each_row_alone(micro):
    model = model_with(micro, [2, 3, 5])
    names = ["task0", "task1", "task2", "task1", "task0"]
    batched = model.logits(TEXTS, names)
    for i, (text, name) in enumerate(zip(TEXTS, names)):
        alone = model.logits([text], [name])
        width = len(model.task(name).labels)
        torch.testing.assert_close(batched[i, :width], alone[0, :width], rtol=0, atol=1e-5)
        assert int(batched[i].argmax()) == int(alone[0].argmax())
        assert torch.isinf(batched[i, width:]).all()


def test_mixed_batch_equals_single_task_batches(micro):
    model = model_with(micro, [2, 4])
    names = ["task0", "task1"] * 2 + ["task0"]
    mixed = model.logits(TEXTS, names)
    for name in ("task0", "task1"):
        rows = [i for i, n in enumerate(names) if n == name]
        same_texts_one_task = model.logits(TEXTS, [name] * len(TEXTS))
        torch.testing.assert_close(mixed[rows], same_texts_one_task[rows], rtol=0, atol=1e-6)


def test_adding_a_task_leaves_old_logits_bit_identical(micro):
    before = model_with(micro, [2, 3])
    names = ["task0", "task1", "task0", "task1", "task1"]
    old_logits = before.logits(TEXTS, names)
    old_bank = {k: v.clone() for k, v in before.bank.items()}
    # A wider label set than any old task widens the head bank: old rows must not move.
    after = before.with_task(Task("wide", [str(i) for i in range(9)]), random_module(micro, 9, seed=7))
    new_logits = after.logits(TEXTS, names)
    assert torch.equal(new_logits[:, : old_logits.shape[1]], old_logits)
    for key, tensor in before.bank.items():
        assert torch.equal(tensor, old_bank[key]), "with_task must not write into the old bank"
    assert before.task_names == ["task0", "task1"]


def test_replacing_a_task_changes_only_that_task(micro):
    model = model_with(micro, [2, 3, 2])
    replaced = model.with_task(Task("task1", ["x", "y"]), random_module(micro, 2, seed=99))
    assert replaced.task_names == model.task_names
    assert replaced.task("task1").labels == ["x", "y"]
    for name in ("task0", "task2"):
        assert torch.equal(replaced.logits(TEXTS, [name] * 5), model.logits(TEXTS, [name] * 5))
    assert not torch.equal(replaced.logits(TEXTS, ["task1"] * 5)[:, :2], model.logits(TEXTS, ["task1"] * 5)[:, :2])


def test_task_module_round_trips_through_the_bank(micro):
    model = model_with(micro, [3])
    module = model.task_module("task0")
    again = ContinualTinyTransformer(micro, CONFIG).with_task(Task("task0", model.task("task0").labels), module)
    assert torch.equal(again.logits(TEXTS, ["task0"] * 5), model.logits(TEXTS, ["task0"] * 5))


def test_max_tasks_is_a_clear_error(micro):
    model = model_with(micro, [2, 2], max_tasks=2)
    with pytest.raises(CTTError, match="MAX_TASKS is 2"):
        model.with_task(Task("third", ["a", "b"]), random_module(micro, 2, seed=3))
    # Replacing an existing task is not growth.
    model.with_task(Task("task0", ["a", "b"]), random_module(micro, 2, seed=3))


def test_the_model_never_reads_max_tasks_from_the_environment(micro, monkeypatch):
    """MAX_TASKS is read by the settings table and passed in; the model takes an argument."""
    from model.settings import Settings

    monkeypatch.setenv("MAX_TASKS", "1")
    assert ContinualTinyTransformer(micro, CONFIG).max_tasks == 50
    assert ContinualTinyTransformer(micro, CONFIG, max_tasks=Settings.from_environ().max_tasks).max_tasks == 1
    monkeypatch.setenv("MAX_TASKS", "many")
    with pytest.raises(CTTError, match="MAX_TASKS='many': must be a whole number"):
        Settings.from_environ()


def test_a_thousand_tasks_fit_when_allowed(micro):
    model = ContinualTinyTransformer(micro, CONFIG, max_tasks=1000)
    for i in range(1000):
        model = model.with_task(Task(f"t{i}", ["a", "b"]), TaskModule.for_backbone(micro, 2))
    logits = model.logits(TEXTS, ["t0", "t999", "t500", "t1", "t42"])
    assert logits.shape == (5, 2)


def test_unknown_task_lists_the_known_ones(micro):
    model = model_with(micro, [2])
    with pytest.raises(CTTError, match="unknown task 'nope'; known tasks: task0"):
        model.logits(["x"], ["nope"])


def test_invalid_task_name(micro):
    with pytest.raises(CTTError, match="invalid task name"):
        ContinualTinyTransformer(micro, CONFIG).with_task(Task("bad name!", ["a", "b"]), TaskModule.for_backbone(micro, 2))


def test_save_and_load_give_identical_logits(micro, tmp_path):
    model = model_with(micro, [2, 5])
    model.save(tmp_path)
    loaded = ContinualTinyTransformer.load(tmp_path)
    names = ["task1", "task0", "task1", "task0", "task1"]
    assert torch.equal(loaded.logits(TEXTS, names), model.logits(TEXTS, names))
    assert loaded.task_names == model.task_names


def test_load_refuses_a_backbone_digest_mismatch(micro, tmp_path):
    model_with(micro, [2]).save(tmp_path)
    config = json.loads((tmp_path / "ctt.json").read_text())
    config["backbone"]["digest"] = "0" * 64
    (tmp_path / "ctt.json").write_text(json.dumps(config))
    with pytest.raises(CTTError, match="refusing to serve mismatched weights"):
        ContinualTinyTransformer.load(tmp_path)


def test_loading_more_tasks_than_max_tasks_fails_clearly(micro, tmp_path):
    model_with(micro, [2, 2, 2]).save(tmp_path)
    with pytest.raises(CTTError, match="MAX_TASKS is 2"):
        ContinualTinyTransformer.load(tmp_path, max_tasks=2)


def test_a_local_model_folder_is_a_backbone(micro, tmp_path):
    from model.backbone import sha256_file

    micro.encoder.save_pretrained(tmp_path)
    micro.tokenizer.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.info.digest == sha256_file(tmp_path / "model.safetensors")
    assert backbone.info.hidden_size == micro.info.hidden_size
    model = ContinualTinyTransformer(backbone, CONFIG).with_task(Task("t", ["a", "b"]), random_module(backbone, 2, seed=1))
    assert model.logits(TEXTS, ["t"] * 5).shape == (5, 2)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(CTTError, match="cannot load backbone"):
        load_backbone(str(tmp_path))


def test_length_grouped_prediction_matches_row_by_row(micro):
    """Mixed lengths and tasks in one call: the same answers as one text at a time."""
    model = model_with(micro, [2, 3, 2])
    texts = ["short", "a much longer text " * 12, "mid length text here", "x", "another long one " * 8] * 3
    tasks = [f"task{i % 3}" for i in range(len(texts))]
    together = model.predict(texts, tasks, batch_size=4)
    budgeted = model.predict(texts, tasks, batch_size=32, max_batch_tokens=60)  # long texts alone
    assert [p.label for p in budgeted] == [p.label for p in together]
    for text, task, got in zip(texts, tasks, together):
        alone = model.predict([text], [task])[0]
        assert (got.task, got.label) == (alone.task, alone.label)
        for label, probability in alone.probabilities.items():
            assert got.probabilities[label] == pytest.approx(probability, abs=1e-5)


# ----- the model's configuration ----------------------------------------------------------------
def test_the_configuration_is_one_object_saved_with_the_version(micro, tmp_path):
    from model.registry import FORMAT_VERSION, read_config

    with pytest.raises(TypeError):
        ModelConfig()  # no max_length of its own: a new lineage takes LearnSettings', a child its parent's
    with pytest.raises(TypeError):
        ContinualTinyTransformer(micro)
    for bad in ({"max_length": 0}, {"max_length": "64"}, {"max_length": 64, "fast_path": "int4"},
                {"max_length": 64, "calibration": "platt"}):
        with pytest.raises(CTTError):
            ModelConfig(**bad)
    model = model_with(micro, [2, 3])
    model.save(tmp_path)
    registry = read_config(tmp_path)
    assert registry["format_version"] == FORMAT_VERSION
    assert ModelConfig.from_registry(registry) == model.config == ContinualTinyTransformer.load(tmp_path).config
    assert ModelConfig(max_length=32, fast_path="int8-dynamic").for_child() == ModelConfig(max_length=32)


def test_a_version_saved_in_format_1_loads_uncalibrated_on_the_int8_path_it_was_measured_on(micro, tmp_path):
    from safetensors.torch import save_file

    model = model_with(micro, [2, 3])
    save_file({k: v.contiguous() for k, v in model.bank.items() if k != "temperature"}, str(tmp_path / "tasks.safetensors"))
    (tmp_path / "ctt.json").write_text(json.dumps({
        "format_version": 1, "backbone": micro.info.to_dict(), "max_length": 64,
        "tasks": [task.to_dict() for task in model.tasks]}))
    loaded = ContinualTinyTransformer.load(tmp_path)
    assert loaded.config == ModelConfig(max_length=64, fast_path="int8-dynamic")
    assert loaded.bank["temperature"].tolist() == [1.0, 1.0]
    names = ["task0", "task1", "task0", "task1", "task1"]
    assert torch.equal(loaded.logits(TEXTS, names), model.logits(TEXTS, names))
    for damaged in ({"format_version": 3}, {"format_version": "1"}, ["not", "a", "registry"]):
        (tmp_path / "ctt.json").write_text(json.dumps(damaged))
        with pytest.raises(CTTError, match="unsupported CTT model format"):
            ContinualTinyTransformer.load(tmp_path)


def test_a_damaged_temperature_is_refused(micro):
    model = model_with(micro, [2])
    for bad in (torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([float("nan")]), torch.ones(2)):
        with pytest.raises(CTTError, match="calibration temperatures are damaged"):
            ContinualTinyTransformer(micro, CONFIG, tasks=model.tasks, bank={**model.bank, "temperature": bad})
