"""
The embedded store: one SQLite file (C{store = sqlite:PATH}).

Threads: every SQLite call runs on the one thread of a
L{twisted.enterprise.adbapi.ConnectionPool} with a single connection
(C{cp_min = cp_max = 1}), so the reactor never waits on the disk and writes
are serialised without locks of ours.

Durability: the database is in WAL mode with C{synchronous = NORMAL}: a
committed write survives the gateway being killed (C{kill -9}); a power
failure may lose the last writes.  What the store keeps is at-least-once
state (webhook positions advance after a delivery), so losing the last
writes means delivering some messages again, never losing them.

Several gateway processes on one host may share the file: writes that read
first (L{SqliteStore.update}, L{SqliteStore.create}) take SQLite's write
lock before they read (C{BEGIN IMMEDIATE}), and a busy database is waited
for (C{busy_timeout}) on the store's thread.

The file is created readable by its owner only: it holds webhook signing
secrets.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from evgate import jsonlimits
from evgate.interfaces import IStore
from evgate.store import Record, applyUpdate

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records ("
    " kind TEXT NOT NULL,"
    " id TEXT NOT NULL,"
    " record TEXT NOT NULL,"
    " PRIMARY KEY (kind, id)"
    ") WITHOUT ROWID"
)


def _dumps(record: Any) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def _prepare(connection: sqlite3.Connection) -> None:
    # Runs on the store's thread whenever the pool opens its connection.
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA busy_timeout = 10000")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"the store was written by a newer evgate (schema {version}, "
                           f"this one knows {SCHEMA_VERSION})")
    connection.execute(_SCHEMA)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _get(txn: Any, kind: str, id: str) -> Optional[Record]:
    txn.execute("SELECT record FROM records WHERE kind = ? AND id = ?", (kind, id))
    row = txn.fetchone()
    return None if row is None else jsonlimits.loads(row[0])  # type: ignore[no-any-return]


def _list(txn: Any, kind: str) -> List[Tuple[str, Record]]:
    txn.execute("SELECT id, record FROM records WHERE kind = ? ORDER BY id", (kind,))
    return [(id, jsonlimits.loads(text)) for id, text in txn.fetchall()]


def _create(txn: Any, kind: str, id: str, text: str) -> bool:
    txn.execute("INSERT OR IGNORE INTO records (kind, id, record) VALUES (?, ?, ?)", (kind, id, text))
    return txn.rowcount == 1  # type: ignore[no-any-return]


def _put(txn: Any, kind: str, id: str, text: str) -> None:
    txn.execute("INSERT OR REPLACE INTO records (kind, id, record) VALUES (?, ?, ?)", (kind, id, text))


def _update(txn: Any, kind: str, id: str, changes: Mapping[str, Any],
            increments: Optional[Mapping[str, int]]) -> Optional[Record]:
    # The write lock first, so that another process sharing the file cannot
    # change the record between this read and this write.
    txn.execute("BEGIN IMMEDIATE")
    record = _get(txn, kind, id)
    if record is None:
        return None
    updated = applyUpdate(record, changes, increments)
    txn.execute("UPDATE records SET record = ? WHERE kind = ? AND id = ?", (_dumps(updated), kind, id))
    return updated


def _delete(txn: Any, kind: str, id: str) -> bool:
    txn.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, id))
    return txn.rowcount == 1  # type: ignore[no-any-return]


@implementer(IStore)
class SqliteStore(Service):
    """
    An L{IStore} in one SQLite file.
    """

    log = Logger()

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor
        self.description = f"sqlite:{path}"
        # A local file: every record is there from the start.
        self.isOpen = True
        self.pool: Optional[adbapi.ConnectionPool] = None
        self._pending: Dict[int, Deferred] = {}
        self._ids = 0
        self._closed = False

    def _makePool(self) -> adbapi.ConnectionPool:
        if not os.path.exists(self.path):
            # Owner-only from the first byte: the file holds signing secrets.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        return adbapi.ConnectionPool(
            "sqlite3", self.path, check_same_thread=False, isolation_level=None, timeout=10.0,
            cp_min=1, cp_max=1, cp_openfun=_prepare, cp_reactor=self.reactor, cp_noisy=False,
        )

    def startService(self) -> None:
        Service.startService(self)
        if self.pool is None:
            self.pool = self._makePool()
        self.log.info("evgate store: {description}", description=self.description)

    def stopService(self) -> Deferred:
        """
        Close the connection once no operation is under way: the services
        stopping alongside (webhook deliveries) write their last positions
        first, even those that follow an earlier write.
        """
        Service.stopService(self)

        def quiet(_: Any = None) -> Any:
            pending = list(self._pending.values())
            if pending:
                return DeferredList(pending, consumeErrors=True).addCallback(quiet)
            self._closed = True
            pool, self.pool = self.pool, None
            if pool is not None:
                pool.close()
            return None

        return succeed(None).addCallback(quiet)

    def _run(self, interaction: Any, *args: Any) -> Deferred:
        if self._closed:
            return fail(RuntimeError(f"the store {self.description} is closed"))
        if self.pool is None:
            # Used before start (a tool, a test): open on first use.
            self.pool = self._makePool()
        self._ids += 1
        key = self._ids
        d = self.pool.runInteraction(interaction, *args)
        self._pending[key] = d

        def done(result: Any) -> Any:
            self._pending.pop(key, None)
            return result

        d.addBoth(done)
        return d

    def get(self, kind: str, id: str) -> "Deferred[Optional[Record]]":
        return self._run(_get, kind, id)

    def list(self, kind: str) -> "Deferred[List[Tuple[str, Record]]]":
        return self._run(_list, kind)

    def create(self, kind: str, id: str, record: Record) -> "Deferred[bool]":
        return self._run(_create, kind, id, _dumps(record))

    def put(self, kind: str, id: str, record: Record) -> "Deferred[None]":
        return self._run(_put, kind, id, _dumps(record))

    def update(self, kind: str, id: str, changes: Mapping[str, Any],
               increments: Optional[Mapping[str, int]] = None) -> "Deferred[Optional[Record]]":
        # Serialise here, on the reactor thread: a bad value fails the call
        # at once rather than on the store's thread.
        json.dumps(dict(changes))
        return self._run(_update, kind, id, dict(changes), dict(increments or {}))

    def delete(self, kind: str, id: str) -> "Deferred[bool]":
        return self._run(_delete, kind, id)
