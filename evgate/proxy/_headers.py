"""
The header rules of the HTTP proxy (docs/proxy.md, "Headers").

Requests going upstream:

 - hop-by-hop headers are removed (RFC 9110 section 7.6.1): C{Connection}
   and every header it names, C{Keep-Alive}, C{Proxy-Connection},
   C{Proxy-Authenticate}, C{Proxy-Authorization}, C{TE}, C{Trailer},
   C{Transfer-Encoding} and C{Upgrade} (an upgrade is carried by its own
   path, L{evgate.proxy._upgrade}, which puts C{Connection: upgrade} and
   C{Upgrade} back);
 - C{Forwarded} (RFC 7239) and the de-facto C{X-Forwarded-For},
   C{X-Forwarded-Proto} and C{X-Forwarded-Host} are appended to, C{Via} is
   added, and C{X-Request-Id} is kept or made;
 - the plan's credentials (C{Authorization}, the API-key header and query
   parameter, the C{access_token} parameter) are removed unless the API
   sets C{forward-credentials = true}: the upstream trusts the gateway,
   and a key for the gateway is nobody else's business.

Responses coming back lose their hop-by-hop headers too; the server's own
framing (Content-Length or chunked) is redone by twisted.web.
"""

from __future__ import annotations

import re
import uuid
from typing import Iterable, List, Optional, Sequence, Set, Tuple
from urllib.parse import quote, unquote_to_bytes

from twisted.web.http_headers import Headers

HOP_BY_HOP: frozenset = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

REQUEST_ID = b"X-Request-Id"
# A client's request id is kept when it is a reasonable token; anything
# else (too long, control characters) is replaced rather than forwarded.
_REQUEST_ID_SHAPE = re.compile(rb"^[\x21-\x7e]{1,200}$")


def connectionTokens(headers: Headers) -> Set[bytes]:
    """
    The lower-cased header names listed in C{headers}' C{Connection}
    values: they are hop-by-hop for this message only.
    """
    tokens: Set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def endToEnd(headers: Headers, drop: Iterable[bytes] = ()) -> List[Tuple[bytes, List[bytes]]]:
    """
    The end-to-end headers of C{headers}: neither hop-by-hop, nor named
    by its C{Connection} header, nor among C{drop} (lower-case names).
    """
    skip = HOP_BY_HOP | connectionTokens(headers) | set(drop)
    return [(name, list(values)) for name, values in headers.getAllRawHeaders() if name.lower() not in skip]


def forwardedNode(host: Optional[str]) -> str:
    """
    An RFC 7239 node for the address C{host}: IPv6 in brackets and quoted,
    C{unknown} when there is none.
    """
    if not host:
        return "unknown"
    if ":" in host:
        return f'"[{host}]"'
    return host


def _quoted(value: str) -> str:
    # RFC 7239 values are tokens or quoted strings.
    if re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def requestId(headers: Headers) -> bytes:
    """
    The request id of a request: the client's C{X-Request-Id} when it is
    a printable token of at most 200 characters, else a new UUID.
    """
    given = headers.getRawHeaders(REQUEST_ID)
    if given and _REQUEST_ID_SHAPE.match(given[0]):
        return given[0]
    return uuid.uuid4().hex.encode("ascii")


def upstreamHeaders(
    incoming: Headers,
    clientHost: Optional[str],
    secure: bool,
    requestIdValue: bytes,
    dropNames: Sequence[bytes] = (),
    hostValue: Optional[bytes] = None,
    via: bytes = b"1.1 evgate",
) -> Headers:
    """
    The headers to send upstream for a request that came with
    C{incoming} (see the module docstring).

    @param clientHost: the client's address, for C{Forwarded} and
        C{X-Forwarded-For}.
    @param secure: whether the client spoke TLS to the gateway.
    @param dropNames: lower-case names of more headers to remove (the
        credentials).
    @param hostValue: the C{Host} to send; L{None} keeps the client's.
    """
    out = Headers()
    originalHost = incoming.getRawHeaders(b"host", [b""])[0]
    for name, values in endToEnd(incoming, dropNames):
        # The body's framing is the upstream request's own (set from the
        # body producer's length); Expect was answered here.
        if name.lower() in (b"host", REQUEST_ID.lower(), b"content-length", b"expect"):
            continue
        out.setRawHeaders(name, values)
    proto = b"https" if secure else b"http"
    node = forwardedNode(clientHost)
    element = f"for={node};proto={proto.decode('ascii')}"
    if originalHost:
        element += ";host=" + _quoted(originalHost.decode("latin-1"))
    previous = incoming.getRawHeaders(b"forwarded")
    forwarded = (b", ".join(previous) + b", " if previous else b"") + element.encode("latin-1")
    out.setRawHeaders(b"Forwarded", [forwarded])
    xff = incoming.getRawHeaders(b"x-forwarded-for")
    address = (clientHost or "unknown").encode("latin-1")
    out.setRawHeaders(b"X-Forwarded-For", [(b", ".join(xff) + b", " if xff else b"") + address])
    out.setRawHeaders(b"X-Forwarded-Proto", [proto])
    if originalHost:
        out.setRawHeaders(b"X-Forwarded-Host", [originalHost])
    viaBefore = incoming.getRawHeaders(b"via")
    out.setRawHeaders(b"Via", [(b", ".join(viaBefore) + b", " if viaBefore else b"") + via])
    out.setRawHeaders(REQUEST_ID, [requestIdValue])
    host = hostValue if hostValue is not None else originalHost
    if host:
        out.setRawHeaders(b"Host", [host])
    return out


def responseHeaders(upstream: Headers) -> List[Tuple[bytes, List[bytes]]]:
    """
    The headers of an upstream response to give the client: its
    end-to-end headers, without C{Content-Length} (set again by the
    caller when the body has one) .
    """
    return [(name, values) for name, values in endToEnd(upstream, (b"content-length",))]


def withoutQueryParameters(query: bytes, names: Sequence[bytes]) -> bytes:
    """
    The query string C{query} (without its C{?}) with the parameters
    named C{names} removed; the others are kept byte for byte, in order.
    """
    if not names or not query:
        return query
    kept = []
    for part in query.split(b"&"):
        name = part.split(b"=", 1)[0]
        if name in names or _unquotedName(name) in names:
            continue
        kept.append(part)
    return b"&".join(kept)


def _unquotedName(name: bytes) -> bytes:
    return unquote_to_bytes(name.replace(b"+", b" "))


def quotedPath(path: str) -> bytes:
    """
    A configured path prefix as it goes on the wire.
    """
    return quote(path, safe="/-._~").encode("ascii")
