"""
A deadline on a Deferred that evgate fires itself.

L{Deferred.addTimeout} cancels the Deferred, which suits a request that
knows how to stop.  The waits here are different: a Deferred made by
evgate that a later event fires (a store that opens, a subscription that
says where it starts), whose waiter must be taken off a list or whose probe
must be ended when time runs out, and which fails with a problem that says
what did not happen.  L{atDeadline} runs that clean-up once, only if the
Deferred has not fired by then, and forgets the timer when it fires first.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred


def atDeadline(reactor: Any, seconds: float, d: Deferred, late: Callable[[], None]) -> Deferred:
    """
    Call C{late} after C{seconds} unless C{d} has fired by then; C{late}
    is expected to fire C{d} (usually with an errback).

    @return: C{d}, for chaining.
    """

    def expired() -> None:
        if not d.called:
            late()

    timer = reactor.callLater(seconds, expired)

    def fired(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    d.addBoth(fired)
    return d
