"""
The endpoint's producer and the thread that serves its delivery reports.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

from twisted.python.failure import Failure

from evgate.connectors.kafka._options import _kafkaReason, producerSettings
from evgate.message import Draft
from evgate.threads import OwnerThread

if TYPE_CHECKING:
    from evgate.connectors.kafka._connector import KafkaConnector


REPORT_BATCH = 512

# librdkafka's RD_KAFKA_PARTITION_UA: no partition chosen, the partitioner decides.
_UNASSIGNED = -1


class ProducerThread(OwnerThread):
    """
    The endpoint's producer and the thread that serves its delivery
    reports.  L{produce} is called on the reactor thread (it only
    enqueues); L{run} runs on the thread.  The reports it serves are
    collected by the connector and handed to the reactor once per
    C{poll()} (L{KafkaConnector.handOverReports}).
    """

    def __init__(self, connector: "KafkaConnector") -> None:
        super().__init__(connector.reactor, connector.startThread)
        self.connector = connector
        self.pollTimeout = connector.options["poll-timeout"]
        config: Dict[str, Any] = dict(producerSettings(connector.options["librdkafka"]))
        self.messageTimeout = float(config.get("message.timeout.ms", config.get("delivery.timeout.ms", 300000)))
        config["error_cb"] = connector.onClientError
        config["stats_cb"] = connector.onStatistics
        config["logger"] = connector.librdkafkaLog
        self.producer: Any = connector.clients.producer(config)

    def produce(self, topic: str, draft: Draft, report: Callable[[Any, Any], None]) -> None:
        """
        Enqueue C{draft}; C{report} runs on this thread when it is
        delivered or failed.

        @raise BufferError: when librdkafka's queue is full.
        @raise KafkaException: when librdkafka refuses the message at once.
        """
        producer = self.producer
        if producer is None:
            # The thread ended (it failed): nothing would serve the report.
            raise BufferError("the producer thread has ended")
        key: Any = draft.key
        if key is not None and key.__class__ is str:
            # bytes: a key written with its schema (evgate.schemas.steps).
            key = key.encode("utf-8")
        headers = [(name, value.encode("utf-8")) for name, value in draft.headers] or None
        producer.produce(topic, value=draft.content, key=key, headers=headers, on_delivery=report)

    def produceMany(self, topic: str, drafts: Sequence[Draft], start: int,
                    report: Callable[[int, Any, Any], None]) -> Tuple[int, Optional[Exception]]:
        """
        Enqueue C{drafts[start:]} in order until librdkafka refuses one;
        C{report(index, error, record)} runs on this thread for each.  Keys
        and headers shared by consecutive drafts (a batch's usually are)
        are encoded once.

        @return: the index of the draft refused (C{len(drafts)} when none
            was) and the exception it was refused with.
        """
        producer = self.producer
        if producer is None:
            return start, BufferError("the producer thread has ended")
        produce = producer.produce
        partial = functools.partial
        lastKey: Any = producer
        lastHeaders: Any = producer
        key = headers = None
        index = start
        try:
            for content, draftKey, draftHeaders in itertools.islice(drafts, start, None):
                if draftKey is not lastKey:
                    lastKey = draftKey
                    key = draftKey.encode("utf-8") if draftKey.__class__ is str else draftKey
                if draftHeaders is not lastHeaders:
                    lastHeaders = draftHeaders
                    headers = [(name, value.encode("utf-8")) for name, value in draftHeaders] or None
                # Positional: confluent-kafka parses keyword arguments by
                # name, once per record.  The partition is librdkafka's
                # "unassigned" (its partitioner decides) and the timestamp 0
                # (now), their defaults.
                produce(topic, content, key, _UNASSIGNED, partial(report, index), None, 0, headers)
                index += 1
        except Exception as e:
            return index, e
        return len(drafts), None

    # the thread

    def threadName(self) -> str:
        """
        C{evgate-kafka-producer-<endpoint>}.
        """
        return f"evgate-kafka-producer-{self.connector.name}"

    def run(self) -> None:
        """
        The thread: serve delivery reports until asked to stop, then flush
        and exit.
        """
        try:
            while not self.stopRequested.is_set():
                self.runOnce()
        except Exception:
            self.callOnReactor(self.connector.log.failure, "Kafka endpoint {endpoint}: the producer thread failed",
                               Failure(), endpoint=self.connector.name)
        finally:
            self.finish()

    def probe(self) -> None:
        """
        Ask for the cluster's metadata once, so that C{connected} and the log
        say at start-up whether the broker is there.  It runs on a thread of
        its own: on the poll thread it would hold up delivery reports for up
        to C{request-timeout}.
        """
        producer = self.producer
        if producer is None:
            return
        try:
            producer.list_topics(timeout=self.connector.options["request-timeout"])
        except Exception as e:
            self.connector.observeBroker(False, _kafkaReason(e))
        else:
            self.connector.observeBroker(True)

    def runOnce(self) -> None:
        """
        Serve the delivery reports (and errors, statistics, log lines) that
        are ready, waiting at most C{poll-timeout}.
        """
        self.producer.poll(self.pollTimeout)
        self.connector.handOverReports()

    def finish(self) -> None:
        """
        Deliver what can be delivered within C{shutdown-timeout}, fail the
        rest (their reports say so), and destroy the producer here rather
        than on the reactor thread.
        """
        producer, self.producer = self.producer, None
        try:
            if producer is not None:
                left = producer.flush(self.connector.options["shutdown-timeout"])
                if left:
                    producer.purge()
                    producer.poll(0)
                    producer.flush(0)
                self.connector.handOverReports()
        except Exception:
            self.callOnReactor(self.connector.log.failure, "Kafka endpoint {endpoint}: flushing the producer failed",
                               Failure(), endpoint=self.connector.name)
        finally:
            del producer
            self.ended()
