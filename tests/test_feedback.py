"""Production feedback in a real database: the same tests on SQLite and on a real PostgreSQL
server (Debian's, started by the fixture in a temporary folder)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import make_url, text

from model.errors import CTTError
from model.feedback.database import (FeedbackConflict, FeedbackDatabase, FeedbackInvalid, FeedbackItem,
                                     FeedbackUnavailable, database_url, is_sqlite, latest_labels, normalise_url,
                                     storable_principal, utc_now)
from model.feedback.schema import SOURCES, Base
from model.serving.auth import ANONYMOUS, INTERNAL, Principal
from tests.conftest import MONEY, SPORT, write_jsonl
from deploy.local_postgres import PostgresServer, start_postgres

PROJECT = Path(__file__).resolve().parent.parent
HEAD = "0002"  # the newest migration


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = start_postgres()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))  # CI installs PostgreSQL (make tools): missing is a failure there
        pytest.skip(str(exc))
    yield server
    server.remove()


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
    assert database.migrate() == HEAD
    assert database.revision() == HEAD
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": "ctt_alembic_version"})
        assert compare_metadata(context, Base.metadata) == []
    assert database.migrate() == HEAD  # a second run is a no-op


def test_concurrent_migrations_never_race(fresh_url):
    """Four processes (workers, replicas) migrating one empty database at once: one migrates,
    the others wait for its lock and find nothing to do."""
    script = ("import sys; from model.feedback.database import FeedbackDatabase; "
              "print(FeedbackDatabase(sys.argv[1]).migrate())")
    processes = [subprocess.Popen([sys.executable, "-c", script, fresh_url], cwd=PROJECT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == [HEAD] * 4
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

    stats = {(s["task"], s["model_tag"], s["source"]): s for s in database.stats()}
    assert stats[("topic", "ctt:v1", "review")]["rows"] == 2 and stats[("topic", "ctt:v1", "review")]["agreed"] == 1
    assert stats[("topic", "ctt:v1", "review")]["with_prediction"] == 2
    assert stats[("topic", "ctt:v1", "correction")]["rows"] == 1
    assert stats[("topic", "ctt:v1", "correction")]["with_prediction"] == 1
    assert stats[("topic", None, "correction")]["rows"] == 1  # the retry's new row, stored without a version
    assert stats[("question", "ctt:v1", "correction")]["rows"] == 1
    assert database.stats(since=utc_now() + timedelta(hours=1)) == []


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
    database.clock = lambda: utc_now() - timedelta(days=100)
    database.add(items(3, prefix="old"))
    database.clock = utc_now
    database.add(items(2, prefix="new"))
    assert database.count_before(utc_now() - timedelta(days=90)) == 3
    assert database.prune(timedelta(days=90)) == 3
    assert [r.text for r in database.rows("topic")] == ["new 0", "new 1"]
    assert database.prune(timedelta(days=90)) == 0
    assert_counts_match_rows(database)


def test_the_newest_label_of_a_text_wins(database):
    database.add([FeedbackItem("ambiguous", "topic", "sport"), FeedbackItem("other", "topic", "money"),
                  FeedbackItem(" ambiguous ", "topic", "money", source="review")])
    kept = latest_labels(database.rows("topic"))
    assert [(r.text.strip(), r.label) for r in kept] == [("other", "money"), ("ambiguous", "money")]


# ----- counts: stats read maintained counts, exact through every write and delete -----------
def scanned_stats(database: FeedbackDatabase, since=None) -> list[dict]:
    """What stats must say, computed the slow way: from every row (the query stats ran before
    counts were kept), over whole hours from the window's start."""
    from model.feedback.counts import window_start

    with database.engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT task, model_tag, source, prediction, label, created_at FROM ctt_feedback")).all()
    start = window_start(since) if since is not None else None
    groups: dict[tuple, dict] = {}
    for row in rows:
        created = row.created_at if not isinstance(row.created_at, str) else datetime.fromisoformat(row.created_at)
        if start is not None and created < start:
            continue
        group = groups.setdefault((row.task, row.model_tag, row.source), {
            "task": row.task, "model_tag": row.model_tag, "source": row.source, "rows": 0, "with_prediction": 0,
            "agreed": 0, "first": created, "last": created})
        group["rows"] += 1
        group["with_prediction"] += row.prediction is not None
        group["agreed"] += row.prediction is not None and row.prediction == row.label
        group["first"], group["last"] = min(group["first"], created), max(group["last"], created)
    return sorted(groups.values(), key=lambda g: (g["task"], g["model_tag"] or "", g["source"]))


def assert_counts_match_rows(database: FeedbackDatabase, since=None) -> None:
    assert database.stats(since) == scanned_stats(database, since)


def test_stats_read_only_the_counts_never_the_rows(database):
    """Constant work per call: whatever the table holds, stats read a few count rows."""
    import re

    from sqlalchemy import event

    database.add(items(6) + items(3, task="question", source="review", prediction="q"), model_tag="ctt:v1")
    statements: list[str] = []
    event.listen(database.engine, "before_cursor_execute",
                 lambda _connection, _cursor, statement, *_args: statements.append(statement))
    database.stats()
    database.stats(since=utc_now() - timedelta(days=3))
    touched = [s for s in statements if "ctt_feedback" in s]
    assert touched and not [s for s in touched if re.search(r"\bctt_feedback\b(?!_counts)", s)], touched


BASE_TIME = datetime(2026, 3, 1, 12, 0)
# Minutes after BASE_TIME, on and around hour and day boundaries, so buckets share rows and
# deletes cut through them; in any order (clocks go back).
MOMENTS = st.sampled_from([0, 1, 30, 59, 60, 61, 119, 720, 1439, 1440, 1441, 2000, 2880])


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(operations=st.lists(st.one_of(
    st.tuples(st.just("add"), MOMENTS,
              st.lists(st.tuples(st.sampled_from([None, "a", "b", "c", "d"]), st.sampled_from(["topic", "q"]),
                                 st.sampled_from(["x", "y"]), st.sampled_from([None, "x", "y"]),
                                 st.sampled_from(SOURCES)), min_size=1, max_size=4),
              st.sampled_from(["key:one", "key:two"]), st.sampled_from([None, "ctt:v1", "ctt:v2"])),
    st.tuples(st.just("prune"), MOMENTS),
    st.tuples(st.just("purge"), st.sampled_from(["key:one", "key:two"]))), min_size=1, max_size=10),
    since=MOMENTS)
def test_stats_stay_exact_through_retries_conflicts_prunes_and_purges(database, operations, since):
    database.ensure_migrated()
    with database.engine.begin() as connection:  # each example starts empty: the database outlives it
        connection.execute(text("DELETE FROM ctt_feedback"))
        connection.execute(text("DELETE FROM ctt_feedback_counts"))
    for operation in operations:
        if operation[0] == "add":
            _, minutes, rows, principal, tag = operation
            database.clock = lambda: BASE_TIME + timedelta(minutes=minutes)
            before = database.count()
            try:
                database.add([FeedbackItem(f"text {label} {task}", task, label, prediction=prediction, source=source,
                                           id=None if key is None else f"id-{key}")
                              for key, task, label, prediction, source in rows], model_tag=tag, principal=principal)
            except FeedbackConflict:
                assert database.count() == before  # all or none
        elif operation[0] == "prune":
            database.prune_before(BASE_TIME + timedelta(minutes=operation[1]))
        else:
            database.purge(operation[1])
    assert_counts_match_rows(database)
    assert_counts_match_rows(database, BASE_TIME + timedelta(minutes=since))


def test_stats_stay_exact_when_deletes_cut_through_buckets(database):
    """Many writes to the same buckets (so shards are shared) with agreeing, disagreeing and
    unpredicted rows; then a prune through an hour and a purge through hours, a day and all time."""
    for minutes in (0, 10, 20, 70, 1500):
        database.clock = lambda minutes=minutes: BASE_TIME + timedelta(minutes=minutes)
        for number in range(10):
            database.add([FeedbackItem(f"t{minutes} {number} {i}", "topic", "x", prediction=("x", "y", None)[i])
                          for i in range(3)], model_tag="ctt:v1", principal=("key:one", "key:two")[number % 2])
    for cut in (lambda: database.prune_before(BASE_TIME + timedelta(minutes=15)), lambda: database.purge("key:two")):
        cut()
        for since in (None, BASE_TIME + timedelta(minutes=30), BASE_TIME + timedelta(minutes=1490)):
            assert_counts_match_rows(database, since)
    assert database.count() == 45  # 150 stored, 60 pruned, half of the rest purged


def test_since_windows_start_on_a_whole_hour_and_say_so(database):
    from model.serving.feedback import FeedbackEndpoint, FeedbackMetrics

    for moment, text_ in ((datetime(2026, 3, 1, 9, 50), "early"), (datetime(2026, 3, 1, 10, 10), "in the hour"),
                          (datetime(2026, 3, 2, 8, 0), "next day")):
        database.clock = lambda moment=moment: moment
        database.add([FeedbackItem(text_, "topic", "sport")])
    endpoint = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:v1", {})
    document = endpoint.stats(datetime(2026, 3, 1, 10, 30))
    assert document["since"] == "2026-03-01T10:00:00Z" and document["granularity_s"] == 3600
    assert [(t["task"], t["rows"], t["first"]) for t in document["tasks"]] == [("topic", 2, "2026-03-01T10:10:00Z")]
    assert endpoint.stats(None)["tasks"][0]["rows"] == 3


def test_stats_are_per_served_version(database):
    from model.serving.feedback import FeedbackEndpoint, FeedbackMetrics

    old = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:v1", {"topic": 0.9})
    new = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:v2", {"topic": 0.95})
    caller = principal("key:web-frontend", "feedback")
    old.store([FeedbackItem(f"old {i}", "topic", "sport", prediction="money") for i in range(3)], caller)
    new.store([FeedbackItem(f"new {i}", "topic", "sport", prediction="sport") for i in range(2)], caller)
    topic = new.stats(None)["tasks"][0]
    assert topic["rows"] == 5 and topic["version_accuracy"] == 0.95
    assert topic["sources"]["correction"] == {"rows": 5, "with_prediction": 5, "agreed": 2, "agreement": 0.4}
    assert [(v["version"], v["served"], v["sources"]["correction"]["agreement"]) for v in topic["versions"]] == [
        ("ctt:v2", True, 1.0), ("ctt:v1", False, 0.0)]


def test_a_database_with_rows_is_counted_when_migrated(fresh_url):
    """Rows stored before counts were kept (migration 0001) are counted by the migration."""
    database = FeedbackDatabase(fresh_url)
    try:
        assert database.migrate("0001") == "0001"
        with database.engine.begin() as connection:
            for number, (task, tag, source, prediction, hour) in enumerate(
                    [("topic", "ctt:v1", "review", "sport", 1), ("topic", "ctt:v1", "review", "money", 1),
                     ("topic", None, "correction", None, 30), ("q", "ctt:v1", "correction", "q", 50)]):
                connection.execute(text(
                    "INSERT INTO ctt_feedback (key, task, text, label, prediction, source, model_tag, created_at) "
                    "VALUES (:key, :task, 'old row', 'sport', :prediction, :source, :tag, :at)"),
                    {"key": f"old-{number}", "task": task, "prediction": prediction, "source": source, "tag": tag,
                     "at": BASE_TIME + timedelta(hours=hour, minutes=number)})
        assert database.migrate() == HEAD
        assert_counts_match_rows(database)
        assert_counts_match_rows(database, BASE_TIME + timedelta(hours=20))
        assert [row["principal"] for row in database.credentials()] == [None, None, None]
    finally:
        database.close()


def test_a_database_a_newer_release_migrated_is_used_as_it_is(database, caplog):
    """Rolling back to this release after a newer one migrated must not stop feedback."""
    database.migrate()
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE ctt_alembic_version SET version_num = '0099'"))
    older = FeedbackDatabase(database.url)
    try:
        with caplog.at_level(logging.WARNING, logger="ctt"):
            assert len(older.add(items(2)).stored) == 2
        assert "at migration 0099, newer than this release knows" in caplog.text
    finally:
        older.close()


# ----- who may write what, and what a row records -------------------------------------------
def principal(name: str, *permissions: str) -> Principal:
    return Principal(name, frozenset(permissions))


def test_review_rows_need_the_review_permission_and_nothing_is_stored(database):
    from model.serving.feedback import FeedbackEndpoint, FeedbackForbidden, FeedbackMetrics

    endpoint = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:v1", {})
    batch = [FeedbackItem("a correction", "topic", "sport"),
             FeedbackItem("a review", "topic", "money", source="review", id="rev-1")]
    for caller in (principal("key:web-frontend", "classify", "feedback"), INTERNAL):
        with pytest.raises(FeedbackForbidden, match=r"item 1: source 'review' needs the 'review' permission") as caught:
            endpoint.store(batch, caller)
        assert (caught.value.permission, caught.value.items) == ("review", [1])
    with pytest.raises(FeedbackForbidden, match="needs the 'feedback' permission") as caught:
        endpoint.store(batch[:1], principal("key:dashboard", "classify"))
    assert caught.value.permission == "feedback"
    assert database.count() == 0
    assert endpoint.store(batch, principal("key:reviewers", "classify", "feedback", "review")).stored == 2


def test_every_row_records_the_credential_that_sent_it(database):
    from model.serving.feedback import FeedbackEndpoint, FeedbackMetrics

    endpoint = FeedbackEndpoint(database, FeedbackMetrics(False), "ctt:v1", {})
    endpoint.store([FeedbackItem("from the web", "topic", "sport")], principal("key:web-frontend", "feedback"))
    endpoint.store([FeedbackItem("open service", "topic", "sport")], ANONYMOUS)
    long_subject = "jwt:" + "a" * 300
    endpoint.store([FeedbackItem("long subject", "topic", "sport")], principal(long_subject, "feedback"))
    endpoint.store([FeedbackItem("odd subject", "topic", "sport")], principal("jwt:eve\x00il", "feedback"))
    recorded = {row.text: row.principal for row in database.rows("topic")}
    assert recorded["from the web"] == "key:web-frontend" and recorded["open service"] == "anonymous"
    # Too long, or unstorable: a readable prefix and a digest, the same for every row of that credential.
    assert len(recorded["long subject"]) <= 200 and recorded["long subject"].startswith("jwt:aaa")
    assert "\x00" not in recorded["odd subject"] and recorded["odd subject"].startswith("jwt:eve?il…sha256:")
    assert storable_principal(long_subject) == recorded["long subject"] != storable_principal(long_subject + "b")


def test_an_id_stored_with_other_content_refuses_the_whole_request_and_keeps_the_first_row(database):
    """Client A stored id row-x for topic; client B sent row-x for task q with another text: B's
    request is refused whole (naming the id), A's row stays as it was, and a true retry is fine."""
    first = FeedbackItem("the striker scored", "topic", "sport", id="row-x")
    database.add([first], principal="key:a")
    other = FeedbackItem("is it late?", "q", "q", id="row-x")
    with pytest.raises(FeedbackConflict,
                       match=r"item 1: id 'row-x' is already stored with different content") as caught:
        database.add([FeedbackItem("a new row", "q", "q", id="new-1"), other], principal="key:b")
    assert (caught.value.ids, caught.value.items) == (["row-x"], [1])
    assert [(r.key, r.task, r.text, r.principal) for r in database.rows("topic") + database.rows("q")] == [
        ("row-x", "topic", "the striker scored", "key:a")]
    for changed in ({"label": "money"}, {"prediction": "sport"}, {"source": "review"}, {"request_id": "r-1"}):
        with pytest.raises(FeedbackConflict):
            database.add([FeedbackItem(**{**first.__dict__, **changed})])
    # The same id with the same content is a retry, from any credential: stored once.
    assert database.add([first], principal="key:b").already_stored == 1
    # One id twice in one request with different content: refused too.
    with pytest.raises(FeedbackConflict, match=r"items 0, 1 repeat id 'twice' with different content"):
        database.add([FeedbackItem("one", "topic", "sport", id="twice"),
                      FeedbackItem("two", "topic", "sport", id="twice")])
    assert database.count() == 1
    assert_counts_match_rows(database)


def test_values_no_supported_database_can_store_are_refused_on_every_database(database):
    from pydantic import ValidationError

    from model.serving.feedback import feedback_request_model

    schema = feedback_request_model({"topic": ["money", "sport"], "q": ["q", "s"]}, 64, 10_000)
    good = {"text": "fine", "task": "topic", "label": "sport"}
    for field, value in (("text", "a\x00b"), ("request_id", "r\x00"), ("id", "i\x00"), ("id", "\ud800")):
        with pytest.raises(ValidationError) as caught:
            schema.model_validate({"items": [good, {**good, field: value}]})
        assert caught.value.errors()[0]["loc"] == ("items", 1, "topic", field)
    # The database layer refuses them too (other callers than the HTTP schema), naming each item.
    with pytest.raises(FeedbackInvalid) as caught:
        database.add([FeedbackItem("fine", "topic", "sport"),
                      FeedbackItem("a\x00b", "topic", "sport", request_id="r\x00"), FeedbackItem("x", "t" * 65, "sport")])
    assert [(loc, "NUL" in message) for loc, message in caught.value.problems] == [
        (["items", 1, "text"], True), (["items", 1, "request_id"], True), (["items", 2, "task"], False)]
    assert database.count() == 0


# ----- every database failure is a 503, logged as one line without users' text --------------
USERS_TEXT = "my secret medical question 4711"


def _hold_every_connection(database):
    held = [database.engine.connect() for _ in range(database.engine.pool.size() + database.engine.pool._max_overflow)]
    return held


@pytest.mark.parametrize("failure", ["pool exhausted", "lock held", "statement refused"])
def test_every_database_failure_is_unavailable_and_logged_as_one_line_without_users_text(fresh_url, failure, caplog):
    import sqlite3

    database = FeedbackDatabase(fresh_url, timeout_s=1, attempts=2, pool_size=1)
    database.migrate()
    database.ensure_migrated()
    held: list = []
    blocker = None
    try:
        if failure == "pool exhausted":
            held = [database.engine.connect() for _ in range(2)]  # pool_size 1 plus as many overflow
            expected = "no free database connection within 1 s"
        elif failure == "lock held":
            if is_sqlite(fresh_url):
                blocker = sqlite3.connect(make_url(fresh_url).database, isolation_level=None)
                blocker.execute("BEGIN EXCLUSIVE")
            else:
                blocker = FeedbackDatabase(fresh_url).engine.connect()
                blocker.execute(text("LOCK TABLE ctt_feedback IN ACCESS EXCLUSIVE MODE"))
            expected = "timed out"
        else:
            with database.engine.begin() as connection:
                connection.execute(text("DROP TABLE ctt_feedback_counts"))
            expected = "the database"
        with caplog.at_level(logging.INFO, logger="ctt"):
            with pytest.raises(FeedbackUnavailable,
                               match=rf"^the feedback database is unavailable \(.*{expected}") as caught:
                database.add([FeedbackItem(USERS_TEXT, "topic", "sport", request_id=USERS_TEXT)])
        lines = [record.getMessage() for record in caplog.records]
        assert len(lines) == 1 and "storing feedback failed" in lines[0], lines
        for shown in (lines[0], str(caught.value)):
            assert USERS_TEXT not in shown and "[SQL" not in shown and "parameters" not in shown
    finally:
        for connection in held:
            connection.close()
        if blocker is not None:
            blocker.close()
        database.close()
    after = FeedbackDatabase(fresh_url)
    try:
        if failure != "statement refused":
            assert after.count() == 0  # all or none
    finally:
        after.close()


def test_database_urls_are_checked_and_never_shown_with_passwords(tmp_path):
    from model.feedback.database import data_dir_for

    # No settings at all (make serve): SQLite in the BentoML home, or under CTT_DATA_DIR.
    assert data_dir_for(None, {"BENTOML_HOME": str(tmp_path)}) == tmp_path / "ctt-data"
    assert data_dir_for(None, {"CTT_DATA_DIR": "/srv/ctt"}) == Path("/srv/ctt")
    assert data_dir_for("/data", {"CTT_DATA_DIR": "/srv/ctt"}) == Path("/data")
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


# ----- the service: /feedback next to /classify, on both databases -------------------------
@pytest.fixture(scope="module")
def feedback_model(tmp_path_factory):
    """A two-task micro model under its own name in the test store."""
    from model import store
    from tests.conftest import QUESTION_ROWS, TOPIC_ROWS, micro_model

    with micro_model("ctt-feedback", tmp_path_factory.mktemp("feedback-model"),
                     {"topic": TOPIC_ROWS, "question": QUESTION_ROWS}) as name:
        yield name, store.get_version()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def feedback_server(request, feedback_model, tmp_path_factory):
    """A real `bentoml serve` (two workers) storing feedback in a database of each kind."""
    from tests.serving import bentoml_serve

    name, _ = feedback_model
    folder = tmp_path_factory.mktemp(f"feedback-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'data' / 'feedback.sqlite3'}"
        env = {"CTT_DATA_DIR": str(folder / "data"), "DATABASE_URL": ""}
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"ctt_serve_{uuid.uuid4().hex[:8]}")
        env = {"DATABASE_URL": url}
    env.update({"CTT_MODEL_NAME": name, "CTT_WORKERS": "2", "ENVIRONMENT": "test", "API_KEY": "", "JWT_SECRET": "",
                "CTT_DB_TIMEOUT_S": "2"})
    log = folder / "serve.log"
    with bentoml_serve(env=env, log_path=log) as base:
        yield request.param, base, url, log


def post_feedback(base: str, items: list[dict], **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/feedback", json={"items": items}, timeout=30, **kwargs)


def stored_rows(url: str) -> list:
    database = FeedbackDatabase(url)
    try:
        with database.engine.connect() as connection:
            return connection.execute(text("SELECT key, task, text, label, prediction, source, request_id, model_tag, "
                                           "principal FROM ctt_feedback ORDER BY id")).all()
    finally:
        database.close()


def test_feedback_round_trip_over_http(feedback_server, feedback_model):
    kind, base, url, _ = feedback_server
    _, version = feedback_model
    served = httpx.post(f"{base}/classify", json={"items": [{"text": "the striker scored", "task": "topic"}]},
                        timeout=30)
    prediction = served.json()[0]["label"]
    request_id = served.headers.get("x-request-id")
    # Reviews need the `review` permission, which a service without credentials does not give.
    items = [{"id": f"{kind}-1", "text": "the striker scored", "task": "topic", "label": "sport",
              "prediction": prediction, "source": "correction", "request_id": request_id},
             {"id": f"{kind}-2", "text": "shares fell", "task": "topic", "label": "money", "prediction": "sport"},
             {"text": "is it late?", "task": "question", "label": "q"}]
    first = post_feedback(base, items)
    assert first.status_code == 200, first.text
    assert first.json() == {"stored": 3, "already_stored": 0}
    # A retry (same ids) answers 200 and stores nothing; the id-less row is new each time.
    retry = post_feedback(base, items[:2])
    assert retry.json() == {"stored": 0, "already_stored": 2}

    rows = stored_rows(url)
    assert [(r.key, r.task, r.label, r.source) for r in rows[:2]] == [
        (f"{kind}-1", "topic", "sport", "correction"), (f"{kind}-2", "topic", "money", "correction")]
    assert rows[0].model_tag == version.tag and rows[2].key.startswith("srv:")
    assert {row.principal for row in rows} == {"anonymous"}

    stats = httpx.get(f"{base}/feedback/stats", timeout=30).json()
    topic = next(t for t in stats["tasks"] if t["task"] == "topic")
    assert stats["version"] == version.tag and topic["rows"] == 2
    agreed = int(prediction == "sport")
    assert topic["sources"]["correction"] == {"rows": 2, "with_prediction": 2, "agreed": agreed,
                                              "agreement": agreed / 2}
    assert [(v["version"], v["served"], v["rows"]) for v in topic["versions"]] == [(version.tag, True, 2)]
    assert topic["version_accuracy"] == pytest.approx(version.metadata["accuracy"]["topic"])
    assert httpx.get(f"{base}/feedback/stats", params={"since": "1m"}, timeout=30).json()["tasks"]
    bad_since = httpx.get(f"{base}/feedback/stats", params={"since": "yesterday"}, timeout=30)
    assert bad_since.status_code == 400 and bad_since.json()["problems"][0]["loc"] == ["query", "since"]

    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert f'ctt_feedback_total{{agreed="false",source="correction",task="topic"}} {2.0 - agreed}' in metrics
    assert 'ctt_task_accuracy{task="topic"}' in metrics


@pytest.mark.parametrize("item, where, fragment", [
    ({"text": "x", "task": "nope", "label": "sport"}, ["items", 1],
     "tag 'nope' found using 'task' does not match any of the expected tags: 'topic', 'question'"),
    ({"text": "x", "task": "topic", "label": "q"}, ["items", 1, "topic", "label"], "Input should be 'money' or 'sport'"),
    ({"text": "x", "task": "topic", "label": "sport", "prediction": "q"}, ["items", 1, "topic", "prediction"],
     "Input should be 'money' or 'sport'"),
    ({"text": "x", "task": "topic", "label": "sport", "source": "guess"}, ["items", 1, "topic", "source"], "review"),
    ({"text": " \u200b ", "task": "topic", "label": "sport"}, ["items", 1, "topic", "text"], "empty"),
    ({"text": "x", "task": "topic", "label": "sport", "id": ""}, ["items", 1, "topic", "id"], "at least 1 character"),
    ({"text": "x", "task": "topic", "label": "sport", "id": 7}, ["items", 1, "topic", "id"], "valid string"),
    ({"text": "x", "task": "topic", "label": "sport", "colour": "red"}, ["items", 1, "topic", "colour"], "not permitted"),
    ({"text": "x", "label": "sport"}, ["items", 1], "Unable to extract tag using discriminator 'task'"),
    # What PostgreSQL cannot store is refused on SQLite too: a row accepted in development is storable in production.
    ({"text": "a\u0000b", "task": "topic", "label": "sport"}, ["items", 1, "topic", "text"], "NUL"),
    ({"text": "x", "task": "topic", "label": "sport", "request_id": "r\u0000"}, ["items", 1, "topic", "request_id"],
     "NUL"),
])
def test_a_bad_item_is_a_400_naming_it_and_nothing_is_stored(feedback_server, item, where, fragment):
    _, base, url, _ = feedback_server
    before = len(stored_rows(url))
    good = {"id": f"good-{uuid.uuid4().hex}", "text": "fine", "task": "topic", "label": "sport"}
    response = post_feedback(base, [good, item])
    assert response.status_code == 400, response.text
    problems = response.json()["problems"]
    assert problems[0]["loc"] == where and fragment in problems[0]["message"], problems
    assert len(stored_rows(url)) == before


def test_the_same_id_with_other_content_is_a_409_naming_it_over_http(feedback_server):
    kind, base, url, _ = feedback_server
    first = {"id": f"{kind}-409", "text": "the striker scored", "task": "topic", "label": "sport"}
    assert post_feedback(base, [first]).status_code == 200
    before = stored_rows(url)
    other = {**first, "task": "question", "text": "is it late?", "label": "q"}
    response = post_feedback(base, [{"text": "a new row", "task": "topic", "label": "money"}, other])
    assert response.status_code == 409, response.text
    assert f"id '{kind}-409' is already stored with different content" in response.json()["error"]
    assert response.json()["problems"] == [{"loc": ["items", 1, "id"], "message": "already stored with different content"}]
    assert stored_rows(url) == before
    assert post_feedback(base, [first]).json() == {"stored": 0, "already_stored": 1}


def test_concurrent_clients_over_http_store_every_row_once(feedback_server):
    import asyncio

    kind, base, url, _ = feedback_server
    before = len(stored_rows(url))

    async def client(number: int, http: httpx.AsyncClient) -> list[int]:
        codes = []
        for request in range(8):
            body = {"items": [{"id": f"{kind}-c{number}-r{request}-{i}", "text": f"text {number} {request} {i}",
                               "task": "topic", "label": "money"} for i in range(4)]}
            codes.append((await http.post(f"{base}/feedback", json=body)).status_code)
        return codes

    async def everyone() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            return sum(await asyncio.gather(*(client(n, http) for n in range(16))), [])

    assert set(asyncio.run(everyone())) == {200}
    assert len(stored_rows(url)) - before == 16 * 8 * 4


def test_classify_keeps_serving_while_the_database_is_down(feedback_server, postgres_server):
    kind, base, url, log = feedback_server
    if kind != "postgresql":
        pytest.skip("an SQLite file is part of the pod: it cannot go away while the service runs")
    classify = {"items": [{"text": "the striker scored", "task": "topic"}]}
    postgres_server.stop()
    try:
        down = post_feedback(base, [{"text": "while down", "task": "topic", "label": "sport", "id": "down-1"}])
        assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text
        assert "feedback database is unavailable" in down.json()["error"]
        assert httpx.get(f"{base}/feedback/stats", timeout=30).status_code == 503
        assert httpx.post(f"{base}/classify", json=classify, timeout=30).status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    finally:
        postgres_server.start()
    # Pooled connections to the old server are replaced (pre-ping): the first request succeeds.
    back = post_feedback(base, [{"text": "while down", "task": "topic", "label": "sport", "id": "down-1"}])
    assert back.status_code == 200 and back.json()["stored"] == 1, back.text
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_staging_and_production_refuse_to_start_without_a_database(feedback_model, environment):
    from deploy.local import BENTOML

    name, _ = feedback_model
    env = {**os.environ, "CTT_MODEL_NAME": name, "ENVIRONMENT": environment, "API_KEY": "k" * 40,
           "DATABASE_URL": "", "DATABASE_URL_FILE": ""}
    done = subprocess.run([BENTOML, "serve", "service:CTT", "--port", "1"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"ctt: refusing to start: ENVIRONMENT={environment} needs a database for feedback: set "
                     "DATABASE_URL_FILE (a mounted Secret) or DATABASE_URL (postgresql+psycopg://...); "
                     "a pod's own disk does not outlive it"], done.stderr


# ----- learning from feedback -------------------------------------------------------------
# Texts the training file never has, each with the label feedback gives it.
CORRECTED = [("zebra quartz lantern", "money"), ("violet harbour kettle", "sport"), ("copper meadow violin", "money"),
             ("silent orchid tractor", "sport"), ("amber glacier pencil", "money"), ("velvet canyon spoon", "sport")]


def test_learn_with_feedback_knows_the_corrected_examples(database, empty_store, topic_files, monkeypatch, capsys):
    from model import store
    from training.cli import main

    train, test = topic_files
    monkeypatch.setenv("DATABASE_URL", database.url)
    # An earlier, wrong label for each text is overridden by the newer one; one row is a review.
    database.add([FeedbackItem(t, "topic", "sport" if label == "money" else "money") for t, label in CORRECTED])
    database.add([FeedbackItem(t, "topic", label, source="review" if i == 0 else "correction")
                  for i, (t, label) in enumerate(CORRECTED)])
    database.add([FeedbackItem("not this task", "question", "q")])
    last_id = max(r.id for r in database.rows("topic"))

    base = ["learn", "--task", "topic", "--train", str(train), "--eval", str(test), "--backbone", "micro",
            "--epochs", "2", "--quiet"]
    assert main(base) == 0
    parent = store.get_version()
    assert main(base[:-3] + ["--epochs", "3", "--quiet", "--feedback"]) == 0
    capsys.readouterr()
    version = store.get_version()
    assert version.parent == parent.tag
    facts = version.metadata["feedback"]
    assert (facts["rows"], facts["examples"], facts["up_to_id"]) == (12, 6, last_id)
    assert facts["sources"] == {"review": 1, "correction": 5} and "hunter" not in facts["database"]
    assert (facts["trained_on"], facts["contradictions"]["total"]) == (6, 0)
    assert facts["by_credential"] == {"(unrecorded)": {"examples": 6, "contradictions": 0,
                                                       "sources": {"correction": 5, "review": 1}}}
    assert version.record()["feedback"] == facts and "feedback" not in parent.metadata

    def known(tag) -> int:
        predictions = store.get_version(tag).load().predict([t for t, _ in CORRECTED], ["topic"] * len(CORRECTED))
        return sum(p.label == label for p, (_, label) in zip(predictions, CORRECTED))

    # The micro backbone is a tiny random encoder and the probe that starts the head is
    # regularised, so one of six unrelated texts may stay wrong; the parent knew two (chance).
    assert known(parent.tag) <= 3 < len(CORRECTED) - 1 <= known(version.tag)

    # Export gives the same rows, newest label per text, as a file `ctt learn --train` reads.
    out = train.parent / "feedback.jsonl"
    assert main(["feedback", "export", "--task", "topic", "--out", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["text"], e["label"]) for e in exported] == CORRECTED
    assert main(["feedback", "export", "--task", "topic", "--since", "2999-01-01", "--out", str(out)]) == 0
    assert out.read_text() == ""


def test_poisoning_evaluation_texts_through_feedback_is_refused_and_an_honest_relearn_passes(
        database, empty_store, topic_files, monkeypatch, capsys):
    """The issue's case: one request relabels 16 of a task's 20 evaluation texts as reviews, then
    `ctt learn --task topic --train ... --eval ... --feedback` (main registered the task at 0.25,
    down from 1.00). An ordinary key cannot send reviews; a reviewer's key can, and the learn is
    refused naming the share, source and credential; overridden, the rows still never train (they
    are evaluation texts). A relearn with more data and honest feedback passes the gate."""
    from model import store
    from model.serving.feedback import FeedbackEndpoint, FeedbackForbidden, FeedbackMetrics
    from training.cli import main

    train, test = topic_files
    monkeypatch.setenv("DATABASE_URL", database.url)
    learn_topic = ["learn", "--task", "topic", "--train", str(train), "--eval", str(test), "--backbone", "micro",
                   "--epochs", "2", "--quiet"]
    assert main(learn_topic) == 0
    parent = store.get_version()
    assert parent.metadata["accuracy"]["topic"] == 1.0
    evaluation = [json.loads(line) for line in test.read_text().splitlines()]
    swapped = {"sport": "money", "money": "sport"}
    poison = [FeedbackItem(e["text"], "topic", swapped[e["label"]], source="review")
              for e in evaluation[:8] + evaluation[10:18]]
    endpoint = FeedbackEndpoint(database, FeedbackMetrics(False), parent.tag, {})
    with pytest.raises(FeedbackForbidden):
        endpoint.store(poison, principal("key:web-frontend", "classify", "feedback"))
    assert endpoint.store(poison, principal("key:reviewer", "classify", "feedback", "review")).stored == 16
    capsys.readouterr()

    assert main(learn_topic + ["--feedback"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ctt: error: refusing to learn from feedback: 16 of 16 "), err
    assert "16 of 16 review; 16 from key:reviewer" in err and "--allow-contradictions" in err
    assert store.get_version().tag == parent.tag

    assert main(learn_topic + ["--feedback", "--allow-contradictions"]) == 0
    assert "16 contradict a label" in capsys.readouterr().err
    overridden = store.get_version()
    facts = overridden.record()["feedback"]
    assert (facts["trained_on"], facts["evaluation_texts_not_trained"]) == (0, 16)
    assert facts["contradictions"]["allowed"] and facts["by_credential"]["key:reviewer"]["contradictions"] == 16
    assert overridden.metadata["accuracy"]["topic"] == 1.0

    # Honest: more training data, and corrections of texts the files do not have.
    more = write_jsonl(train.parent / "more.jsonl",
                       [(t, "sport") for t in SPORT] * 3 + [(t, "money") for t in MONEY] * 3)
    endpoint.store([FeedbackItem(t, "topic", label) for t, label in CORRECTED],
                   principal("key:web-frontend", "feedback"))
    assert main(["learn", "--task", "topic", "--train", str(more), "--eval", str(test), "--backbone", "micro",
                 "--epochs", "3", "--quiet", "--feedback", "--allow-contradictions"]) == 0
    honest = store.get_version()
    gate = honest.record()["relearn_gate"]
    assert honest.parent == overridden.tag and not gate["clearly_worse"] and gate["sets"]["eval"]["examples"] == 20
    assert honest.record()["feedback"]["by_credential"]["key:web-frontend"] == {
        "examples": 6, "contradictions": 0, "sources": {"correction": 6}}


def test_a_revoked_credentials_rows_are_listed_and_purged_only_with_yes(database, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv("DATABASE_URL", database.url)
    database.add(items(3, prefix="kept"), model_tag="ctt:v1", principal="key:web-frontend")
    database.add(items(2, prefix="bad", source="review") + items(1, task="q", prefix="bad"), model_tag="ctt:v1",
                 principal="key:leaked")
    assert main(["feedback", "credentials"]) == 0
    listed = capsys.readouterr().out
    assert "key:leaked" in listed and "key:web-frontend" in listed
    assert main(["feedback", "credentials", "--credential", "key:leaked", "--json"]) == 0
    assert sum(row["rows"] for row in json.loads(capsys.readouterr().out)) == 3

    assert main(["feedback", "purge", "--credential", "key:leaked"]) == 0
    shown = capsys.readouterr()
    assert shown.out.startswith("would delete 3 row(s) sent by credential 'key:leaked'")
    assert "1 correction of task 'q', 2 review of task 'topic'" in shown.out
    assert "run again with --yes" in shown.err and database.count() == 6

    assert main(["feedback", "purge", "--credential", "key:leaked", "--yes"]) == 0
    assert capsys.readouterr().out.startswith("deleted 3 row(s) sent by credential 'key:leaked'")
    assert [row.principal for row in database.rows("topic")] == ["key:web-frontend"] * 3 and database.rows("q") == []
    assert_counts_match_rows(database)
    assert main(["feedback", "recount"]) == 0
    assert capsys.readouterr().out.startswith("recounted ")
    assert_counts_match_rows(database)
    # Rows stored before credentials were recorded are listed, and purged, as "(unrecorded)".
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE ctt_feedback SET principal = NULL WHERE text = 'kept 0'"))
    assert main(["feedback", "purge", "--credential", "(unrecorded)", "--yes"]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 row(s) sent by credential '(unrecorded)'")
    assert database.count() == 2


def test_feedback_cli_mistakes_are_one_line(database, monkeypatch, capsys, tmp_path):
    from training.cli import main

    monkeypatch.setenv("DATABASE_URL", database.url)
    database.add(items(2))
    for args, fragment in ((["feedback", "prune", "--older-than", "soon"], "--older-than 'soon': give an age"),
                           (["feedback", "export", "--task", "topic", "--since", "last week", "--out", "x.jsonl"],
                            "--since 'last week'"),
                           (["feedback", "export", "--task", "topic", "--out", str(tmp_path / "no" / "x.jsonl")],
                            "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert main(["feedback", "prune", "--older-than", "90d", "--yes"]) == 0
    assert "deleted 0 row(s)" in capsys.readouterr().out
    monkeypatch.setenv("CTT_FEEDBACK_RETENTION_DAYS", "30")
    assert main(["feedback", "prune", "--yes"]) == 0  # the retention setting is the default age
    assert "deleted 0 row(s) older than 30d" in capsys.readouterr().out
    assert main(["feedback", "stats"]) == 0
    assert "topic" in capsys.readouterr().out
    monkeypatch.setenv("DATABASE_URL", "mysql://u:hunter2@db/x")
    assert main(["feedback", "stats"]) == 2
    err = capsys.readouterr().err
    assert "uses 'mysql'" in err and "hunter2" not in err
