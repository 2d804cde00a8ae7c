"""End to end on the real pretrained MiniLM backbone (slower: real weights, real data)."""

from __future__ import annotations

import pytest

from model import store
from model.backbone import MINILM_PINNED_SHA256, load_backbone
from model.ctt import TaskModule
from training.data import read_labelled
from training.demo import export_tasks
from training.evaluate import accuracy
from training.learn import LearnSettings, learn

pytestmark = pytest.mark.slow


def test_minilm_files_match_the_published_digests_and_modules_stay_tiny():
    backbone = load_backbone("minilm")
    assert backbone.info.digest == MINILM_PINNED_SHA256["model.safetensors"]
    assert (backbone.info.num_layers, backbone.info.hidden_size) == (6, 384)
    six_class = TaskModule.for_backbone(backbone, 6).num_parameters()
    assert six_class < 0.001 * backbone.info.parameters


def test_learn_two_real_tasks_register_reload_predict(empty_store, tmp_path):
    files = export_tasks(tmp_path, ("bbc-topic", "bbc-headline-or-body"), train_limit=150, test_limit=60)
    settings = LearnSettings(epochs=1, progress=False)
    first = learn("bbc-topic", *files["bbc-topic"], settings=settings)
    second = learn("bbc-headline-or-body", *files["bbc-headline-or-body"], settings=settings)

    assert second.parent == first.tag and second.bwt == 0.0
    assert second.accuracy["bbc-topic"] == first.accuracy["bbc-topic"]
    assert first.accuracy["bbc-topic"] > 0.8  # five topics, chance is 0.2
    assert second.accuracy["bbc-headline-or-body"] > 0.75

    model = store.get_version().load()
    assert model.backbone.info.spec == "minilm"
    # The reloaded version reproduces the registered accuracy of both tasks exactly.
    for task, (_, test_file) in files.items():
        assert accuracy(model, task, read_labelled(test_file)) == second.accuracy[task]
    predictions = model.predict(
        ["Chelsea striker scores twice in cup final win",
         "The central bank raised interest rates to curb inflation, economists said."],
        ["bbc-topic", "bbc-topic"])
    assert [p.label for p in predictions] == ["sports", "business"]
    assert all(0.5 < p.score <= 1.0 for p in predictions)
    # The fast path on the real encoder: mixed-task passes of both tasks' test texts agree with fp32
    # within the stated tolerance, closer than the plain dynamic int8 path does.
    from dataclasses import replace
    from statistics import mean, median

    from model.precision import MIXED_BATCH_LABEL_AGREEMENT, MIXED_BATCH_MEDIAN_DRIFT

    rows = [(task, example.text) for task, (_, test_file) in files.items() for example in read_labelled(test_file)[:40]]
    texts, tasks = [text for _, text in rows], [task for task, _ in rows]
    int8 = dict.fromkeys(files, "int8")
    fp32 = model.predict(texts, tasks)
    drift = {}
    for path in ("int8-rows", "int8-dynamic"):
        served = model.with_config(replace(model.config, fast_path=path)).predict(texts, tasks, precisions=int8)
        drift[path] = [max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)
                       for a, b in zip(fp32, served)]
        if path == "int8-rows":
            assert median(drift[path]) <= MIXED_BATCH_MEDIAN_DRIFT
            assert sum(a.label == b.label for a, b in zip(fp32, served)) / len(rows) >= MIXED_BATCH_LABEL_AGREEMENT
    assert mean(drift["int8-rows"]) < mean(drift["int8-dynamic"])
    assert all(store.get_version().record()["calibration"][task]["method"] == "temperature" for task in files)
