"""`learn` against the real BentoML model store (temporary home), on the micro backbone."""

from __future__ import annotations

import json

import pytest
import torch

from model import store
from model.errors import CTTError
from tests.conftest import SPORT, write_jsonl
from training.learn import learn


def test_two_tasks_two_versions_with_lineage_and_zero_forgetting(empty_store, topic_files, question_files, micro_settings):
    first = learn("topic", *topic_files, settings=micro_settings())
    second = learn("question", *question_files, settings=micro_settings())

    assert second.parent == first.tag
    assert second.tasks == ["topic", "question"]
    assert second.bwt == 0.0 and second.forgetting == {"topic": 0.0}
    assert second.accuracy["topic"] == first.accuracy["topic"]
    rows = second.accuracy_matrix["rows"]
    assert [r["learned"] for r in rows] == ["topic", "question"]
    assert [r["version"] for r in rows] == [first.tag, second.tag]

    versions = store_versions()
    assert [v.tag for v in versions] == [second.tag, first.tag]  # newest first
    assert versions[0].parent == first.tag and versions[1].parent is None
    assert versions[0].metadata["backbone"] == "micro"
    assert versions[0].metadata["backbone_digest"] == versions[1].metadata["backbone_digest"]
    assert versions[0].labels["stage"] == "development"
    assert (versions[0].path / "accuracy_matrix.png").stat().st_size > 1000

    # The old task's logits are bit-identical in the old and the new version, loaded from the store.
    old_model, new_model = versions[1].load(), versions[0].load()
    texts = SPORT[:6]
    assert torch.equal(old_model.logits(texts, ["topic"] * 6), new_model.logits(texts, ["topic"] * 6))


def store_versions():
    return store.list_versions()


def test_registry_round_trip(empty_store, topic_files, micro_settings):
    report = learn("topic", *topic_files, settings=micro_settings())
    version = store.get_version(report.tag)
    model = version.load()
    task = model.task("topic")
    assert task.labels == ["money", "sport"]
    assert [json.dumps(e, sort_keys=True) for e in version.eval_set(0)][:1]
    # One record per version: the store metadata and the report are derived from metrics.json.
    record = store.read_record(version.path)
    assert record["tag"] == report.tag and record["accuracy"] == report.accuracy
    assert record["examples"]["topic"]["eval_examples"] == 20
    assert record["learned_accuracy"]["topic"] == report.accuracy["topic"]
    assert record["probe_accuracy"]["topic"] == report.probe_accuracy["topic"]
    assert {k: version.metadata[k] for k in ("accuracy", "mean_accuracy", "tasks")} == \
        {k: record[k] for k in ("accuracy", "mean_accuracy", "tasks")}
    assert task.info == {}  # the registry holds no copy of any measurement
    assert store.task_summaries(version.path) == [{
        "name": "topic", "labels": ["money", "sport"], "accuracy": report.accuracy["topic"],
        "learned_accuracy": report.accuracy["topic"], "probe_accuracy": report.probe_accuracy["topic"],
        "examples": record["examples"]["topic"], "calibration": record["calibration"]["topic"]}]
    assert store.get_version(version.tag.split(":")[1]).tag == version.tag  # bare version accepted


def test_same_inputs_and_seed_give_the_same_model(empty_store, topic_files, micro_settings):
    first = learn("topic", *topic_files, settings=micro_settings(seed=3))
    second = learn("topic", *topic_files, from_tag=None, settings=micro_settings(seed=3))
    assert second.replaced
    a, b = store.get_version(first.tag).load(), store.get_version(second.tag).load()
    for key in a.bank:
        assert torch.equal(a.bank[key], b.bank[key])


def test_relearning_replaces_the_task(empty_store, topic_files, question_files, micro_settings, tmp_path):
    learn("topic", *topic_files, settings=micro_settings())
    learn("question", *question_files, settings=micro_settings())
    renamed = write_jsonl(tmp_path / "topic2.jsonl", [(t, "sports") for t in SPORT] * 2 + [("stocks fell", "markets")] * 10)
    # New label names: a deliberate relabelling, so the parent's evaluation set no longer applies.
    report = learn("topic", renamed, settings=micro_settings(allow_relabel=True))
    assert report.replaced and report.tasks == ["topic", "question"] and report.relearn_gate["clearly_worse"]
    assert report.labels == ["markets", "sports"]
    assert report.forgetting == {"question": 0.0}


def test_quality_gate_refuses_a_weak_new_task_and_registers_nothing(empty_store, micro_settings, tmp_path):
    # Every text appears once with each label: no model can score above one half.
    contradictory = write_jsonl(tmp_path / "noise.jsonl", [(t, l) for t in SPORT for l in ("a", "b")])
    with pytest.raises(CTTError, match="below --min-accuracy 0.9"):
        learn("noise", contradictory, contradictory, settings=micro_settings(min_accuracy=0.9))
    assert store_versions() == []


def test_quality_gate_refuses_forgetting(empty_store, topic_files, question_files, micro_settings, monkeypatch):
    first = learn("topic", *topic_files, settings=micro_settings())
    # Pretend the parent had measured a better score than the task now gets (as a changed
    # backbone or evaluation set would cause): the gate must refuse. (Editing the parent's file
    # would be refused as tampering, so its record is altered as it is read.)
    original_record = store.Version.record

    def better_record(version):
        record = original_record(version)
        if version.tag == first.tag:
            record["accuracy"] = {**record["accuracy"], "topic": first.accuracy["topic"] + 0.05}
        return record

    monkeypatch.setattr(store.Version, "record", better_record)
    with pytest.raises(CTTError, match="accuracy fell"):
        learn("question", *question_files, settings=micro_settings())
    learn("question", *question_files, settings=micro_settings(max_forgetting=0.1))
    assert len(store_versions()) == 2


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_registering_leaves_no_partial_version(empty_store, topic_files, micro_settings, monkeypatch, failure):
    from model.ctt import ContinualTinyTransformer

    original_save = ContinualTinyTransformer.save

    def save_then_fail(self, folder):
        original_save(self, folder)
        raise failure

    monkeypatch.setattr(ContinualTinyTransformer, "save", save_then_fail)
    with pytest.raises(type(failure)):
        learn("topic", *topic_files, settings=micro_settings())
    assert store_versions() == []
    assert store.store_problems() == []  # and no leftover in the staging area


def test_max_tasks_refused_before_training(empty_store, topic_files, question_files, micro_settings, monkeypatch):
    learn("topic", *topic_files, settings=micro_settings())
    monkeypatch.setenv("MAX_TASKS", "1")
    with pytest.raises(CTTError, match="MAX_TASKS is 1"):
        learn("question", *question_files, settings=micro_settings())


def test_from_tag_branches_from_an_older_version(empty_store, topic_files, question_files, micro_settings):
    first = learn("topic", *topic_files, settings=micro_settings())
    learn("question", *question_files, settings=micro_settings())
    branch = learn("question2", *question_files, from_tag=first.tag, settings=micro_settings())
    assert branch.parent == first.tag and branch.tasks == ["topic", "question2"]


# ----- the recipe (training/recipe.py) ---------------------------------------------------------
def test_cli_defaults_are_the_learn_settings_defaults():
    from dataclasses import fields

    from training.cli import build_parser
    from training.settings import LearnSettings

    args = vars(build_parser().parse_args(["learn", "--task", "t", "--train", "x.jsonl"]))
    flag = {"learning_rate": "lr", "head_learning_rate": "head_lr"}
    for f in fields(LearnSettings):
        name = flag.get(f.name, f.name)
        if name in args and f.name not in ("backbone", "owner"):  # both have no fixed default
            assert args[name] == f.default, f.name


def test_selection_compares_accuracy_first_then_temperature_scaled_loss():
    from training.recipe import Score, calibrated_loss

    targets = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    calibrated = torch.tensor([[0.4, -0.4], [-0.4, 0.4]] * 4)
    confident = calibrated * 25  # the same ranking, far too sure of itself
    confident[0] = torch.tensor([-10.0, 10.0])  # and one confident mistake
    raw = torch.nn.functional.cross_entropy(confident, targets)
    scaled, temperature = calibrated_loss(confident, targets)
    assert scaled < float(raw) and temperature > 1.0

    probe = Score(accuracy=0.80, loss=0.45, calibrated_loss=0.44)
    trained = Score(accuracy=0.85, loss=0.60, calibrated_loss=0.40)  # better, but overconfident raw
    assert trained.key("accuracy") > probe.key("accuracy")
    assert trained.key("loss") < probe.key("loss")  # what raw loss used to choose: the probe
    tie = Score(accuracy=0.80, loss=0.9, calibrated_loss=0.43)
    assert tie.key("accuracy") > probe.key("accuracy")  # a tie in accuracy goes to the better calibrated loss


def test_the_probe_replaces_the_last_epoch_only_when_the_held_out_slice_shows_it_clearly_worse():
    from training.recipe import significantly_worse

    def correct(pattern: str) -> torch.Tensor:
        return torch.tensor([c == "1" for c in pattern])

    probe = correct("1" * 20 + "0" * 10)
    assert not significantly_worse(probe, probe)  # no disagreement
    assert not significantly_worse(correct("1" * 18 + "0" * 12), probe)  # 2 against 0: noise on 30 examples
    assert significantly_worse(correct("1" * 12 + "0" * 18), probe)  # 8 against 0
    assert not significantly_worse(correct("0" * 8 + "1" * 12 + "1" * 8 + "0" * 2), probe)  # 8 against 8


def test_by_default_the_whole_schedule_runs_and_its_last_epoch_is_kept(empty_store, topic_files, micro_settings):
    from training.data import label_set, read_labelled, stratified_split
    from training.learn import starting_point
    from training.recipe import train_task_module

    settings = micro_settings(epochs=3, patience=1)  # patience only applies to a held-out selection
    assert settings.select_on == "last"
    model, _ = starting_point(None, settings)
    examples = read_labelled(topic_files[0])
    fit, held_out = stratified_split(examples, settings.holdout, settings.seed)
    module, info = train_task_module(model, label_set(examples), fit, held_out, settings)
    assert info["epochs_run"] == 3 and len(info["history"]) == 4
    assert info["best_epoch"] in (0, 3)  # the last epoch, or the probe when the last is clearly worse
    if info["best_epoch"] == 3:
        assert not torch.equal(module.key, torch.ones_like(module.key))


def test_learning_rate_warms_up_then_decays_to_zero():
    from training.recipe import lr_lambda

    factor = lr_lambda(100, 0.1)
    values = [factor(step) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:])) and values[-1] < 0.01


def test_the_module_trains_away_from_the_probe_and_records_each_epoch(empty_store, topic_files, micro_settings):
    from training.data import label_set, read_labelled, stratified_split
    from training.learn import starting_point
    from training.recipe import train_task_module

    settings = micro_settings(epochs=2, patience=5)
    model, _ = starting_point(None, settings)
    examples = read_labelled(topic_files[0])
    fit, held_out = stratified_split(examples, settings.holdout, settings.seed)
    module, info = train_task_module(model, label_set(examples), fit, held_out, settings)
    assert [row["epoch"] for row in info["history"]] == [0, 1, 2]
    assert 0 <= info["best_epoch"] <= 2
    # the head starts at the probe's weights, and the vectors are trained with their own rate
    assert info["probe"].weight.shape == module.head.weight.shape


# ----- one model configuration ------------------------------------------------------------------
def test_an_explicit_max_length_other_than_the_lineages_is_refused_naming_both(
        empty_store, topic_files, question_files, micro_settings, capsys):
    from training.cli import main

    first = learn("topic", *topic_files, settings=micro_settings(max_length=32))
    assert store.get_version(first.tag).load().max_length == 32
    with pytest.raises(CTTError, match=r"--max-length 64 differs from ctt-test-\w+:\w+'s max_length 32"):
        learn("question", *question_files, settings=micro_settings(max_length=64))
    assert len(store_versions()) == 1
    # Left out, the flag means the lineage's length, and the record says what the model used.
    second = learn("question", *question_files, settings=micro_settings())
    record = store.get_version(second.tag).record()
    assert record["max_length"] == 32 == record["training"]["settings"]["max_length"]
    assert record["training"]["settings"]["backbone"] == "micro"
    # As a user meets it: exit 2 and one line naming both lengths.
    code = main(["learn", "--task", "other", "--train", str(question_files[0]), "--max-length", "128",
                 "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--max-length 128 differs" in err and "max_length 32" in err
    assert "Traceback" not in err and len(store_versions()) == 2


def test_a_new_lineage_reads_the_settings_default_length(empty_store, topic_files, micro_settings):
    from training.settings import DEFAULT_MAX_LENGTH

    report = learn("topic", *topic_files, settings=micro_settings())
    version = store.get_version(report.tag)
    assert version.load().max_length == DEFAULT_MAX_LENGTH == version.record()["training"]["settings"]["max_length"]
    registry = json.loads((version.path / "ctt.json").read_text())
    assert registry["format_version"] == 2 and registry["max_length"] == DEFAULT_MAX_LENGTH
    assert registry["fast_path"] == "int8-rows"
