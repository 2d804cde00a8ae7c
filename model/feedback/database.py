"""Where feedback is stored: an SQLite file under the data folder by default, PostgreSQL when
``DATABASE_URL`` (or the mounted file ``DATABASE_URL_FILE``) names one.

Every write is one transaction: when ``add`` returns, the rows are committed (SQLite with
``synchronous=FULL``, PostgreSQL with its default synchronous commit), so an answer of 200 is
never lost by a crash. Every row carries a unique key (the client's id or one made here), and
rows are inserted with "on conflict do nothing", so a retry, the client's or ours after a dropped
connection, never stores a row twice; an id already stored with other content refuses the whole
request (``FeedbackConflict``). The counts that stats read change in the same transaction as the
rows (model/feedback/counts.py).

Every failure of the database, whatever it is (unreachable, a dropped connection, a timeout, no
free pooled connection, a statement it refuses), is ``FeedbackUnavailable`` after a bounded wait
and a few retries of what is worth retrying, logged as one line that names the kind of failure
and never the statement's parameters (they hold users' text); the caller answers 503 and goes on
serving everything else. Migrations run on first use, once, under a lock that every worker and
replica shares: a PostgreSQL advisory lock, or a file lock beside the SQLite file.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from model.errors import CTTError
from model.feedback import counts
from model.feedback.schema import (DEFAULT_SOURCE, KEY_MAX_CHARS, PRINCIPAL_MAX_CHARS,
                                   SERVER_KEY_PREFIX, SOURCES, TASK_MAX_CHARS, FeedbackRow, feedback_table,
                                   storable_problem)

logger = logging.getLogger("ctt")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_FILE = "feedback.sqlite3"
# pg_advisory_lock takes a 64-bit key; any fixed number works as long as only CTT's migrations use it.
MIGRATION_LOCK_KEY = 0x0C77_FEED_BAC4
SUPPORTED = "postgresql+psycopg://user:password@host:5432/database or sqlite:////absolute/path.sqlite3"
# Prune and purge delete in chunks of this many rows, each one transaction with its counts: a
# large delete never holds locks (or the rows it returns) all at once.
DELETE_CHUNK = 5000


class FeedbackUnavailable(CTTError):
    """The database failed (unreachable, timed out, out of pooled connections, or refused the
    statement): retry later. The message names the kind of failure, never users' text."""


class FeedbackConflict(CTTError):
    """An id is already stored (or repeated in the request) with different content: nothing of
    the request is stored. ``ids`` are the ids, ``items`` their positions in the request."""

    def __init__(self, message: str, ids: list[str], items: list[int]):
        super().__init__(message)
        self.ids = ids
        self.items = items


class FeedbackInvalid(CTTError):
    """Items no supported database can store (the request schema refuses them first; this is the
    last guard for other callers). ``problems`` are ``(loc, message)`` pairs, loc as in a 400."""

    def __init__(self, problems: list[tuple[list, str]]):
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in problems))
        self.problems = problems


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """``CTT_DATA_DIR`` when set, else ``ctt-data`` in the BentoML home (writable wherever
    ``bentoml serve`` runs, and where ``make serve`` keeps the model store)."""
    if environ.get("CTT_DATA_DIR"):
        return Path(environ["CTT_DATA_DIR"])
    return Path(environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "ctt-data"


def data_dir_for(configured: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The feedback folder: CTT_DATA_DIR's value when set, else ctt-data in the BentoML home."""
    import os

    return Path(configured) if configured else default_data_dir(os.environ if environ is None else environ)


def redact(url: str) -> str:
    """A database URL as a log line or error may show it: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def normalise_url(url: str, where: str = "DATABASE_URL") -> str:
    """The URL SQLAlchemy should use, or one readable error naming what is wrong."""
    url = url.strip()
    if url.startswith(("postgres://", "postgresql://")):
        # The form most hosting consoles print: use the psycopg 3 driver the project ships.
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CTTError(f"{where} is not a database URL; use {SUPPORTED}") from None
    if parsed.drivername not in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        raise CTTError(f"{where} uses {parsed.drivername!r}; use {SUPPORTED}")
    if parsed.drivername.startswith("sqlite") and not parsed.database:
        raise CTTError(f"{where}: an in-memory SQLite database loses every row at exit; name a file")
    return url


def database_url(configured: str | None, data_dir: Path) -> str:
    """``configured`` (DATABASE_URL or its file) when given, else the SQLite file in ``data_dir``."""
    if configured:
        return normalise_url(configured)
    return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@dataclass(frozen=True)
class FeedbackItem:
    """One row to store, as the API and tests give it."""

    text: str
    task: str
    label: str
    prediction: str | None = None
    source: str = DEFAULT_SOURCE
    request_id: str | None = None
    id: str | None = None  # the client's id: unique; a retry with the same id adds nothing

    def content(self) -> tuple:
        """What a retry must repeat exactly for its id to count as the same row."""
        return (self.task, self.text, self.label, self.prediction, self.source, self.request_id)


@dataclass(frozen=True)
class AddResult:
    stored: list[FeedbackItem]  # new rows, in request order
    already_stored: int  # items whose id was stored before (retries)


# The last guard before a row reaches the database: what the request schema refuses first.
_BOUNDED = {"task": TASK_MAX_CHARS, "id": KEY_MAX_CHARS, "request_id": KEY_MAX_CHARS}


def item_problems(items: list[FeedbackItem]) -> list[tuple[list, str]]:
    """Why items cannot be stored the same way in every supported database (``(loc, message)``)."""
    problems = []
    for index, item in enumerate(items):
        for name in ("text", "task", "label", "prediction", "source", "request_id", "id"):
            value = getattr(item, name)
            if value is None:
                continue
            if not isinstance(value, str):
                problems.append((["items", index, name], "must be a string"))
                continue
            problem = storable_problem(value)
            if problem:
                problems.append((["items", index, name], problem))
            elif name in _BOUNDED and len(value) > _BOUNDED[name]:
                problems.append((["items", index, name], f"has {len(value)} characters; the limit is {_BOUNDED[name]}"))
        if item.source not in SOURCES:
            problems.append((["items", index, "source"], f"must be one of {', '.join(SOURCES)}"))
    return problems


def _repeated_ids(items: list[FeedbackItem]) -> None:
    """An id repeated within one request with different content: refused like a stored one."""
    first: dict[str, int] = {}
    clashes: list[int] = []
    for index, item in enumerate(items):
        if item.id is None:
            continue
        if item.id in first and items[first[item.id]].content() != item.content():
            clashes += [first[item.id], index]
        first.setdefault(item.id, index)
    if clashes:
        ids = list(dict.fromkeys(items[i].id for i in clashes))
        raise FeedbackConflict(f"items {', '.join(map(str, sorted(set(clashes))))} repeat "
                               f"{'id' if len(ids) == 1 else 'ids'} {', '.join(map(repr, ids))} with different "
                               "content; nothing was stored", ids, sorted(set(clashes)))


EVERY_CREDENTIAL = object()  # FeedbackDatabase.credentials(): every credential's rows


def _sent_by(principal: str | None):
    column = feedback_table.c.principal
    return column.is_(None) if principal is None else column == principal


def storable_principal(principal: str) -> str:
    """A credential's id as a row records it: as given when it fits and every database can store
    it, else a readable prefix and a digest of the whole id (still one value per credential)."""
    if len(principal) <= PRINCIPAL_MAX_CHARS and storable_problem(principal) is None:
        return principal
    import hashlib

    digest = hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    readable = "".join(c if storable_problem(c) is None else "?" for c in principal[:PRINCIPAL_MAX_CHARS - 40])
    return f"{readable}…sha256:{digest}"


def _failure(exc: BaseException, timeout_s: float) -> tuple[str, bool]:
    """What kind of failure ``exc`` is, in words a client may read, and whether a retry may help.
    Never the exception's text: SQLAlchemy's holds the statement's parameters (users' text)."""
    if isinstance(exc, PoolTimeout):
        return f"no free database connection within {timeout_s:g} s", False
    if isinstance(exc, DBAPIError):
        state = getattr(exc.orig, "sqlstate", None) or ""
        sqlite_error = getattr(exc.orig, "sqlite_errorname", "") or ""
        if exc.connection_invalidated or isinstance(exc, InterfaceError) or state.startswith("08") or state == "57P01":
            return "the connection failed or was lost", True
        if state in ("57014", "55P03") or sqlite_error.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return "a statement or lock timed out", True
        if state in ("40001", "40P01"):
            return "a concurrent transaction conflicted", True
        if isinstance(exc, OperationalError):
            # PostgreSQL's operational errors are the server's state (shutting down, out of
            # resources); SQLite's other ones are the file's (full disk, I/O), which a retry
            # a moment later does not mend.
            return "the database could not run the statement", not sqlite_error
        return "the database refused the statement", False
    return "the database failed", False


def _failure_detail(exc: BaseException) -> str:
    """Exception classes and error codes for the log: enough to diagnose, no values."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "sqlite_errorname", None)
        return f"{type(exc).__name__}/{type(exc.orig).__name__}" + (f" {code}" if code else "")
    return type(exc).__name__


class FeedbackDatabase:
    """Feedback rows in one database. Thread-safe; one per worker process."""

    def __init__(self, url: str, timeout_s: float = 5.0, attempts: int = 3, pool_size: int = 5):
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        # The pool's connections and as many again in overflow: how many calls can use it at once.
        self.max_connections = 2 * pool_size
        self.engine = self._engine(url, timeout_s, pool_size)
        self.clock: Callable[[], datetime] = utc_now  # when rows are stored (tests set other times)
        self._migrated = False
        self._migrate_lock = threading.Lock()

    @property
    def public_url(self) -> str:
        return redact(self.url)

    @staticmethod
    def _engine(url: str, timeout_s: float, pool_size: int) -> Engine:
        if is_sqlite(url):
            path = Path(make_url(url).database)
            path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": timeout_s}, pool_pre_ping=True,
                                   pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout_s)

            @event.listens_for(engine, "connect")
            def _durable_and_concurrent(dbapi_connection, _record):
                # WAL lets readers and the writer of several workers overlap; FULL syncs the WAL
                # at every commit, so a committed row survives a crash of the machine, not only
                # of the process. busy_timeout waits for another worker's write instead of failing.
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
                cursor.close()

            return engine
        # pool_pre_ping replaces a connection the server dropped (restart, failover, idle cut)
        # before it is used; the timeouts bound how long a request can wait for a dead server.
        return create_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout_s, pool_recycle=1800,
            pool_pre_ping=True,
            connect_args={"connect_timeout": max(1, int(timeout_s)),
                          "options": f"-c statement_timeout={int(timeout_s * 1000)} "
                                     f"-c lock_timeout={int(timeout_s * 1000)}",
                          "application_name": "ctt"})

    def close(self) -> None:
        self.engine.dispose()

    # ----- migrations ---------------------------------------------------------------------
    def migrate(self, revision: str = "head") -> str:
        """Bring the schema to ``revision`` (the newest by default), under the lock every worker
        and replica shares (so two never race), and return the database's revision. A no-op when
        already there. A database a newer release migrated further is used as it is: migrations
        only add, so this release still works with it (a rollback must not lose feedback)."""
        from alembic import command
        from alembic.config import Config
        from alembic.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        scripts = ScriptDirectory.from_config(config)

        def upgrade(connection: Connection) -> str:
            current = MigrationContext.configure(
                connection, opts={"version_table": "ctt_alembic_version"}).get_current_revision()
            connection.commit()
            try:
                scripts.get_revision(current)
            except CommandError:
                logger.warning(f"feedback database {self.public_url} is at migration {current}, newer than this "
                               f"release knows ({scripts.get_current_head()}): using it as it is")
                return current
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            connection.commit()
            return MigrationContext.configure(
                connection, opts={"version_table": "ctt_alembic_version"}).get_current_revision()

        if is_sqlite(self.url):
            from filelock import FileLock

            lock_path = Path(make_url(self.url).database + ".migrate.lock")
            with FileLock(str(lock_path), timeout=max(60.0, self.timeout_s)):
                with self.engine.connect() as connection:
                    return upgrade(connection)
        with self.engine.connect() as connection:
            # Session-level: held across the migration's own transactions, released by unlock,
            # or by the server when this connection dies. A migration that fills a table from a
            # large one may take longer than a request's statement timeout.
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.execute(text("SET statement_timeout = 0"))
            connection.commit()
            try:
                return upgrade(connection)
            finally:
                connection.rollback()
                connection.execute(text("RESET statement_timeout"))
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()

    def revision(self) -> str | None:
        with self.engine.connect() as connection:
            try:
                return connection.execute(text("SELECT version_num FROM ctt_alembic_version")).scalar()
            except DBAPIError:
                return None

    def ensure_migrated(self) -> None:
        """Migrate once per process; any failure is FeedbackUnavailable (logged as one line)."""
        if self._migrated:
            return
        with self._migrate_lock:
            if self._migrated:
                return
            try:
                revision = self.migrate()
            except (SQLAlchemyError, OSError) as exc:
                self._unavailable("migrating", exc, 1)
            except Exception as exc:  # alembic's own errors: the schema cannot be brought up to date
                logger.warning(f"feedback database {self.public_url}: migrating failed: {type(exc).__name__}")
                raise FeedbackUnavailable("the feedback database is unavailable (its schema could not be "
                                          "brought up to date)") from None
            logger.info(f"feedback database {self.public_url} at migration {revision}")
            self._migrated = True

    def _unavailable(self, what: str, exc: BaseException, attempts: int):
        reason, _ = _failure(exc, self.timeout_s)
        logger.warning(f"feedback database {self.public_url}: {what} failed after {attempts} attempt(s): "
                       f"{reason} ({_failure_detail(exc)})")
        raise FeedbackUnavailable(f"the feedback database is unavailable ({reason})") from None

    def _run(self, operation: Callable[[Connection], T], what: str = "a statement") -> T:
        """``operation`` in one transaction, committed before this returns; retried when the
        connection dropped, the server was briefly unreachable or a lock timed out (every write
        is idempotent). Any database failure ends as FeedbackUnavailable, logged once."""
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            self.ensure_migrated()
            try:
                with self.engine.begin() as connection:
                    return operation(connection)
            except (SQLAlchemyError, OSError) as exc:
                _, worth_retrying = _failure(exc, self.timeout_s)
                if not worth_retrying or attempt == self.attempts:
                    self._unavailable(what, exc, attempt)
                time.sleep(delay)
                delay *= 3
        raise AssertionError("unreachable")

    # ----- writes -------------------------------------------------------------------------
    def add(self, items: Iterable[FeedbackItem], model_tag: str | None = None,
            principal: str | None = None) -> AddResult:
        """Store ``items`` in one transaction (all or none), recording ``principal`` (a
        credential's id) on each row. Items whose id is already stored with the same content, or
        repeated within ``items``, are counted in ``already_stored`` and not stored again; an id
        stored (or repeated) with different content raises FeedbackConflict and stores nothing."""
        items = list(items)
        if not items:
            return AddResult([], 0)
        problems = item_problems(items)
        if problems:
            raise FeedbackInvalid(problems)
        _repeated_ids(items)
        principal = storable_principal(principal) if principal is not None else None
        now = self.clock()
        # Keys are made once, before the first attempt, so a retry inserts the same keys.
        keys = [item.id if item.id is not None else f"{SERVER_KEY_PREFIX}{uuid.uuid4().hex}" for item in items]
        first_of: dict[str, int] = {}
        for index, key in enumerate(keys):
            first_of.setdefault(key, index)
        # In request order, so ids (and the newest label of a text) follow it. Two requests with
        # the same client ids in other orders can deadlock on PostgreSQL: it aborts one, retried.
        rows = [{"key": key, "task": items[index].task, "text": items[index].text, "label": items[index].label,
                 "prediction": items[index].prediction, "source": items[index].source,
                 "request_id": items[index].request_id, "model_tag": model_tag or None, "created_at": now,
                 "principal": principal} for key, index in first_of.items()]

        def insert(connection: Connection) -> set[str]:
            if is_sqlite(self.url):
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            statement = (dialect_insert(feedback_table).on_conflict_do_nothing(index_elements=["key"])
                         .returning(feedback_table.c.key))
            # The rows as parameters, not in the statement: it compiles once (SQLAlchemy sends
            # them as one multi-row insert).
            inserted = set(connection.execute(statement, rows).scalars())
            self._refuse_changed_content(connection, [k for k in first_of if k not in inserted], items, first_of)
            counts.add_counts(connection, [counts.CountedRow(r["task"], r["model_tag"], r["source"], now,
                                                             r["prediction"], r["label"])
                                           for r in rows if r["key"] in inserted])
            return inserted

        inserted = self._run(insert, "storing feedback")
        stored = [items[index] for index in sorted(index for key, index in first_of.items() if key in inserted)]
        return AddResult(stored, len(items) - len(stored))

    @staticmethod
    def _refuse_changed_content(connection: Connection, keys: list[str], items: list[FeedbackItem],
                                first_of: dict[str, int]) -> None:
        if not keys:
            return
        table = feedback_table.c
        stored = connection.execute(select(table.key, table.task, table.text, table.label, table.prediction,
                                           table.source, table.request_id).where(table.key.in_(keys))).all()
        changed = sorted(first_of[row.key] for row in stored if tuple(row[1:]) != items[first_of[row.key]].content())
        if changed:
            ids = [items[index].id for index in changed]
            one = len(changed) == 1
            raise FeedbackConflict(
                f"{'item' if one else 'items'} {', '.join(map(str, changed))}: {'id' if one else 'ids'} "
                f"{', '.join(map(repr, ids))} {'is' if one else 'are'} already stored with different content; "
                "nothing was stored (a retry repeats a row exactly; a new row needs a new id)", ids, changed)

    def _delete(self, where, what: str) -> int:
        """Delete the rows ``where`` selects, in chunks, each chunk's counts subtracted in its own
        transaction; returns how many rows were deleted."""
        table = feedback_table.c
        deleted = 0

        def chunk(connection: Connection) -> int:
            ids = select(table.id).where(where).order_by(table.id).limit(DELETE_CHUNK).scalar_subquery()
            gone = connection.execute(delete(feedback_table).where(table.id.in_(ids)).returning(
                table.task, table.model_tag, table.source, table.created_at, table.prediction, table.label)).all()
            counts.subtract_counts(connection, [counts.CountedRow(*row) for row in gone])
            return len(gone)

        while True:
            done = self._run(chunk, what)
            deleted += done
            if done < DELETE_CHUNK:
                return deleted

    def prune(self, older_than: timedelta) -> int:
        """Delete rows stored more than ``older_than`` ago; returns how many."""
        return self.prune_before(self.clock() - older_than)

    def prune_before(self, cutoff: datetime) -> int:
        """Delete rows stored before ``cutoff`` (UTC, no zone); returns how many."""
        return self._delete(feedback_table.c.created_at < cutoff, "pruning feedback")

    def count_before(self, cutoff: datetime) -> int:
        """How many rows were stored before ``cutoff``: what ``prune_before`` would delete. Exact,
        from the rows (stats' windows are whole hours)."""
        return self._run(lambda connection: connection.execute(
            select(func.count()).select_from(feedback_table).where(feedback_table.c.created_at < cutoff)).scalar(),
            "counting feedback")

    def purge(self, principal: str | None) -> int:
        """Delete every row ``principal`` (a credential's id, as listed by ``credentials``; None:
        the rows stored before credentials were recorded) sent; returns how many."""
        return self._delete(_sent_by(principal), "purging a credential's feedback")

    def recount(self) -> int:
        """Rebuild the counts stats read from the rows (a full scan); returns the buckets written."""
        return self._run(counts.recount, "recounting feedback")

    # ----- reads --------------------------------------------------------------------------
    def stats(self, since: datetime | None = None) -> list[dict]:
        """Per task, served version (``model_tag``) and source: rows, rows with a served prediction,
        how many of those the feedback label agreed with, first and last row time. Read from the
        counts, never the rows: all time, or whole hours from ``counts.window_start(since)``."""
        return self._run(lambda connection: counts.read_counts(connection, since), "reading feedback stats")

    def credentials(self, principal: str | None | object = EVERY_CREDENTIAL) -> list[dict]:
        """Per credential (``principal``; None for rows stored before credentials were recorded),
        task and source: rows, first and last row time; every credential's, or the one given.
        Reads the rows: an operator's command."""
        table = feedback_table.c
        query = (select(table.principal, table.task, table.source, func.count().label("rows"),
                        func.min(table.created_at).label("first"), func.max(table.created_at).label("last"))
                 .group_by(table.principal, table.task, table.source)
                 .order_by(table.principal, table.task, table.source))
        if principal is not EVERY_CREDENTIAL:
            query = query.where(_sent_by(principal))
        return [dict(row._mapping) for row in self._run(lambda connection: connection.execute(query).all(),
                                                         "listing credentials")]

    def rows(self, task: str, since: datetime | None = None, up_to_id: int | None = None) -> list[FeedbackRow]:
        """Every row of ``task`` in the order stored (oldest first)."""
        query = select(FeedbackRow).where(FeedbackRow.task == task).order_by(FeedbackRow.id)
        if since is not None:
            query = query.where(FeedbackRow.created_at >= since)
        if up_to_id is not None:
            query = query.where(FeedbackRow.id <= up_to_id)

        def read(connection: Connection) -> list[FeedbackRow]:
            from sqlalchemy.orm import Session

            with Session(bind=connection, expire_on_commit=False) as session:
                rows = list(session.scalars(query))
                session.expunge_all()
                return rows

        return self._run(read, "reading feedback")

    def count(self) -> int:
        return self._run(lambda connection: connection.execute(select(func.count()).select_from(feedback_table)).scalar())


def latest_labels(rows: Iterable[FeedbackRow]) -> list[FeedbackRow]:
    """One row per text (whitespace at the ends ignored): the newest, so a later correction of a
    text overrides an earlier label. Returned in the order of those newest rows."""
    newest: dict[str, FeedbackRow] = {}
    for row in sorted(rows, key=lambda r: r.id):
        newest.pop(row.text.strip(), None)
        newest[row.text.strip()] = row
    return list(newest.values())


def open_database(configured_url: str | None, data_dir: Path, timeout_s: float = 5.0) -> FeedbackDatabase:
    return FeedbackDatabase(database_url(configured_url, data_dir), timeout_s=timeout_s)


__all__ = ["AddResult", "FeedbackConflict", "FeedbackDatabase", "FeedbackInvalid", "FeedbackItem",
           "FeedbackUnavailable", "data_dir_for", "database_url", "default_data_dir", "item_problems",
           "latest_labels", "normalise_url", "open_database", "redact", "storable_principal", "utc_now"]
