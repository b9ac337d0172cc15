"""
The shape of the store's topic: its settings, message headers and keys,
and what a node knows of each record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from evgate.store import Record

# How long a call made before the store is open waits for it.
OPEN_WAIT = 10.0

# How long a write waits for its delivery report, and then for this node's
# reader to read it back.
WRITE_TIMEOUT = 10.0

# Sync messages a writer sends at most to settle one write that was merged
# with concurrent ones (each further one only follows yet another
# concurrent write of the same record).
MAX_SYNCS = 5

# A reader that failed is started again after this many seconds, doubling
# up to MAX_RESTART_DELAY.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0

# Messages one batch of the reader carries to the reactor, and batches
# that may be on their way at once.
READ_BATCH = 500
BATCHES_IN_FLIGHT = 2

# The headers of a message (see the module's docstring).
OP_HEADER = "evgate-op"
WRITER_HEADER = "evgate-writer"
BASE_HEADER = "evgate-base"
PATCH_HEADER = "evgate-patch"


def _dumps(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")


def recordKey(kind: str, id: str) -> str:
    """
    The message key of record C{id} of C{kind}.

    @raise ValueError: if C{kind} has a C{/} (the key could not be split).
    """
    if "/" in kind or not kind:
        raise ValueError(f"a record kind cannot be empty or contain '/': {kind!r}")
    return f"{kind}/{id}"


@dataclass
class _Entry:
    """
    What a node knows of one key: the offset of its last message, and the
    record (L{None} once deleted: a record deleted in the history this node
    read stays deleted when a late update lands).
    """

    offset: int
    record: Optional[Record]


@dataclass(frozen=True)
class Applied:
    """
    What became of one of this node's writes when its reader applied it.

    @ivar adopted: whether the record became the value written (rather
        than a merge with concurrent writes, or, for C{create}, the
        record that was there first).
    @ivar record: the record after the message (L{None}: deleted).
    @ivar offset: the message's offset.
    """

    adopted: bool
    record: Optional[Record]
    offset: int
