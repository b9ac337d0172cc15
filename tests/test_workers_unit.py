"""
Unit tests for L{evgate.workers} and L{evgate.worker}: the reports a worker
sends, how the primary reads and adds them up, and the worker's log tag.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any, Dict, List

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from evgate.logs import JsonLinesObserver
from evgate.metrics import subscriberCount
from evgate.service import tcpAddress
from evgate.worker import _tagged
from evgate.workers import REPORT_FD, WorkerProtocol, snapshot

from .helpers import memoryGateway


class FakePool:
    """
    The parts of L{evgate.workers.WorkerPool} the metrics and the
    protocol use.
    """

    def __init__(self) -> None:
        self.reports: Dict[int, Dict[str, Any]] = {}
        self.log = self
        self.warnings: List[str] = []

    def liveReports(self) -> List[Dict[str, Any]]:
        return [self.reports[i] for i in sorted(self.reports)]

    def warn(self, text: str, **kwargs: Any) -> None:
        self.warnings.append(text)


class ReportTests(SynchronousTestCase):
    def test_protocolKeepsLastWholeLine(self) -> None:
        """
        The primary keeps the last complete report line of a worker; a
        line split across reads is put together, other descriptors and
        lines that are not JSON are ignored (with a warning for the latter).
        """
        pool = FakePool()
        protocol = WorkerProtocol(pool, 1)  # type: ignore[arg-type]
        protocol.childDataReceived(REPORT_FD, b'{"n": 1}\n{"n"')
        self.assertEqual(pool.reports[1], {"n": 1})
        protocol.childDataReceived(REPORT_FD, b': 2}\n')
        self.assertEqual(pool.reports[1], {"n": 2})
        protocol.childDataReceived(1, b'{"n": 3}\n')
        self.assertEqual(pool.reports[1], {"n": 2})
        protocol.childDataReceived(REPORT_FD, b"not json\n")
        self.assertEqual(pool.reports[1], {"n": 2})
        self.assertEqual(len(pool.warnings), 1)

    def test_primaryAddsWorkerCounts(self) -> None:
        """
        The primary's tallies and subscriber counts are its own plus every
        worker's last report; a worker's report is what L{snapshot} makes.
        """
        worker = memoryGateway(entrypoints="http-post http-get sse")
        tally = worker.metrics.tally("demo", "http-post")
        tally.answered(202)
        tally.published(10, 0.002)
        report = json.loads(json.dumps(snapshot(worker)))

        primary = memoryGateway(entrypoints="http-post http-get sse")
        own = primary.metrics.tally("demo", "http-post")
        own.answered(202)
        own.answered(400)
        own.published(5, 0.002)
        pool = FakePool()
        pool.reports[1] = report
        pool.reports[2] = report
        primary.node.workerPool = pool
        merged = primary.metrics.allTallies()[("demo", "http-post")]
        self.assertEqual(merged.codes, {202: 3, 400: 1})
        self.assertEqual((merged.messagesIn, merged.bytesIn, merged.latencyCount), (3, 25, 3))
        self.assertEqual(sum(merged.latency), 3)
        self.assertEqual(primary.metrics.totals("demo")["messagesIn"], 3)
        self.assertEqual(own.messagesIn, 1, "the primary's own tally is not changed")
        api = primary.api("demo")
        sse = [e for e in api.entrypoints if e.name == "sse"][0]
        pool.reports[1] = dict(report, subscribers=[["demo", "sse", 7]])
        self.assertEqual(subscriberCount(primary, api, sse), 7)


class LogTagTests(SynchronousTestCase):
    def test_jsonLines(self) -> None:
        """
        A worker's JSON log lines carry C{"worker": N}.
        """
        out = io.StringIO()
        observe = _tagged(JsonLinesObserver(out), 3)
        observe({"log_format": "hello", "log_namespace": "x", "log_time": 0.0})
        self.assertEqual(json.loads(out.getvalue())["worker"], 3)


class TcpAddressTests(SynchronousTestCase):
    """
    L{tcpAddress} reads a TCP description as Twisted's own parser does, so
    that one socket per worker binds where the single listener would.
    """

    def test_asTwistedReadsIt(self) -> None:
        """
        Port, interface and backlog, positional or named, and an escaped
        IPv6 interface, come out as the endpoint Twisted builds from the
        same description holds them.
        """
        for description in ["tcp:8080", "tcp:port=0:interface=127.0.0.1:backlog=7",
                            "tcp6:8080:interface=\\:\\:1", "tcp:9:127.0.0.2:12"]:
            endpoint: Any = serverFromString(MemoryReactor(), description)
            address = tcpAddress(description)
            self.assertEqual((address.port, address.interface, address.backlog),
                             (endpoint._port, endpoint._interface, endpoint._backlog), description)
        self.assertEqual(tcpAddress("tcp6:0").family, socket.AF_INET6)
        self.assertEqual(tcpAddress("tcp:0").family, socket.AF_INET)

    def test_notTcp(self) -> None:
        """
        A description of another kind of endpoint is refused.
        """
        self.assertRaises(ValueError, tcpAddress, "unix:/tmp/evgate.sock")
