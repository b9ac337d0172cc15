"""
The Kafka endpoint: the connector that owns the producer, the readers and
the group readers, and answers publishers.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.connectors.kafka._assigned import AssignedReader
from evgate.connectors.kafka._client import ConfluentClients, LibrdkafkaLog, codes, kafkaError, refusalOf
from evgate.connectors.kafka._consumer import ConsumerThread
from evgate.connectors.kafka._groups import GroupBatch, GroupReader
from evgate.connectors.kafka._heads import KnownHeads
from evgate.connectors.kafka._producer import REPORT_BATCH, ProducerThread
from evgate.errors import EndpointTimeout, EndpointUnavailable, PayloadTooLarge, Problem
from evgate.interfaces import IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog, IUpstreamSink
from evgate.message import Cursor, Draft, Position
from evgate.threads import ReactorBatches, StartThread, callOnReactor, startDaemonThread

Start = Union[str, Cursor]

# Seconds before the same refusal is logged again (with how often it
# happened meanwhile): librdkafka retries every few seconds, forever.
REFUSAL_RELOG = 600.0


class _Batch:
    """
    A batch of publishes waiting for their delivery reports: one entry, one
    timer and one Deferred for all of them.

    @ivar results: per record, L{None} until its report, then the
        L{Position} or the L{Problem}.
    """

    __slots__ = ("deferred", "timer", "topic", "results", "waiting")

    def __init__(self, deferred: Deferred, topic: str, results: List[Any], waiting: int) -> None:
        self.deferred = deferred
        self.topic = topic
        self.results = results
        self.waiting = waiting
        self.timer: Any = None


class _Publish:
    """
    A publish waiting for its delivery report.
    """

    __slots__ = ("deferred", "timer", "topic")

    def __init__(self, deferred: Deferred, topic: str) -> None:
        self.deferred = deferred
        self.topic = topic
        self.timer: Any = None


@implementer(IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog)
class KafkaConnector(Service):
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
        # reactor once per poll (see handOverReports).
        self._reports: ReactorBatches[Tuple[Any, ...]] = ReactorBatches(reactor, self._deliveredAll,
                                                                        handOverAt=REPORT_BATCH)
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
            if isinstance(pending, _Batch):
                results = pending.results
                for index, result in enumerate(results):
                    if result is None:
                        results[index] = problem
                self._settle(token, results)
            else:
                self._settle(token, problem)

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

    # publishing

    def publish(self, topic: str, draft: Draft, timeout: float = 10.0) -> Deferred:
        """
        Enqueue C{draft} on the shared producer; the Deferred fires on the
        reactor thread with the L{Position} of the delivery report.

        Timeouts: this method owns the publish's timeout on the connector
        side.  Its timer fails the Deferred after C{timeout} seconds with
        L{EndpointTimeout} (504: the message may or may not have been
        stored), or L{EndpointUnavailable} (503) while the broker is
        unreachable; a delivery report that comes later is dropped.
        librdkafka's C{message.timeout.ms} is not a second timeout for the
        caller but the bound on how long librdkafka keeps trying: when it
        passes first, the report says so and the publish fails at once
        with the same problems (see L{problemFor}).  Keep it below
        C{timeout} (evgate's default is 5 s; a longer one is warned about
        once) so that a publish to a broker that is down is answered 503
        from librdkafka's own knowledge rather than 504 from the timer.
        """
        producer = self.producerThread
        if producer is None or self._stopping:
            return fail(EndpointUnavailable(f"Kafka endpoint {self.name} is not running",
                                            retryAfter=self.retryAfter))
        if self.refusal is not None:
            return fail(self.refused("the message was not sent"))
        if not self._warnedTimeout and producer.messageTimeout > timeout * 1000:
            self._warnedTimeout = True
            self.log.warn("Kafka endpoint {endpoint}: message.timeout.ms ({ms:.0f}) is longer than the publish "
                          "timeout ({seconds:g} s): during a broker outage publishers get 504, not 503",
                          endpoint=self.name, ms=producer.messageTimeout, seconds=timeout)
        token = next(self._tokens)
        try:
            producer.produce(topic, draft, self._reportFor(token))
        except BufferError:
            return fail(EndpointUnavailable(
                f"the Kafka producer of endpoint {self.name} has too many messages waiting for the broker "
                "(queue.buffering.max.messages / queue.buffering.max.kbytes); retry shortly",
                retryAfter=self.retryAfter))
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            return fail(self.problemFor(error, topic))
        d: Deferred = Deferred(lambda _: self._forget(token))
        pending = self._pending[token] = _Publish(d, topic)
        pending.timer = self.reactor.callLater(timeout, self._timedOut, token, timeout)
        return d

    def publishMany(self, topic: str, drafts: Sequence[Draft], timeout: float = 10.0) -> Deferred:
        """
        Enqueue every draft on the shared producer, in order, under one
        token and one timer; the Deferred fires once every record has its
        delivery report (or the timeout passed) with one L{Position} or
        L{Problem} per draft.  Records that librdkafka refuses at once (its
        queue is full) get their problem without being sent.
        """
        producer = self.producerThread
        count = len(drafts)
        if producer is None or self._stopping:
            down = EndpointUnavailable(f"Kafka endpoint {self.name} is not running", retryAfter=self.retryAfter)
            return succeed([down] * count)
        if self.refusal is not None:
            return succeed([self.refused("the message was not sent")] * count)
        token = next(self._tokens)
        results: List[Any] = [None] * count
        add = self._reports.add

        def report(index: int, error: Any, record: Any) -> None:
            # On the producer thread, like _reportFor's reports.
            if error is None:
                add((token, index, record.partition(), record.offset()))
            else:
                add((token, index, error, None))

        waiting = count
        index = 0
        while index < count:
            index, exception = producer.produceMany(topic, drafts, index, report)
            if exception is None:
                break
            if isinstance(exception, BufferError):
                # The queue is full: the rest are not tried.
                refused = EndpointUnavailable(
                    f"the Kafka producer of endpoint {self.name} has too many messages waiting for the "
                    "broker (queue.buffering.max.messages / queue.buffering.max.kbytes); retry shortly",
                    retryAfter=self.retryAfter)
                for rest in range(index, count):
                    results[rest] = refused
                waiting -= count - index
                break
            error = kafkaError(exception)
            if error is None:
                raise exception
            results[index] = self.problemFor(error, topic)
            waiting -= 1
            index += 1
        if not waiting:
            return succeed(results)
        d: Deferred = Deferred(lambda _: self._forget(token))
        pending = self._pending[token] = _Batch(d, topic, results, waiting)  # type: ignore[assignment]
        pending.timer = self.reactor.callLater(timeout, self._timedOut, token, timeout)
        return d

    def _reportFor(self, token: int) -> Callable[[Any, Any], None]:
        # The delivery report runs on the producer thread; everything it
        # needs is read there and handed to the reactor.
        add = self._reports.add

        def report(error: Any, record: Any) -> None:
            # Collected here, on the producer thread, and handed to the
            # reactor once per poll (handOverReports): one reactor wake-up
            # per batch of acknowledgements rather than one per message.
            if error is None:
                add((token, None, Position(record.topic(), record.partition(), record.offset())))
            else:
                add((token, error, None))

        return report

    def handOverReports(self) -> None:
        """
        On the producer thread: hand the delivery reports collected since
        the last call to the reactor, in one call.
        """
        self._reports.flush()

    def _deliveredAll(self, batch: List[Tuple[Any, ...]]) -> None:
        pending = self._pending
        delivered = False
        for report in batch:
            if len(report) == 3:
                self._delivered(*report)
                continue
            # The report of one record of a publishMany batch.
            token, index, partitionOrError, offset = report
            entry = pending.get(token)
            if entry is None or entry.results[index] is not None:
                continue
            if offset is None:
                entry.results[index] = self.problemFor(partitionOrError, entry.topic)
            else:
                delivered = True
                entry.results[index] = Position(entry.topic, partitionOrError, offset)
            entry.waiting -= 1
            if entry.waiting == 0:
                self._settle(token, entry.results)
        if delivered:
            self._setConnected(True)

    def _delivered(self, token: int, error: Any, position: Optional[Position]) -> None:
        if error is None:
            self._setConnected(True)
            self._settle(token, position)
            return
        pending = self._pending.get(token)
        if pending is not None:
            self._settle(token, self.problemFor(error, pending.topic))

    def _settle(self, token: int, result: Any) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if isinstance(result, Exception):
            pending.deferred.errback(result)
        else:
            pending.deferred.callback(result)

    def _forget(self, token: int) -> None:
        # The publisher cancelled (its own timeout); a late report is dropped.
        pending = self._pending.pop(token, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _timedOut(self, token: int, timeout: float) -> None:
        pending = self._pending.get(token)
        if pending is None:
            return
        pending.timer = None
        if not self.connected:
            problem: Problem = self.unreachable(f"no acknowledgement within {timeout:g} s")
        else:
            problem = EndpointTimeout(f"Kafka did not acknowledge within {timeout:g} s; "
                                      "the message may or may not have been stored")
        if isinstance(pending, _Batch):
            results = pending.results
            for index, result in enumerate(results):
                if result is None:
                    results[index] = problem
            self._settle(token, results)
            return
        self._settle(token, problem)

    def unreachable(self, what: str) -> EndpointUnavailable:
        """
        The 503 of a publish while the broker is unreachable.
        """
        return EndpointUnavailable(
            f"Kafka endpoint {self.name} cannot reach the broker ({self.brokerReason}); {what}",
            retryAfter=self.retryAfter)

    def problemFor(self, error: Any, topic: str) -> Problem:
        """
        The client's answer to a failed publish of the librdkafka
        C{error}.
        """
        code = error.code()
        known = codes()
        if code == known.MSG_TIMED_OUT:
            if not self.connected:
                return self.unreachable("the message was not stored (message.timeout.ms passed); "
                                        "retry when it is back")
            return EndpointTimeout("Kafka did not acknowledge within message.timeout.ms; "
                                   "the message may or may not have been stored",
                                   extra={"brokerError": error.name()})
        if code in known.MSG_SIZE_TOO_LARGE:
            return PayloadTooLarge(f"Kafka refuses the message as too large for topic {topic}: {error.str()}",
                                   extra={"brokerError": error.name()})
        if code in known.PURGED:
            return EndpointUnavailable("the gateway is stopping; the message was not stored",
                                       retryAfter=self.retryAfter, extra={"brokerError": error.name()})
        return EndpointUnavailable(f"Kafka refused the message for topic {topic}: {error.str()}",
                                   retryAfter=self.retryAfter, extra={"brokerError": error.name()})

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
