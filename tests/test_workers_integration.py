"""
Worker processes (C{workers = 2}) against the real Kafka broker: both
processes accept on the one port, the primary's metrics count the
worker's traffic, a reload reaches the worker, a killed worker comes back,
and stopping the primary stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from typing import List, Optional

from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, httpRequest, waitFor
from .test_kafka_integration import freshTopic, requireKafka

TOKEN = "workers-test-token-0123456789"

MORE = """
[api:more]
path = /more
endpoint = kafka
topic = {topic}
entrypoints = http-post
"""


def sockets(pid: int) -> int:
    """
    How many sockets process C{pid} holds open.
    """
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Stream:
    """
    A raw SSE client, reading the chunked response as it comes.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(b"GET /orders HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n")
        self.buffer = b""

    def readUntil(self, needle: bytes) -> bytes:
        deadline = time.monotonic() + 20
        while needle not in self.buffer:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} did not come; got {self.buffer[-300:]!r}")
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"the stream closed before {needle!r}")
            self.buffer += data
        return self.buffer

    def close(self) -> None:
        self.sock.close()


class WorkersTests(TestCase):
    def setUp(self) -> None:
        requireKafka()
        self.topic = freshTopic()
        self.gateway = GatewayProcess(
            GatewayIni(workers=2).admin(TOKEN).kafka()
            .api("orders", endpoint="kafka", topic=self.topic, entrypoints="http-post sse", heartbeat=60),
            name="workers")
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.primary = self.gateway.process.pid
        self.worker = self.workerPid()
        waitFor(lambda: "evgate worker 1 serving" in self.gateway.output(), 30, what="the worker to serve")

    def workerPid(self, after: Optional[int] = None) -> int:
        """
        The pid of worker 1 from the primary's log (the one started after
        C{after}, when given).
        """
        def find() -> Optional[int]:
            pids = [int(p) for p in re.findall(r"started worker 1 \(pid (\d+)\)", self.gateway.output())]
            pids = [p for p in pids if p != after]
            return pids[-1] if pids else None

        return waitFor(find, 30, what="worker 1 to start")

    def metric(self, name: str, labels: str) -> float:
        status, _, body = httpRequest("GET", self.gateway.adminUrl("/metrics"),
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 200)
        match = re.search(rf"(?m)^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", body.decode())
        return float(match.group(1)) if match else -1.0

    def test_bothProcessesServe(self) -> None:
        """
        Streams opened on the one port are spread over both processes;
        every stream gets a message published through either; the
        primary's metrics count the worker's subscribers and requests.
        """
        before = {pid: sockets(pid) for pid in (self.primary, self.worker)}
        streams: List[Stream] = []
        self.addCleanup(lambda: [s.close() for s in streams])
        for _ in range(40):
            stream = Stream(self.gateway.port)
            stream.readUntil(b"retry:")
            streams.append(stream)
        grown = {pid: sockets(pid) - count for pid, count in before.items()}
        self.assertGreater(grown[self.worker], 0, f"the worker accepted no stream: {grown}")
        self.assertGreater(grown[self.primary], 0, f"the primary accepted no stream: {grown}")
        waitFor(lambda: self.metric("evgate_subscribers", 'api="orders",entrypoint="sse"') == 40, 15,
                what="40 subscribers in the primary's metrics")
        for n in range(20):
            status, _, body = httpRequest("POST", self.gateway.url("/orders"), json.dumps({"n": n}).encode(),
                                          {"Connection": "close"})
            self.assertEqual(status, 202, body)
        for stream in streams:
            stream.readUntil(b'"n": 19}')
        waitFor(lambda: self.metric("evgate_requests_total", 'api="orders",code="202",entrypoint="http-post"')
                == 20, 15, what="20 publishes in the primary's metrics")

    def test_reloadReachesWorkers(self) -> None:
        """
        A reload the primary applies is applied by the worker too: an API
        added to the file answers on every connection.
        """
        with open(self.gateway.ini, "a") as f:
            f.write(MORE.format(topic=self.topic))
        os.kill(self.primary, signal.SIGHUP)
        waitFor(lambda: "[worker-1] reload: applied" in self.gateway.output(), 30,
                what="the worker to apply the reload")
        statuses = [httpRequest("POST", self.gateway.url("/more"), b"x", {"Connection": "close"})[0]
                    for _ in range(30)]
        self.assertEqual(set(statuses), {202})

    def test_killedWorkerComesBack(self) -> None:
        """
        A worker killed outright is started again; stopping the primary
        stops it.
        """
        os.kill(self.worker, signal.SIGKILL)
        replacement = self.workerPid(after=self.worker)
        waitFor(lambda: self.gateway.output().count("evgate worker 1 serving") == 2, 30,
                what="the new worker to serve")
        self.assertIn("worker 1 exited", self.gateway.output())
        statuses = [httpRequest("POST", self.gateway.url("/orders"), b"x", {"Connection": "close"})[0]
                    for _ in range(20)]
        self.assertEqual(set(statuses), {202})
        self.assertIn(self.gateway.stop(), (0, -signal.SIGTERM))
        waitFor(lambda: not alive(replacement), 20, what="the worker to stop with the primary")
