"""
A deliverer's writes to the store, coalesced: L{CoalescedWrites}.

At most one update per subscription is in flight, and updates start at
most every L{WRITE_INTERVAL} seconds; what changes meanwhile (fields
replaced, counters added up) goes in the next one.  A subscription that
delivers hundreds of messages a second so writes its position, counts and
time of last delivery a few times a second, not once per message: each
write is a read and a write of the record on the store's thread (and,
with a shared store, a round trip), which the deliveries would otherwise
pay for, message by message.  A write waited for (L{CoalescedWrites.flushed},
when a deliverer stops) starts at once.

An update the store refuses is put back under anything newer and tried
again a second later, not in a tight loop.  A crash loses at most the
writes not yet made: some messages are delivered again, none is skipped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from evgate.message import Cursor
from evgate.webhook import records

# Seconds between the starts of two updates of one subscription's record.
WRITE_INTERVAL = 0.1


class CoalescedWrites:
    """
    The store writes of a L{evgate.webhook.delivery.Deliverer}, which
    provides C{id}, C{context} (its C{store} and C{tag}), C{reactor},
    C{stopped} and C{log}.
    """

    id: str
    context: Any
    reactor: Any
    stopped: bool
    log: Any

    def _initWrites(self, position: Optional[Cursor]) -> None:
        self._changes: Dict[str, Any] = {}
        self._increments: Dict[str, int] = {}
        self._saving: Optional[Deferred] = None
        self._savedWaiters: List[Deferred] = []
        self._savedPosition = position
        self._lastWrite = float("-inf")
        self._writeCall: Any = None

    def _save(self, changes: Mapping[str, Any], **increments: int) -> None:
        self._changes.update(changes)
        for name, amount in increments.items():
            self._increments[name] = self._increments.get(name, 0) + amount
        if self._saving is None and self._writeCall is None:
            self._flushSoon()

    def _flushSoon(self) -> None:
        # Now if the last update started long enough ago (or someone waits
        # for the store), else once it did.
        wait = self._lastWrite + WRITE_INTERVAL - self.reactor.seconds()
        if wait <= 0 or self._savedWaiters or (not self._changes and not self._increments):
            self._flush()
        elif self._writeCall is None:
            self._writeCall = self.reactor.callLater(wait, self._flushScheduled)

    def _flushScheduled(self) -> None:
        self._writeCall = None
        if self._saving is None:
            self._flush()

    def _flush(self) -> None:
        if self._writeCall is not None:
            if self._writeCall.active():
                self._writeCall.cancel()
            self._writeCall = None
        if not self._changes and not self._increments:
            waiters, self._savedWaiters = self._savedWaiters, []
            for d in waiters:
                d.callback(None)
            return
        self._lastWrite = self.reactor.seconds()
        changes, self._changes = self._changes, {}
        increments, self._increments = self._increments, {}
        position = changes.get("position")
        if isinstance(position, Cursor):
            changes["position"] = position.encode(self.context.tag)
        delivered = changes.get("lastDeliveredAt")
        if isinstance(delivered, float):
            # Seconds, as the deliverer saves them: formatted once per write.
            changes["lastDeliveredAt"] = records.timestamp(delivered)
        d = self.context.store.update(records.KIND, self.id, changes, increments)
        self._saving = d

        def saved(result: Any) -> None:
            self._saving = None
            if result is None:
                self.log.info("webhook subscription {subscription} is no longer in the store", subscription=self.id)
            elif isinstance(position, Cursor):
                self._savedPosition = position
            self._flushSoon()

        def notSaved(failure: Failure) -> None:
            self._saving = None
            if self.stopped:
                # No retrying after the stop: what was not written is
                # delivered again next time, as at-least-once allows.
                self.log.warn("webhook subscription {subscription}: its last position was not stored: {error}",
                              subscription=self.id, error=failure.getErrorMessage())
                waiters, self._savedWaiters = self._savedWaiters, []
                for d in waiters:
                    d.callback(None)
                return
            self.log.failure("webhook subscription {subscription}: the store refused an update; trying again",
                             failure, subscription=self.id)
            # Put the lost changes back under anything newer, and try again
            # later rather than in a tight loop.
            for name, value in changes.items():
                self._changes.setdefault(name, position if name == "position" else value)
            for name, amount in increments.items():
                self._increments[name] = self._increments.get(name, 0) + amount
            self.reactor.callLater(1.0, self._flushIfIdle)

        d.addCallbacks(saved, notSaved)

    def _flushIfIdle(self) -> None:
        if self._saving is None:
            self._flush()

    def flushed(self) -> Deferred:
        """
        A Deferred that fires when every change so far is in the store.
        """
        if self._saving is None and not self._changes and not self._increments:
            return succeed(None)
        d: Deferred = Deferred()
        self._savedWaiters.append(d)
        if self._saving is None:
            self._flush()
        return d
