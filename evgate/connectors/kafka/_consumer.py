"""
The owner thread of one C{confluent_kafka.Consumer}, which every Kafka
reader (assigned, group, the store's) builds on.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.connectors.kafka._client import codes
from evgate.connectors.kafka._options import _confluent, _kafkaReason
from evgate.errors import Problem
from evgate.threads import OwnerThread

if TYPE_CHECKING:
    from evgate.connectors.kafka._connector import KafkaConnector


class ConsumerThread(OwnerThread):
    """
    A C{confluent_kafka.Consumer} and the one thread that owns it.

    The reactor side calls L{start}, L{send} and L{stop}; the thread runs
    L{run}: it builds the consumer (L{open}), then runs queued commands and
    the subclass's L{step} until stopped, and closes the consumer
    (L{finish}).  A command C{("name", args)} runs C{self.do_name(*args)} on
    the thread (see L{evgate.threads.OwnerThread}).  Subclasses choose the
    mode: L{AssignedReader} (assign and seek, no group), L{GroupReader} (a
    member of a consumer group) or the store's reader.

    Errors the consumer returns in place of records go to L{recordError},
    which treats the codes every reader treats alike and leaves the rest to
    the reader (L{refused}, L{ownRecordError}, L{warnRecordError}).
    """

    log = Logger()
    kind = "reader"

    def __init__(self, connector: "KafkaConnector", topic: str, config: Mapping[str, Any]) -> None:
        super().__init__(connector.reactor, connector.startThread)
        self.connector = connector
        self.topic = topic
        options = connector.options
        self.pollTimeout: float = options["poll-timeout"]
        self.requestTimeout: float = options["request-timeout"]
        self.batchSize: int = options["batch-size"]
        self.config = dict(config)
        self.consumer: Any = None
        self.closing = False
        self.stopped = False
        # Back-off while the broker cannot be asked: a time to retry at, not
        # a sleep, so that commands are still served meanwhile.
        self.now: Callable[[], float] = time.monotonic
        self.retryAt = 0.0
        self.retryDelay = 0.25

    # the reactor side

    def threadName(self) -> str:
        """
        C{evgate-kafka-<kind>-<endpoint>-<topic>}.
        """
        return f"evgate-kafka-{self.kind}-{self.connector.name}-{self.topic}"

    def stop(self) -> None:
        """
        Ask the owner thread to close the consumer and end.  Idempotent.
        """
        if not self.stopped:
            self.stopped = True
            self.requestStop()
            self.send("close")

    # the owner thread

    def run(self) -> None:
        """
        The owner thread's whole life.
        """
        try:
            if self.consumer is None:
                self.open()
            while self.runOnce():
                pass
        except Exception:
            self.crashed(Failure())
        finally:
            self.finish()

    def open(self) -> None:
        """
        Build the consumer.
        """
        config = dict(self.config)
        config["error_cb"] = self.connector.onClientError
        config["stats_cb"] = self.connector.onStatistics
        config["logger"] = self.connector.librdkafkaLog
        self.consumer = self.connector.clients.consumer(config)

    def runOnce(self) -> bool:
        """
        One turn: the commands that are waiting, then one L{step}.

        @return: whether to go on.
        """
        self.runCommands()
        if self.closing:
            return False
        self.step()
        return not self.closing

    def step(self) -> None:
        """
        The mode's work for one turn; must return within about
        C{poll-timeout} (or C{request-timeout} for a broker request).
        """
        raise NotImplementedError

    def do_close(self) -> None:
        """
        Command: end the thread.
        """
        self.closing = True

    # errors in place of records, on the owner thread

    def recordError(self, record: Any, error: Any) -> None:
        """
        React to an error the consumer returned in place of a record: the
        broker being unreachable is noted, a refusal ends the reader (with
        L{refused}), the end of a partition is no error; every other code
        is the reader's (L{ownRecordError}), and what it does not know is
        logged (L{warnRecordError}).
        """
        code = error.code()
        known = codes()
        if code in (known.ALL_BROKERS_DOWN, known.TRANSPORT):
            self.connector.observeBroker(False, error.str())
        elif code in known.NOT_AUTHORIZED:
            raise self.refused(error)
        elif code == known.PARTITION_EOF:
            pass
        elif not self.ownRecordError(record, error, code):
            self.warnRecordError(error)

    def refused(self, error: Any) -> Problem:
        """
        The problem that ends this reader when Kafka refuses it access.
        """
        raise NotImplementedError

    def ownRecordError(self, record: Any, error: Any, code: int) -> bool:
        """
        Handle an error code only this kind of reader knows.

        @return: whether it was handled (else it is logged).
        """
        return False

    def warnRecordError(self, error: Any) -> None:
        """
        Log an error no reader handles, on the reactor.
        """
        self.callOnReactor(self.log.warn, "Kafka endpoint {endpoint}: reading {topic}: {error}",
                           endpoint=self.connector.name, topic=self.topic, error=error.str())

    def finish(self) -> None:
        """
        Close and destroy the consumer on this thread, then tell the
        reactor.
        """
        consumer, self.consumer = self.consumer, None
        try:
            if consumer is not None:
                consumer.close()
        except Exception:
            self.callOnReactor(self.log.failure, "Kafka endpoint {endpoint}: closing a consumer of {topic} failed",
                            Failure(), endpoint=self.connector.name, topic=self.topic)
        finally:
            del consumer
            self.callOnReactor(self.exited)

    def exited(self) -> None:
        """
        On the reactor: the owner thread has ended.
        """
        self.connector.forget(self)
        self.exits.fire()

    def crashed(self, failure: Failure) -> None:
        """
        On the owner thread: an exception ended the loop.  A L{Problem} is
        an expected end (the broker refused us) and is logged without a
        traceback.
        """
        if failure.check(Problem):
            self.callOnReactor(self.log.warn, "Kafka endpoint {endpoint}: reading {topic} ended: {reason}",
                            endpoint=self.connector.name, topic=self.topic, reason=failure.getErrorMessage())
            return
        self.callOnReactor(self.log.failure, "Kafka endpoint {endpoint}: a consumer of {topic} failed",
                        failure, endpoint=self.connector.name, topic=self.topic)

    def wait(self, seconds: float) -> None:
        """
        Sleep up to C{seconds}, or less if a command comes.
        """
        self.runCommands(wait=seconds)

    def backOff(self, exception: BaseException) -> None:
        """
        The broker could not be asked: note it, and ask again later (after
        0.25 s, doubling up to 5 s).
        """
        self.connector.observeBroker(False, _kafkaReason(exception))
        self.retryAt = self.now() + self.retryDelay
        self.retryDelay = min(self.retryDelay * 2, 5.0)

    def backingOff(self) -> bool:
        """
        Whether it is too early to ask the broker again; if so, wait a
        little (at most C{poll-timeout}).
        """
        left = self.retryAt - self.now()
        if left <= 0:
            return False
        self.wait(min(self.pollTimeout, left))
        return True

    def brokerAnswered(self) -> None:
        """
        The broker answered a request: no more back-off.
        """
        self.retryDelay = 0.25
        self.connector.observeBroker(True)

    def takeCredit(self, semaphore: threading.Semaphore, wait: float) -> bool:
        """
        Take one credit of C{semaphore}, waiting at most C{wait} seconds.
        """
        if wait > 0:
            return semaphore.acquire(timeout=wait)
        return semaphore.acquire(blocking=False)

    def tp(self, partition: int, offset: Optional[int] = None) -> Any:
        """
        A TopicPartition of this thread's topic.
        """
        return self.connector.clients.topicPartition(self.topic, partition, offset)

    def partitionsOf(self) -> Optional[List[int]]:
        """
        The partitions of the topic from fresh metadata, or L{None} when the
        topic does not exist.

        @raise KafkaException: when the broker cannot be asked.
        """
        metadata = self.consumer.list_topics(self.topic, timeout=self.requestTimeout)
        topic = metadata.topics.get(self.topic)
        if topic is None:
            return None
        if topic.error is not None:
            if topic.error.code() in codes().UNKNOWN_TOPIC:
                return None
            raise _confluent().KafkaException(topic.error)
        return sorted(topic.partitions)

    def watermarks(self, partition: int) -> Tuple[int, int]:
        """
        The low and high watermarks of C{partition}, asked of the broker.

        @raise KafkaException: when the broker cannot be asked.
        """
        low, high = self.consumer.get_watermark_offsets(self.tp(partition), timeout=self.requestTimeout,
                                                        cached=False)
        return low, high


class BatchReader(ConsumerThread):
    """
    A reader that polls batches and hands them to the reactor under
    credits: at most as many batches are on their way as C{credits}
    allows, and the reactor gives a batch's credit back once its sink has
    it.  L{AssignedReader} and the store's reader build on it; they differ
    in what a record becomes (L{take}), what the end of a partition means
    (L{reachedEnd}) and where a batch goes (L{sendBatch}).
    """

    def __init__(self, connector: "KafkaConnector", topic: str, config: Mapping[str, Any],
                 credits: int) -> None:
        super().__init__(connector, topic, config)
        self.credits = threading.Semaphore(credits)
        # owner-thread state: a batch read that waits for a credit.
        self.batch: Optional[List[Any]] = None

    def sendWaiting(self) -> bool:
        """
        If a batch waits for a credit, wait for one (at most
        C{poll-timeout}) and send it when it comes.

        @return: whether a batch was waiting (then this turn is spent).
        """
        if self.batch is None:
            return False
        if self.takeCredit(self.credits, self.pollTimeout):
            self.sendBatch()
        return True

    def read(self) -> None:
        """
        Poll one batch (waiting at most C{poll-timeout} for its first
        record) and hand over what the reader takes of it.  Errors in place
        of records go to L{recordError}, except the end of a partition,
        which goes to L{reachedEnd}.
        """
        first = self.consumer.poll(self.pollTimeout)
        if first is None:
            return
        records = [first]
        if self.batchSize > 1:
            records.extend(self.consumer.consume(self.batchSize - 1, 0))
        batch: List[Any] = []
        ended = False
        endCode = codes().PARTITION_EOF
        for record in records:
            error = record.error()
            if error is None:
                item = self.take(record)
                if item is not None:
                    batch.append(item)
            elif error.code() == endCode:
                ended = self.reachedEnd(record) or ended
            else:
                self.recordError(record, error)
        if batch or ended:
            self.connector.observeBroker(True)
            self.handOver(batch)

    def take(self, record: Any) -> Any:
        """
        What a record becomes in a batch, or L{None} to pass it over.
        """
        raise NotImplementedError

    def reachedEnd(self, record: Any) -> bool:
        """
        The consumer reached the end of a partition (C{record} says where).

        @return: whether that is news the reactor must hear, even with no
            records (then an empty batch goes).
        """
        return False

    def handOver(self, batch: List[Any]) -> None:
        """
        Send C{batch} now if a credit is free, else keep it for
        L{sendWaiting}.
        """
        self.batch = batch
        if self.takeCredit(self.credits, 0):
            self.sendBatch()

    def sendBatch(self) -> None:
        """
        Hand the waiting batch to the reactor (its credit is taken).
        """
        raise NotImplementedError
