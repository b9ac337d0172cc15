"""
Tests for L{evgate.directwrite}: chunks sent straight to a real loopback
socket, and everything else left to the transport.
"""

from __future__ import annotations

import socket
from typing import Any, List

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import toChunk
from zope.interface import implementer

from evgate import directwrite
from evgate.directwrite import (
    PIECE_BYTES,
    STREAM_SEND_BUFFER,
    boundSendBuffer,
    writeChunk,
    writeChunksFrom,
    writeFrom,
    writeNow,
)

from .wire import dechunk


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


@implementer(IPushProducer)
class RecordingProducer:
    """
    A streaming producer that notes when its transport pauses and resumes
    it.
    """

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        pass


class LargeFrameTests(TestCase):
    """
    L{writeChunksFrom} and L{writeFrom} send a large frame from the shared
    bytes over a real loopback connection whose buffers are small: the
    transport never holds more than the rest of one piece, the producer is
    paused until that is written, and the client gets the frame whole.
    """

    setUp = SocketTests.setUp
    receive = SocketTests.receive

    frame = bytes(range(256)) * 1024

    def writeWhileResumed(self, write: Any) -> Deferred:
        """
        Write C{self.frame} with C{write(frame, start)} whenever the
        producer is not paused; fire with the producer once it is all
        written, checking after every call what the transport holds.
        """
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        producer = RecordingProducer()
        self.transport.registerProducer(producer, True)
        self.addCleanup(self.transport.unregisterProducer)

        async def run() -> RecordingProducer:
            at = 0
            while at < len(self.frame):
                if producer.paused:
                    await deferLater(reactor, 0.001, lambda: None)
                    continue
                at = write(self.frame, at)
                held = sum(map(len, self.transport._tempDataBuffer)) + len(self.transport.dataBuffer)
                self.assertLessEqual(held, PIECE_BYTES + 16)
                if held:
                    self.assertTrue(producer.paused, "a transport holding the rest pauses the producer")
            return producer

        return Deferred.fromCoroutine(run())

    def test_chunksFromSharedBytes(self) -> None:
        """
        A chunked response gets the frame as chunks of at most
        L{PIECE_BYTES}, counted as body bytes, and the stream was paused
        and resumed on the way.
        """
        request = FakeRequest(self.transport)
        writing = self.writeWhileResumed(lambda frame, at: writeChunksFrom(request, frame, at))
        size = len(self.frame) + (len(self.frame) // PIECE_BYTES) * (len(b"%x" % PIECE_BYTES) + 4)
        reading = self.receive(size, within=30)

        def check(results: List[Any]) -> None:
            producer, body = results
            self.assertEqual(dechunk(body)[0], self.frame)
            self.assertEqual(request.sentLength, len(self.frame))
            self.assertEqual(request.written, [])
            self.assertGreater(producer.pauses, 0)
            self.assertEqual(producer.pauses, producer.resumes)

        return gatherResults([writing, reading]).addCallback(check)

    def test_rawFromSharedBytes(self) -> None:
        """
        Bytes already framed (a WebSocket's) go out as they are.
        """
        writing = self.writeWhileResumed(lambda frame, at: writeFrom(self.transport, frame, at))
        reading = self.receive(len(self.frame), within=30)

        def check(results: List[Any]) -> None:
            producer, body = results
            self.assertEqual(body, self.frame)
            self.assertGreater(producer.pauses, 0)

        return gatherResults([writing, reading]).addCallback(check)


class LargeFrameFallbackTests(SynchronousTestCase):
    """
    Where the socket cannot be written to directly, a large frame goes
    through the transport one slice at a time.
    """

    def test_chunkSlices(self) -> None:
        """
        A response on another transport gets slices of
        L{directwrite.SLICE_BYTES} through C{request.write}.
        """
        request = FakeRequest(StringTransport())
        frame = b"y" * (directwrite.SLICE_BYTES + 10)
        at = writeChunksFrom(request, frame, 0)
        self.assertEqual(at, directwrite.SLICE_BYTES)
        self.assertEqual(writeChunksFrom(request, frame, at), len(frame))
        self.assertEqual(b"".join(request.written), frame)

    def test_rawSlices(self) -> None:
        """
        Another transport gets raw slices through its C{write}.
        """
        transport = StringTransport()
        frame = b"y" * (directwrite.SLICE_BYTES + 10)
        self.assertEqual(writeFrom(transport, frame, 0), directwrite.SLICE_BYTES)
        self.assertEqual(writeFrom(transport, frame, directwrite.SLICE_BYTES), len(frame))
        self.assertEqual(transport.value(), frame)
