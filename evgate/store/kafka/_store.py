"""
The store itself: records in memory, applied from the topic, written
through the endpoint's producer.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate import jsonlimits
from evgate.deadlines import atDeadline
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IWatchableStore
from evgate.message import Draft
from evgate.store import Record, _copy, applyUpdate
from evgate.store.kafka._reader import StoreReader
from evgate.store.kafka._records import (
    BASE_HEADER,
    MAX_RESTART_DELAY,
    MAX_SYNCS,
    OP_HEADER,
    OPEN_WAIT,
    PATCH_HEADER,
    RESTART_DELAY,
    WRITE_TIMEOUT,
    WRITER_HEADER,
    Applied,
    _dumps,
    _Entry,
    recordKey,
)


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
            self._openWaiters.remove(d)
            d.errback(self._unavailable(f"not open after {self.openWait:g} s: {self._status()}"))

        return atDeadline(self.reactor, self.openWait, d, tooLong)

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
