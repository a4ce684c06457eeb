"""The embedded online store: one SQLite file in WAL mode (the default backend).

Tables ``user_features(id, v, s, h)``, ``item_features(id, v, s)`` (one row
per entity, blobs as in :mod:`.state`), ``cms_days(day, cms)`` (the Count-Min
of item frequency per UTC day, days since 1970-01-01, ~1.1 MB each at the
default epsilon; :mod:`.sketch_state`) and ``meta(k, v)``. WAL lets many
reader processes read while one writes; writers serialize on SQLite's lock
(``BEGIN IMMEDIATE``), so concurrent ``apply_events`` calls never lose each
other's updates. Reads use their own connection with ``busy_timeout`` =
``timeout_s``; writes wait up to :data:`WRITE_BUSY_TIMEOUT_S` for the lock.
A handle is safe to share between threads (one lock per connection).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from features.online_store.state import chunks
from features.online_store.store import OnlineStore, Snapshot, Update, Writes
from infra.config import FeaturesConfig
from infra.errors import ConfigError

# A writer waits this long for another writer (a bulk load holds the lock for seconds).
WRITE_BUSY_TIMEOUT_S = 30.0
# Host parameters per statement, well under SQLite's limit (32766 since 3.32).
_MAX_PARAMS = 900
DEFAULT_PATH = Path("online") / "features.sqlite"
_TABLES = {"user": "user_features", "item": "item_features"}
_CMS_TABLE = "cms_days"
_META_KEY = "meta"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS user_features "
    "(id INTEGER PRIMARY KEY, v BLOB NOT NULL, s BLOB NOT NULL, h BLOB)",
    "CREATE TABLE IF NOT EXISTS item_features "
    "(id INTEGER PRIMARY KEY, v BLOB NOT NULL, s BLOB NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_CMS_TABLE} (day INTEGER PRIMARY KEY, cms BLOB NOT NULL)",
)


class SqliteOnlineStore(OnlineStore):
    backend: ClassVar[str] = "sqlite"
    _backend_errors = (sqlite3.Error, OSError)

    def __init__(self, config: FeaturesConfig, path: str | Path) -> None:
        super().__init__(config)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        timeout = config.online_store.timeout_s
        self._writer = self._connect(WRITE_BUSY_TIMEOUT_S)
        self._wlock = threading.Lock()
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            self._writer.execute(statement)
        self._writer.execute("COMMIT")
        self._reader = self._connect(timeout)
        self._rlock = threading.Lock()

    @classmethod
    def from_config(cls, config: FeaturesConfig, workdir: str | Path) -> SqliteOnlineStore:
        url = config.online_store.url
        if url is not None:
            return cls(config, url.removeprefix("sqlite:///"))
        if "://" in str(workdir) and not str(workdir).startswith("file://"):
            raise ConfigError(
                f"the sqlite online store needs a local workdir, got {workdir}: "
                "set features.online_store.url to a local file or use kind=redis"
            )
        return cls(config, Path(str(workdir).removeprefix("file://")) / DEFAULT_PATH)

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        # WAL + NORMAL: a commit survives a process crash; an OS crash may lose the last ones.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    # ------------------------------------------------------------------ reads

    def _fetch_user(self, user_id: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        with self._rlock:
            row = self._reader.execute(
                "SELECT v, h FROM user_features WHERE id = ?", (user_id,)
            ).fetchone()
            meta = self._reader.execute("SELECT v FROM meta WHERE k = ?", (_META_KEY,)).fetchone()
        vector, history = row if row else (None, None)
        return vector, history, meta[0] if meta else None

    def _fetch_vectors(
        self, entity: str, ids: Sequence[int]
    ) -> tuple[list[bytes | None], bytes | None]:
        found: dict[int, bytes] = {}
        table = _TABLES[entity]
        with self._rlock:
            for chunk in chunks(list(dict.fromkeys(ids)), _MAX_PARAMS):
                marks = ",".join("?" * len(chunk))
                found.update(
                    self._reader.execute(
                        f"SELECT id, v FROM {table} WHERE id IN ({marks})", chunk
                    ).fetchall()
                )
            meta = self._reader.execute("SELECT v FROM meta WHERE k = ?", (_META_KEY,)).fetchone()
        return [found.get(i) for i in ids], meta[0] if meta else None

    def _fetch_history(self, user_id: int) -> bytes | None:
        with self._rlock:
            row = self._reader.execute(
                "SELECT h FROM user_features WHERE id = ?", (user_id,)
            ).fetchone()
        return row[0] if row else None

    def _fetch_meta(self) -> bytes | None:
        with self._rlock:
            row = self._reader.execute("SELECT v FROM meta WHERE k = ?", (_META_KEY,)).fetchone()
        return row[0] if row else None

    def _entity_ids(self, entity: str) -> list[int]:
        with self._rlock:
            rows = self._reader.execute(f"SELECT id FROM {_TABLES[entity]} ORDER BY id").fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ writes

    def _transact(
        self, ids: dict[str, list[int]], update: Update, days: Sequence[int] = ()
    ) -> None:
        with self._wlock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                snapshot = Snapshot(states={}, histories={}, meta=None)
                for entity, entity_ids in ids.items():
                    states = snapshot.states.setdefault(entity, {})
                    cols = "id, s, h" if entity == "user" else "id, s, NULL"
                    for chunk in chunks(entity_ids, _MAX_PARAMS):
                        marks = ",".join("?" * len(chunk))
                        for i, s, h in conn.execute(
                            f"SELECT {cols} FROM {_TABLES[entity]} WHERE id IN ({marks})", chunk
                        ):
                            states[i] = s
                            if entity == "user":
                                snapshot.histories[i] = h
                for day in days:
                    found = conn.execute(
                        f"SELECT cms FROM {_CMS_TABLE} WHERE day = ?", (day,)
                    ).fetchone()
                    snapshot.cms[day] = found[0] if found else None
                row = conn.execute("SELECT v FROM meta WHERE k = ?", (_META_KEY,)).fetchone()
                snapshot.meta = row[0] if row else None
                self._put(conn, update(snapshot))
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    def _replace(self, writes: Writes) -> None:
        with self._wlock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._put(conn, writes)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _put(conn: sqlite3.Connection, writes: Writes) -> None:
        users = writes.records.get("user", [])
        items = writes.records.get("item", [])
        if users:
            conn.executemany(
                "INSERT OR REPLACE INTO user_features (id, v, s, h) VALUES (?, ?, ?, ?)", users
            )
        if items:
            conn.executemany(
                "INSERT OR REPLACE INTO item_features (id, v, s) VALUES (?, ?, ?)",
                [(i, v, s) for i, v, s, _ in items],
            )
        for day, cms in sorted(writes.cms.items()):
            if cms is None:
                conn.execute(f"DELETE FROM {_CMS_TABLE} WHERE day = ?", (day,))
            else:
                conn.execute(
                    f"INSERT OR REPLACE INTO {_CMS_TABLE} (day, cms) VALUES (?, ?)", (day, cms)
                )
        if writes.meta is not None:
            conn.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (_META_KEY, writes.meta)
            )

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is gone; SQLite rolls back on its own

    def clear(self) -> None:
        def wipe(conn: sqlite3.Connection) -> None:
            for table in ("meta", _CMS_TABLE, *_TABLES.values()):
                conn.execute(f"DELETE FROM {table}")

        with self._wlock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                wipe(conn)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise

    def close(self) -> None:
        with self._rlock:
            self._reader.close()
        with self._wlock:
            self._writer.close()
