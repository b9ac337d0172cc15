"""
The Confluent wire format, as Confluent's serializers write it:

    byte 0     magic byte, 0
    bytes 1-4  the schema id, a big-endian unsigned 32-bit integer
    then       for Protobuf only: the message-index array (which message of
               the .proto file), then the payload

The message-index array is a count followed by that many indexes, each a
zigzag varint (protobuf's sint32 encoding). The common case, the first
message of the file (C{[0]}), is written as a single 0 byte, which reads
back as C{[0]} because a count of 0 means exactly that.

Nothing here touches a registry; L{unpack} raises only L{DecodeError}.
"""

from __future__ import annotations

import struct
from typing import List, Sequence, Tuple

from evgate.schemas.errors import DecodeError

MAGIC = 0
HEADER_SIZE = 5
_HEADER = struct.Struct(">bI")
# Confluent's readers refuse more than this many indexes: a corrupt count
# must not make us allocate a huge list.
MAX_INDEXES = 100_000
_MAX_VARINT_BYTES = 10


def pack(schemaId: int, payload: bytes, indexes: Sequence[int] = ()) -> bytes:
    """
    The wire-format bytes of C{payload} written with schema C{schemaId};
    C{indexes} is the Protobuf message-index array (empty for Avro and JSON
    Schema).
    """
    if not 0 <= schemaId <= 0xFFFFFFFF:
        raise ValueError(f"schema id {schemaId} does not fit in 32 bits")
    head = _HEADER.pack(MAGIC, schemaId)
    if indexes:
        head += encodeIndexes(indexes)
    return head + payload


def unpack(data: bytes) -> Tuple[int, bytes]:
    """
    The schema id and the rest (index array included, for Protobuf) of
    wire-format C{data}.

    @raise DecodeError: C{reason="wire-format"} if C{data} is shorter than
        the header or does not start with the magic byte.
    """
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"{len(data)} bytes are too short for the schema registry wire format "
                          "(magic byte and 4-byte schema id)", reason="wire-format")
    if data[0] != MAGIC:
        raise DecodeError(f"magic byte is {data[0]}, not {MAGIC}: not schema registry wire format",
                          reason="wire-format")
    _, schemaId = _HEADER.unpack_from(data)
    return schemaId, bytes(data[HEADER_SIZE:])


def zigzag(value: int) -> int:
    """
    C{value} mapped to an unsigned integer so that small magnitudes stay small.
    """
    return (value << 1) ^ (value >> 63)


def unzigzag(value: int) -> int:
    """
    The inverse of L{zigzag}.
    """
    return (value >> 1) ^ -(value & 1)


def encodeVarint(value: int) -> bytes:
    """
    C{value} (zigzag-encoded first) as a base-128 varint.
    """
    value = zigzag(value) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decodeVarint(data: bytes, offset: int) -> Tuple[int, int]:
    """
    The zigzag varint at C{offset} of C{data} and the offset after it.

    @raise DecodeError: if the varint is truncated or longer than 10 bytes.
    """
    result = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if offset + i >= len(data):
            raise DecodeError("truncated varint in the message-index array", reason="wire-format")
        byte = data[offset + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return unzigzag(result), offset + i + 1
        shift += 7
    raise DecodeError("varint longer than 10 bytes in the message-index array", reason="wire-format")


def encodeIndexes(indexes: Sequence[int]) -> bytes:
    """
    The message-index array of a Protobuf message, with Confluent's
    single-0-byte shortcut for C{[0]}.
    """
    if list(indexes) == [0]:
        return b"\x00"
    return encodeVarint(len(indexes)) + b"".join(encodeVarint(i) for i in indexes)


def decodeIndexes(data: bytes, offset: int = 0) -> Tuple[List[int], int]:
    """
    The message-index array at C{offset} of C{data} and the offset of the
    payload after it.

    @raise DecodeError: C{reason="wire-format"} if it is truncated or absurd.
    """
    count, offset = decodeVarint(data, offset)
    if count == 0:
        return [0], offset
    if count < 0 or count > MAX_INDEXES:
        raise DecodeError(f"message-index array of {count} entries is not plausible", reason="wire-format")
    indexes = []
    for _ in range(count):
        index, offset = decodeVarint(data, offset)
        if index < 0:
            raise DecodeError(f"negative message index {index}", reason="wire-format")
        indexes.append(index)
    return indexes, offset
