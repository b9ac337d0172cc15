"""
A store shared by several gateway nodes: a compacted Kafka topic
(C{store = kafka:<endpoint>/<topic>}), the way Kafka Connect and Schema
Registry keep their configuration.

    [gateway]
    store = kafka:events/evgate-store

    [endpoint:events]
    type = kafka
    bootstrap.servers = kafka-1:9092,kafka-2:9092

The topic
=========

One partition, C{cleanup.policy = compact}; the node that finds it
missing creates it (with the AdminClient, on the reader's thread) with
the broker's default replication factor.  A message is one record: key
C{kind/id}, value the record as JSON, and a tombstone (a null value) for a
deleted record.  Compaction keeps the last message of every key, which is
all a node starting later needs.  A topic with more than one partition, or
that is not compacted, is refused (nothing is read; every call fails with
a 503 that says why): its order, or its records, would be lost.

Reading
=======

Every node reads the whole topic into memory at start, up to the end
offset the broker gave when reading began; only then is the store open,
and calls made before wait for that (at most L{OPEN_WAIT} seconds, then
503).  Afterwards the node follows the topic and applies every record as
it comes, from whichever node wrote it, and tells the callers of
L{KafkaStore.watch} (API keys use it: a key revoked on one node is refused
everywhere within the time it takes to read one message back, milliseconds
rather than a polling interval).  Reads (C{get}, C{list}) are answered
from memory: they go on while Kafka is down.

The reader is an L{evgate.connectors.kafka.ConsumerThread} of the store's
endpoint (the same owner-thread machinery as the endpoint's own readers),
and writes go through the endpoint's shared producer.

Writing
=======

A write is produced to the topic and answered once its delivery report
came I{and} this node's reader has applied it: after C{update} answered,
C{get} on the same node sees the change (read your writes).  While Kafka
is down a write fails with a 503 (after the endpoint's
C{message.timeout.ms}).  The writes of one node to one record are made
one after the other, in the order they were asked for.

Several writers
===============

Every node applies the same messages in the same order, so every node
computes the same records, whatever the writers did concurrently, as long
as the rule that turns a message into a record is deterministic.  It is:

 - C{put} replaces the record; C{delete} removes it.
 - C{create} stores the record unless the id is taken at the point where
   the message lands: of two nodes creating the same id at once, the first
   in the topic wins (and the other's C{create} answers C{False}).  Ids
   are random (62 bits or more), so in practice this is a safety net.
 - C{update} carries the fields it changes and the increments, besides
   the whole record as the writer computed it, and the offset of the
   version of the record it started from (its I{base}).  When the base is
   still the record's last version, the record becomes the writer's.
   When another write landed in between (an operator pausing a
   subscription on one node while another node moves its position), the
   changes and increments are applied to the record as it now is: writers
   of different fields keep each other's changes, and concurrent
   increments all count.  A record deleted in between stays deleted.

Compaction keeps only the last message of a key, so that message's value
must be the record every node computed, or a node starting later would
see something else.  When a write was merged rather than taken as it was
(another write landed in between), its writer follows it with a C{sync}
message holding the merged record, which every node with the history
ignores and a node without it takes as it is.  A writer that dies between
its write and its sync leaves a value that the next write of that record
corrects; until then a node that starts meanwhile may see that record
without the concurrent change.  That is the one window where the last
writer wins, at record granularity.

What the store does not do: transactions across records, or a read that
waits for other nodes' writes (a C{get} right after another node wrote
may still see the old record for the milliseconds the message takes to
arrive).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate import jsonlimits
from evgate.connectors.kafka import ConsumerThread, _confluent, codes, consumerSettings, kafkaError
from evgate.errors import EndpointUnavailable, Problem
from evgate.interfaces import IWatchableStore
from evgate.message import Draft
from evgate.store import Record, _copy, applyUpdate

# How long a call made before the store is open waits for it.
OPEN_WAIT = 10.0

# How long a write waits for its delivery report, and then for this node's
# reader to read it back.
WRITE_TIMEOUT = 10.0

# Sync messages a writer sends at most to settle one write that was merged
# with concurrent ones (each further one only follows yet another
# concurrent write of the same record).
MAX_SYNCS = 5

# A reader that failed is started again after this many seconds, doubling
# up to MAX_RESTART_DELAY.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0

# Messages one batch of the reader carries to the reactor, and batches
# that may be on their way at once.
READ_BATCH = 500
BATCHES_IN_FLIGHT = 2

# The headers of a message (see the module's docstring).
OP_HEADER = "evgate-op"
WRITER_HEADER = "evgate-writer"
BASE_HEADER = "evgate-base"
PATCH_HEADER = "evgate-patch"


def _admin() -> Any:
    # confluent_kafka does not import its admin package itself.
    import confluent_kafka.admin

    return confluent_kafka.admin


def _dumps(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")


def recordKey(kind: str, id: str) -> str:
    """
    The message key of record C{id} of C{kind}.

    @raise ValueError: if C{kind} has a C{/} (the key could not be split).
    """
    if "/" in kind or not kind:
        raise ValueError(f"a record kind cannot be empty or contain '/': {kind!r}")
    return f"{kind}/{id}"


@dataclass
class _Entry:
    """
    What a node knows of one key: the offset of its last message, and the
    record (L{None} once deleted: a record deleted in the history this node
    read stays deleted when a late update lands).
    """

    offset: int
    record: Optional[Record]


@dataclass(frozen=True)
class Applied:
    """
    What became of one of this node's writes when its reader applied it.

    @ivar adopted: whether the record became the value written (rather
        than a merge with concurrent writes, or, for C{create}, the
        record that was there first).
    @ivar record: the record after the message (L{None}: deleted).
    @ivar offset: the message's offset.
    """

    adopted: bool
    record: Optional[Record]
    offset: int


class StoreReader(ConsumerThread):
    """
    The owner thread of the store's consumer: makes sure the topic exists
    (one partition, compacted), reads it from C{startOffset} and hands the
    messages to the store on the reactor, in batches, with the offset to
    read next (which a partition-EOF event moves past offsets that
    compaction emptied).

    Reactor-side calls of the store: C{readerResolved(start, end)} once
    the partition is assigned (C{end}: the end offset at that moment),
    C{readerBatch(reader, messages, nextOffset)} (which must give the
    batch's credit back with L{done}) and C{readerFailed(reason)}.
    """

    kind = "store"

    def __init__(self, store: "KafkaStore", startOffset: int) -> None:
        connector = store.connector
        config = consumerSettings(connector.options["librdkafka"])
        # EOF events say where the end is even when the last offsets hold
        # no message (compaction removed them).
        config["enable.partition.eof"] = "true"
        config["auto.offset.reset"] = "earliest"
        super().__init__(connector, store.topic, config)
        self.batchSize = READ_BATCH
        self.store = store
        self.startOffset = startOffset
        # A topic that disappears after this node read records from it is
        # not created again behind the node's back: that would lose them.
        self.mayCreate = startOffset == 0
        self.credits = threading.Semaphore(BATCHES_IN_FLIGHT)
        # owner-thread state
        self.admin: Any = None
        self.resolved = False
        self.nextOffset = startOffset
        self.batch: Optional[List[Tuple[int, Optional[bytes], Optional[bytes], Any]]] = None

    # the reactor side

    def done(self) -> None:
        """
        The store applied a batch: its credit goes back to the thread.
        """
        self.credits.release()

    # the owner thread

    def crashed(self, failure: Failure) -> None:
        super().crashed(failure)
        self.fromThread(self.store.readerFailed, failure.getErrorMessage())

    def finish(self) -> None:
        self.admin = None
        super().finish()

    def step(self) -> None:
        if self.backingOff():
            return
        if not self.resolved:
            self.resolve()
        elif self.batch is not None:
            if self.takeCredit(self.credits, self.pollTimeout):
                self.sendBatch()
        else:
            self.read()

    def makeAdmin(self) -> Any:
        """
        The AdminClient of the endpoint (made once, on this thread).
        """
        if self.admin is None:
            config: Dict[str, Any] = dict(self.connector.options["librdkafka"])
            config["logger"] = self.connector.librdkafkaLog
            config["error_cb"] = self.connector.onClientError
            make = getattr(self.connector.clients, "admin", None)
            if make is None:
                make = _admin().AdminClient
            self.admin = make(config)
        return self.admin

    def resolve(self) -> None:
        """
        Find the topic (create it when missing), check it, assign its
        partition at the start offset and tell the store where the end is.
        """
        try:
            partitions = self.partitionsOf()
            if partitions is None and not self.mayCreate:
                raise EndpointUnavailable(f"the store's topic {self.topic} is gone (deleted?); this node goes on "
                                          "with the records it has, read-only")
            if partitions is None:
                self.createTopic()
                return
            if partitions != [0]:
                raise EndpointUnavailable(
                    f"the store's topic {self.topic} has {len(partitions)} partitions; it needs exactly one, so "
                    "that every node applies the records in one order (use another topic)")
            self.checkCompacted()
            low, high = self.watermarks(0)
        except Problem:
            raise
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            if error.code() in codes().NOT_AUTHORIZED:
                raise EndpointUnavailable(f"Kafka refuses to let the gateway use the store's topic {self.topic}: "
                                          f"{error.str()}") from None
            self.backOff(e)
            return
        self.brokerAnswered()
        if high < self.startOffset:
            raise EndpointUnavailable(f"the store's topic {self.topic} ends at offset {high}, before offset "
                                      f"{self.startOffset} that this node read: it was created again; restart "
                                      "the node to read it afresh")
        start = max(self.startOffset, low)
        self.consumer.assign([self.tp(0, start)])
        self.nextOffset = start
        self.resolved = True
        self.fromThread(self.store.readerResolved, start, high)

    def createTopic(self) -> None:
        """
        Create the topic: one partition, compacted, the broker's default
        replication.  Another node creating it at the same moment is
        fine.
        """
        admin = _admin()
        topic = admin.NewTopic(self.topic, num_partitions=1, replication_factor=-1,
                               config={"cleanup.policy": "compact"})
        future = self.makeAdmin().create_topics([topic], request_timeout=self.requestTimeout)[self.topic]
        try:
            future.result(self.requestTimeout + 1)
        except Exception as e:
            error = kafkaError(e)
            if error is None or error.code() != _confluent().KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        else:
            self.fromThread(self.store.log.info, "store: created the compacted topic {topic}", topic=self.topic)
        # The broker's metadata may lag behind the creation for a moment.
        self.retryAt = self.now() + 0.2

    def checkCompacted(self) -> None:
        """
        Refuse a topic whose old records Kafka would delete by age.
        """
        admin = _admin()
        resource = admin.ConfigResource(admin.ResourceType.TOPIC, self.topic)
        futures = self.makeAdmin().describe_configs([resource], request_timeout=self.requestTimeout)
        entries = list(futures.values())[0].result(self.requestTimeout + 1)
        entry = entries.get("cleanup.policy")
        policy = str(getattr(entry, "value", "") or "")
        if "compact" not in policy.split(",") or "delete" in policy.split(","):
            raise EndpointUnavailable(
                f"the store's topic {self.topic} has cleanup.policy={policy}: Kafka would delete records by age; "
                "set cleanup.policy=compact on it (kafka-configs --alter) or use another topic")

    def read(self) -> None:
        """
        Poll one batch and hand it over (with the offset to read next).
        """
        first = self.consumer.poll(self.pollTimeout)
        if first is None:
            return
        records = [first]
        records.extend(self.consumer.consume(self.batchSize - 1, 0))
        batch = []
        moved = False
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() == codes().PARTITION_EOF:
                    if record.offset() > self.nextOffset:
                        self.nextOffset = record.offset()
                    moved = True
                else:
                    self.recordError(error)
                continue
            batch.append((record.offset(), record.key(), record.value(), record.headers()))
            self.nextOffset = record.offset() + 1
            moved = True
        if not moved:
            return
        self.connector.observeBroker(True)
        self.batch = batch
        if self.takeCredit(self.credits, 0):
            self.sendBatch()

    def sendBatch(self) -> None:
        """
        Hand the waiting batch to the store (its credit is taken).
        """
        batch, self.batch = self.batch, None
        self.fromThread(self.store.readerBatch, self, batch, self.nextOffset)

    def recordError(self, error: Any) -> None:
        """
        React to an error the consumer returned in place of a record.
        """
        code = error.code()
        known = codes()
        if code in (known.ALL_BROKERS_DOWN, known.TRANSPORT):
            self.connector.observeBroker(False, error.str())
        elif code in known.NOT_AUTHORIZED:
            raise EndpointUnavailable(f"Kafka refuses to let the gateway read the store's topic {self.topic}: "
                                      f"{error.str()}")
        elif code in known.UNKNOWN_TOPIC:
            raise EndpointUnavailable(f"the store's topic {self.topic} is gone")
        else:
            self.fromThread(self.log.warn, "store: reading {topic}: {error}", topic=self.topic, error=error.str())


@implementer(IWatchableStore)
class KafkaStore(Service):
    """
    An L{IWatchableStore} in a compacted Kafka topic (see the module's
    docstring).

    @ivar isOpen: whether the topic was read up to its end at start.
    @ivar nextOffset: the offset of the next message to apply.
    """

    log = Logger()

    def __init__(self, connector: Any, topic: str, reactor: Any, openWait: float = OPEN_WAIT,
                 writeTimeout: float = WRITE_TIMEOUT) -> None:
        self.connector = connector
        self.topic = topic
        self.reactor = reactor
        self.openWait = openWait
        self.writeTimeout = writeTimeout
        self.description = f"kafka:{connector.name}/{topic}"
        # Whose writes are whose: a header on every message this node
        # writes, so that its reader recognises them.
        self.node = uuid.uuid4().hex[:16]
        self.entries: Dict[Tuple[str, str], _Entry] = {}
        self.isOpen = False
        self.closed = False
        self.nextOffset = 0
        self.endAtStart: Optional[int] = None
        self.reader: Optional[StoreReader] = None
        self.problem: Optional[str] = None
        self.watchers: Dict[str, List[Callable[[str, Optional[Record]], None]]] = {}
        self._openWaiters: List[Deferred] = []
        self._awaiting: Dict[str, Deferred] = {}
        self._queues: Dict[Tuple[str, str], List[Tuple[Callable[[], Any], Deferred]]] = {}
        self._serial = 0
        self._restartCall: Any = None
        self._restartDelay = RESTART_DELAY
        self._began = 0.0
        self._warned: set = set()

    # -- lifecycle

    def startService(self) -> None:
        Service.startService(self)
        self.closed = False
        self._began = self.reactor.seconds()
        self.log.info("evgate store: {description} (reading it)", description=self.description)
        self._startReader()

    def _startReader(self) -> None:
        self._restartCall = None
        if not self.running:
            return
        reader = self.reader = StoreReader(self, self.nextOffset)
        reader.whenExited().addCallback(self._readerExited, reader)
        reader.start()

    def _readerExited(self, _: Any, reader: StoreReader) -> None:
        if reader is not self.reader or not self.running:
            return
        # It ended on its own: a failure, logged by the thread.  Read on
        # from where it was, later.
        self.reader = None
        delay = self._restartDelay
        self._restartDelay = min(MAX_RESTART_DELAY, delay * 2)
        self._restartCall = self.reactor.callLater(delay, self._startReader)

    def stopService(self) -> Deferred:
        """
        Let the writes under way finish (the services stopping alongside
        write their last positions), then stop the reader.
        """
        Service.stopService(self)
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        self._restartCall = None

        def quiet(_: Any = None) -> Any:
            pending = [d for queue in self._queues.values() for _, d in queue]
            if pending:
                return DeferredList(pending, consumeErrors=True).addCallback(quiet)
            return self._close()

        return succeed(None).addCallback(quiet)

    def _close(self) -> Deferred:
        self.closed = True
        waiters, self._openWaiters = self._openWaiters, []
        for d in waiters:
            if not d.called:
                d.errback(self._unavailable("it is closing"))
        reader, self.reader = self.reader, None
        if reader is None:
            return succeed(None)
        reader.stop()
        done: Deferred = Deferred()

        def exited(_: Any = None) -> None:
            # The thread ended, or it is stuck on a broker that is gone and
            # is left behind (a daemon thread cannot keep the process up).
            if giveUp.active():
                giveUp.cancel()
            if not done.called:
                done.callback(None)

        giveUp = self.reactor.callLater(self.connector.options["shutdown-timeout"] + 1.0, exited)
        reader.whenExited().addCallback(exited)
        return done

    # -- the reader's reports, on the reactor

    def readerResolved(self, start: int, end: int) -> None:
        """
        The reader assigned the partition at C{start}; the topic ended at
        C{end} then.
        """
        self.problem = None
        if start > self.nextOffset:
            if self.nextOffset > 0 or self.isOpen:
                self.log.warn("store: the records of {topic} from offset {lost} to {start} were deleted before "
                              "this node read them", topic=self.topic, lost=self.nextOffset, start=start - 1)
            self.nextOffset = start
        if self.endAtStart is None:
            self.endAtStart = end
        self._checkOpen()

    def readerBatch(self, reader: StoreReader, messages: Sequence[Tuple[int, Any, Any, Any]],
                    nextOffset: int) -> None:
        """
        Messages read from the topic, in order.
        """
        try:
            if reader is self.reader:
                self._restartDelay = RESTART_DELAY
                for offset, key, value, headers in messages:
                    if offset >= self.nextOffset:
                        try:
                            self._apply(offset, key, value, headers)
                        except Exception:
                            # Skipped alike by every node, rather than
                            # stopping this one's reading.
                            self.log.failure("store: applying the message at offset {offset} of {topic} failed",
                                             offset=offset, topic=self.topic)
                        self.nextOffset = offset + 1
                self.nextOffset = max(self.nextOffset, nextOffset)
                self._checkOpen()
        finally:
            reader.done()

    def readerFailed(self, reason: str) -> None:
        """
        The reader ended with C{reason} (it is started again).
        """
        self.problem = reason

    def _checkOpen(self) -> None:
        if self.isOpen or self.endAtStart is None or self.nextOffset < self.endAtStart:
            return
        self.isOpen = True
        self.log.info("store {description} open: {count} records read in {seconds:.1f} s",
                      description=self.description, seconds=self.reactor.seconds() - self._began,
                      count=sum(1 for e in self.entries.values() if e.record is not None))
        waiters, self._openWaiters = self._openWaiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    # -- applying a message (every node, the same way)

    def _apply(self, offset: int, rawKey: Optional[bytes], value: Optional[bytes], rawHeaders: Any) -> None:
        try:
            kind, sep, id = (rawKey or b"").decode("utf-8").partition("/")
            if not sep or not kind:
                raise ValueError("not kind/id")
            headers = {name: raw.decode("utf-8") for name, raw in rawHeaders or () if raw is not None}
            record = None if value is None else jsonlimits.loads(value)
            if record is not None and not isinstance(record, dict):
                raise ValueError("not a JSON object")
            patch = jsonlimits.loads(headers[PATCH_HEADER]) if PATCH_HEADER in headers else {}
            if not isinstance(patch, dict) or not all(isinstance(patch.get(part, {}), dict)
                                                      for part in ("changes", "increments")):
                raise ValueError("a bad patch header")
            base = int(headers.get(BASE_HEADER, "-1"))
        except (ValueError, UnicodeDecodeError) as e:
            # Written by something else than evgate: every node skips it
            # alike.
            self._warnOnce(("bad", rawKey), "store: skipping the message at offset {offset} of {topic}: {error}",
                           offset=offset, topic=self.topic, error=str(e))
            return
        key = (kind, id)
        entry = self.entries.get(key)
        before = entry.record if entry is not None else None
        op = headers.get(OP_HEADER)
        adopted = True
        after: Optional[Record]
        if op in ("update", "sync") and entry is not None and entry.offset != base:
            # Another write landed since the version this one started
            # from: merge instead of replacing (see the module docstring).
            adopted = False
            if op == "sync" or before is None:
                after = before
            else:
                after = applyUpdate(before, patch.get("changes") or {}, patch.get("increments") or {})
        elif op == "create" and before is not None:
            adopted = False
            after = before
        else:
            after = record
        self.entries[key] = _Entry(offset, after)
        if self.isOpen and after != before:
            self._notify(kind, id, after)
        writer = headers.get(WRITER_HEADER)
        if writer is not None:
            waiter = self._awaiting.pop(writer, None)
            if waiter is not None:
                waiter.callback(Applied(adopted, None if after is None else _copy(after), offset))

    def _notify(self, kind: str, id: str, record: Optional[Record]) -> None:
        for callback in list(self.watchers.get(kind, ())):
            try:
                callback(id, None if record is None else _copy(record))
            except Exception:
                self.log.failure("store: a watcher of {kind} records failed", kind=kind)

    def _warnOnce(self, what: Any, format: str, **fields: Any) -> None:
        if what in self._warned:
            return
        if len(self._warned) > 1000:
            self._warned.clear()
        self._warned.add(what)
        self.log.warn(format, **fields)

    # -- waiting for the store to be open

    def _unavailable(self, why: str) -> EndpointUnavailable:
        return EndpointUnavailable(f"the store {self.description} is unavailable: {why}",
                                   retryAfter=self.connector.retryAfter)

    def _status(self) -> str:
        if self.problem:
            return self.problem
        if self.endAtStart is None:
            return f"Kafka endpoint {self.connector.name} has not answered yet ({self.connector.brokerReason})"
        return f"it has read {self.nextOffset} of the {self.endAtStart} messages of its topic so far"

    def whenOpen(self) -> Deferred:
        """
        A Deferred that fires once the store is open, or fails (503) after
        C{openWait} seconds, or at once when the store is closed.
        """
        if self.closed:
            return fail(self._unavailable("it is closed"))
        if self.isOpen:
            return succeed(None)
        d: Deferred = Deferred()
        self._openWaiters.append(d)

        def tooLong() -> None:
            if not d.called:
                self._openWaiters.remove(d)
                d.errback(self._unavailable(f"not open after {self.openWait:g} s: {self._status()}"))

        timer = self.reactor.callLater(self.openWait, tooLong)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(done)
        return d

    # -- IStore: reads

    def _record(self, kind: str, id: str) -> Optional[Record]:
        entry = self.entries.get((kind, id))
        return None if entry is None or entry.record is None else _copy(entry.record)

    def _records(self, kind: str) -> List[Tuple[str, Record]]:
        return [(i, _copy(e.record)) for (k, i), e in sorted(self.entries.items())
                if k == kind and e.record is not None]

    def get(self, kind: str, id: str) -> "Deferred[Optional[Record]]":
        if self.isOpen and not self.closed:
            return succeed(self._record(kind, id))
        return self.whenOpen().addCallback(lambda _: self._record(kind, id))  # type: ignore[no-any-return]

    def list(self, kind: str) -> "Deferred[List[Tuple[str, Record]]]":
        if self.isOpen and not self.closed:
            return succeed(self._records(kind))
        return self.whenOpen().addCallback(lambda _: self._records(kind))  # type: ignore[no-any-return]

    # -- IWatchableStore

    def watch(self, kind: str, callback: Callable[[str, Optional[Record]], None]) -> Callable[[], None]:
        """
        Call C{callback(id, record)} for every change of a record of
        C{kind} applied after the store opened (see
        L{evgate.interfaces.IWatchableStore}).
        """
        self.watchers.setdefault(kind, []).append(callback)

        def stop() -> None:
            callbacks = self.watchers.get(kind, [])
            if callback in callbacks:
                callbacks.remove(callback)

        return stop

    # -- IStore: writes

    def create(self, kind: str, id: str, record: Record) -> "Deferred[bool]":
        value = _copy(record)

        def write() -> Any:
            if self._record(kind, id) is not None:
                return False
            d = self._send(kind, id, "create", value)
            return d.addCallback(self._settled, kind, id).addCallback(lambda applied: applied.adopted)

        return self._enqueue(kind, id, write)

    def put(self, kind: str, id: str, record: Record) -> "Deferred[None]":
        value = _copy(record)

        def write() -> Any:
            return self._send(kind, id, "put", value).addCallback(lambda _: None)

        return self._enqueue(kind, id, write)

    def update(self, kind: str, id: str, changes: Mapping[str, Any],
               increments: Optional[Mapping[str, int]] = None) -> "Deferred[Optional[Record]]":
        # A JSON round trip now: a value that cannot be stored fails the
        # call here rather than on the way to Kafka.
        patch = {"changes": _copy(dict(changes)), "increments": _copy(dict(increments or {}))}

        def write() -> Any:
            entry = self.entries.get((kind, id))
            if entry is None or entry.record is None:
                return None
            value = applyUpdate(entry.record, patch["changes"], patch["increments"])
            d = self._send(kind, id, "update", value, base=entry.offset, patch=patch)
            return d.addCallback(self._settled, kind, id).addCallback(lambda applied: applied.record)

        return self._enqueue(kind, id, write)

    def delete(self, kind: str, id: str) -> "Deferred[bool]":
        def write() -> Any:
            if self._record(kind, id) is None:
                return False
            return self._send(kind, id, "delete", None).addCallback(lambda _: True)

        return self._enqueue(kind, id, write)

    def _enqueue(self, kind: str, id: str, write: Callable[[], Any]) -> Deferred:
        """
        Run C{write} once the store is open and this node's earlier writes
        of the same record are done.
        """
        try:
            recordKey(kind, id)
        except ValueError as e:
            return fail(e)
        if self.closed:
            return fail(self._unavailable("it is closed"))
        key = (kind, id)
        d: Deferred = Deferred()
        queue = self._queues.setdefault(key, [])
        queue.append((write, d))
        if len(queue) == 1:
            self._runNext(key)
        return d

    def _runNext(self, key: Tuple[str, str]) -> None:
        queue = self._queues.get(key)
        if not queue:
            self._queues.pop(key, None)
            return
        write, d = queue[0]
        step = self.whenOpen().addCallback(lambda _: write())

        def finished(result: Any) -> None:
            queue.pop(0)
            if not queue:
                del self._queues[key]
            else:
                self._runNext(key)
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        step.addBoth(finished)

    def _send(self, kind: str, id: str, op: str, value: Optional[Record], base: Optional[int] = None,
              patch: Optional[Mapping[str, Any]] = None) -> Deferred:
        """
        Produce one message and fire with its L{Applied} once this node's
        reader applied it.
        """
        self._serial += 1
        token = f"{self.node}.{self._serial}"
        headers = [(OP_HEADER, op), (WRITER_HEADER, token)]
        if base is not None:
            headers.append((BASE_HEADER, str(base)))
        if patch is not None:
            headers.append((PATCH_HEADER, _dumps(patch).decode("utf-8")))
        # A null value is a tombstone; the producer passes it on as it is.
        content: Any = None if value is None else _dumps(value)
        applied: Deferred = Deferred()
        self._awaiting[token] = applied
        published = self.connector.publish(self.topic, Draft(content, key=recordKey(kind, id),
                                                             headers=tuple(headers)), self.writeTimeout)

        def delivered(position: Any) -> Deferred:
            if applied.called:
                return applied

            def tooSlow() -> None:
                if self._awaiting.pop(token, None) is applied:
                    applied.errback(self._unavailable(
                        f"the write is at offset {position.offset} of {self.topic}, but this node has not read it "
                        f"back within {self.writeTimeout:g} s"))

            timer = self.reactor.callLater(self.writeTimeout, tooSlow)

            def readBack(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            return applied.addBoth(readBack)

        def failed(failure: Failure) -> Failure:
            self._awaiting.pop(token, None)
            return failure

        published.addCallbacks(delivered, failed)
        return published

    def _settled(self, applied: Applied, kind: str, id: str, syncs: int = 0) -> Any:
        """
        Make sure the last message of the record in the topic holds the
        record every node computed: when C{applied} was merged with a
        concurrent write, send the merged record (a sync) until one lands
        as it was written.  Fires with the first L{Applied}.
        """
        if applied.adopted or syncs >= MAX_SYNCS:
            if not applied.adopted:
                self.log.warn("store: record {kind}/{id} is written by several nodes at once; its last message "
                              "may not match the merged record until its next write", kind=kind, id=id)
            return applied
        entry = self.entries[(kind, id)]
        d = self._send(kind, id, "sync", entry.record, base=entry.offset)

        def again(synced: Applied) -> Any:
            if synced.adopted:
                return applied
            return self._settled(Applied(False, applied.record, applied.offset), kind, id, syncs + 1)

        def notSynced(failure: Failure) -> Applied:
            # The write itself is done; the next write of the record
            # repairs the last message.
            self.log.warn("store: could not settle record {kind}/{id}: {error}", kind=kind, id=id,
                          error=failure.getErrorMessage())
            return applied

        return d.addCallbacks(again, notSynced)


def buildKafkaStore(endpoint: str, topic: str, connectors: Mapping[str, Any], reactor: Any,
                    configPath: str) -> KafkaStore:
    """
    The store of C{store = kafka:<endpoint>/<topic>}.

    @raise ConfigError: if there is no Kafka endpoint of that name.
    """
    from evgate.config import ConfigError

    connector = connectors.get(endpoint)
    if connector is None or getattr(connector, "kind", None) != "kafka":
        kafka = ", ".join(sorted(n for n, c in connectors.items() if getattr(c, "kind", None) == "kafka")) or "none"
        what = (f"there is no [endpoint:{endpoint}]" if connector is None
                else f"[endpoint:{endpoint}] is of type {connector.kind}")
        raise ConfigError(configPath, "gateway", "store",
                          f"kafka:{endpoint}/{topic}: {what}; the store needs an endpoint of type kafka "
                          f"(Kafka endpoints: {kafka})")
    return KafkaStore(connector, topic, reactor)

