"""
The publishing half of the Kafka endpoint: publishes enqueued on the shared
producer, their delivery reports handed to the reactor in batches, their
timeouts, and the problems a failed publish is answered with.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from evgate.connectors.kafka._client import codes, kafkaError
from evgate.connectors.kafka._producer import ProducerThread
from evgate.errors import EndpointTimeout, EndpointUnavailable, PayloadTooLarge, Problem
from evgate.message import Draft, Position
from evgate.threads import ReactorBatches


class _Batch:
    """
    A batch of publishes waiting for their delivery reports: one entry, one
    timer and one Deferred for all of them, and one hand-over to the
    reactor once the last report is in.

    The producer thread writes each record's report into the batch
    (C{partitions} and C{offsets}, or C{errors}) and counts them in
    C{received}; the reactor thread writes C{expected} (the records
    librdkafka took) while it produces, and reads the reports once the
    batch is handed over (or its timer fires).  Each field has one writer.

    @ivar refused: per record, the L{Problem} of a record librdkafka
        refused at once (it was never sent), else L{None}.
    @ivar offsets: per record, its offset once reported stored, else
        L{None}; written after its partition, so a reader that sees an
        offset sees its partition too.
    """

    __slots__ = ("deferred", "timer", "topic", "token", "refused", "partitions", "offsets", "errors",
                 "expected", "received")

    def __init__(self, deferred: Deferred, topic: str, token: int, count: int) -> None:
        self.deferred = deferred
        self.topic = topic
        self.token = token
        self.refused: List[Optional[Problem]] = [None] * count
        self.partitions: List[Any] = [None] * count
        self.offsets: List[Any] = [None] * count
        self.errors: Dict[int, Any] = {}
        self.expected = count
        self.received = 0
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


class KafkaPublishing:
    """
    Publishing, for L{KafkaConnector}: what it needs of the connector is
    declared here, and the connector sets it up.
    """

    log: Logger
    name: Optional[str]  # Service declares it so; the connector sets it
    reactor: Any
    options: Mapping[str, Any]
    retryAfter: int
    connected: bool
    brokerReason: str
    refusal: Optional[str]
    producerThread: Optional[ProducerThread]
    _pending: Dict[int, Any]  # _Publish or _Batch
    _reports: ReactorBatches[Any]  # a publish's report tuple, or a _Batch all reported
    _tokens: "itertools.count[int]"
    _stopping: bool
    _warnedTimeout: bool

    def _setConnected(self, up: bool, reason: str = "") -> None:
        raise NotImplementedError

    def refused(self, what: str) -> EndpointUnavailable:
        raise NotImplementedError

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

        The reports of a batch are written into it on the producer thread
        and reach the reactor together, in one hand-over once the last is
        in: no per-record item crosses the threads, and no per-record work
        waits for the reactor.
        """
        producer = self.producerThread
        count = len(drafts)
        if producer is None or self._stopping:
            down = EndpointUnavailable(f"Kafka endpoint {self.name} is not running", retryAfter=self.retryAfter)
            return succeed([down] * count)
        if self.refusal is not None:
            return succeed([self.refused("the message was not sent")] * count)
        token = next(self._tokens)
        d: Deferred = Deferred(lambda _: self._forget(token))
        batch = _Batch(d, topic, token, count)
        partitions = batch.partitions
        offsets = batch.offsets
        errors = batch.errors
        add = self._reports.add

        def report(index: int, error: Any, record: Any) -> None:
            # On the producer thread, the only one that writes the reports
            # and counts them.
            if error is None:
                partitions[index] = record.partition()
                offsets[index] = record.offset()
            else:
                errors[index] = error
            batch.received += 1
            if batch.received == batch.expected:
                add(batch)

        # Registered before the first record goes: its report may be handed
        # over before this method returns (it is handled on the reactor,
        # after it returns).
        self._pending[token] = batch
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
                    batch.refused[rest] = refused
                batch.expected -= count - index
                break
            error = kafkaError(exception)
            if error is None:
                self._pending.pop(token, None)
                raise exception
            batch.refused[index] = self.problemFor(error, topic)
            batch.expected -= 1
            index += 1
        if batch.received >= batch.expected:
            # Every record taken was reported while the rest were refused
            # (or none was taken): answer now; a hand-over on its way finds
            # the batch settled.
            self._settle(token, self._batchResults(batch))
            return d
        batch.timer = self.reactor.callLater(timeout, self._timedOut, token, timeout)
        return d

    def _batchResults(self, batch: _Batch, missing: Optional[Problem] = None) -> List[Any]:
        """
        The result of each record of C{batch}: its L{Position}, or the
        L{Problem} it failed with, or C{missing} for a record not reported
        yet.
        """
        topic = batch.topic
        errors = batch.errors
        if not errors and missing is None and batch.expected == len(batch.offsets):
            # Every record stored: the positions, built without a Python
            # call per record.
            return list(map(tuple.__new__, itertools.repeat(Position),
                            zip(itertools.repeat(topic), batch.partitions, batch.offsets)))
        results: List[Any] = []
        records = zip(batch.refused, batch.partitions, batch.offsets, strict=True)
        for index, (refused, partition, offset) in enumerate(records):
            if refused is not None:
                results.append(refused)
            elif offset is not None:
                results.append(Position(topic, partition, offset))
            elif index in errors:
                results.append(self.problemFor(errors[index], topic))
            else:
                results.append(missing)
        return results

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

    def _deliveredAll(self, reports: List[Any]) -> None:
        for report in reports:
            if not isinstance(report, _Batch):
                self._delivered(*report)
                continue
            # Every record of a publishMany batch has its report; unless the
            # batch was answered meanwhile (timed out, cancelled).
            token = report.token
            if token not in self._pending or self._pending[token] is not report:
                continue
            if len(report.errors) < report.expected:
                self._setConnected(True)
            self._settle(token, self._batchResults(report))

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
        self._fail(token, pending, problem)

    def _fail(self, token: int, pending: Any, problem: Problem) -> None:
        """
        Answer a pending publish with C{problem}; in a batch, the records
        still waiting for their report.
        """
        if isinstance(pending, _Batch):
            self._settle(token, self._batchResults(pending, problem))
        else:
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
