"""
Every use evgate makes of a private Twisted name, in one place.

Twisted may rename or remove what is private without a deprecation
period; keeping each use here, behind a function with a docstring that
says what it relies on, and pinning each with a test, makes an upgrade
that breaks one fail in the test suite instead of in production.  Each
section belongs to the part of evgate that needs it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.http import HTTPChannel

# ---------------------------------------------------------------------------
# HTTP channel (evgate.site): how a malformed request head is answered.
# Pinned by tests.test_site.TwistedPrivateTests.
# ---------------------------------------------------------------------------

# The method HTTPChannel calls for every malformed head (bad request line,
# header without a colon, invalid name or value, conflicting lengths, bad
# chunked framing).  Twisted writes a bare "400 Bad Request" without a
# body; no public hook exists.
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"


def hasBadRequestHook() -> bool:
    """
    Whether this Twisted's L{HTTPChannel} still answers malformed heads
    through L{BAD_REQUEST_HOOK}.
    """
    return callable(getattr(HTTPChannel, BAD_REQUEST_HOOK, None))


def answerBadRequestsWith(channelClass: type, answer: Callable[[Any], None]) -> None:
    """
    Make C{channelClass} (an L{HTTPChannel} subclass) answer malformed
    request heads with C{answer(channel)} instead of Twisted's bare C{400}.

    @raise RuntimeError: if this Twisted no longer has the hook (at import,
        rather than silently answering bare C{400}s again).
    """
    if not hasBadRequestHook():
        raise RuntimeError(f"twisted.web.http.HTTPChannel has no {BAD_REQUEST_HOOK}: "
                           "update evgate.twistedprivate for this Twisted")
    setattr(channelClass, BAD_REQUEST_HOOK, answer)

# ---------------------------------------------------------------------------
# end of the HTTP channel section
# ---------------------------------------------------------------------------
