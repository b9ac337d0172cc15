"""
A deliverer's writes to the store, coalesced: L{CoalescedWrites}.

At most one update per subscription is in flight; what changes meanwhile
(fields replaced, counters added up) goes in the next one.  An update the
store refuses is put back under anything newer and tried again a second
later, not in a tight loop.  A crash loses at most the writes not yet
made: some messages are delivered again, none is skipped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from evgate.message import Cursor
from evgate.webhook import records


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

    def _save(self, changes: Mapping[str, Any], **increments: int) -> None:
        self._changes.update(changes)
        for name, amount in increments.items():
            self._increments[name] = self._increments.get(name, 0) + amount
        if self._saving is None:
            self._flush()

    def _flush(self) -> None:
        if not self._changes and not self._increments:
            waiters, self._savedWaiters = self._savedWaiters, []
            for d in waiters:
                d.callback(None)
            return
        changes, self._changes = self._changes, {}
        increments, self._increments = self._increments, {}
        position = changes.get("position")
        if isinstance(position, Cursor):
            changes["position"] = position.encode(self.context.tag)
        d = self.context.store.update(records.KIND, self.id, changes, increments)
        self._saving = d

        def saved(result: Any) -> None:
            self._saving = None
            if result is None:
                self.log.info("webhook subscription {subscription} is no longer in the store", subscription=self.id)
            elif isinstance(position, Cursor):
                self._savedPosition = position
            self._flush()

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
        return d
