"""
The problem documents of the HTTP proxy (docs/errors.md): each says which
stage failed (C{stage}: C{select}, C{connect}, C{tls}, C{response-head},
C{request-body}) and how many targets were tried (C{attempts}).  Target
addresses are logged, never shown to clients.
"""

from __future__ import annotations

from typing import Any

from evgate.errors import NotFound, Problem


class UpstreamFailed(Problem):
    """No usable response came from the upstream (refused, reset, bad response)."""

    status = 502
    slug = "upstream-failed"
    title = "Bad gateway"


class UpstreamTimeout(Problem):
    """The upstream did not connect or answer within its timeout."""

    status = 504
    slug = "upstream-timeout"
    title = "Gateway timeout"


class NoUpstreamInService(Problem):
    """Every target of the endpoint is out of service."""

    status = 503
    slug = "no-upstream-in-service"
    title = "Service unavailable"

    def __init__(self, detail: str, retryAfter: int = 5, **kw: Any) -> None:
        headers = list(kw.pop("headers", ())) + [("Retry-After", str(retryAfter))]
        super().__init__(detail, headers=headers, **kw)


class BadProxyPath(Problem):
    """The path under a proxy API has dot segments or encoded separators that could leave its prefix."""

    status = 400
    slug = "bad-proxy-path"
    title = "Bad path"


class NotAnEventApi(NotFound):
    """A route that only event APIs have (AsyncAPI) was asked of a proxy API."""

    slug = "not-an-event-api"
    title = "Not an event API"
