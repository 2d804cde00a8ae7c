"""The examples of README.md and docs/, as tests/test_docs.py runs them.

A fenced block is an example when its info string says so after the language:

    ```bash run          run in order with the other examples of its page (bash -euo pipefail)
    ```python run        run with the project's Python
    ```text expect       what the run block before it prints: each line must appear, in order
                         (``...`` within a line matches anything; a line ``...`` skips lines)
    ```bash cluster      needs a cluster, a registry or a long run: parsed (bash -n), not run
    ```python cluster    the same for Python: compiled, not run

Run blocks of one page share a working folder and a real `bentoml serve`; ``http://localhost:3000``
in an example means that server. The folder stands for the repository's root as a reader sees it
after `make serve`: ``.venv`` is the project's virtualenv (so ``.venv/bin/ctt`` works as written)
and the project is importable. The shell environment holds API_KEY (the server's key: the examples
send ``$API_KEY`` as a reader with a key of their own would), a BentoML home whose model has the
demo's task names on a micro backbone (CTT_MODEL_NAME), and the server's feedback database
(CTT_DATA_DIR), so the command line sees what the service stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
DOCUMENTED_ADDRESS = "http://localhost:3000"
# Links and images: a plot that is not there is as broken as a page.
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    kind: str  # run, expect, cluster, or "" (not an example)
    text: str
    info: str = ""  # the fence's whole info string

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, words = match.group("fence"), match.group("info").split()
        body, end = [], index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][len(match.group("indent")):])
            end += 1
        language = words[0] if words else ""
        kind = next((word for word in words[1:] if word in ("run", "expect", "cluster")), "")
        found.append(Block(page, index + 1, language, kind, "\n".join(body) + "\n", match.group("info").strip()))
        index = end + 1
    return found


def expectation_problem(expected: str, actual: str) -> str | None:
    """None when every expected line appears in ``actual``, in order; else what is missing."""
    output = [line.strip() for line in actual.splitlines()]
    position = 0
    for wanted in (line.strip() for line in expected.splitlines()):
        if not wanted or wanted == "...":
            continue
        pattern = re.compile(".*?".join(re.escape(part) for part in wanted.split("...")))
        while position < len(output) and not pattern.search(output[position]):
            position += 1
        if position == len(output):
            return f"expected a line matching {wanted!r} in:\n{actual[-2000:]}"
        position += 1
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text in lower case, punctuation but hyphens and
    underscores dropped, each space a hyphen. Emphasis marks are not text; an underscore inside a
    word or a code span is (`CTT_MAX_WAIT_S` gives ctt_max_wait_s)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(?<![\w`])_+|_+(?![\w`])|[*`]", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, counts, in_fence = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        count = counts.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        counts[base] = count + 1
    return found


def broken_links(page: Path, root: Path) -> list[str]:
    """Relative links of ``page`` whose file or heading does not exist."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    problems = []
    for match in LINK.finditer(text):
        target = match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if root not in destination.parents and destination != root:
            problems.append(f"{page.name}: {target} leaves the repository")
        elif not destination.exists():
            problems.append(f"{page.name}: {target} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{page.name}: {target}: no such heading")
    return problems
