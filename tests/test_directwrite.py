"""
Tests for L{evgate.directwrite}: chunks sent straight to a real loopback
socket, and everything else left to the transport.
"""

from __future__ import annotations

import socket
from typing import Any, List

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import toChunk

from evgate.directwrite import STREAM_SEND_BUFFER, boundSendBuffer, writeChunk, writeNow


class FakeRequest:
    """
    The parts of a twisted.web request that L{writeChunk} reads: a chunked
    response whose headers are written.
    """

    def __init__(self, transport: Any, method: bytes = b"GET") -> None:
        self.channel = type("Channel", (), {"transport": transport})()
        self.chunked = True
        self.startedWriting = True
        self.method = method
        self.sentLength = 0
        self.written: List[bytes] = []

    def write(self, data: bytes) -> None:
        # What twisted.web's Request.write does for a chunked response.
        self.written.append(data)
        self.channel.transport.writeSequence(toChunk(data))


class Capture(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self.transport)


class FallbackTests(SynchronousTestCase):
    """
    Anything but an idle plain TCP transport goes through C{request.write}.
    """

    def test_otherTransport(self) -> None:
        """
        A transport that is not a TCP connection (TLS, a test transport)
        gets the usual write.
        """
        request = FakeRequest(StringTransport())
        writeChunk(request, b"data")
        self.assertEqual(request.written, [b"data"])

    def test_head(self) -> None:
        """
        A HEAD request, whose body twisted.web silences, is never written
        to directly.
        """
        request = FakeRequest(StringTransport(), method=b"HEAD")
        writeChunk(request, b"data")
        self.assertEqual(request.written, [b"data"])


class SocketTests(TestCase):
    """
    Over a real loopback connection.
    """

    def setUp(self) -> Deferred:
        factory = protocol.ServerFactory()
        factory.protocol = Capture
        factory.connected = Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(self.client.close)

        def connected(transport: Any) -> None:
            self.transport = transport
            self.addCleanup(transport.abortConnection)

        return factory.connected.addCallback(connected)

    def read(self, size: int) -> bytes:
        self.client.settimeout(10)
        out = b""
        while len(out) < size:
            chunk = self.client.recv(size - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def test_sentAtOnce(self) -> None:
        """
        With nothing buffered, the chunk is on the socket when the call
        returns: framed, counted, and nothing left in the transport.
        """
        request = FakeRequest(self.transport)
        writeChunk(request, b"data: hello\n\n")
        self.assertEqual(request.written, [])
        self.assertEqual(request.sentLength, 13)
        self.assertEqual(self.transport._tempDataBuffer, [])
        self.assertEqual(self.read(18), b"d\r\ndata: hello\n\n\r\n")

    def test_restQueuedInOrder(self) -> None:
        """
        What a full socket does not take is queued on the transport, and
        later chunks queue behind it: the client reads every chunk whole
        and in order.
        """
        request = FakeRequest(self.transport)
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chunks = [bytes([65 + i % 26]) * 5000 for i in range(40)]
        for chunk in chunks:
            writeChunk(request, chunk)
        self.assertTrue(self.transport._tempDataBuffer or self.transport.dataBuffer,
                        "the socket should have filled up")
        self.assertTrue(request.written, "later chunks should have queued behind the rest")
        expected = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        return self.receive(len(expected)).addCallback(self.assertEqual, expected)

    def receive(self, size: int, within: float = 10.0) -> Deferred:
        """
        The next C{size} bytes the client receives, read without blocking
        while the reactor runs (it writes what the transport queued), or a
        failure after C{within} seconds.
        """
        received: List[bytes] = []

        async def wait() -> bytes:
            self.client.setblocking(False)
            deadline = reactor.seconds() + within
            while sum(map(len, received)) < size:
                try:
                    data = self.client.recv(65536)
                    if not data:
                        break
                    received.append(data)
                    continue
                except BlockingIOError:
                    pass
                if reactor.seconds() > deadline:
                    break
                await deferLater(reactor, 0.002, lambda: None)
            return b"".join(received)

        return Deferred.fromCoroutine(wait())


class WriteNowTests(TestCase):
    """
    L{writeNow} over a real loopback connection, and its fallback.
    """

    setUp = SocketTests.setUp
    read = SocketTests.read
    receive = SocketTests.receive

    def test_sentAtOnce(self) -> None:
        """
        With nothing buffered, the bytes are on the socket when the call
        returns.
        """
        writeNow(self.transport, b"\x81\x05hello")
        self.assertEqual(self.transport._tempDataBuffer, [])
        self.assertEqual(self.read(7), b"\x81\x05hello")

    def test_behindBuffered(self) -> None:
        """
        Bytes waiting in the transport go first: later bytes queue behind
        them.
        """
        self.transport.write(b"first ")
        writeNow(self.transport, b"second")
        self.assertEqual(self.transport._tempDataBuffer, [b"first ", b"second"])
        return self.receive(12).addCallback(self.assertEqual, b"first second")

    def test_otherTransport(self) -> None:
        """
        Anything but a plain TCP connection gets its own write.
        """
        transport = StringTransport()
        writeNow(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class SendBufferTests(TestCase):
    """
    L{boundSendBuffer} fixes a stream socket's kernel send buffer.
    """

    setUp = SocketTests.setUp

    def test_bounded(self) -> None:
        """
        The socket's send buffer is L{STREAM_SEND_BUFFER} (which Linux
        doubles), so that a client that stops reading cannot park megabytes
        in the kernel unnoticed.
        """
        boundSendBuffer(self.transport)
        size = self.transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.assertIn(size, (STREAM_SEND_BUFFER, 2 * STREAM_SEND_BUFFER))
