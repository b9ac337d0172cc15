"""
A request body streamed to the upstream as it arrives.

twisted.web's L{Request} reads the whole body into C{request.content}
before the resource renders; a proxy that waited for that would hold a
1 GB upload in a temporary file and only then start sending it.  So a
request to a proxy API that has a body is routed when its headers are
complete: L{evgate.gateway.GatewayRequest.gotLength} asks the gateway
resource whether the path belongs to an API that streams request bodies
and, if so, puts a L{RequestBodyPipe} where the body would go and starts
processing the request at once (plans, limits, then L{evgate.proxy._forward}).  The
body's chunks reach the pipe through C{handleContentChunk}; the end of the
body is the channel's C{allContentReceived}, which the request passes on
to L{RequestBodyPipe.bodyEnded} instead of rendering a second time.

The pipe is the upstream request's L{IBodyProducer}.  The upstream
connection pauses it when its send buffer is full; the pipe then pauses
the client's transport, so the kernel's receive window, not our memory,
holds the client back.  The channel also resumes that transport on its own
(its response-side flow control, and request hand-off), so data may still
arrive while the pipe is paused: it is kept (one read's worth at most) and
the transport paused again.  Before the upstream connection exists, up to
L{PIPE_BUFFER} bytes are kept and then the client is paused the same way.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

# What a pipe keeps before its upstream connection is ready (or while it is
# paused) before it pauses the client.
PIPE_BUFFER = 65536


@implementer(IBodyProducer)
class RequestBodyPipe:
    """
    A request body on its way through: C{request.content} on one side (the
    channel writes chunks to it), the upstream request's L{IBodyProducer}
    on the other.  See the module docstring for the flow control.

    @ivar length: the body's length, or C{UNKNOWN_LENGTH} (chunked).
    @ivar sent: bytes handed to the upstream so far.
    """

    def __init__(self, request: Any, length: Optional[int]) -> None:
        self.request = request
        self.length: Any = length if length is not None else UNKNOWN_LENGTH
        self.received = 0
        self.sent = 0
        self.ended = False
        self.failure: Optional[Failure] = None
        self._buffer: List[bytes] = []
        self._buffered = 0
        self._consumer: Any = None
        self._paused = False
        self._clientPaused = False
        self._done: Optional[Deferred] = None
        self.onProgress: Any = None

    @property
    def started(self) -> bool:
        """
        Whether an upstream has begun to take the body (it cannot be
        given to another one then).
        """
        return self._consumer is not None

    # The file-like side that twisted.web's request writes the body to.

    def write(self, data: bytes) -> None:
        """
        A chunk of the body arrived from the client.
        """
        if self.failure is not None or self.ended:
            return
        self.received += len(data)
        if self._consumer is not None and not self._paused and not self._buffer:
            self.sent += len(data)
            self._consumer.write(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered >= PIPE_BUFFER or self._paused:
                self._pauseClient()
        if self.onProgress is not None:
            self.onProgress()

    @property
    def complete(self) -> bool:
        """
        Whether the whole body has been handed to the upstream.
        """
        return self.ended and not self._buffer and self._consumer is not None

    def seek(self, *args: Any) -> None:
        """
        Nothing to rewind: the body is not kept.
        """

    def tell(self) -> int:
        """
        The bytes received so far.
        """
        return self.received

    def read(self, *args: Any) -> bytes:
        """
        Nothing to read back: the body went upstream.
        """
        return b""

    def close(self) -> None:
        """
        Nothing to release.
        """

    def bodyEnded(self) -> None:
        """
        The client sent the whole body.
        """
        self.ended = True
        self._flush()
        if self.onProgress is not None:
            self.onProgress()

    def clientLost(self, reason: Failure) -> None:
        """
        The client went away before the body was complete: the upstream
        request fails rather than send a truncated body as if it were
        whole.
        """
        if self.ended or self.failure is not None:
            return
        self.failure = reason
        self._buffer = []
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)

    # IBodyProducer, for the upstream request.

    def startProducing(self, consumer: Any) -> Deferred:
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        if self.failure is not None:
            self._done = None
            done.errback(self.failure)
            return done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._pauseClient()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The upstream request ended (failed, or answered early): the rest
        # of the body goes nowhere.
        self._consumer = None
        self._done = None
        self._buffer = []
        self.failure = self.failure or Failure(CancelledError("the upstream request ended"))
        self._resumeClient()

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None or self._paused:
            return
        while self._buffer and not self._paused:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self.sent += len(data)
            consumer.write(data)
        if self.onProgress is not None:
            self.onProgress()
        if self._paused:
            return
        self._resumeClient()
        if self.ended and not self._buffer:
            done, self._done = self._done, None
            if done is not None:
                done.callback(None)

    def _pauseClient(self) -> None:
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            # Paused again even when we think it is: the channel resumes
            # the same transport for its own reasons.
            transport.pauseProducing()
            self._clientPaused = True

    def _resumeClient(self) -> None:
        if not self._clientPaused:
            return
        self._clientPaused = False
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None and not self.ended:
            transport.resumeProducing()
