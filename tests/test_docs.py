"""The documentation works: every example of README.md and docs/ that can run here runs against a
real `bentoml serve` (tests/docs_examples.py says how blocks are marked), the others are parsed,
and every relative link resolves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import micro_model
from tests.docs_examples import DOCUMENTED_ADDRESS, blocks, broken_links, expectation_problem
from tests.serving import PROJECT, bentoml_serve

PAGES = sorted([PROJECT / "README.md", PROJECT / "ARCHITECTURE.md", PROJECT / "CHANGELOG.md",
                *(PROJECT / "docs").glob("*.md")])
RUNNABLE = [page for page in PAGES if any(block.kind == "run" for block in blocks(page))]
README_MAX_LINES = 300
API_KEY = "docs-key-" + uuid.uuid4().hex
# The demo's tasks, learned on a few texts with the micro backbone: what the examples name.
DEMO_ROWS = {
    "bbc-topic": [(text, label) for label, texts in {
        "business": ["Shares in the bank rose 5%", "profits beat forecasts", "the economy grew"],
        "sports": ["the striker scored twice", "tennis final set", "the team won the cup"],
        "tech": ["the new phone sold well", "a faster chip for laptops", "software update released"],
        "politics": ["the minister resigned", "parliament votes today", "election results are in"],
        "entertainment": ["the film won awards", "a new album tops the charts", "the actor's new role"],
    }.items() for text in texts],
    "bbc-headline-or-body": [(text, label) for label, texts in {
        "headline": ["Bank shares rise", "Striker scores twice", "Film wins award"],
        "body": ["Shares in the bank rose five percent on Monday after results.",
                 "The striker scored twice in the second half of the match.",
                 "The film won three awards at the ceremony on Sunday night."],
    }.items() for text in texts],
}


def test_the_readme_is_a_front_door():
    lines = (PROJECT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; guides belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_number_is_left_to_fill_in(page):
    assert "⟨" not in page.read_text(encoding="utf-8"), f"{page.name} holds a placeholder (⟨...⟩) for a measurement"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page, PROJECT) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_examples_that_cannot_run_here_are_valid_code(page):
    for block in blocks(page):
        if block.kind != "cluster":
            continue
        if block.language == "python":
            compile(block.text, block.where, "exec")
        else:
            assert block.language in ("bash", "sh"), f"{block.where}: a cluster example is bash or python"
            checked = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert checked.returncode == 0, f"{block.where}: {checked.stderr}"


def test_examples_are_marked_with_what_the_harness_knows():
    """A typo (```bash runn) would make an example silently plain text."""
    for page in PAGES:
        for block in blocks(page):
            words = set(block.info.split()[1:])
            assert words <= {"run", "expect", "cluster"}, f"{block.where}: unknown marks {words}"
            assert block.kind != "expect" or block.language == "text", f"{block.where}: expect blocks are text"


def test_expected_output_matches_lines_in_order():
    assert expectation_problem('{"stored": 2, ...}\n...\nok', 'x\n{"stored": 2, "already_stored": 0}\ny\nok\n') is None
    assert expectation_problem("b\na", "a\nb\n") is not None


@pytest.fixture(scope="module")
def documented_service(tmp_path_factory):
    """The demo's task names on a micro model, served with an API key, as the examples expect."""
    with micro_model("ctt-docs", tmp_path_factory.mktemp("docs-data"), DEMO_ROWS) as name:
        home = os.environ["BENTOML_HOME"]
        data = str(tmp_path_factory.mktemp("docs-feedback"))
        env = {"CTT_MODEL_NAME": name, "ENVIRONMENT": "test", "API_KEY": f"{API_KEY} id=docs "
               "permissions=classify,feedback,review", "JWT_SECRET": "", "CTT_DATA_DIR": data}
        with bentoml_serve(env=env) as url:
            yield url, {"BENTOML_HOME": home, "CTT_MODEL_NAME": name, "CTT_DATA_DIR": data}


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda page: page.name)
def test_examples_run(page, documented_service, tmp_path):
    url, store = documented_service
    venv = Path(sys.prefix)
    # The page's working folder stands for the repository's root: `.venv/bin/ctt` as documented.
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    environment = {**os.environ, **store, "API_KEY": API_KEY, "PYTHONPATH": str(PROJECT),
                   "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    examples = [block for block in blocks(page) if block.kind in ("run", "expect")]
    output = ""
    for block in examples:
        if block.kind == "expect":
            problem = expectation_problem(block.text, output)
            assert problem is None, f"{block.where}: {problem}"
            continue
        text = block.text.replace(DOCUMENTED_ADDRESS, url)
        if block.language == "python":
            command = [sys.executable, "-c", text]
        else:
            command = ["bash", "-euo", "pipefail", "-c", text]
        ran = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        output = ran.stdout + ran.stderr
        assert ran.returncode == 0, f"{block.where} exited {ran.returncode}:\n{output[-3000:]}"
    shutil.rmtree(tmp_path, ignore_errors=True)
