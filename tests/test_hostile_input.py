"""Every command that takes a tag, a path, a duration or a name, driven with hostile strings: each
is refused with exit 2 and one line, no traceback, and neither the store nor the file system
around it changes (property tests, in-process ``training.cli.main``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import store
from model.errors import CTTError
from model.feedback.ages import parse_age
from model.tags import check_model_name, parse_tag
from tests.conftest import MONEY, SPORT, write_jsonl
from training.cli import main
from training.learn import LearnSettings, learn

EXAMPLES = settings(max_examples=8, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Strings that once did damage, or could: empty and nameless tags, climbing paths, separators,
# control and invisible characters, options where values belong, very long ones.
KNOWN_HOSTILE = ["", " ", ":", "ctt:", ":abc", "..", "ctt:..", "ctt:../../models", "../../../x", "/etc/passwd",
                 "ctt:a/b", "a\\b", "a\x00b", "ctt:\n", "\n", "\t", " ctt:abc", "CTT:ABC", "ctt:a:b", "ctt:a..b",
                 "\u202e", "\u200b", "\udcff", "-", "--yes", "-x", "x" * 300, "~", "~/x", ".", "./x", "ctt:-a",
                 "ctt:a-", "a\u2028b", "ctt:é"]
INVISIBLE = st.characters(categories=["Cc", "Cf", "Cs", "Co", "Zl", "Zp"])


def _refused(parse) -> callable:
    def refused(text: str) -> bool:
        try:
            parse(text)
        except (CTTError, ValueError):
            return True
        return False

    return refused


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """A store with one version, approved for production, and a labelled file and a backup beside it."""
    name = f"ctt-hostile-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("hostile")
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    try:
        data = write_jsonl(folder / "t.jsonl", [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY])
        tag = learn("topic", data, settings=LearnSettings(backbone="micro", epochs=1, progress=False)).tag
        assert main(["stage", "set", tag, "production"]) == 0
        assert main(["export", tag, "--out", str(folder / "backup.tar")]) == 0
        yield {"name": name, "tag": tag, "data": str(data), "backup": str(folder / "backup.tar")}
    finally:
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous


@pytest.fixture
def work(hostile_store, monkeypatch, tmp_path):
    monkeypatch.setenv("CTT_MODEL_NAME", hostile_store["name"])
    monkeypatch.setenv("CTT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return {**hostile_store, "out": str(tmp_path / "out.tar")}


def _tree(root: Path, deep: bool) -> dict:
    seen = {}
    if not root.is_dir():
        return seen
    for directory, folders, files in os.walk(root):
        for entry in folders + files:
            path = Path(directory) / entry
            seen[str(path)] = (path.lstat().st_size, path.lstat().st_mtime_ns)
        if not deep:
            break
    return seen


def snapshot(name: str) -> dict:
    """The store of ``name``, the BentoML home around it, and the working folder. (The home's own
    parent is the shared temporary folder, which other processes change.)"""
    home = store.models_dir().resolve().parent
    return {**_tree(home, False), **_tree(store.models_dir(), False),
            **_tree(store.models_dir() / name, True), **_tree(store.state_dir(), True),
            **_tree(store.staging_dir(), True), **_tree(Path.cwd(), True)}


def assert_refused(capsys, argv: list[str], name: str) -> None:
    before = snapshot(name)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("ctt: error:") and "Traceback" not in err, (argv, err)
    assert out == "", (argv, out)
    assert snapshot(name) == before, argv


# ----- tags ------------------------------------------------------------------------------------
def hostile_tags() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KNOWN_HOSTILE), st.text(max_size=70),
                     st.builds(lambda a, b, c: a + b + c, st.text(max_size=20), INVISIBLE, st.text(max_size=20)),
                     st.builds(lambda a: f"ctt:{a}", st.text(max_size=30)))


TAG_COMMANDS = {
    "models delete": lambda t, w: ["models", "delete", "--", t],
    "models delete --force --yes": lambda t, w: ["models", "delete", "--force", "--yes", "--", t],
    "stage set": lambda t, w: ["stage", "set", "--", t, "production"],
    "verify TAG": lambda t, w: ["verify", "--", t],
    "export TAG": lambda t, w: ["export", "--out", w["out"], "--", t],
    "export --range OLDER..": lambda t, w: ["export", f"--range={t}..{w['tag']}", "--out", w["out"]],
    "export --range ..NEWER": lambda t, w: ["export", f"--range={w['tag']}..{t}", "--out", w["out"]],
    "predict --model": lambda t, w: ["predict", "--task", "topic", "--text", "goal", f"--model={t}"],
    "evaluate --model": lambda t, w: ["evaluate", "--task", "topic", "--data", w["data"], f"--model={t}"],
    "learn --from": lambda t, w: ["learn", "--task", "more", "--train", w["data"], f"--from={t}", "--quiet"],
    "deploy release --model-tag": lambda t, w: ["deploy", "release", "--env", "staging", "--image",
                                                "ghcr.io/example/ctt:1.0", f"--model-tag={t}"],
}


@pytest.mark.parametrize("command", list(TAG_COMMANDS))
@EXAMPLES
@given(tag=hostile_tags())
def test_every_command_taking_a_tag_refuses_a_hostile_one_and_changes_nothing(capsys, work, command, tag):
    if not _refused(lambda t: parse_tag(t, work["name"]))(tag) and command != "deploy release --model-tag":
        tag = tag + "/"  # a tag the grammar accepts is no test of refusal here: make it one it refuses
    assert_refused(capsys, TAG_COMMANDS[command](tag, work), work["name"])
    assert [v.tag for v in store.list_versions()] == [work["tag"]]


# ----- paths -----------------------------------------------------------------------------------
def hostile_paths() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["", "a\x00b", "out\n.tar", "\udcff.tar", "x" * 5000, "a/" + "b" * 300,
                                      "\t", "o\u202eut.tar"]),
                     st.builds(lambda a, b, c: a + b + c, st.text(max_size=20), INVISIBLE, st.text(max_size=20)))


PATH_COMMANDS = {
    "export --out": lambda p, w: ["export", w["tag"], f"--out={p}"],
    "import SOURCE": lambda p, w: ["import", "--", p],
    "import --allow-backbone": lambda p, w: ["import", w["backup"], f"--allow-backbone={p}"],
    "learn --train": lambda p, w: ["learn", "--task", "more", f"--train={p}", "--quiet"],
    "learn --eval": lambda p, w: ["learn", "--task", "more", "--train", w["data"], f"--eval={p}", "--quiet"],
    "evaluate --data": lambda p, w: ["evaluate", "--task", "topic", f"--data={p}"],
}


@pytest.mark.parametrize("command", list(PATH_COMMANDS))
@EXAMPLES
@given(path=hostile_paths())
def test_every_command_taking_a_path_refuses_a_hostile_one_and_changes_nothing(capsys, work, command, path):
    assert_refused(capsys, PATH_COMMANDS[command](path, work), work["name"])


# ----- durations, sizes, digests, stages --------------------------------------------------------
def hostile_values(parse) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KNOWN_HOSTILE + ["999999999d", "1e9d", "nan", "-1d", "3 months", "0x10",
                                                      "99999999999999999999", "1.5GB", "abc" * 30]),
                     st.text(max_size=30)).filter(_refused(parse))


def _stage(text: str) -> None:
    from model.store.stages import check_stage

    check_stage(text)


def _sha256(text: str) -> None:
    from training.backup import check_sha256

    check_sha256(text)


def _size(text: str) -> None:
    from training.backup import parse_size

    parse_size(text, "--max-bytes")


VALUE_COMMANDS = {
    "feedback prune --older-than": (parse_age, lambda v, w: ["feedback", "prune", f"--older-than={v}"]),
    "feedback prune --older-than --yes --force": (
        parse_age, lambda v, w: ["feedback", "prune", f"--older-than={v}", "--yes", "--force"]),
    "stage set TAG STAGE": (_stage, lambda v, w: ["stage", "set", w["tag"], "--", v]),
    "stage rollback STAGE": (_stage, lambda v, w: ["stage", "rollback", "--", v]),
    "stage show STAGE": (_stage, lambda v, w: ["stage", "show", "--", v]),
    "import --sha256": (_sha256, lambda v, w: ["import", w["backup"], f"--sha256={v}"]),
    "import --max-bytes": (_size, lambda v, w: ["import", w["backup"], f"--max-bytes={v}"]),
}


@pytest.mark.parametrize("command", list(VALUE_COMMANDS))
@EXAMPLES
@given(data=st.data())
def test_every_command_taking_a_duration_size_digest_or_stage_refuses_a_hostile_one(capsys, work, command, data):
    parse, argv = VALUE_COMMANDS[command]
    value = data.draw(hostile_values(parse))
    assert_refused(capsys, argv(value, work), work["name"])
    assert store.stage_version("production").tag == work["tag"]


# ----- the model name --------------------------------------------------------------------------
NAME_COMMANDS = [["models"], ["verify"], ["verify", "--repair", "--yes"], ["models", "delete", "--yes", "abc"],
                 ["stage", "show"], ["stage", "set", "abc", "production"], ["export", "--all", "--out", "out.tar"],
                 ["predict", "--task", "topic", "--text", "goal"]]


@pytest.mark.parametrize("argv", NAME_COMMANDS, ids=" ".join)
@EXAMPLES
@given(name=st.one_of(st.sampled_from(KNOWN_HOSTILE), st.text(min_size=1, max_size=70)))
def test_every_store_command_refuses_a_hostile_model_name(capsys, work, monkeypatch, argv, name):
    if "\x00" in name or not _refused(check_model_name)(name) or not name.strip():
        name = name.replace("\x00", "") + "/.."  # one the rules refuse, and the environment can hold
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        name = "../" + name.encode("utf-8", "replace").decode("utf-8", "replace").replace("\x00", "")
    if name.isspace() or not name:
        name = "../x"
    monkeypatch.setenv("CTT_MODEL_NAME", name)
    assert_refused(capsys, argv, work["name"])
    monkeypatch.setenv("CTT_MODEL_NAME", work["name"])
    assert [v.tag for v in store.list_versions()] == [work["tag"]]


@pytest.mark.parametrize("name", ["topic\n", "topic\r\n", "\ntopic", "to pic", "", "-topic", "t" * 65])
def test_a_task_name_with_a_line_break_or_anything_outside_the_rule_is_refused(name):
    from model.ctt import check_task_name

    with pytest.raises(CTTError, match="invalid task name"):
        check_task_name(name)


def test_an_image_reference_with_a_trailing_line_break_is_refused():
    from deploy.spec import check_image

    with pytest.raises(CTTError, match="not an image reference"):
        check_image("staging", "registry.example/ctt:1\n")
