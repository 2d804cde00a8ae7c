"""`ctt feedback prune` says which rows an age means before it deletes them (SQLite under
CTT_DATA_DIR; the same command runs on PostgreSQL in tests/test_feedback.py)."""

from __future__ import annotations

import re
import uuid

import pytest

from model import store
from model.feedback.database import FeedbackItem
from training.cli import main
from training.feedback import open_from_environ


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def rows(monkeypatch, tmp_path):
    """Three rows just stored in a SQLite database of the test's own."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL_FILE", raising=False)
    monkeypatch.setenv("CTT_DATA_DIR", str(tmp_path))
    database = open_from_environ()
    database.migrate()
    database.add([FeedbackItem(f"text {i}", "topic", "sport", id=f"row-{uuid.uuid4().hex}") for i in range(3)])
    yield database
    database.close()


def test_a_short_age_is_shown_as_its_cutoff_and_deletes_nothing_without_yes_and_force(capsys, rows):
    """'--older-than 3m' once deleted 2,000,015 rows at once: 'm' is minutes."""
    code, out, err = run(capsys, "feedback", "prune", "--older-than", "0m")
    assert code == 0 and re.match(r"would delete 3 row\(s\) older than 0m \(0 seconds: stored before "
                                  r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", out), out
    assert "--yes" in err and "--force" in err and rows.count() == 3
    code, out, err = run(capsys, "feedback", "prune", "--older-than", "3m", "--yes")
    assert code == 2 and "less than a day ago: add --force" in err and "3 minutes" in err and err.count("\n") == 1
    assert rows.count() == 3
    code, out, _ = run(capsys, "feedback", "prune", "--older-than", "0m", "--yes", "--force")
    assert code == 0 and out.startswith("deleted 3 row(s) older than 0m") and rows.count() == 0
    record = [entry for entry in store.read_history() if entry["action"] == "feedback-prune"][-1]
    assert record["rows"] == 3 and record["older_than"] == "0m" and record["by"] and record["cutoff"].endswith("Z")


@pytest.mark.parametrize("age", ["999999999d", "99999999999999999999d", "3 months", "-1d", "nan", "1e9d", ""])
def test_an_age_out_of_range_or_unreadable_is_one_line(capsys, rows, age):
    code, out, err = run(capsys, "feedback", "prune", f"--older-than={age}", "--yes", "--force")
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("ctt: error: --older-than")
    assert rows.count() == 3
