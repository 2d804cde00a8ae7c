"""The settings table is the one source: everything that names a setting is derived from it or
checked against it here, by importing it (never by searching source files)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import yaml

from model.errors import CTTError
from model.serving.auth import Credentials, check_startup_credentials
from model.settings import BY_NAME, SETTINGS, SecretSource, Settings, settings_markdown
from tests.serving import PROJECT

NOT_SETTINGS = {"TOKENIZERS_PARALLELISM", "BENTOML_DO_NOT_TRACK"}  # third-party switches


def test_every_setting_has_one_field_and_every_field_one_setting():
    table = {s.field for s in SETTINGS if not s.secret}
    assert table == {f.name for f in dataclasses.fields(Settings)}
    assert len(BY_NAME) == len(SETTINGS)
    defaults = Settings.from_environ({})
    assert defaults.environment == "development" and defaults.max_items == 64 and not defaults.fails_closed


def test_the_operators_guide_shows_the_table_as_generated():
    guide = (PROJECT / "docs" / "operating.md").read_text(encoding="utf-8")
    assert settings_markdown() in guide, ("docs/operating.md's settings table is stale: "
                                          "paste `python -m model.settings`")


def test_bentofile_sets_only_what_differs_from_the_table():
    bentofile = yaml.safe_load((PROJECT / "bentofile.yaml").read_text())
    envs = {e["name"]: str(e["value"]) for e in bentofile["envs"]}
    for name, value in envs.items():
        if name in NOT_SETTINGS:
            continue
        assert name in BY_NAME, f"bentofile sets {name}, which is not in the settings table"
        assert value != BY_NAME[name].default, f"bentofile repeats {name}'s default"
        BY_NAME[name].value({name: value})  # the service accepts it
    assert envs["ENVIRONMENT"] == "production", "an image must fail closed unless told otherwise"


def test_values_are_checked_with_the_setting_named():
    for environ, message in [({"CTT_MAX_BATCH_SIZE": "1"}, "CTT_MAX_BATCH_SIZE='1': must be at least 2"),
                             ({"MONITORING_ENABLED": "maybe"}, "MONITORING_ENABLED='maybe': must be true or false"),
                             ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud': must be one of"),
                             ({"CTT_MAX_ITEMS": "500"}, "CTT_MAX_BODY_BYTES=1048576 is below")]:
        with pytest.raises(CTTError, match=message):
            Settings.from_environ(environ)
    assert Settings.from_environ({"LOG_LEVEL": "debug", "CTT_MAX_ITEMS": ""}).log_level == "DEBUG"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_secret_files_are_reread_when_they_change(tmp_path):
    path = tmp_path / "api-key"
    path.write_text("first\n\n# a comment\nsecond\n")
    clock = Clock()
    source = SecretSource("API_KEY", {"API_KEY_FILE": str(path)}, reload_s=10, clock=clock)
    assert source.get() == "first\n\n# a comment\nsecond"
    (tmp_path / "swap").write_text("third\n")
    (tmp_path / "swap").replace(path)
    assert source.get().endswith("second"), "checked at most every reload_s"
    clock.now = 10
    assert source.get() == "third"
    path.unlink()
    clock.now = 20
    assert source.get() is None, "a removed Secret holds no key"
    assert SecretSource("API_KEY", {"API_KEY": "inline"}).get() == "inline"


@pytest.mark.parametrize("environ, fails", [
    ({"ENVIRONMENT": "development"}, False),
    ({"ENVIRONMENT": "test"}, False),
    ({"ENVIRONMENT": "staging"}, True),
    ({"ENVIRONMENT": "production"}, True),
    ({"ENVIRONMENT": "production", "API_KEY": "k"}, False),
    ({"ENVIRONMENT": "production", "JWT_SECRET": "s" * 32}, False),
    ({"ENVIRONMENT": "development", "JWT_SECRET": "s" * 31}, True),
])
def test_fail_closed_outside_development(environ, fails):
    settings = Settings.from_environ(environ)
    credentials = Credentials(settings, SecretSource("API_KEY", environ), SecretSource("JWT_SECRET", environ))
    if fails:
        with pytest.raises(CTTError):
            check_startup_credentials(settings, credentials)
    else:
        check_startup_credentials(settings, credentials)


def test_learn_refuses_too_many_labels_in_one_line(tmp_path, empty_store, capsys):
    from training.cli import main

    train = tmp_path / "wide.jsonl"
    train.write_text("".join(json.dumps({"text": f"text {i}", "label": f"label-{i}"}) + "\n" for i in range(300)))
    assert main(["learn", "--task", "wide", "--train", str(train), "--backbone", "micro", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 300 different labels; a task may have at most 256 (CTT_MAX_LABELS)" in err[0]


def test_settings_table_prints_as_markdown():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "model.settings"], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == settings_markdown()
