"""
Answering a data-plane or admin request with a problem document, and
knowing whether its client is still there to hear the answer.

This module sits below the site, the gateway and the admin API (it needs
only evgate.errors and twisted.web), so that every one of them can answer
with a problem without importing the others.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from evgate.errors import Problem

log = Logger()


def watchDeparture(request: Any) -> None:
    """
    Note on C{request} (as C{evgateLeft}) when its client leaves before the
    response is finished, so that L{clientLeft} can tell later.

    C{notifyFinish}'s errback is the public way Twisted says a client left.
    A request class that sets C{evgateLeft} itself (L{evgate.site}'s
    C{GatewayRequest}, in C{connectionLost}) is already watched, and costs
    no Deferred.
    """
    if hasattr(request, "evgateLeft"):
        return
    request.evgateLeft = False
    request.notifyFinish().addErrback(_left, request)


def _left(reason: Failure, request: Any) -> None:
    request.evgateLeft = True


def onDeparture(request: Any, callback: Callable[[Failure], None]) -> None:
    """
    Call C{callback} with the reason if C{request}'s client leaves before
    its response is finished.

    This is C{request.notifyFinish().addErrback(callback)}, without the
    Deferred for a request that offers one place for it (L{evgate.site}'s
    C{GatewayRequest}, whose C{connectionLost} calls C{evgateOnLeft}): an
    idle stream keeps it for as long as it lasts.
    """
    if getattr(request, "evgateOnLeft", False) is None:
        request.evgateOnLeft = callback
        return
    request.notifyFinish().addErrback(callback)


def clientLeft(request: Any) -> bool:
    """
    Whether C{request} needs no answer any more: it is finished, or its
    client left (as seen by L{watchDeparture}).
    """
    return bool(request.finished or getattr(request, "evgateLeft", False))


def writeProblem(request: Request, problem: Problem) -> bytes:
    """
    Set up C{request}'s response as the problem document of C{problem} and
    return the body for C{render} to return.
    """
    request.setResponseCode(problem.status)
    request.setHeader(b"Content-Type", b"application/problem+json")
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in problem.headers:
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    return problem.body()


def finishWithProblem(request: Request, problem: Problem) -> None:
    """
    Write the problem document of C{problem} and finish C{request}, unless
    the client has gone.
    """
    if clientLeft(request):
        return
    body = writeProblem(request, problem)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


def finishWithFailure(request: Request, failure: Failure, context: str) -> None:
    """
    Finish C{request} with the problem carried by C{failure}, or with a 500
    (logged with its traceback) for anything unexpected.
    """
    if isinstance(failure.value, Problem):
        finishWithProblem(request, failure.value)
        return
    log.failure("unexpected error {context}", failure, context=context)
    finishWithProblem(request, Problem("an internal error occurred; it has been logged"))
