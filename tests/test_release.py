"""Release checks against real `bentoml serve` processes (moved from tests/test_service.py)."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.conftest import MONEY, SPORT, write_jsonl
from tests.serving import bentoml_serve
from training.learn import LearnSettings, learn

API_KEY = "test-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory):
    name = f"ctt-release-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get("CTT_MODEL_NAME")
    os.environ["CTT_MODEL_NAME"] = name
    folder = tmp_path_factory.mktemp("release-data")
    learn("topic", write_jsonl(folder / "t.jsonl", [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY]),
          settings=LearnSettings(backbone="micro", epochs=1, progress=False))
    try:
        with bentoml_serve(env={"CTT_MODEL_NAME": name, "API_KEY": API_KEY}) as url:
            yield url
    finally:
        if previous is None:
            os.environ.pop("CTT_MODEL_NAME", None)
        else:
            os.environ["CTT_MODEL_NAME"] = previous


@pytest.mark.parametrize("script", ["smoke_tests.py", "integration_tests.py"])
def test_deployment_scripts_pass_against_a_live_server(secured_server, script):
    import subprocess
    import sys

    from tests.serving import PROJECT

    result = subprocess.run([sys.executable, str(PROJECT / "scripts" / script), "--url", secured_server],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "API_KEY": API_KEY})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout and "FAIL" not in result.stdout
    assert "auth failure" in result.stdout and "SKIP" not in result.stdout


def test_deployment_scripts_fail_when_the_service_is_down():
    import subprocess
    import sys

    from tests.serving import PROJECT, free_port

    result = subprocess.run([sys.executable, str(PROJECT / "scripts" / "smoke_tests.py"),
                             "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "FAIL" in result.stdout


def test_promote_keeps_the_switch_when_smoke_tests_pass(secured_server, tmp_path, monkeypatch, capsys):
    import json as json_

    from deploy.render import RELEASE_FILE, overlay_dir, render
    from training.cli import main

    monkeypatch.setenv("API_KEY", API_KEY)
    render("staging", "registry.example.com/ctt@sha256:" + "ab" * 32, tmp_path)
    code = main(["deploy", "promote", "--env", "staging", "--to", "green", "--out", str(tmp_path),
                 "--url", secured_server])
    assert code == 0, capsys.readouterr().err
    assert json_.loads((overlay_dir(tmp_path, "staging") / RELEASE_FILE).read_text())["active"] == "green"
