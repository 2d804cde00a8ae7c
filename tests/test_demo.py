"""The BBC-derived tasks and the demo model that `make serve` builds on an empty store."""

from __future__ import annotations

import json
from collections import Counter

from model import store
from training.cli import main
from training.demo import DEMO_TASKS, DERIVED_TASKS, export_tasks


def test_derived_tasks_are_balanced_enough_and_split_by_article(tmp_path):
    files = export_tasks(tmp_path, tuple(DERIVED_TASKS), train_limit=400, test_limit=100)
    for name, (train, test) in files.items():
        train_rows = [json.loads(line) for line in train.read_text().splitlines()]
        test_rows = [json.loads(line) for line in test.read_text().splitlines()]
        assert len(train_rows) == 400 and len(test_rows) == 100, name
        labels = Counter(row["label"] for row in train_rows)
        assert len(labels) >= 2 and min(labels.values()) > 0.1 * len(train_rows) / len(labels), (name, labels)
    topic_train = {json.loads(line)["text"] for line in files["bbc-topic"][0].read_text().splitlines()}
    topic_test = {json.loads(line)["text"] for line in files["bbc-topic"][1].read_text().splitlines()}
    assert not topic_train & topic_test


def test_demo_builds_once_on_an_empty_store(empty_store, capsys):
    assert main(["demo", "--if-missing", "--backbone", "micro", "--train-limit", "60", "--quiet"]) == 0
    versions = store.list_versions()
    assert [v.metadata["new_task"] for v in versions] == list(reversed(DEMO_TASKS))
    assert versions[0].metadata["tasks"] == list(DEMO_TASKS)
    assert main(["demo", "--if-missing", "--backbone", "micro", "--quiet"]) == 0
    assert "not rebuilding" in capsys.readouterr().err
    assert len(store.list_versions()) == 2
