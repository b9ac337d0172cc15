"""
Tests for L{evgate.twistedprivate}: the private attributes of Twisted and
autobahn that evgate reads still exist, on the versions it knows.
"""

from __future__ import annotations

import socket
from collections import deque

import autobahn
import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel

import twisted
from evgate import twistedprivate


class VersionTests(SynchronousTestCase):
    """
    The installed dependencies are the ones the accessors were checked
    against.
    """

    def test_twistedVersion(self) -> None:
        """
        Twisted is the version evgate.twistedprivate knows; another one
        fails here, naming the module whose accessors to re-check.
        """
        self.assertEqual(twisted.__version__, twistedprivate.KNOWN_TWISTED,
                         f"Twisted {twisted.__version__} is installed; evgate/twistedprivate.py was checked against "
                         f"{twistedprivate.KNOWN_TWISTED}: re-check its accessors, then update KNOWN_TWISTED")

    def test_autobahnVersion(self) -> None:
        """
        autobahn is the version evgate.twistedprivate knows; another one
        fails here, naming the module whose accessors to re-check.
        """
        self.assertEqual(autobahn.__version__, twistedprivate.KNOWN_AUTOBAHN,
                         f"autobahn {autobahn.__version__} is installed; evgate/twistedprivate.py was checked "
                         f"against {twistedprivate.KNOWN_AUTOBAHN}: re-check its accessors, then update "
                         "KNOWN_AUTOBAHN")


class AttributeTests(SynchronousTestCase):
    """
    Every private attribute the accessors read exists on real instances.
    """

    def test_tcpServer(self) -> None:
        """
        A real tcp.Server has every attribute of TCP_PRIVATE, and tcpIdle
        and tcpSocket read them.
        """
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        server = tcp.Server(left, None, ("127.0.0.1", 1), None, 1, MemoryReactorClock())  # type: ignore[arg-type]
        for name in twistedprivate.TCP_PRIVATE:
            self.assertTrue(hasattr(server, name), f"tcp.Server lost {name}: re-check evgate/twistedprivate.py")
        self.assertIs(twistedprivate.tcpSocket(server), left)
        self.assertTrue(twistedprivate.tcpIdle(server))
        server._tempDataBuffer.append(b"x")
        self.assertFalse(twistedprivate.tcpIdle(server))

    def test_request(self) -> None:
        """
        A twisted.web Request has every attribute of REQUEST_PRIVATE.
        """
        request = Request(DummyChannel())
        for name in twistedprivate.REQUEST_PRIVATE:
            self.assertTrue(hasattr(request, name), f"Request lost {name}: re-check evgate/twistedprivate.py")
        self.assertFalse(twistedprivate.chunkedBodyStarted(request))
        twistedprivate.countBodyBytes(request, 5)
        self.assertEqual(request.sentLength, 5)

    def test_autobahnProtocol(self) -> None:
        """
        The accessors of autobahn's protocol read and count what its
        opening handshake and connection set up (that autobahn still sets
        them is L{test_autobahnProtocolSource}).
        """
        protocol = WebSocketServerProtocol()
        protocol._perMessageCompress = None
        protocol.send_queue = deque()
        protocol.trafficStats = TrafficStats()
        self.assertTrue(twistedprivate.autobahnWritesPlainFrames(protocol))
        protocol.send_queue.append(b"x")
        self.assertFalse(twistedprivate.autobahnWritesPlainFrames(protocol))
        twistedprivate.countAutobahnOctets(protocol, 7)
        self.assertEqual(protocol.trafficStats.outgoingOctetsWireLevel, 7)

    def test_autobahnProtocolSource(self) -> None:
        """
        autobahn itself still sets the protocol attributes evgate reads
        (they are assigned in its source, not only by the test above).
        """
        import inspect

        from autobahn.websocket import protocol as wsprotocol

        source = inspect.getsource(wsprotocol)
        for name in twistedprivate.AUTOBAHN_PROTOCOL_PRIVATE:
            self.assertIn(f"self.{name} =", source,
                          f"autobahn no longer sets {name}: re-check evgate/twistedprivate.py")

    def test_autobahnFactory(self) -> None:
        """
        autobahn's factory has C{_batched_timer}, and bindAutobahnTimers puts
        its timers on the given reactor.
        """
        factory = WebSocketServerFactory()
        for name in twistedprivate.AUTOBAHN_FACTORY_PRIVATE:
            self.assertTrue(hasattr(factory, name),
                            f"autobahn's factory lost {name}: re-check evgate/twistedprivate.py")
        clock = Clock()
        twistedprivate.bindAutobahnTimers(factory, clock)
        fired = []
        timer = factory._batched_timer.call_later(2, fired.append, 1)
        clock.advance(2)
        self.assertEqual(fired, [1])
        timer.cancel()  # after it fired: no error


class ChannelTests(SynchronousTestCase):
    """
    The request line HTTPChannel keeps while it reads a request is where
    evgate.twistedprivate reads it.
    """

    def test_requestLine(self) -> None:
        """
        After a request line and a header, a real HTTPChannel has every
        attribute of CHANNEL_REQUEST_LINE, and channelRequestLine returns
        the method, path and version that were sent.
        """
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /orders?x=1 HTTP/1.0\r\nContent-Length: 5\r\n")
        for name in twistedprivate.CHANNEL_REQUEST_LINE:
            self.assertTrue(hasattr(channel, name), f"HTTPChannel lost {name}: re-check evgate/twistedprivate.py")
        self.assertEqual(twistedprivate.channelRequestLine(channel), (b"POST", b"/orders?x=1", b"HTTP/1.0"))
        channel.connectionLost(Failure(ConnectionDone()))


class PoolTests(SynchronousTestCase):
    """
    HTTPConnectionPool still chooses its protocol factory through the
    attribute evgate.twistedprivate replaces.
    """

    def test_poolFactory(self) -> None:
        """
        HTTPConnectionPool has POOL_FACTORY, and QuietConnectionPool's is
        the quiet factory.
        """
        self.assertTrue(hasattr(HTTPConnectionPool, twistedprivate.POOL_FACTORY),
                        "HTTPConnectionPool lost _factory: re-check evgate/twistedprivate.py")
        self.assertIs(getattr(twistedprivate.QuietConnectionPool, twistedprivate.POOL_FACTORY),
                      twistedprivate.QuietClientFactory)
        self.assertFalse(twistedprivate.QuietClientFactory.noisy)


class ProxySpliceTests(SynchronousTestCase):
    """
    Request and HTTPChannel still keep the attributes the proxy reads and
    calls through evgate.twistedprivate.
    """

    def test_requestDisconnected(self) -> None:
        """
        A Request has REQUEST_DISCONNECTED, and requestDisconnected turns
        true when its connection is lost.
        """
        request = Request(DummyChannel())
        self.assertTrue(hasattr(request, twistedprivate.REQUEST_DISCONNECTED),
                        "Request lost _disconnected: re-check evgate/twistedprivate.py")
        self.assertFalse(twistedprivate.requestDisconnected(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(twistedprivate.requestDisconnected(request))

    def test_channelUpgrade(self) -> None:
        """
        An HTTPChannel has CHANNEL_BUFFER and CHANNEL_UPGRADE;
        takeChannelBuffer empties the buffer and upgradeChannel hands the
        connection to another protocol, which then receives its bytes.
        """
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.assertTrue(hasattr(channel, twistedprivate.CHANNEL_BUFFER),
                        "HTTPChannel lost _dataBuffer: re-check evgate/twistedprivate.py")
        self.assertTrue(callable(getattr(channel, twistedprivate.CHANNEL_UPGRADE, None)),
                        "HTTPChannel lost _protocolUpgradeForWebsockets: re-check evgate/twistedprivate.py")
        setattr(channel, twistedprivate.CHANNEL_BUFFER, [b"ab", b"c"])
        self.assertEqual(twistedprivate.takeChannelBuffer(channel), b"abc")
        self.assertEqual(twistedprivate.takeChannelBuffer(channel), b"")
        received: list = []

        class Receiver(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        twistedprivate.upgradeChannel(channel, Receiver())
        channel.dataReceived(b"frame")
        self.assertEqual(received, [b"frame"])


class RedisTests(SynchronousTestCase):
    """
    txredisapi's protocol still says through REDIS_READY whether it was
    usable.
    """

    def test_redisReady(self) -> None:
        """
        A new RedisProtocol has REDIS_READY, not yet true.
        """
        protocol = txredisapi.RedisProtocol()
        self.assertTrue(hasattr(protocol, twistedprivate.REDIS_READY),
                        "txredisapi.RedisProtocol lost _ready: re-check evgate/twistedprivate.py")
        self.assertFalse(twistedprivate.redisProtocolReady(protocol))
