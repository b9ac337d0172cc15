"""
What creating a webhook subscription checks and where it starts: the body
fields the admin API takes, the C{maxInFlight} bound, and the cursor that
C{latest} or C{earliest} stands for at the moment of creation
(L{resolveStart}).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.deadlines import atDeadline
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IUpstreamSink
from evgate.message import Cursor

# How long creating a subscription waits to learn where the topic starts.
START_TIMEOUT = 10.0

FIELDS = frozenset({"callbackUrl", "headers", "filter", "start", "retry", "maxInFlight"})

# The bounds of webhook.max-in-flight and of a subscription's maxInFlight.
MAX_IN_FLIGHT_LIMIT = 1000


def checkMaxInFlight(value: Any) -> Optional[int]:
    """
    A subscription's C{maxInFlight} as the admin API got it: L{None} (the
    API's C{webhook.max-in-flight}) or an integer from 1 to
    L{MAX_IN_FLIGHT_LIMIT}.

    @raise ValueError: for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IN_FLIGHT_LIMIT:
        raise ValueError(f"maxInFlight must be an integer from 1 to {MAX_IN_FLIGHT_LIMIT}")
    return value


@implementer(IUpstreamSink)
class _StartProbe:
    """
    A throw-away upstream subscription that learns which cursor C{latest}
    or C{earliest} means right now.
    """

    def __init__(self, deferred: Deferred) -> None:
        self.deferred = deferred
        self.subscription: Any = None

    def _end(self) -> None:
        if self.subscription is not None:
            self.subscription.close()

    def started(self, cursor: Cursor) -> None:
        if not self.deferred.called:
            self.deferred.callback(cursor)
        self._end()

    def deliver(self, messages: Any) -> None:
        pass

    def gap(self, cursor: Cursor, reason: str) -> None:
        pass

    def failed(self, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


def resolveStart(connector: Any, topic: str, start: Any, reactor: Any, timeout: float = START_TIMEOUT) -> Deferred:
    """
    The cursor C{start} (C{"latest"}, C{"earliest"} or a L{Cursor}) stands
    for now, so that a subscription made with C{latest} receives every
    message published after its creation was answered.
    """
    d: Deferred = Deferred()
    probe = _StartProbe(d)
    probe.subscription = connector.subscribe(topic, start, probe)

    def tooLate() -> None:
        probe._end()
        d.errback(EndpointUnavailable(f"endpoint {connector.name} did not say where topic {topic} starts "
                                      f"within {timeout:g} s; try again"))

    return atDeadline(reactor, timeout, d, tooLate)
