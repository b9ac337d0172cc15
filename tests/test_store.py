"""
Tests of the record stores: one behaviour suite run against every
L{IStore} (memory, SQLite), and what only SQLite does (durability, file
permissions, sharing a file between processes).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.interfaces import IStore
from evgate.store import MemoryStore, StoreSpec
from evgate.store.sqlite import SqliteStore

from .helpers import demoIni


def storeIni(store: str) -> str:
    """
    A configuration's text with C{store} as its store.
    """
    return str(demoIni(listen=None, store=store))


class StoreBehaviour:
    """
    What every L{IStore} does; mixed into a TestCase that sets
    C{self.store}.
    """

    store: Any

    def test_interface(self) -> None:
        """
        The store provides IStore.
        """
        self.assertTrue(verifyObject(IStore, self.store))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_putGetListDelete(self) -> Any:
        """
        Records are kept per kind and id, listed in id order, and deleted.
        """
        store = self.store
        yield store.put("thing", "b", {"n": 2, "nested": {"x": [1, "two"]}})
        yield store.put("thing", "a", {"n": 1})
        yield store.put("other", "a", {"n": 99})
        self.assertEqual((yield store.get("thing", "b")), {"n": 2, "nested": {"x": [1, "two"]}})
        self.assertIsNone((yield store.get("thing", "c")))
        self.assertEqual((yield store.list("thing")), [("a", {"n": 1}), ("b", {"n": 2, "nested": {"x": [1, "two"]}})])
        self.assertTrue((yield store.delete("thing", "a")))
        self.assertFalse((yield store.delete("thing", "a")))
        self.assertEqual([i for i, _ in (yield store.list("thing"))], ["b"])
        self.assertEqual((yield store.get("other", "a")), {"n": 99})

    @inlineCallbacks
    def test_createOnlyOnce(self) -> Any:
        """
        create stores a record only when its id is free.
        """
        self.assertTrue((yield self.store.create("thing", "x", {"v": 1})))
        self.assertFalse((yield self.store.create("thing", "x", {"v": 2})))
        self.assertEqual((yield self.store.get("thing", "x")), {"v": 1})

    @inlineCallbacks
    def test_updateMerges(self) -> Any:
        """
        update sets the fields it names, adds its increments, keeps the
        rest, and answers the record as it now is; a missing record is
        neither created nor changed.
        """
        store = self.store
        yield store.put("thing", "x", {"a": 1, "b": "keep", "count": 2})
        after = yield store.update("thing", "x", {"a": 5, "c": None}, {"count": 3, "fresh": 1})
        self.assertEqual(after, {"a": 5, "b": "keep", "c": None, "count": 5, "fresh": 1})
        self.assertEqual((yield store.get("thing", "x")), after)
        self.assertIsNone((yield store.update("thing", "nope", {"a": 1})))
        self.assertIsNone((yield store.get("thing", "nope")))

    @inlineCallbacks
    def test_copies(self) -> Any:
        """
        Records handed in or out are copies: changing them changes nothing
        stored.
        """
        record = {"list": [1]}
        yield self.store.put("thing", "x", record)
        record["list"].append(2)
        got = yield self.store.get("thing", "x")
        got["list"].append(3)
        self.assertEqual((yield self.store.get("thing", "x")), {"list": [1]})

    @inlineCallbacks
    def test_concurrentIncrements(self) -> Any:
        """
        Increments issued together all count.
        """
        yield self.store.put("thing", "x", {"n": 0})
        yield gatherResults([self.store.update("thing", "x", {}, {"n": 1}) for _ in range(20)])
        self.assertEqual((yield self.store.get("thing", "x")), {"n": 20})


class MemoryStoreTests(StoreBehaviour, TestCase):
    """
    The memory store.
    """

    def setUp(self) -> None:
        self.store = MemoryStore()


class SqliteStoreTests(StoreBehaviour, TestCase):
    """
    The SQLite store.
    """

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp() + "-dir", "evgate.sqlite")
        os.makedirs(os.path.dirname(self.path))
        self.store = self.open()

    def open(self) -> SqliteStore:
        """
        A started store on C{self.path}, stopped at cleanup.
        """
        store = SqliteStore(self.path, reactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    @inlineCallbacks
    def test_survivesReopen(self) -> Any:
        """
        What was written is there after the store is closed and opened
        again.
        """
        yield self.store.put("thing", "x", {"position": "abc"})
        yield self.store.update("thing", "x", {}, {"n": 1})
        yield self.store.stopService()
        again = self.open()
        self.assertEqual((yield again.get("thing", "x")), {"position": "abc", "n": 1})

    def test_ownerOnly(self) -> None:
        """
        The file is created readable and writable by its owner only: it
        holds signing secrets.
        """
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        self.assertEqual(mode & 0o077, 0)

    @inlineCallbacks
    def test_sharedFile(self) -> Any:
        """
        Two stores on one file (two gateway processes on one host) see each
        other's writes, and their increments both count.
        """
        other = self.open()
        yield self.store.put("thing", "x", {"n": 0})
        yield gatherResults([s.update("thing", "x", {}, {"n": 1}) for s in (self.store, other) * 10])
        self.assertEqual((yield other.get("thing", "x")), {"n": 20})

    @inlineCallbacks
    def test_closedRefuses(self) -> Any:
        """
        After stopping, calls fail instead of reopening the file.
        """
        yield self.store.stopService()
        yield self.assertFailure(self.store.get("thing", "x"), RuntimeError)

    @inlineCallbacks
    def test_newerSchemaRefused(self) -> Any:
        """
        A file written by a newer evgate (higher schema version) is not
        touched.
        """
        yield self.store.put("thing", "x", {})
        yield self.store.stopService()
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA user_version = 99")
        connection.commit()
        connection.close()
        again = self.open()
        failure = yield self.assertFailure(again.get("thing", "x"), RuntimeError)
        self.assertIn("newer evgate", str(failure))


class StoreKeyTests(TestCase):
    """
    The [gateway] store key.
    """

    def test_sqliteRelativeToConfig(self) -> None:
        """
        A relative sqlite path is relative to the configuration file's
        directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "var"))
        config = parseConfig(storeIni("sqlite:var/evgate.sqlite"), os.path.join(directory, "evgate.ini"))
        self.assertEqual(config.gateway.options["store"],
                         StoreSpec("sqlite", os.path.join(directory, "var", "evgate.sqlite")))

    def test_memoryAndErrors(self) -> None:
        """
        memory is a store; other values and missing directories are refused
        with the key named.
        """
        self.assertEqual(parseConfig(storeIni("memory"), "t.ini").gateway.options["store"],
                         StoreSpec("memory"))
        for value in ("redis://x", "sqlite:", "sqlite:/no/such/directory/x.sqlite"):
            error = self.assertRaises(ConfigError, parseConfig, storeIni(value), "t.ini")
            self.assertEqual((error.section, error.key), ("gateway", "store"))
