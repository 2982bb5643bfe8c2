"""One lock per study, held in the study's own storage, so that workers on any machine take turns.

Workers of one sweep share nothing but the Optuna storage (and the MLflow server), so the lock
lives there: a PostgreSQL advisory lock or a MySQL named lock (on a connection of its own, released
by the database when the holder's connection drops, e.g. when it is killed), a file lock beside a
SQLite database or a journal file, a Redis lock (with an expiry, Redis cannot see its holder die).

It is held around what must happen once, or in turn: creating the storage's tables, creating the
study and enqueuing its fixed points, finding or creating the one MLflow parent run, counting the
trials and asking for the next one (with its parameters, so no other worker proposes them too), and
writing the parent's best tags and final artifacts. Each section is short; none is nested.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: file-backed storages are then not locked across processes
    fcntl = None  # type: ignore[assignment]  # the module where it exists, None where it does not

# A Redis lock outlives a killed holder by this long at most; every section ends well within it.
REDIS_LOCK_SECONDS = 600


def _digest(study: str) -> bytes:
    return hashlib.blake2b(f"gptexp-study:{study}".encode(), digest_size=8).digest()


def advisory_key(study: str) -> int:
    """PostgreSQL's advisory-lock key of a study: the same 64-bit integer in every process (unlike
    Python's hash(), which is salted per process)."""
    return int.from_bytes(_digest(study), "big", signed=True)


def _file_of(url: str) -> Path | None:
    """The file a sqlite:/// or journal:/// storage lives in; None for in-memory or other storages."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            path = url[len(prefix) :].split("?", 1)[0]
            return Path(path) if path and path != ":memory:" else None
    return None


class StudyLock:
    """A reusable, non-reentrant lock on one study of one storage: `with lock: ...`."""

    def __init__(self, url: str, study: str):
        self.url, self.study = url, study
        self._release: contextlib.ExitStack | None = None

    def __enter__(self) -> StudyLock:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self._acquire())
        except BaseException:
            stack.close()
            raise
        self._release = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._release = self._release, None
        if stack is not None:
            stack.close()

    def _acquire(self):
        url = self.url
        if url.startswith(("postgresql", "postgres://")):
            key = advisory_key(self.study)
            return _sql_lock(url, "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", key)
        if url.startswith("mysql"):
            # MySQL names are at most 64 characters; -1: wait as long as it takes.
            name = "gptexp-" + _digest(self.study).hex()
            return _sql_lock(url, "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", name)
        if url.startswith(("redis://", "rediss://")):
            return _redis_lock(url, self.study)
        path = _file_of(url)
        if path is not None:
            return _file_lock(Path(f"{path}.gptexp-lock"))
        return contextlib.nullcontext()


@contextlib.contextmanager
def _sql_lock(url: str, lock_sql: str, unlock_sql: str, key):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # Its own connection, not one of the storage's pool: the lock belongs to this database session,
    # whatever transactions the storage runs meanwhile; NullPool closes it after each section.
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(lock_sql), {"k": key})
            conn.commit()  # a session-level lock outlives the transaction; no snapshot is held meanwhile
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a dropped connection has released it already
                    conn.execute(sqlalchemy.text(unlock_sql), {"k": key})
                    conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path):
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _redis_lock(url: str, study: str):
    import redis

    client = redis.Redis.from_url(url)
    lock = client.lock(f"gptexp:study-lock:{_digest(study).hex()}", timeout=REDIS_LOCK_SECONDS)
    lock.acquire(blocking=True)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # expired meanwhile: nothing left to release
            lock.release()
        client.close()
