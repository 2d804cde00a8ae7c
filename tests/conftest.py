"""Shared fixtures. Every test run gets its own BentoML home, so the real model store is used
without touching the developer's; each test gets its own model name inside it."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# BentoML reads BENTOML_HOME once, when its store is first used: set it before any import.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="ctt-test-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SPORT = ["football match goal", "the striker scored", "tennis final set", "cricket team won the cup",
         "the coach praised the players", "olympic runner sets record", "rugby league season opener",
         "goalkeeper saves penalty", "boxing title fight", "golf open championship"]
MONEY = ["stock market falls", "bank raises interest rates", "shares in the firm rose",
         "profits beat forecasts", "inflation hits new high", "the economy grew last quarter",
         "oil prices climb", "currency slides against dollar", "investors sell bonds", "retail sales slump"]
QUESTION = ["is it raining today?", "what time is it?", "where is the station?", "who won the game?",
            "can you help me?", "how much does it cost?", "why is the sky blue?", "when does it open?",
            "which way is north?", "are you coming tonight?"]
STATEMENT = ["it is raining today.", "the time is noon.", "the station is near.", "the home team won.",
             "I can help you.", "it costs ten pounds.", "the sky is blue.", "it opens at nine.",
             "north is that way.", "I am coming tonight."]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8")
    return path


@pytest.fixture
def empty_store(monkeypatch):
    """A fresh model name in the test BentoML home: an empty store as far as ctt can tell."""
    name = f"ctt-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CTT_MODEL_NAME", name)
    return name


@pytest.fixture
def topic_files(tmp_path):
    train = write_jsonl(tmp_path / "topic.train.jsonl",
                        [(t, "sport") for t in SPORT] * 2 + [(t, "money") for t in MONEY] * 2)
    test = write_jsonl(tmp_path / "topic.test.jsonl", [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY])
    return train, test


@pytest.fixture
def question_files(tmp_path):
    train = write_jsonl(tmp_path / "question.train.csv", [])
    train.write_text("text,label\n" + "".join(f'"{t}",question\n' for t in QUESTION * 2)
                     + "".join(f'"{t}",statement\n' for t in STATEMENT * 2), encoding="utf-8")
    test = write_jsonl(tmp_path / "question.test.jsonl",
                       [(t, "question") for t in QUESTION] + [(t, "statement") for t in STATEMENT])
    return train, test


@pytest.fixture
def micro_settings():
    from training.learn import LearnSettings

    def make(**overrides):
        values = dict(backbone="micro", epochs=2, progress=False, batch_size=8)
        values.update(overrides)
        return LearnSettings(**values)

    return make


TOPIC_ROWS = [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY]
QUESTION_ROWS = [(t, "q") for t in QUESTION] + [(t, "s") for t in STATEMENT]


@contextmanager
def micro_model(prefix: str, folder: Path, tasks: dict[str, list[tuple[str, str]]]) -> Iterator[str]:
    """A micro-backbone model under a name of its own in the test store, one version per task
    (learned in order, one epoch each); CTT_MODEL_NAME names it until the block ends."""
    from training.learn import LearnSettings, learn

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    try:
        settings = LearnSettings(backbone="micro", epochs=1, progress=False)
        for task, rows in tasks.items():
            learn(task, write_jsonl(folder / f"{task}.jsonl", rows), settings=settings)
        yield name
    finally:
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous
