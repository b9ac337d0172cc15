"""
Messages, positions and cursors: the values that travel between
connectors, the hub and entrypoints.

A L{Cursor} is the one resume token every entrypoint speaks (HTTP GET's
C{nextCursor}, SSE's C{id:}, WebSocket's C{cursor} parameter, a webhook
subscription's position).  It records, per partition, the offset of the next
record a client has not seen yet, so a client may switch protocols and
resume exactly where it was.

On the wire a cursor is URL-safe base64 (no padding) of::

    version (1 byte) | tag (4 bytes) | varint epoch | varint count |
    count * (varint partition, varint next-offset)

The tag binds a cursor to one API's topic: a cursor minted for another API
is I{foreign} and rejected, never silently applied to the wrong stream.  The
epoch identifies an incarnation of a log that can be reset: the in-memory
broker starts a new epoch in every process, and so does the MQTT connector,
which numbers the messages it receives; Kafka's offsets are the broker's own
and use epoch 0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple

CURSOR_VERSION = 1
_VERSION_BYTE = bytes([CURSOR_VERSION])
# The start of single-partition tokens, by (tag, epoch, partition).
_PREFIXES: Dict[Tuple[bytes, int, int], bytes] = {}
_URLSAFE = bytes.maketrans(b"+/", b"-_")


class CursorError(ValueError):
    """
    A cursor token is malformed, of an unknown version, or foreign to the
    stream it was offered to.
    """


class Draft(NamedTuple):
    """
    A message on its way in: what a publisher hands to a connector.  A
    named tuple rather than a frozen dataclass: a batch makes one per
    record, and a tuple is made in a third of the time.

    @ivar content: the payload bytes.
    @ivar key: the record key, or L{None}.
    @ivar headers: message headers, name to value, in order.
    """

    content: bytes
    key: Optional[str] = None
    headers: Tuple[Tuple[str, str], ...] = ()


class Position(NamedTuple):
    """
    Where a broker stored one record: the answer to a publish (a named
    tuple, like L{Draft}, for batches).
    """

    topic: str
    partition: int
    offset: int

    def asJSON(self) -> Dict[str, Any]:
        """
        The acknowledgement body of a publish.
        """
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}

    def encoded(self) -> bytes:
        """
        L{asJSON} encoded, written directly: it answers every publish.
        """
        return b'{"topic":%s,"partition":%d,"offset":%d}' % (_jsonString(self.topic), self.partition, self.offset)


@lru_cache(maxsize=1024)
def _jsonString(text: str) -> bytes:
    # A topic's name as a JSON string; the topics answered are few.
    return json.dumps(text).encode("utf-8")


NO_EXTRA: Mapping[str, Any] = MappingProxyType({})

# The problem type base of evgate.errors (not imported: errors sits above).
_PROBLEM_BASE = "https://evgate.dev/problems/"


class MessageError(NamedTuple):
    """
    The marker of a message that a delivery step (L{evgate.pipeline}) could
    not transform or decode: the message is delivered as it was read, with
    this error, never dropped.

    @ivar slug: the last segment of the problem type
        (C{transform-failed}, or a codec's own such as C{decode-failed}).
    @ivar step: the step as configured.
    @ivar line: the step's line in its key's value, or 0.
    @ivar detail: what went wrong, for people.
    @ivar pointer: a JSON Pointer into the content where that applies.
    """

    slug: str
    step: str
    line: int
    detail: str
    pointer: Optional[str] = None

    def asJSON(self) -> Dict[str, Any]:
        """
        The C{error} member of a message's JSON envelope: a problem
        document (RFC 9457 members) plus the step.
        """
        document: Dict[str, Any] = {
            "type": _PROBLEM_BASE + self.slug,
            "title": "Transform failed" if self.slug == "transform-failed" else "Message not readable",
            "detail": self.detail,
            "step": self.step,
        }
        if self.line:
            document["line"] = self.line
        if self.pointer is not None:
            document["pointer"] = self.pointer
        return document


class Message(NamedTuple):
    """
    A record read from an endpoint.  A named tuple, made once per record
    read: a frozen dataclass took three times as long to build.

    @ivar timestamp: milliseconds since the epoch, as the broker reports it.
    @ivar extra: endpoint-specific metadata (for example MQTT's qos).
    @ivar error: L{None}, or the L{MessageError} of a delivery step that
        failed on this message (whose content is then as it was read).
    @ivar jsonContent: the content is compact JSON text that readers show
        as a JSON value (C{"content": {...}}) rather than as a string: set
        by a decoder (L{evgate.schemas.steps}) that turned a schema-encoded
        payload into JSON.  Raw content, JSON or not, stays a string, as
        it always was.
    """

    content: bytes
    key: Optional[str]
    headers: Tuple[Tuple[str, str], ...]
    topic: str
    partition: int
    offset: int
    timestamp: int
    extra: Mapping[str, Any] = NO_EXTRA
    error: Optional[MessageError] = None
    jsonContent: bool = False

    def metadata(self) -> Dict[str, Any]:
        """
        The C{metadata} object of the JSON envelope.
        """
        meta: Dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
        }
        meta.update(self.extra)
        return meta


def contentForJSON(content: bytes) -> Tuple[str, Optional[str]]:
    """
    Represent C{content} in a JSON document.

    @return: the text and L{None} when C{content} is UTF-8; otherwise the
        base64 text and C{"base64"}, the value of the envelope's C{encoding}.
    """
    try:
        return content.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(content).decode("ascii"), "base64"


def headerObject(headers: Tuple[Tuple[str, str], ...]) -> Dict[str, Any]:
    """
    The C{headers} member of a JSON document for a message's C{headers}
    (ordered name/value pairs): each name once, with its value as a string
    when the name appears once (so a message without repeated names looks
    as it always did) and as an array of its values, in order, when it
    repeats.
    """
    out: Dict[str, Any] = {}
    for name, value in headers:
        have = out.get(name)
        if have is None:
            out[name] = value
        elif isinstance(have, list):
            have.append(value)
        else:
            out[name] = [have, value]
    return out


class _LastHeaders:
    """
    The text of the last headers L{headerText} encoded, by the identity of
    their tuple.
    """

    headers: Any = ()
    text = "{}"


_lastHeaders = _LastHeaders()
_compactJSON = json.JSONEncoder(separators=(",", ":")).encode


def headerText(headers: Tuple[Tuple[str, str], ...]) -> str:
    """
    L{headerObject} as compact JSON text.  Records decoded by a schema
    codec share one headers tuple (L{evgate.schemas.steps}): a page of
    them encodes it once.
    """
    if headers is _lastHeaders.headers:
        return _lastHeaders.text
    text = _compactJSON(headerObject(headers)) if headers else "{}"
    _lastHeaders.headers = headers
    _lastHeaders.text = text
    return text


def _encodable(text: str) -> bool:
    # JSON may carry a lone surrogate (\ud800), which no broker can take
    # as UTF-8: refusing it here keeps it from failing inside a connector.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def headerPairs(document: Any, where: str = "headers") -> Tuple[Tuple[str, str], ...]:
    """
    The message headers a publisher's JSON C{headers} member asks for: the
    inverse of L{headerObject}.  Each member is a name and either a string
    (one header) or an array of strings (the name repeated, once per value,
    in order).  L{None} is no headers.

    @raise ValueError: naming C{where}, for anything else: a name that is
        empty, a value that is neither a string nor an array of strings, or
        text that is not valid Unicode.
    """
    if document is None:
        return ()
    if not isinstance(document, dict):
        raise ValueError(f"{where} must be an object of names to strings or arrays of strings")
    pairs: List[Tuple[str, str]] = []
    for name, value in document.items():
        if not name or not _encodable(name):
            raise ValueError(f"{where} has an empty or invalid name")
        if isinstance(value, str):
            values: List[Any] = [value]
        elif isinstance(value, list):
            values = value
        else:
            raise ValueError(f"{where}.{name} must be a string or an array of strings")
        for one in values:
            if not isinstance(one, str):
                raise ValueError(f"{where}.{name} must be a string or an array of strings")
            if not _encodable(one):
                raise ValueError(f"{where}.{name} is not valid Unicode text")
            pairs.append((name, one))
    return tuple(pairs)


def envelope(message: Message, eventId: Optional[str] = None) -> Dict[str, Any]:
    """
    The JSON envelope of a message shared by every entrypoint.
    """
    env: Dict[str, Any] = {}
    if eventId is not None:
        env["id"] = eventId
    env["key"] = message.key
    env["headers"] = headerObject(message.headers)
    if message.jsonContent:
        env["content"] = json.loads(message.content)
    else:
        text, encoding = contentForJSON(message.content)
        env["content"] = text
        if encoding is not None:
            env["encoding"] = encoding
    env["metadata"] = message.metadata()
    if message.error is not None:
        env["error"] = message.error.asJSON()
    return env


def envelopeJSON(message: Message, eventId: Optional[str] = None) -> bytes:
    """
    The envelope of L{envelope}, serialised compactly.
    """
    return json.dumps(envelope(message, eventId), separators=(",", ":")).encode("utf-8")


def cursorTag(api: str, topic: str) -> bytes:
    """
    The 4-byte tag that binds cursors to one API's topic.
    """
    return hashlib.sha256(f"{api}\x00{topic}".encode("utf-8")).digest()[:4]


_SMALL_VARINTS = tuple(bytes((i,)) for i in range(128))


def _varint(value: int) -> bytes:
    # Every event's id is a cursor: this runs once per partition per event.
    if value < 0x80:
        return _SMALL_VARINTS[value]
    # Offsets below 2**28 (nearly all of them), without a loop.
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _readVarint(data: bytes, index: int) -> Tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if index >= len(data):
            raise CursorError("cursor is truncated")
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index
        shift += 7
        if shift > 63:
            raise CursorError("cursor holds an oversized number")


@dataclass(frozen=True)
class Cursor:
    """
    A position in a stream: per partition, the offset of the next record to
    read.  Immutable; L{advance} returns a new cursor.

    @ivar epoch: the incarnation of the log the offsets refer to.
    @ivar offsets: sorted pairs of (partition, next offset).
    """

    epoch: int = 0
    offsets: Tuple[Tuple[int, int], ...] = ()

    @classmethod
    def fromMapping(cls, offsets: Mapping[int, int], epoch: int = 0) -> "Cursor":
        """
        Build a cursor from a mapping of partition to next offset.
        """
        return cls(epoch, tuple(sorted(offsets.items())))

    def asDict(self) -> Dict[int, int]:
        """
        The offsets as a new mutable dictionary.
        """
        return dict(self.offsets)

    def get(self, partition: int) -> Optional[int]:
        """
        The next offset of C{partition}, or L{None} if the cursor does not
        know the partition.
        """
        for p, o in self.offsets:
            if p == partition:
                return o
        return None

    def advance(self, partition: int, nextOffset: int) -> "Cursor":
        """
        A cursor that has moved C{partition} to C{nextOffset}.
        """
        offsets = self.asDict()
        offsets[partition] = nextOffset
        return Cursor.fromMapping(offsets, self.epoch)

    def after(self, message: Message) -> "Cursor":
        """
        The cursor that resumes right after C{message}.
        """
        return self.advance(message.partition, message.offset + 1)

    def dominates(self, other: "Cursor") -> bool:
        """
        Whether every partition of C{other} is at or behind this cursor.
        """
        mine = self.asDict()
        return all(mine.get(p, -1) >= o for p, o in other.offsets)

    def merged(self, other: "Cursor") -> "Cursor":
        """
        The per-partition maximum of two cursors.
        """
        offsets = self.asDict()
        for p, o in other.offsets:
            if offsets.get(p, -1) < o:
                offsets[p] = o
        return Cursor.fromMapping(offsets, self.epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(self.offsets)

    def encode(self, tag: bytes) -> str:
        """
        The URL-safe token of this cursor for the stream named by C{tag}.
        """
        offsets = self.offsets
        if len(offsets) == 1:
            # Every event's id is a cursor: for one partition, all but the
            # offset is the same from event to event.
            partition, offset = offsets[0]
            key = (tag, self.epoch, partition)
            prefix = _PREFIXES.get(key)
            if prefix is None:
                if len(_PREFIXES) > 1024:
                    _PREFIXES.clear()
                prefix = _PREFIXES[key] = b"".join(
                    [_VERSION_BYTE, tag, _varint(self.epoch), _varint(1), _varint(partition)])
            raw = prefix + _varint(offset)
        else:
            parts = [_VERSION_BYTE, tag, _varint(self.epoch), _varint(len(offsets))]
            for partition, offset in offsets:
                parts.append(_varint(partition))
                parts.append(_varint(offset))
            raw = b"".join(parts)
        return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, tag: bytes) -> "Cursor":
        """
        Parse a token made by L{encode} for the stream named by C{tag}.

        @raise CursorError: if the token is malformed or foreign.
        """
        if not token or len(token) > 4096:
            raise CursorError("cursor is empty or too long")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise CursorError("cursor is not valid base64url") from None
        if len(raw) < 7:
            raise CursorError("cursor is truncated")
        if raw[0] != CURSOR_VERSION:
            raise CursorError(f"cursor version {raw[0]} is not supported")
        if raw[1:5] != tag:
            raise CursorError("cursor belongs to another API or topic")
        epoch, index = _readVarint(raw, 5)
        count, index = _readVarint(raw, index)
        if count > 100000:
            raise CursorError("cursor names too many partitions")
        offsets: Dict[int, int] = {}
        for _ in range(count):
            partition, index = _readVarint(raw, index)
            offset, index = _readVarint(raw, index)
            if partition in offsets:
                raise CursorError("cursor names a partition twice")
            offsets[partition] = offset
        if index != len(raw):
            raise CursorError("cursor has trailing bytes")
        return cls.fromMapping(offsets, epoch)


def cursorsAfter(start: Cursor, messages: Iterable[Message]) -> Iterator[Tuple[Message, Cursor]]:
    """
    Pair each message with the cursor that resumes right after it, starting
    from C{start}.
    """
    offsets = start.asDict()
    epoch = start.epoch
    for message in messages:
        partition = message.partition
        if len(offsets) <= 1 and (not offsets or partition in offsets):
            # One partition (a group poll's usual page): no dict to sort.
            offsets = {partition: message.offset + 1}
            yield message, Cursor(epoch, ((partition, message.offset + 1),))
            continue
        offsets[partition] = message.offset + 1
        yield message, Cursor.fromMapping(offsets, epoch)
