"""
Cross-origin access for browser clients: the C{cors-origins} key of an API.

A page on another origin may read an API's responses (an C{EventSource},
C{fetch} for GET and POST) only when the response names its origin in
C{Access-Control-Allow-Origin}, and it sends a preflight C{OPTIONS} first
for any request that is not "simple" (a JSON POST, an C{Authorization}
header).  The gateway answers both for the origins an operator lists::

    [api:demo]
    cors-origins = https://app.example.com https://admin.example.com
    ; or: cors-origins = *      (any origin, without credentials)

The preflight is answered before the plan chain, because browsers send it
without credentials; it reveals nothing but the methods the API serves.
An API without the key sends no CORS headers at all, so browsers keep the
same-origin policy.  WebSocket is not subject to CORS.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from evgate.ini import ApiContext, SectionReader, apiOptionParser

PREFLIGHT_MAX_AGE = b"600"


def allowedOrigin(api: Any, origin: Optional[bytes]) -> Optional[bytes]:
    """
    The value of C{Access-Control-Allow-Origin} for a request from
    C{origin}, or L{None} when that origin is not allowed.
    """
    origins: Tuple[str, ...] = api.config.options.get("corsOrigins", ())
    if not origins or origin is None:
        return None
    if "*" in origins:
        return b"*"
    if origin.decode("latin-1") in origins:
        return origin
    return None


def applyCors(request: Any, api: Any) -> None:
    """
    Let the request's origin read the response, if the API allows it.
    """
    if not api.config.options.get("corsOrigins"):
        return
    # Caches must not serve one origin's answer to another.
    request.setHeader(b"Vary", b"Origin")
    allowed = allowedOrigin(api, request.getHeader(b"origin"))
    if allowed is not None:
        request.setHeader(b"Access-Control-Allow-Origin", allowed)


def preflight(request: Any, api: Any) -> Optional[bytes]:
    """
    Answer a CORS preflight (C{OPTIONS} with C{Access-Control-Request-Method})
    and return the body for C{render}, or L{None} when C{request} is not one
    this API answers.
    """
    if request.method != b"OPTIONS" or not api.config.options.get("corsOrigins"):
        return None
    wanted = request.getHeader(b"access-control-request-method")
    if wanted is None:
        return None
    request.setHeader(b"Vary", b"Origin")
    allowed = allowedOrigin(api, request.getHeader(b"origin"))
    if allowed is None:
        # No CORS headers: the browser refuses the actual request.
        request.setResponseCode(204)
        return b""
    request.setResponseCode(204)
    request.setHeader(b"Access-Control-Allow-Origin", allowed)
    request.setHeader(b"Access-Control-Allow-Methods", b", ".join(api.allowedMethods()))
    headers = request.getHeader(b"access-control-request-headers")
    if headers:
        # The origin is one the operator trusts; whichever headers its
        # page sends are the plans' and entrypoints' business.
        request.setHeader(b"Access-Control-Allow-Headers", headers)
    request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
    return b""


@apiOptionParser
def parseCorsOption(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{cors-origins} key: origins (C{scheme://host[:port]}) or C{*}.
    """
    origins = section.getList("cors-origins", ())
    for origin in origins:
        if origin == "*":
            continue
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise section.error("cors-origins", f"{origin!r} is not an origin "
                                "(scheme://host[:port], no path) or *")
    return {"corsOrigins": tuple(origins)}
