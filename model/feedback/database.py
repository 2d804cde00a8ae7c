"""Where feedback is stored: an SQLite file under the data folder by default, PostgreSQL when
``DATABASE_URL`` (or the mounted file ``DATABASE_URL_FILE``) names one.

Every write is one transaction: when ``add`` returns, the rows are committed (SQLite with
``synchronous=FULL``, PostgreSQL with its default synchronous commit), so an answer of 200 is
never lost by a crash. Every row carries a unique key (the client's id or one made here), and
rows are inserted with "on conflict do nothing", so a retry, the client's or ours after a dropped
connection, never stores a row twice.

A database that is down or unreachable is ``FeedbackUnavailable`` after a bounded wait (connect
and statement timeouts, a few retries); the caller answers 503 and goes on serving everything
else. Migrations run on first use, once, under a lock that every worker and replica shares: a
PostgreSQL advisory lock, or a file lock beside the SQLite file.
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

from sqlalchemy import Engine, and_, case, create_engine, delete, event, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError

from model.errors import CTTError
from model.feedback.schema import DEFAULT_SOURCE, SERVER_KEY_PREFIX, FeedbackRow, feedback_table

logger = logging.getLogger("ctt")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_FILE = "feedback.sqlite3"
# pg_advisory_lock takes a 64-bit key; any fixed number works as long as only CTT's migrations use it.
MIGRATION_LOCK_KEY = 0x0C77_FEED_BAC4
SUPPORTED = "postgresql+psycopg://user:password@host:5432/database or sqlite:////absolute/path.sqlite3"


class FeedbackUnavailable(CTTError):
    """The database cannot be reached (or timed out) now: retry later."""


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


@dataclass(frozen=True)
class AddResult:
    stored: list[FeedbackItem]  # new rows, in request order
    already_stored: int  # items whose id was stored before (retries)


def _transient(exc: DBAPIError) -> bool:
    """Worth retrying: the server is gone, the connection dropped, a lock or timeout."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(exc.connection_invalidated)


class FeedbackDatabase:
    """Feedback rows in one database. Thread-safe; one per worker process."""

    def __init__(self, url: str, timeout_s: float = 5.0, attempts: int = 3, pool_size: int = 5):
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        # The pool's connections and as many again in overflow: how many calls can use it at once.
        self.max_connections = 2 * pool_size
        self.engine = self._engine(url, timeout_s, pool_size)
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
    def migrate(self) -> str:
        """Bring the schema to the newest migration, under the lock every worker and replica
        shares (so two never race), and return the revision. A no-op when already there."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(config).get_current_head()

        def upgrade(connection: Connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()

        if is_sqlite(self.url):
            from filelock import FileLock

            lock_path = Path(make_url(self.url).database + ".migrate.lock")
            with FileLock(str(lock_path), timeout=max(60.0, self.timeout_s)):
                with self.engine.connect() as connection:
                    upgrade(connection)
        else:
            with self.engine.connect() as connection:
                # Session-level: held across the migration's own transactions, released by
                # unlock, or by the server when this connection dies.
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()
                try:
                    upgrade(connection)
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    connection.commit()
        return head

    def revision(self) -> str | None:
        with self.engine.connect() as connection:
            try:
                return connection.execute(text("SELECT version_num FROM ctt_alembic_version")).scalar()
            except DBAPIError:
                return None

    def _ensure_migrated(self) -> None:
        if self._migrated:
            return
        with self._migrate_lock:
            if not self._migrated:
                revision = self.migrate()
                logger.info(f"feedback database {self.public_url} at migration {revision}")
                self._migrated = True

    def _run(self, operation: Callable[[Connection], T]) -> T:
        """``operation`` in one transaction, committed before this returns; retried when the
        connection dropped or the server was briefly unreachable (every write is idempotent)."""
        delay = 0.1
        for attempt in range(1, self.attempts + 1):
            try:
                self._ensure_migrated()
                with self.engine.begin() as connection:
                    return operation(connection)
            except DBAPIError as exc:
                if not _transient(exc):
                    raise
                if attempt == self.attempts:
                    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
                    raise FeedbackUnavailable(f"the feedback database is unavailable ({reason[:200]})") from None
                time.sleep(delay)
                delay *= 3
        raise AssertionError("unreachable")

    # ----- writes -------------------------------------------------------------------------
    def add(self, items: Iterable[FeedbackItem], model_tag: str | None = None) -> AddResult:
        """Store ``items`` in one transaction (all or none). Items whose id is already stored,
        or repeated within ``items``, are counted in ``already_stored`` and not stored again."""
        items = list(items)
        if not items:
            return AddResult([], 0)
        now = utc_now()
        # Keys are made once, before the first attempt, so a retry inserts the same keys.
        keys = [item.id if item.id is not None else f"{SERVER_KEY_PREFIX}{uuid.uuid4().hex}" for item in items]
        rows = [{"key": key, "task": item.task, "text": item.text, "label": item.label,
                 "prediction": item.prediction, "source": item.source, "request_id": item.request_id,
                 "model_tag": model_tag, "created_at": now} for key, item in zip(keys, items)]

        def insert(connection: Connection) -> set[str]:
            if is_sqlite(self.url):
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            statement = (dialect_insert(feedback_table).values(rows)
                         .on_conflict_do_nothing(index_elements=["key"]).returning(feedback_table.c.key))
            return set(connection.execute(statement).scalars())

        inserted = self._run(insert)
        stored, seen = [], set()
        for key, item in zip(keys, items):
            if key in inserted and key not in seen:
                stored.append(item)
            seen.add(key)
        return AddResult(stored, len(items) - len(stored))

    def prune(self, older_than: timedelta) -> int:
        """Delete rows stored more than ``older_than`` ago; returns how many."""
        cutoff = utc_now() - older_than
        return self._run(lambda connection: connection.execute(
            delete(feedback_table).where(feedback_table.c.created_at < cutoff)).rowcount)

    # ----- reads --------------------------------------------------------------------------
    def stats(self, since: datetime | None = None) -> list[dict]:
        """Per task and source: rows, rows with a served prediction, how many of those the
        feedback label agreed with, first and last row time."""
        table = feedback_table
        has_prediction = table.c.prediction.is_not(None)
        agreed = and_(has_prediction, table.c.prediction == table.c.label)
        query = (select(table.c.task, table.c.source, func.count().label("rows"),
                        func.sum(case((has_prediction, 1), else_=0)).label("with_prediction"),
                        func.sum(case((agreed, 1), else_=0)).label("agreed"),
                        func.min(table.c.created_at).label("first"), func.max(table.c.created_at).label("last"))
                 .group_by(table.c.task, table.c.source).order_by(table.c.task, table.c.source))
        if since is not None:
            query = query.where(table.c.created_at >= since)
        return [dict(row._mapping) for row in self._run(lambda connection: connection.execute(query).all())]

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

        return self._run(read)

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


__all__ = ["AddResult", "FeedbackDatabase", "FeedbackItem", "FeedbackUnavailable", "data_dir_for", "database_url",
           "default_data_dir", "latest_labels", "normalise_url", "open_database", "redact", "utc_now"]
