"""Model tags as operators type them and archives carry them: parsed once, strictly.

A tag is ``NAME:VERSION``. Both parts follow BentoML's rules (lowercase letters, digits, ``.``,
``_`` and ``-``, starting and ending with a letter or digit, at most 63 characters) and CTT adds
one of its own: ``..`` never occurs (it is ``ctt export --range``'s separator, and a part that
could mean "the folder above" never reaches a path). Since the name and the version become folder
names (``models/<name>/<version>``, ``ctt-state/<name>.lock``), nothing that could escape a folder
gets past this module: no separator, no absolute path, no control or invisible character, no
empty part. ``tests/test_bentoml_internals.py`` checks that BentoML accepts every tag accepted
here.

This module imports nothing heavy: the settings table validates ``CTT_MODEL_NAME`` with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.errors import CTTError

PART_PATTERN = re.compile(r"[a-z0-9](?:[-._a-z0-9]*[a-z0-9])?")  # BentoML's tag_fmt
PART_MAX_CHARS = 63  # BentoML's tag_max_length
LATEST = "latest"
SHOWN_MAX_CHARS = 60
RULE = ("lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit, "
        f"at most {PART_MAX_CHARS} characters")


def shown(text: object) -> str:
    """``text`` quoted for a one-line message: control and invisible characters escaped, cut short."""
    quoted = repr(text)
    return quoted if len(quoted) <= SHOWN_MAX_CHARS else quoted[:SHOWN_MAX_CHARS - 4] + "…" + quoted[-1]


def part_problem(value: str) -> str | None:
    """Why ``value`` is not a valid tag name or version, or None."""
    if not value:
        return "is empty"
    if len(value) > PART_MAX_CHARS:
        return f"is longer than {PART_MAX_CHARS} characters"
    if ".." in value:
        return "contains '..'"
    if not PART_PATTERN.fullmatch(value):
        return f"must be {RULE}"
    return None


def check_model_name(name: str) -> str:
    """A model name (``CTT_MODEL_NAME``, the name part of a tag); raises ValueError with the reason."""
    problem = part_problem(name) if isinstance(name, str) else "is not text"
    if problem:
        raise ValueError(f"a model name {problem}")
    return name


@dataclass(frozen=True)
class TagRef:
    """A parsed tag. ``version`` None means the newest version of ``name``."""

    name: str
    version: str | None

    def __str__(self) -> str:
        return f"{self.name}:{self.version or LATEST}"


def _general_problem(text: str) -> str | None:
    if not text:
        return "is empty: name a version such as ctt:<version> ('ctt models' lists them)"
    if not text.isprintable() or any(c.isspace() for c in text):
        return "contains control, invisible or space characters"
    if "/" in text or "\\" in text:
        return "contains a path separator: a tag is NAME:VERSION, never a path"
    if ".." in text:
        return "contains '..'"
    if text.count(":") > 1:
        return "has more than one ':'"
    return None


def parse_tag(text: str, default_name: str, what: str = "tag", *, allow_latest: bool = True) -> TagRef:
    """``NAME:VERSION``, a bare ``VERSION`` (of ``default_name``), or ``NAME`` / ``NAME:latest`` for
    the newest version; anything else is a CTTError naming ``what`` and the problem in one line."""
    if not isinstance(text, str):
        raise CTTError(f"{what} {shown(text)} is not text")
    problem = _general_problem(text)
    name, colon, version = text.partition(":")
    if problem is None and colon and not name:
        problem = "has no name before ':'"
    elif problem is None and colon and not version:
        problem = "has no version after ':'"
    elif problem is None and not colon:
        name, version = (default_name, LATEST) if text in (default_name, LATEST) else (default_name, text)
    for label, value in (("name", name), ("version", version)):
        if problem is None and part_problem(value):
            problem = f"has a {label} that {part_problem(value)}" if colon else part_problem(value)
    if problem:
        raise CTTError(f"{what} {shown(text)} {problem}")
    if version == LATEST:
        if not allow_latest:
            raise CTTError(f"{what} {shown(text)}: name the version explicitly ('ctt models' lists them), "
                           "not the newest")
        return TagRef(name, None)
    return TagRef(name, version)


def tag_problem(text: object) -> str | None:
    """Why ``text`` is not an exact ``NAME:VERSION`` tag (as archives and records carry them), or None."""
    if not isinstance(text, str):
        return "is not text"
    problem = _general_problem(text)
    if problem:
        return problem
    name, colon, version = text.partition(":")
    if not colon:
        return "is not NAME:VERSION"
    for label, value in (("name", name), ("version", version)):
        reason = part_problem(value)
        if reason:
            return f"has a {label} that {reason}"
    if version == LATEST:
        return "names no exact version"
    return None


def exact_tag(text: object, what: str = "tag") -> TagRef:
    """An exact ``NAME:VERSION`` tag, or a CTTError."""
    problem = tag_problem(text)
    if problem:
        raise CTTError(f"{what} {shown(text)} {problem}")
    name, _, version = str(text).partition(":")
    return TagRef(name, version)
