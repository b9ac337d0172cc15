"""
A group reader's commit with the real librdkafka while the group has no
coordinator: a bootstrap address where nothing listens, as during a broker
restart.  No broker is needed.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from evgate.connectors.kafka import KafkaConnector

from .helpers import freePort
from .test_kafka_bridge import parse


class CommitWithoutCoordinatorTests(TestCase):
    """
    librdkafka defers a commit while the group has no coordinator, up to
    C{session.timeout.ms} (45 s by default); the group reader must not
    wait that long.
    """

    timeout = 20

    @inlineCallbacks
    def test_commitAnsweredSoon(self) -> Any:
        """
        A commit while the group has no coordinator is answered (as not
        confirmed) within a couple of seconds, and the reader's next poll
        is answered at its own deadline, where a synchronous commit held
        the reader's thread for the whole session timeout.
        """
        options = dict(parse({"bootstrap.servers": f"127.0.0.1:{freePort()}"}))
        options["request-timeout"] = 1.0
        connector = KafkaConnector("restarting", options, reactor)
        connector.startService()
        self.addCleanup(connector.stopService)
        first = yield connector.groupPoll("evgate-no-broker", "webhook.t", 10, 0.2, "earliest")
        self.assertEqual(first.messages, [])
        reader = first.reader
        started = time.monotonic()
        yield reader.commit({0: 5})
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertFalse(reader.lock.locked)
        started = time.monotonic()
        second = yield connector.groupPoll("evgate-no-broker", "webhook.t", 10, 0.2, "earliest")
        self.assertLess(time.monotonic() - started, 3.0)
        second.putBack()
