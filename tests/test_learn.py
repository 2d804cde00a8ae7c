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
        "examples": record["examples"]["topic"]}]
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
    report = learn("topic", renamed, settings=micro_settings())
    assert report.replaced and report.tasks == ["topic", "question"]
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
