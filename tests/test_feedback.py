"""Production feedback in a real database: the same tests on SQLite and on a real PostgreSQL
server (Debian's, started by the fixture in a temporary folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from model.errors import CTTError
from model.feedback.database import (FeedbackDatabase, FeedbackItem, database_url, latest_labels, normalise_url,
                                     utc_now)
from model.feedback.schema import Base
from tests.postgres import PostgresServer, start_postgres

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = start_postgres()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))  # CI installs PostgreSQL (make tools): missing is a failure there
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_kind(request):
    return request.param


@pytest.fixture
def fresh_url(database_kind, request, tmp_path):
    """A URL of an empty database of the parametrized kind."""
    if database_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'feedback.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"ctt_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def database(fresh_url):
    db = FeedbackDatabase(fresh_url, timeout_s=5)
    yield db
    db.close()


def items(count: int, task: str = "topic", prefix: str = "text", **fields) -> list[FeedbackItem]:
    return [FeedbackItem(text=f"{prefix} {i}", task=task, label="sport" if i % 2 else "money", **fields)
            for i in range(count)]


# ----- schema and migrations --------------------------------------------------------------
def test_migrations_from_an_empty_database_match_the_models(database):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert database.revision() is None
    assert database.migrate() == "0001"
    assert database.revision() == "0001"
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": "ctt_alembic_version"})
        assert compare_metadata(context, Base.metadata) == []
    assert database.migrate() == "0001"  # a second run is a no-op


def test_concurrent_migrations_never_race(fresh_url):
    """Four processes (workers, replicas) migrating one empty database at once: one migrates,
    the others wait for its lock and find nothing to do."""
    script = ("import sys; from model.feedback.database import FeedbackDatabase; "
              "print(FeedbackDatabase(sys.argv[1]).migrate())")
    processes = [subprocess.Popen([sys.executable, "-c", script, fresh_url], cwd=PROJECT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["0001"] * 4
    database = FeedbackDatabase(fresh_url)
    with database.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM ctt_alembic_version")).scalar() == 1
    database.close()


# ----- writes and reads -------------------------------------------------------------------
def test_round_trip_with_stats_and_idempotent_ids(database):
    first = [FeedbackItem("the striker scored", "topic", "sport", prediction="sport", source="review", id="r1"),
             FeedbackItem("bank raises rates", "topic", "money", prediction="sport", source="review", id="r2"),
             FeedbackItem("oil prices climb", "topic", "money", prediction="sport", request_id="req-9"),
             FeedbackItem("is it raining?", "question", "q")]
    result = database.add(first, model_tag="ctt:v1")
    assert (len(result.stored), result.already_stored) == (4, 0)
    # A retry of the same rows (ids) adds nothing; a repeated id within one request is stored once.
    again = database.add(first[:2] + [FeedbackItem("new", "topic", "sport", id="r3"),
                                      FeedbackItem("new", "topic", "sport", id="r3")])
    assert ([i.id for i in again.stored], again.already_stored) == (["r3"], 3)
    assert database.count() == 5

    rows = database.rows("topic")
    assert [(r.text, r.label, r.prediction, r.source) for r in rows] == [
        ("the striker scored", "sport", "sport", "review"), ("bank raises rates", "money", "sport", "review"),
        ("oil prices climb", "money", "sport", "correction"), ("new", "sport", None, "correction")]
    assert rows[2].request_id == "req-9" and rows[0].model_tag == "ctt:v1" and rows[0].key == "r1"
    assert rows[0].id < rows[1].id < rows[2].id < rows[3].id

    stats = {(s["task"], s["source"]): s for s in database.stats()}
    assert stats[("topic", "review")]["rows"] == 2 and stats[("topic", "review")]["agreed"] == 1
    assert stats[("topic", "review")]["with_prediction"] == 2
    assert stats[("topic", "correction")]["rows"] == 2 and stats[("topic", "correction")]["with_prediction"] == 1
    assert stats[("question", "correction")]["rows"] == 1
    assert database.stats(since=utc_now() + timedelta(minutes=1)) == []


def test_concurrent_writers_lose_nothing_and_store_nothing_twice(database):
    """Eight writers at once, each sending 20 requests of 5 rows and then retrying all of them."""
    errors = []

    def writer(number: int) -> None:
        try:
            batches = [[FeedbackItem(f"w{number} r{r} i{i}", "topic", "sport", id=f"{number}-{r}-{i}")
                        for i in range(5)] for r in range(20)]
            for batch in batches:
                assert len(database.add(batch).stored) == 5
            for batch in batches:
                assert database.add(batch).already_stored == 5
        except Exception as exc:  # reported below: an assertion in a thread would be lost
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert database.count() == 8 * 20 * 5
    assert len({r.key for r in database.rows("topic")}) == 800


def test_prune_deletes_only_old_rows(database):
    database.add(items(3, prefix="old"))
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE ctt_feedback SET created_at = :t"), {"t": utc_now() - timedelta(days=100)})
    database.add(items(2, prefix="new"))
    assert database.prune(timedelta(days=90)) == 3
    assert [r.text for r in database.rows("topic")] == ["new 0", "new 1"]
    assert database.prune(timedelta(days=90)) == 0


def test_the_newest_label_of_a_text_wins(database):
    database.add([FeedbackItem("ambiguous", "topic", "sport"), FeedbackItem("other", "topic", "money"),
                  FeedbackItem(" ambiguous ", "topic", "money", source="review")])
    kept = latest_labels(database.rows("topic"))
    assert [(r.text.strip(), r.label) for r in kept] == [("other", "money"), ("ambiguous", "money")]


def test_database_urls_are_checked_and_never_shown_with_passwords(tmp_path):
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'feedback.sqlite3'}"
    assert normalise_url("postgresql://u:p@db:5432/ctt") == "postgresql+psycopg://u:p@db:5432/ctt"
    assert normalise_url("postgres://u:p@db/ctt") == "postgresql+psycopg://u:p@db/ctt"
    for bad, fragment in (("mysql://u:secret@db/ctt", "uses 'mysql'"), ("not a url", "not a database URL"),
                          ("sqlite://", "in-memory")):
        with pytest.raises(CTTError, match=fragment) as caught:
            normalise_url(bad)
        assert "secret" not in str(caught.value)
    db = FeedbackDatabase("postgresql+psycopg://ctt:hunter2@127.0.0.1:1/ctt", timeout_s=1, attempts=2)
    assert "hunter2" not in db.public_url


def test_an_unreachable_database_is_unavailable_quickly_not_an_error():
    from model.feedback.database import FeedbackUnavailable
    from deploy.local import free_port

    db = FeedbackDatabase(f"postgresql+psycopg://ctt:hunter2@127.0.0.1:{free_port()}/ctt", timeout_s=1, attempts=2)
    with pytest.raises(FeedbackUnavailable, match="unavailable") as caught:
        db.add(items(1))
    assert "hunter2" not in str(caught.value)
