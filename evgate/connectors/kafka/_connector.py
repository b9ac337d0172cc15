"""
The Kafka endpoint: the connector that owns the producer, the readers and
the group readers, and answers publishers (its publishing half is in
C{_publishing}).
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.connectors.kafka._assigned import AssignedReader
from evgate.connectors.kafka._client import ConfluentClients, LibrdkafkaLog, codes, refusalOf
from evgate.connectors.kafka._consumer import ConsumerThread
from evgate.connectors.kafka._groups import GroupBatch, GroupReader
from evgate.connectors.kafka._heads import KnownHeads
from evgate.connectors.kafka._producer import REPORT_BATCH, ProducerThread
from evgate.connectors.kafka._publishing import KafkaPublishing
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog, IUpstreamSink
from evgate.message import Cursor
from evgate.threads import ReactorBatches, StartThread, callOnReactor, startDaemonThread

Start = Union[str, Cursor]

# Seconds before the same refusal is logged again (with how often it
# happened meanwhile): librdkafka retries every few seconds, forever.
REFUSAL_RELOG = 600.0


@implementer(IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog)
class KafkaConnector(Service, KafkaPublishing):
    """
    An endpoint of C{type = kafka}.

    @ivar connected: whether a broker answered last (a delivery, metadata,
        records, or librdkafka's statistics showing a broker up), rather
        than librdkafka reporting every broker down.
    @ivar refusal: why the broker refuses the gateway (authentication or
        TLS failed; see L{refusedBy}), or L{None}.  While it is set,
        publishes and new subscriptions fail at once with a 503 that says
        so, rather than after C{message.timeout.ms}.
    """

    kind = "kafka"
    log = Logger()

    def __init__(self, name: str, options: Mapping[str, Any], reactor: Any,
                 clients: Optional[Any] = None,
                 startThread: StartThread = startDaemonThread) -> None:
        self.name = name  # type: ignore[assignment]  # Service declares it None
        self.options = options
        self.reactor = reactor
        self.clients = clients if clients is not None else ConfluentClients()
        self.startThread = startThread
        self.retryAfter: int = options["retry-after"]
        self.connected = False
        self.known = False
        self.brokerReason = "the gateway has not reached the broker yet"
        self.transportError = ""
        self.refusal: Optional[str] = None
        self._refusalLogged: Tuple[Optional[str], float, int] = (None, 0.0, 0)
        self._refusalSeen: Tuple[Optional[str], float] = (None, 0.0)
        self.librdkafkaLog = LibrdkafkaLog(self)
        self.producerThread: Optional[ProducerThread] = None
        self.readers: Set[ConsumerThread] = set()
        self.groups: Dict[Tuple[str, str], GroupReader] = {}
        self.heads = KnownHeads()
        self._pending: Dict[int, Any] = {}  # _Publish or _Batch
        # Delivery reports collected on the producer thread, handed to the
        # reactor once per poll (see handOverReports): a publish's, or a
        # publishMany batch whose records all have theirs.
        self._reports: ReactorBatches[Any] = ReactorBatches(reactor, self._deliveredAll, handOverAt=REPORT_BATCH)
        self._tokens = itertools.count(1)
        self._stopping = False
        self._warnedTimeout = False
        self._reported: Tuple[Optional[bool], float] = (None, 0.0)

    def epoch(self) -> int:
        return 0

    def headOffsets(self, topic: str) -> Optional[Mapping[int, int]]:
        """
        Where the partitions of C{topic} end, as this connector's readers
        last saw it (see L{KnownHeads}); L{None} while none has read it.
        """
        return self.heads.of(topic)

    # lifecycle

    def startService(self) -> None:
        # The producer is made here, not in __init__: twistd builds the
        # service before it daemonizes, and librdkafka's threads would not
        # survive the fork.
        Service.startService(self)
        self._stopping = False
        try:
            self.producerThread = ProducerThread(self)
        except Exception:
            self.log.failure("Kafka endpoint {endpoint}: cannot create the producer", endpoint=self.name)
            return
        self.producerThread.start()
        self.startThread(self.producerThread.probe, f"evgate-kafka-probe-{self.name}")

    def stopService(self) -> Deferred:
        """
        Close every reader, flush the producer, and fire once their threads
        ended, or after C{shutdown-timeout} (plus a second) in any case.
        """
        Service.stopService(self)
        self._stopping = True
        exits = []
        for group in list(self.groups.values()):
            group.close()
        for reader in list(self.readers):
            if isinstance(reader, AssignedReader):
                reader.close()
            else:
                reader.stop()
            exits.append(reader.whenExited())
        producer = self.producerThread
        if producer is not None:
            producer.requestStop()
            exits.append(producer.whenExited())
        done: Deferred = Deferred()
        remaining = [len(exits)]

        def oneExited(_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.called:
                giveUp.cancel()
                done.callback(None)

        def gaveUp() -> None:
            self.log.warn("Kafka endpoint {endpoint}: {count} client thread(s) did not end within "
                          "{seconds} s (is the broker gone?); leaving them behind",
                          endpoint=self.name, count=remaining[0], seconds=self.options["shutdown-timeout"])
            done.callback(None)

        giveUp = self.reactor.callLater(self.options["shutdown-timeout"] + 1.0, gaveUp)
        for d in exits:
            d.addCallback(oneExited)
        if not exits:
            giveUp.cancel()
            done.callback(None)
        done.addCallback(self._stopped)
        return done

    def _stopped(self, _: Any) -> None:
        self.producerThread = None
        for token in list(self._pending):
            self._settle(token, EndpointUnavailable(
                "the gateway stopped before Kafka acknowledged; the message may or may not have been stored",
                retryAfter=self.retryAfter))

    def forget(self, reader: ConsumerThread) -> None:
        """
        A reader's thread ended.
        """
        self.readers.discard(reader)
        if isinstance(reader, GroupReader):
            self.groupClosing(reader)
        elif isinstance(reader, AssignedReader) and not any(
                isinstance(r, AssignedReader) and r.topic == reader.topic for r in self.readers):
            # Nothing keeps the heads of this topic fresh any more: lag
            # figures and non-blocking reads must not trust them.
            self.heads.forget(reader.topic)

    # broker state, from any thread

    def observeBroker(self, up: bool, reason: str = "") -> None:
        """
        A client thread saw the broker up or down; the reactor learns of
        changes (at most every second per repeat, so a broker that is down
        does not flood the reactor).
        """
        last, when = self._reported
        now = time.monotonic()
        if up == self.connected and last == up:
            return
        if last == up and now - when < 1.0:
            return
        self._reported = (up, now)
        callOnReactor(self.reactor, self._setConnected, up, reason)

    @property
    def notConnectedReason(self) -> Optional[str]:
        """
        One line on why the endpoint is not connected, for C{/ready}; L{None}
        while it is.
        """
        if self.connected:
            return None
        return self.brokerReason

    def _setConnected(self, up: bool, reason: str = "") -> None:
        if up and self.refusal is not None:
            self.log.info("Kafka endpoint {endpoint}: the broker accepts the gateway again", endpoint=self.name)
            self.refusal = None
            self._refusalLogged = (None, 0.0, 0)
        if reason and not up and self.refusal is None:
            self.brokerReason = reason
        if up == self.connected and self.known:
            return
        self.connected = up
        self.known = True
        if up:
            self.log.info("Kafka endpoint {endpoint}: broker reachable at {servers}",
                          endpoint=self.name, servers=self.options["librdkafka"]["bootstrap.servers"])
        elif self.refusal is None:
            self.log.warn("Kafka endpoint {endpoint}: broker unreachable: {reason}",
                          endpoint=self.name, reason=self.brokerReason)

    def observeRefusal(self, reason: str) -> None:
        """
        A client thread saw the broker refuse the gateway; the reactor
        learns of it (the same reason at most once a second: every client
        of the endpoint retries).
        """
        last, when = self._refusalSeen
        now = time.monotonic()
        if last == reason and now - when < 1.0:
            return
        self._refusalSeen = (reason, now)
        callOnReactor(self.reactor, self.refusedBy, reason)

    def refusedBy(self, reason: str) -> None:
        """
        The broker refuses the gateway (on the reactor thread): say so in
        one log line (again only after L{REFUSAL_RELOG} seconds, or when the
        reason changes), mark the endpoint not connected with that reason,
        and answer the publishes waiting for a delivery report now: their
        messages cannot reach the broker before librdkafka's
        C{message.timeout.ms}, and the publisher should not wait for it.
        """
        self.refusal = self.brokerReason = reason
        self.connected = False
        self.known = True
        logged, when, repeats = self._refusalLogged
        now = self.reactor.seconds()
        if logged != reason or now - when >= REFUSAL_RELOG:
            self.log.error("Kafka endpoint {endpoint}: the broker refuses the gateway: {reason}{repeats}",
                           endpoint=self.name, reason=reason,
                           repeats=f" (again {repeats} times since)" if logged == reason and repeats else "")
            self._refusalLogged = (reason, now, 0)
        else:
            self._refusalLogged = (logged, when, repeats + 1)
        problem = self.refused("the message was not stored")
        for token, pending in list(self._pending.items()):
            self._fail(token, pending, problem)

    def refused(self, what: str) -> EndpointUnavailable:
        """
        The 503 of a call while the broker refuses the gateway.
        """
        return EndpointUnavailable(f"Kafka endpoint {self.name}: the broker refuses the gateway: {self.refusal}; "
                                   f"{what}", retryAfter=self.retryAfter)

    def onClientError(self, error: Any) -> None:
        """
        confluent-kafka's C{error_cb}, on a client thread.
        """
        code = error.code()
        known = codes()
        refusal = refusalOf(code, error.str())
        if refusal is not None:
            self.observeRefusal(refusal)
        elif code == known.ALL_BROKERS_DOWN:
            # "1/1 brokers are down" says less than the connection error
            # that came just before it.
            self.observeBroker(False, self.transportError or error.str())
        elif code == known.TRANSPORT:
            # One connection failing is not the cluster being gone; but its
            # reason is the useful one when they all are.
            self.transportError = error.str()
        elif getattr(error, "fatal", lambda: False)():
            self.observeBroker(False, error.str())
            callOnReactor(self.reactor, self.log.error, "Kafka endpoint {endpoint}: fatal client error: {error}",
                            endpoint=self.name, error=error.str())

    def onStatistics(self, text: str) -> None:
        """
        confluent-kafka's C{stats_cb}, on a client thread: any broker up
        means connected.
        """
        try:
            brokers = json.loads(text).get("brokers", {})
        except ValueError:
            return
        if any(broker.get("state") == "UP" for broker in brokers.values()):
            self.observeBroker(True)

    # subscribing

    def subscribe(self, topic: str, start: Start, sink: IUpstreamSink) -> AssignedReader:
        """
        Read C{topic} from C{start} into C{sink} on a reader thread of its
        own.
        """
        reader = AssignedReader(self, topic, start, sink)
        if self._stopping or self.refusal is not None:
            reader.closed = True
            problem = (self.refused("cannot read") if self.refusal is not None
                       else EndpointUnavailable(f"Kafka endpoint {self.name} is not running",
                                                retryAfter=self.retryAfter))
            self.reactor.callLater(0, sink.failed, Failure(problem))
            return reader
        self.readers.add(reader)
        reader.start()
        return reader

    # group mode

    def groupId(self, group: str) -> str:
        """
        The Kafka consumer group of the evgate group name C{group}.
        """
        return f"{self.options['group-prefix']}.{group}"

    def groupPoll(self, topic: str, group: str, limit: int, timeout: float,
                  start: str = "latest") -> Deferred:
        """
        Read C{topic} as a member of the consumer group
        C{<group-prefix>.<group>}: up to C{limit} messages, answering as
        soon as there is one or after C{timeout} seconds.

        The reader of a (topic, group) is kept between polls and closed
        after C{group-idle-timeout} seconds without one.  Polls of one group
        take turns: a poll that cannot get its turn within C{timeout} gets
        an empty batch.

        @param start: where a group without a committed position starts.
        @return: a Deferred of a L{GroupBatch}, which the caller must
            C{commit()} (after the client has the messages) or
            C{putBack()}.
        """
        if self._stopping:
            return fail(EndpointUnavailable(f"Kafka endpoint {self.name} is not running",
                                            retryAfter=self.retryAfter))
        if self.refusal is not None:
            return fail(self.refused("cannot read"))
        groupId = self.groupId(group)
        reader = self.groups.get((topic, groupId))
        if reader is None:
            reader = self.groups[(topic, groupId)] = GroupReader(self, topic, groupId, start)
            self.readers.add(reader)
            reader.start()
        reader.touch()
        began = self.reactor.seconds()
        turn = reader.lock.acquire()
        turn.addTimeout(timeout, self.reactor)

        def haveTurn(_: Any) -> Deferred:
            left = max(0.0, timeout - (self.reactor.seconds() - began))
            d = reader.take(limit, left)
            d.addErrback(self._releaseOnError, reader)
            return d

        def noTurn(failure: Failure) -> GroupBatch:
            failure.trap(CancelledError, TimeoutError)
            return GroupBatch(None, [], reader.lastCursor, reader.lastCursor)

        turn.addCallbacks(haveTurn, noTurn)
        return turn

    def leaveGroup(self, topic: str, group: str) -> Deferred:
        """
        Close the reader of C{topic} in the group C{<group-prefix>.<group>}
        now rather than after C{group-idle-timeout}: its consumer leaves
        the group (commands already sent to it, such as a commit, run
        first).

        @return: a Deferred that fires once the reader's thread has ended
            (at once if there was no reader).
        """
        reader = self.groups.get((topic, self.groupId(group)))
        if reader is None:
            return succeed(None)
        reader.close()
        return reader.whenExited()

    def _releaseOnError(self, failure: Failure, reader: GroupReader) -> Failure:
        reader.release()
        return failure

    def groupClosing(self, reader: GroupReader) -> None:
        """
        Forget a group reader that is closing.
        """
        for key, value in list(self.groups.items()):
            if value is reader:
                del self.groups[key]
