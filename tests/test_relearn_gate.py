"""The gate on a relearned task (training/gate.py) and the check of feedback against the files it
would overrule (training/feedback.py ``vet_feedback``): a relearned task clearly worse than the
parent's module is refused unless --allow-relabel, which the version records."""

from __future__ import annotations

import pytest

from model.errors import CTTError
from tests.conftest import MONEY, SPORT, write_jsonl
from training.data import Example

SWAPPED = {"sport": "money", "money": "sport"}


def test_a_relearn_clearly_worse_than_the_parent_is_refused_unless_a_relabelling_is_allowed(
        empty_store, topic_files, capsys):
    from model import store
    from training.cli import main

    train, test = topic_files
    common = ["--backbone", "micro", "--epochs", "2", "--quiet"]
    assert main(["learn", "--task", "topic", "--train", str(train), "--eval", str(test), *common]) == 0
    parent = store.get_version()
    flipped = write_jsonl(train.parent / "flipped.jsonl",
                          [(t, "money") for t in SPORT] * 2 + [(t, "sport") for t in MONEY] * 2)
    capsys.readouterr()
    # main registered this at below chance: the relearned task had no floor.
    assert main(["learn", "--task", "topic", "--train", str(flipped), "--eval", str(test), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"relearned task 'topic' is clearly worse than {parent.tag}'s module" in err, err
    assert "right only with the parent's module" in err and "--allow-relabel" in err
    assert store.get_version().tag == parent.tag

    # A deliberate relabelling, without --eval: measured on the parent's stored set, recorded.
    assert main(["learn", "--task", "topic", "--train", str(flipped), "--allow-relabel", *common]) == 0
    assert "registered with --allow-relabel" in capsys.readouterr().err
    relabelled = store.get_version()
    gate = relabelled.record()["relearn_gate"]
    assert gate["clearly_worse"] and gate["allowed"] and list(gate["sets"]) == ["parent"]
    assert gate["parent_accuracy"] == 1.0 and gate["accuracy"] < 0.5
    assert relabelled.metadata["relearn_gate"] == gate
    assert relabelled.record()["training"]["settings"]["allow_relabel"] is True


def test_feedback_that_poisons_texts_like_the_evaluation_texts_is_refused_by_the_gate(
        empty_store, topic_files, micro_settings):
    """Near-copies of the evaluation texts with the other label contradict no file, so they train;
    the gate then finds the relearned task clearly worse on the evaluation texts themselves."""
    from model import store
    from training.feedback import FeedbackBatch
    from training.learn import learn

    train, test = topic_files
    learn("topic", train, test, settings=micro_settings())
    parent = store.get_version()
    poison = [Example(f"{text} {word}", SWAPPED[label]) for text, label in
              [(t, "sport") for t in SPORT] + [(t, "money") for t in MONEY] for word in ("today", "again", "now")]
    batch = FeedbackBatch(poison, {"rows": len(poison), "examples": len(poison), "up_to_id": len(poison),
                                   "sources": {"review": len(poison)}, "database": "-"},
                          [("review", "key:reviewer")] * len(poison))
    with pytest.raises(CTTError, match=r"relearned task 'topic' is clearly worse") as caught:
        learn("topic", train, test, settings=micro_settings(), feedback=batch)
    assert "0 only with the new one" in str(caught.value)
    assert store.get_version().tag == parent.tag


def test_feedback_is_counted_against_the_files_by_source_and_credential():
    from training.feedback import FeedbackBatch, vet_feedback

    training = [Example("a", "x"), Example("b", "x"), Example("b", "y")]
    evaluation = {"parent": [Example("c", "x")], "eval": [Example("d", "y")]}
    batch = FeedbackBatch([Example("a", "y"), Example("b", "y"), Example("c", "y"), Example("d", "y"),
                           Example("e", "x")], {"rows": 5},
                          [("review", "key:r"), ("correction", "key:w"), ("review", "key:r"), ("correction", "key:w"),
                           ("correction", "key:w")])
    with pytest.raises(CTTError, match=r"2 of 5 example\(s\) \(40 %\).*2 of 2 review; 2 from key:r") as caught:
        vet_feedback(batch, training, evaluation, max_share=0.2, allowed=False)
    assert "--allow-contradictions" in str(caught.value)
    trained, report = vet_feedback(batch, training, evaluation, max_share=0.4, allowed=False)
    # "b" has the label y in the file too (not a contradiction); evaluation texts never train.
    assert trained == [Example("a", "y"), Example("b", "y"), Example("e", "x")]
    assert report["contradictions"] == {"training_file": 1, "evaluation": 1, "total": 2, "share": 0.4,
                                        "max_share": 0.4, "allowed": False}
    assert report["evaluation_texts_not_trained"] == 2
    assert report["by_credential"]["key:w"] == {"examples": 3, "contradictions": 0, "sources": {"correction": 3}}
