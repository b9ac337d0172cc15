"""
Streaming readers across restarts of the Kafka broker: a C{twistd -n
evgate} subprocess in front of a private broker of this test's own (started
with C{scripts/dev-services} on its own state directory and free ports, so
that restarting it touches nobody else's), with SSE readers that must get
every message published while the broker goes down and comes back, several
times over.

The test starts the broker itself (about 30 s on a busy machine) and
restarts it by stopping it and starting its process again.  It needs what
C{scripts/dev-services up kafka} needs (a JDK, the Kafka jars it fetches).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, Optional, Set

from twisted.trial.unittest import TestCase

from .helpers import ROOT, GatewayProcess, freePort, httpRequest, waitFor

DEV_SERVICES = os.path.join(ROOT, "scripts", "dev-services")

INI = """
[gateway]
listen = tcp:0
publish-timeout = 10

[endpoint:kafka]
type = kafka
bootstrap.servers = {kafka}
linger.ms = 1
request-timeout = 2

[api:orders]
path = /orders
endpoint = kafka
topic = {topic}
entrypoints = http-post sse
start = latest
heartbeat = 1
"""


class PrivateBroker:
    """
    A Kafka broker of this test's own: its state directory and every port
    it listens on (plaintext, controller, SASL, SSL) are fresh.
    """

    def __init__(self) -> None:
        self.state = tempfile.mkdtemp(prefix="evgate-test-kafka-")
        self.port = freePort()
        self.env = dict(os.environ, EVGATE_STATE=self.state, EVGATE_KAFKA_PORT=str(self.port),
                        EVGATE_KAFKA_CONTROLLER_PORT=str(freePort()), EVGATE_KAFKA_SASL_PORT=str(freePort()),
                        EVGATE_KAFKA_SSL_PORT=str(freePort()), EVGATE_KAFKA_TIMEOUT="120")
        self.log = os.path.join(self.state, "dev-services.log")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, command: str) -> None:
        """
        C{scripts/dev-services COMMAND kafka}; fails the test if it fails.
        """
        with open(self.log, "ab") as out:
            code = subprocess.run([DEV_SERVICES, command, "kafka"], env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if code != 0:
            with open(self.log, "rb") as f:
                raise AssertionError(f"dev-services {command} kafka failed:\n" + f.read().decode("utf-8", "replace"))

    def remove(self) -> None:
        """
        Stop the broker and delete its state.
        """
        try:
            self.run("down")
        finally:
            shutil.rmtree(self.state, ignore_errors=True)

    def createTopic(self, partitions: int) -> str:
        """
        A new topic with C{partitions} partitions.
        """
        from confluent_kafka.admin import AdminClient, NewTopic

        name = f"evgate-restart-{os.getpid()}-{int(time.time())}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, num_partitions=partitions,
                                                    replication_factor=1)]).values():
            future.result(30)
        return name


class Publisher(threading.Thread):
    """
    POSTs numbered messages at a steady pace; a C{202} makes one
    acknowledged.
    """

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.rate = rate
        self.acked: Set[int] = set()
        self.statuses: Dict[int, int] = {}
        self.done = threading.Event()
        self.next = 0

    def run(self) -> None:
        while not self.done.is_set():
            seq = self.next
            self.next += 1
            try:
                status, _, _ = httpRequest("POST", self.url, json.dumps({"seq": seq}).encode(),
                                           {"Content-Type": "application/json"}, timeout=15)
            except OSError:
                status = 0
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 202:
                self.acked.add(seq)
            time.sleep(1.0 / self.rate)


class SseReader(threading.Thread):
    """
    Reads the stream, and reconnects with its last id whenever the stream
    ends (as an EventSource does).
    """

    def __init__(self, port: int, path: str, stay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        # Seconds a session lasts before the reader leaves and resumes with
        # its last id (0: until the stream ends).
        self.stay = stay
        self.seen: Set[int] = set()
        self.lastId: Optional[str] = None
        self.started = threading.Event()
        self.done = threading.Event()
        self.sessions = 0
        self.ends: List[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.session()
            except (OSError, http.client.HTTPException) as e:
                self.ends.append(repr(e))
            time.sleep(0.2)

    def session(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        headers = {"Accept": "text/event-stream"}
        if self.lastId is not None:
            headers["Last-Event-ID"] = self.lastId
        connection.request("GET", self.path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            self.ends.append(f"HTTP {response.status}")
            connection.close()
            return
        self.sessions += 1
        data: List[str] = []
        eventId: Optional[str] = None
        leaveAt = time.monotonic() + self.stay if self.stay else None
        try:
            while not self.done.is_set() and (leaveAt is None or time.monotonic() < leaveAt):
                line = response.readline()
                if not line:
                    self.ends.append("end of stream")
                    return
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("id:"):
                    eventId = text[3:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].strip())
                elif text == "":
                    # An event counts once it is whole, and so does its id:
                    # a reader that leaves in the middle of one gets it again.
                    for item in data:
                        try:
                            self.seen.add(json.loads(item)["seq"])
                        except (ValueError, KeyError, TypeError):
                            pass
                    data = []
                    if eventId is not None:
                        self.lastId = eventId
                        self.started.set()
                    eventId = None
        finally:
            connection.close()


class KafkaRestartTests(TestCase):
    """
    Streaming readers survive restarts of the broker.
    """

    timeout = 240
    restarts = 3
    readers = 8
    rate = 80.0
    # Seconds the broker stays down, besides its start-up.
    down = 8.0

    def setUp(self) -> None:
        self.broker = PrivateBroker()
        self.addCleanup(self.broker.remove)
        self.broker.run("up")
        self.topic = self.broker.createTopic(2)
        self.gateway = GatewayProcess(INI.format(kafka=self.broker.bootstrap, topic=self.topic), "restart")
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def test_readersGetEverythingAfterRestarts(self) -> None:
        """
        SSE readers attached before the broker restarts get every message
        acknowledged afterwards, through several restarts: the node's
        shared read of the topic recovers each time.  A reader that joins
        after the restarts gets the messages published after it joined.
        """
        # Some read for good, some leave every few seconds and resume with
        # their last id (from the window, or while the broker is away).
        readers = [SseReader(self.gateway.port, "/orders", stay=(i % 3) * 2.5) for i in range(self.readers)]
        for reader in readers:
            reader.start()
            self.addCleanup(reader.done.set)
        waitFor(lambda: all(r.started.is_set() for r in readers), 30, what="the readers to start")
        publisher = Publisher(self.gateway.url("/orders"), self.rate)
        publisher.start()
        self.addCleanup(publisher.done.set)
        waitFor(lambda: len(publisher.acked) >= 20, 30, what="the first acknowledged messages")
        for _ in range(self.restarts):
            self.broker.run("down")
            time.sleep(self.down)
            self.broker.run("up")
            target = len(publisher.acked) + 40
            waitFor(lambda: len(publisher.acked) >= target, 60,  # noqa: B023 - waited for at once
                    what="publishing to go on after the restart")
        late = SseReader(self.gateway.port, "/orders")
        late.start()
        self.addCleanup(late.done.set)
        waitFor(late.started.is_set, 30, what="the late reader to start")
        joined = publisher.next
        time.sleep(2)
        publisher.done.set()
        publisher.join(20)
        acked = set(publisher.acked)

        def complete() -> bool:
            return (all(acked <= r.seen for r in readers)
                    and {s for s in acked if s >= joined} <= late.seen)

        try:
            waitFor(complete, 30, what="the readers to get every acknowledged message")
        except AssertionError:
            lacking = [sorted(acked - r.seen) for r in readers]
            lateLacking = sorted({s for s in acked if s >= joined} - late.seen)
            self.fail(f"{len(acked)} acknowledged ({publisher.statuses}); readers lack "
                      f"{[(len(x), x[:3]) for x in lacking]}; the late reader lacks "
                      f"{len(lateLacking)} {lateLacking[:3]}; ends "
                      f"{[r.ends[-3:] for r in readers]}\n" + self.gateway.output()[-6000:])
