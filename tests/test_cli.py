"""`ctt` as a user meets it: exit codes, one readable line for bad input, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model import store
from tests.conftest import write_jsonl
from training.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ctt: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def learn_args(task, train, *extra):
    return ["learn", "--task", task, "--train", str(train), "--backbone", "micro", "--epochs", "1", "--quiet", *extra]


def test_learn_prints_the_tag_and_json_summary(capsys, empty_store, topic_files, question_files):
    code, out, _ = run(capsys, *learn_args("topic", topic_files[0], "--eval", str(topic_files[1])))
    assert code == 0 and out.strip().startswith(f"{empty_store}:")
    code, out, _ = run(capsys, *learn_args("question", question_files[0], "--json"))
    summary = json.loads(out)
    assert code == 0
    assert {"tag", "tasks", "accuracy", "mean_accuracy", "bwt"} <= set(summary)
    assert summary["tasks"] == ["topic", "question"] and summary["bwt"] == 0.0

    code, out, _ = run(capsys, "models", "--json")
    listed = json.loads(out)
    assert [v["tag"] for v in listed][0] == summary["tag"] and listed[0]["parent"] == listed[1]["tag"]

    code, out, _ = run(capsys, "evaluate", "--task", "topic", "--data", str(topic_files[1]), "--json")
    assert code == 0 and json.loads(out)["examples"] == 20

    code, out, _ = run(capsys, "predict", "--task", "topic", "--text", "the striker scored a goal")
    label, score = out.split("\t")
    assert code == 0 and label in {"sport", "money"} and 0 < float(score) <= 1


def test_relearning_says_it_replaces(capsys, empty_store, topic_files):
    run(capsys, *learn_args("topic", topic_files[0]))
    code, _, err = run(capsys, "learn", "--task", "topic", "--train", str(topic_files[0]), "--epochs", "1")
    assert code == 0 and "replaced the existing task 'topic'" in err


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".jsonl", "no such file"),
    ("", ".jsonl", "no labelled examples"),
    ("\n\n", ".jsonl", "no labelled examples"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "at least two different labels"),
    ('{"body": "a", "label": "x"}\n', ".jsonl", "line 1 needs an object with 'text' and 'label'"),
    ('{"text": "a", "label": "x"\n', ".jsonl", "line 1 is not valid JSON"),
    ('{"text": "", "label": "x"}\n', ".jsonl", "empty or non-string 'text'"),
    ("sentence,category\nhello,x\n", ".csv", "CSV needs a header with 'text' and 'label'"),
    (b"text,label\nok,a\n\xff\xfe bad,b\n", ".csv", "line 3 is not valid UTF-8"),
    ("text\tlabel\n", ".tsv", "unknown format '.tsv'"),
])
def test_bad_training_files(capsys, empty_store, tmp_path, content, suffix, message):
    path = tmp_path / f"train{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, _, err = run(capsys, *learn_args("t", path))
    assert code != 0 and message in error_line(err)
    assert store.list_versions() == []


def test_directory_instead_of_file(capsys, empty_store, tmp_path):
    code, _, err = run(capsys, *learn_args("t", tmp_path))
    assert code != 0 and "not a regular file" in error_line(err)


def test_eval_labels_never_seen_in_training(capsys, empty_store, topic_files, tmp_path):
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", [("goal", "sport"), ("weather", "climate")])
    code, _, err = run(capsys, *learn_args("topic", topic_files[0], "--eval", str(bad_eval)))
    assert code != 0 and "labels ['climate'] never appear" in error_line(err)


def test_bad_task_name(capsys, empty_store, topic_files):
    code, _, err = run(capsys, *learn_args("no spaces", topic_files[0]))
    assert code != 0 and "invalid task name" in error_line(err)


def test_unknown_task_and_unknown_tag(capsys, empty_store, topic_files):
    code, _, err = run(capsys, "predict", "--task", "topic", "--text", "hi")
    assert code != 0 and "has no" in error_line(err)
    run(capsys, *learn_args("topic", topic_files[0]))
    code, _, err = run(capsys, "predict", "--task", "weather", "--text", "hi")
    assert code != 0 and "unknown task 'weather'; known tasks: topic" in error_line(err)
    code, _, err = run(capsys, "predict", "--task", "topic", "--text", "hi", "--model", "nosuchversion")
    assert code != 0 and "not in the BentoML model store" in error_line(err)
    code, _, err = run(capsys, *learn_args("more", topic_files[0], "--from", f"{empty_store}:missing"))
    assert code != 0 and "not in the BentoML model store" in error_line(err)


def test_evaluate_with_labels_the_task_lacks(capsys, empty_store, topic_files, tmp_path):
    run(capsys, *learn_args("topic", topic_files[0]))
    other = write_jsonl(tmp_path / "other.jsonl", [("goal", "sport"), ("rain", "weather")])
    code, _, err = run(capsys, "evaluate", "--task", "topic", "--data", str(other))
    assert code != 0 and "not labels of task 'topic'" in error_line(err)


def test_edited_registry_is_refused_before_loading(capsys, empty_store, topic_files):
    """Editing ctt.json (here: the backbone digest it records) is caught by the version's manifest."""
    run(capsys, *learn_args("topic", topic_files[0]))
    config_path = store.get_version().path / "ctt.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["digest"] = "f" * 64
    config_path.write_text(json.dumps(config))
    code, _, err = run(capsys, "predict", "--task", "topic", "--text", "goal")
    assert code != 0 and "ctt.json" in error_line(err) and "recorded" in error_line(err)


def test_console_script_reports_errors_without_traceback(empty_store, tmp_path):
    """The installed `ctt` entry point, as a real process."""
    ctt = os.path.join(os.path.dirname(sys.executable), "ctt")
    result = subprocess.run([ctt, "learn", "--task", "t", "--train", str(tmp_path / "missing.csv")],
                            capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"ctt: error: {tmp_path / 'missing.csv'}: no such file"]
    help_text = subprocess.run([ctt, "learn", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--max-forgetting" in help_text
