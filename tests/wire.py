"""
In-memory connections to a gateway for the streaming tests: a real
twisted.web HTTP channel over a L{StringTransport}, so that chunked
responses, producers and autobahn's takeover of the transport all happen
as on a socket, driven by a Clock.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport


class WireConnection:
    """
    One client connection to C{gateway.site}.
    """

    def __init__(self, gateway: object) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        self.channel = gateway.site.buildProtocol(self.transport.getPeer())  # type: ignore[attr-defined]
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)
        self.offset = 0

    @property
    def httpChannel(self) -> object:
        """
        The HTTP/1.1 channel under the site's protocol-negotiating wrapper.
        """
        return getattr(self.channel, "_channel", self.channel)

    def fill(self) -> None:
        """
        The transport's buffer is full: it pauses its producer.
        """
        self.transport.producer.pauseProducing()

    def drain(self) -> None:
        """
        The transport's buffer drained: it resumes its producer.
        """
        self.transport.producer.resumeProducing()

    def send(self, data: bytes) -> None:
        """
        Bytes from the client, to whichever protocol owns the transport
        now (the HTTP channel, or autobahn's after an upgrade).
        """
        self.transport.protocol.dataReceived(data)

    def get(self, target: str, headers: Optional[Dict[str, str]] = None) -> None:
        """
        Send a GET request for C{target}.
        """
        lines = [f"GET {target} HTTP/1.1", "Host: gateway.test"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def received(self) -> bytes:
        """
        Everything the gateway wrote so far.
        """
        return self.transport.value()

    def disconnect(self) -> None:
        """
        The client goes away.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.protocol.connectionLost(Failure(ConnectionDone()))


def splitHead(raw: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """
    The status, lower-cased headers and the rest of a response.
    """
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def dechunk(body: bytes) -> Tuple[bytes, bool]:
    """
    The data of a chunked body received so far, and whether its last chunk
    arrived.
    """
    out = []
    while body:
        line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out), True
        if len(rest) < size + 2:
            break
        out.append(rest[:size])
        body = rest[size + 2:]
    return b"".join(out), False


def sseEvents(stream: bytes) -> List[Dict[str, object]]:
    """
    The events of an event stream, parsed as the HTML standard says (field
    per line, blank line dispatches); each as a dict with C{id}, C{event},
    C{data} (lines joined with newlines) and C{comments}, including blocks
    without data, which a browser would not dispatch.
    """
    events = []
    current: Dict[str, object] = {}
    data: List[str] = []
    text = stream.decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    complete = text.endswith("\n")
    if complete:
        lines = lines[:-1]
    for line in lines:
        if line == "":
            if current or data:
                if data:
                    current["data"] = "\n".join(data)
                events.append(current)
            current, data = {}, []
            continue
        if line.startswith(":"):
            current.setdefault("comments", []).append(line[1:].strip())  # type: ignore[union-attr]
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        else:
            current[name] = value
    return events


# WebSocket framing, as a client does it.

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


def clientFrame(opcode: int, payload: bytes) -> bytes:
    """
    One masked, final frame.
    """
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def serverFrames(data: bytes) -> List[Tuple[int, bytes]]:
    """
    The (opcode, payload) of each complete unmasked frame in C{data}.
    """
    frames = []
    index = 0
    while index + 2 <= len(data):
        b0, b1 = data[index], data[index + 1]
        length = b1 & 0x7F
        index += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[index:index + 2])
            index += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[index:index + 8])
            index += 8
        if index + length > len(data):
            break
        frames.append((b0 & 0x0F, data[index:index + length]))
        index += length
    return frames


def closeCode(payload: bytes) -> Tuple[int, str]:
    """
    The code and reason of a close frame's payload.
    """
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode("utf-8")


UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
