"""
The C{http-proxy} entrypoint: an API whose requests are forwarded to the
targets of an C{http} endpoint (docs/proxy.md).

An API with this entrypoint owns its path's whole subtree: C{/billing} and
C{/billing/...} (see L{evgate.gateway.GatewayResource}).  What lies under
the prefix is forwarded as the client wrote it, byte for byte, after a
check that it cannot climb out of the prefix once an upstream decodes and
normalises it: a C{.} or C{..} segment, raw or percent-encoded, or an
encoded C{/} or C{\\} that would make one, is a 400.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate.errors import Problem
from evgate.gateway import ApiCall, writeProblem
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import ISubtreeEntrypoint
from evgate.metrics import tallyFor
from evgate.proxy._forward import ProxyCall, RequestBodyPipe, isUpgrade
from evgate.proxy._headers import quotedPath, requestId, upstreamHeaders, withoutQueryParameters
from evgate.proxy._upgrade import UpgradeRelay
from evgate.proxy.problems import BadProxyPath

_REWRITE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*/?$")

# Every method is forwarded; this list is what a 405 elsewhere, and CORS,
# would name.
PROXY_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")


@apiOptionParser
def parseProxyOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The keys of an API with the C{http-proxy} entrypoint: C{strip-path},
    C{rewrite}, C{forward-credentials}, C{preserve-host}; and the rules
    that bind it to an C{http} endpoint.
    """
    proxy = "http-proxy" in context.entrypoints
    if context.endpoint.type == "http" and not proxy:
        raise section.error("entrypoints", f"endpoint {context.endpoint.name} is an http endpoint: its APIs "
                            "use the http-proxy entrypoint")
    if not proxy:
        return {}
    if context.endpoint.type != "http":
        raise section.error("endpoint", f"http-proxy forwards to an http endpoint; {context.endpoint.name} is "
                            f"of type {context.endpoint.type}")
    if len(context.entrypoints) > 1:
        raise section.error("entrypoints", "http-proxy owns the API's whole path: it takes no other entrypoint")
    rewrite = section.get("rewrite", None)
    if rewrite is not None and (not _REWRITE.match(rewrite) or ".." in rewrite.split("/")):
        raise section.error("rewrite", f"{rewrite!r} is not a path prefix such as /v2")
    strip = section.getBool("strip-path", True)
    if rewrite is not None and not section.has("strip-path"):
        strip = True
    return {"proxy": {
        "stripPath": strip,
        "rewrite": rewrite.rstrip("/") if rewrite is not None else None,
        "forwardCredentials": section.getBool("forward-credentials", False),
        "preserveHost": section.getBool("preserve-host", False),
    }}


def subtreePath(remainder: bytes) -> Optional[str]:
    """
    Why C{remainder}, the raw path under an API's prefix, could escape
    the prefix once decoded (see the module docstring); L{None} if it
    cannot.
    """
    decoded = unquote_to_bytes(remainder)
    if b"\x00" in decoded:
        return "an encoded NUL"
    for segment in re.split(rb"[/\\]", decoded):
        if segment in (b".", b".."):
            return "a dot segment"
    return None


@implementer(ISubtreeEntrypoint)
class HttpProxyEntrypoint:
    """
    C{http-proxy}: forward every request under the API's path to its
    C{http} endpoint, with the API's plans in front.
    """

    name = "http-proxy"
    methods = PROXY_METHODS
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        self.endpoint = api.connector
        self.options = api.config.options["proxy"]
        self.prefix = api.config.path.encode("ascii")
        self.tally = tallyFor(api, self.name)
        self.settings = dict(self.endpoint.options)
        self.settings["preserveHost"] = self.options["preserveHost"]
        self._dropHeaders: tuple = ()
        self._dropQuery: tuple = ()
        if not self.options["forwardCredentials"]:
            self._dropHeaders, self._dropQuery = self._credentials(api)

    def _credentials(self, api: Any) -> Any:
        headers = set()
        query = set()
        plans = api.config.plans
        if "jwt" in plans or "oauth2" in plans:
            headers.add(b"authorization")
            query.add(b"access_token")
        if "api-key" in plans:
            options = api.config.options.get("apiKey", {})
            headers.add(options.get("header", "X-Api-Key").lower().encode("ascii"))
            if options.get("query"):
                query.add(options["query"].encode("ascii"))
        return tuple(sorted(headers)), tuple(sorted(query))

    def openBodyPipe(self, request: Request, length: Optional[int]) -> RequestBodyPipe:
        """
        Where the body of C{request} goes while it arrives (the site calls
        this once the request's headers are in; see
        L{evgate.site.GatewayRequest.gotLength}).
        """
        return RequestBodyPipe(request, length)

    def accepts(self, request: Request) -> bool:
        """
        Every request under the API's path is forwarded.
        """
        return True

    def upstreamPath(self, uri: bytes) -> bytes:
        """
        The path and query to request upstream for the client's C{uri}
        (under this API's prefix): prefix stripped, kept or rewritten,
        credentials dropped from the query.

        @raise BadProxyPath: for a path that could leave the prefix.
        """
        path, question, query = uri.partition(b"?")
        remainder = path[len(self.prefix):]
        why = subtreePath(remainder)
        if why is not None:
            raise BadProxyPath(f"the path has {why}, which could leave {self.api.config.path}")
        options = self.options
        if options["rewrite"] is not None:
            base = quotedPath(options["rewrite"])
        elif options["stripPath"]:
            base = b""
        else:
            base = self.prefix
        forwarded = base + remainder
        if not forwarded.startswith(b"/"):
            forwarded = b"/" + forwarded
        if question:
            query = withoutQueryParameters(query, self._dropQuery)
            if query:
                forwarded += b"?" + query
        return forwarded

    def render(self, request: Request, call: ApiCall) -> Any:
        """
        Forward C{request}; the answer is streamed back as it comes.
        """
        try:
            path = self.upstreamPath(request.uri)
        except Problem as problem:
            return self._refuse(request, problem)
        peer = request.getClientAddress()
        rid = requestId(request.requestHeaders)
        request.setHeader(b"X-Request-Id", rid)
        headers = upstreamHeaders(
            request.requestHeaders, getattr(peer, "host", None), request.isSecure(), rid,
            dropNames=self._dropHeaders)
        if isUpgrade(request):
            UpgradeRelay(self.endpoint, request, self.api.name, path, headers, self.settings).start()
            return NOT_DONE_YET
        body = request.content if isinstance(request.content, RequestBodyPipe) else None
        ProxyCall(self.endpoint, request, self.api.name, request.method, path, headers, body,
                  self.settings).start()
        return NOT_DONE_YET

    def stop(self) -> None:
        """
        Nothing to end: requests in flight finish on their own (a reload
        lets them).
        """

    def _refuse(self, request: Request, problem: Problem) -> Any:
        body = writeProblem(request, problem)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return body
