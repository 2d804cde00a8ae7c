"""Labelled files: JSONL (``{"text": ..., "label": ...}`` per line) or CSV with ``text,label``."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from model.errors import CTTError
from model.settings import default

MAX_LABELS: int = default("CTT_MAX_LABELS")


@dataclass(frozen=True)
class Example:
    text: str
    label: str

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label}


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CTTError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CTTError(f"{path}: line {line} is not valid UTF-8 text") from None


def _example(path: Path, where: str, text: object, label: object) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise CTTError(f"{path}: {where} has an empty or non-string 'text'")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise CTTError(f"{path}: {where} has an empty or invalid 'label' (use a string or integer)")
    return Example(text.strip(), str(label).strip())


def _read_jsonl(path: Path, content: str) -> list[Example]:
    examples = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CTTError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise CTTError(f"{path}: line {number} needs an object with 'text' and 'label' keys")
        examples.append(_example(path, f"line {number}", record["text"], record["label"]))
    return examples


def _read_csv(path: Path, content: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(content))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "text" not in columns or "label" not in columns:
        raise CTTError(f"{path}: CSV needs a header with 'text' and 'label' columns, found {columns}")
    reader.fieldnames = columns
    examples = []
    try:
        for row in reader:
            examples.append(_example(path, f"row {reader.line_num}", row.get("text"), row.get("label")))
    except csv.Error as exc:
        raise CTTError(f"{path}: malformed CSV near line {reader.line_num} ({exc})") from None
    return examples


def read_labelled(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise CTTError(f"{path}: no such file")
    if not path.is_file():
        raise CTTError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in {".jsonl", ".json", ".ndjson", ".csv"}:
        raise CTTError(f"{path}: unknown format '{suffix or 'no extension'}' (use .jsonl or .csv)")
    content = _read_text(path)
    examples = _read_csv(path, content) if suffix == ".csv" else _read_jsonl(path, content)
    if not examples:
        raise CTTError(f"{path}: no labelled examples")
    return examples


def label_set(examples: list[Example]) -> list[str]:
    return sorted({example.label for example in examples})


def read_training_file(path: str | Path, max_labels: int = MAX_LABELS) -> list[Example]:
    examples = read_labelled(path)
    labels = label_set(examples)
    if len(labels) < 2:
        raise CTTError(f"{path}: needs at least two different labels, found {labels}")
    if len(labels) > max_labels:
        raise CTTError(f"{path}: has {len(labels)} different labels; a task may have at most {max_labels} "
                       "(CTT_MAX_LABELS): every task's head is padded to the widest, so this bounds every batch")
    return examples


def stratified_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each label (at least one where a label has two or more)."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    rng = random.Random(seed)
    kept, held = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        count = min(max(1, round(len(group) * fraction)), len(group) - 1) if len(group) > 1 else 0
        held.extend(group[:count])
        kept.extend(group[count:])
    return kept, held


def cap_stratified(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if len(examples) <= limit:
        return examples
    _, capped = stratified_split(examples, limit / len(examples), seed)
    return capped
