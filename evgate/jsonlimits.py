"""
JSON from outside, parsed within limits of depth and size.

Python's C{json} parser recurses once per level of nesting: a 200 KB
document of 100,000 nested arrays ends in a L{RecursionError} (an internal
error, or a dropped connection, wherever it happens).  Every JSON document
evgate reads from outside (request bodies, WebSocket frames, admin bodies,
JWKS and introspection answers, stored records, message values filters
look into) goes through L{loads}, which refuses a document nested deeper
than C{maxDepth} or larger than C{maxBytes} with one of two documented
errors, both L{ValueError}s so that callers already catching C{json}'s
errors keep doing the right thing:

 - L{JsonTooDeep}: nested deeper than the limit;
 - L{JsonTooLarge}: more bytes (or characters) than the limit.

How the depth is checked without recursion, and what it costs
=============================================================

A document cannot nest deeper than the number of its opening brackets, so
the common case is decided by two C{count} calls (C speed, no copy): a
1 KB body with a handful of objects pays under a microsecond.  Only a
document with more opening brackets than C{maxDepth} is scanned, with
C{bytes} operations only (no Python loop per character): escaped quotes
are dropped, C{translate} keeps the brackets and quotes, strings without
brackets vanish with one C{replace}, and then each C{replace} pass of
C{"()"} removes one level of nesting everywhere at once; a document still
holding pairs after C{maxDepth} passes is too deep.  A batch of 200 records
(12 KB, 1,200 brackets) costs about a fifth of its C{json.loads}; a
200 KB attack of 100,000 nested arrays is refused in a few milliseconds.

A L{RecursionError} from the parser itself (a document the scan
under-estimated, say in UTF-16) is still reported as L{JsonTooDeep}.
"""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any, Optional, Union

# Deep enough for any document a person or a program means to send, and far
# below the interpreter's recursion limit (1,000 frames) even when the
# caller itself is deep in the stack, or when the parsed value is walked
# again recursively (re-serialised, turned into CEL values by a filter).
DEFAULT_MAX_DEPTH = 64

# Everything but brackets and quotes, for bytes.translate's delete argument.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
# Both kinds of bracket as one: nesting depth does not depend on the kind
# (a mismatch is the parser's error to report).
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_SIGNS = bytes.maketrans(b"()", b"\x01\xff")


class JsonLimitError(ValueError):
    """
    A JSON document was refused for exceeding a limit (a L{ValueError}, as
    C{json}'s own parse errors are).

    @ivar limit: the limit that was exceeded.
    """

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class JsonTooDeep(JsonLimitError):
    """
    The document nests arrays and objects deeper than the limit.
    """


class JsonTooLarge(JsonLimitError):
    """
    The document is longer than the limit.
    """


def _brackets(raw: bytes) -> bytes:
    """
    The brackets of the JSON text C{raw} outside its strings, as C{(} and
    C{)}.
    """
    if b"\\" in raw:
        # Escaped backslashes first: what is left before a quote escapes it.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = raw.translate(None, _NOT_STRUCTURE)
    if b'"' in structure:
        # Quotes alternate open/close; two adjacent ones enclose no bracket
        # (an empty string, or the gap between two strings), so dropping
        # them changes nothing.  What is left are strings with brackets.
        structure = structure.replace(b'""', b"")
        if b'"' in structure:
            structure = b"".join(structure.split(b'"')[::2])
    return structure.translate(_PARENS)


def depthOf(data: Union[bytes, str]) -> int:
    """
    The deepest nesting of arrays and objects in the JSON text C{data},
    computed without recursion (brackets inside strings do not count).  The
    text need not be valid JSON: an unterminated string's brackets count,
    which can only over-estimate.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    parens = _brackets(raw).translate(_SIGNS)
    if not parens:
        return 0
    return max(0, max(accumulate(memoryview(parens).cast("b"))))


def _deeperThan(data: Union[bytes, str], maxDepth: int) -> bool:
    """
    Whether C{data} nests deeper than C{maxDepth}.

    Each C{replace} pass drops the innermost pairs, one level of every
    branch at once (C speed, no Python loop per character): a balanced
    document is empty after as many passes as it is deep, and a pair still
    there after C{maxDepth} passes encloses more than C{maxDepth} levels.
    Unbalanced brackets (invalid JSON) are measured exactly.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    remaining = _brackets(raw)
    # The usual attack is one long run of openings: found at C speed.
    if b"(" * (maxDepth + 1) in remaining:
        return True
    for _ in range(maxDepth):
        if not remaining:
            return False
        shorter = remaining.replace(b"()", b"")
        if len(shorter) == len(remaining):
            break
        remaining = shorter
    else:
        if not remaining:
            return False
        if b"()" in remaining:
            return True
    return depthOf(data) > maxDepth


def checkLimits(data: Union[bytes, bytearray, str], maxDepth: int = DEFAULT_MAX_DEPTH,
                maxBytes: Optional[int] = None) -> None:
    """
    Refuse C{data} if it is longer than C{maxBytes} or nests deeper than
    C{maxDepth}, without parsing it.

    @raise JsonTooLarge: if it is too long.
    @raise JsonTooDeep: if it nests too deep.
    """
    if maxBytes is not None and len(data) > maxBytes:
        raise JsonTooLarge(f"the JSON document is larger than the limit of {maxBytes} bytes", maxBytes)
    # Fast path: fewer opening brackets than the limit cannot nest deeper.
    if isinstance(data, str):
        opening = data.count("[") + data.count("{")
    else:
        opening = data.count(b"[") + data.count(b"{")
    if opening <= maxDepth:
        return
    if _deeperThan(data if not isinstance(data, bytearray) else bytes(data), maxDepth):
        raise JsonTooDeep(f"the JSON document nests deeper than the limit of {maxDepth} levels", maxDepth)


def loads(data: Union[bytes, bytearray, str], *, maxDepth: int = DEFAULT_MAX_DEPTH,
          maxBytes: Optional[int] = None) -> Any:
    """
    Parse the JSON text C{data} (bytes in UTF-8, -16 or -32, or a string),
    as C{json.loads} does, within limits.

    @param maxDepth: the deepest nesting of arrays and objects allowed.
    @param maxBytes: the longest document allowed (bytes, or characters for
        a string); L{None} for no limit.
    @raise JsonTooLarge: if C{data} is longer than C{maxBytes}.
    @raise JsonTooDeep: if C{data} nests deeper than C{maxDepth}.
    @raise ValueError: if C{data} is not JSON (C{json.JSONDecodeError}, or
        C{UnicodeDecodeError} for bytes that are not text).
    """
    checkLimits(data, maxDepth, maxBytes)
    try:
        return json.loads(data)
    except RecursionError:
        # The scan under-estimated (an encoding it does not read): the
        # parser's own guard fired; say what it means.
        raise JsonTooDeep(f"the JSON document nests deeper than the limit of {maxDepth} levels",
                          maxDepth) from None
