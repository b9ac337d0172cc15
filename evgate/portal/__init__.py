"""
The developer portal: pages for an API's consumers, on the gateway's own
listener.

Configuration: C{portal = /portal} in C{[gateway]} serves the portal at
that path; C{portal = true} in an C{[api:NAME]} section lists that API in
it (APIs are not listed unless they opt in).  The portal's path must not
be an API's path, lie under one, or have one under it: that is a
configuration error naming the API's C{path} (or C{[gateway] portal}).

What it serves, without credentials (the pages hold no secrets: plans are
described by the names of their headers and parameters, never by keys,
tokens or secret files):

    GET <portal>                    the list of APIs (portal.html)
    GET <portal>/apis/<name>        one API's page (the same page; it reads
                                    the document below)
    GET <portal>/apis.json          the opted-in APIs
    GET <portal>/apis/<name>.json   one of them: its AsyncAPI document and
                                    how to authenticate
    GET <portal>/portal.js, portal.css

The page's "try it" panel publishes and subscribes with C{fetch} to the
API itself, with the key or token the consumer types in, so everything it
does is what the consumer's own code would do.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from evgate.admin.asyncapi import asyncapiDocument
from evgate.answers import writeProblem
from evgate.errors import MethodNotAllowed, NotFound
from evgate.ini import ApiContext, SectionReader, apiOptionParser, gatewayKeys

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

# As the console's: own script and style only, same-origin requests only.
SECURITY_HEADERS = (
    (b"Content-Security-Policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                                 b"form-action 'self'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
)

FILES = {
    "portal.js": "text/javascript; charset=utf-8",
    "portal.css": "text/css; charset=utf-8",
}

_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


@gatewayKeys
def parsePortalKey(section: SectionReader) -> Mapping[str, Any]:
    """
    C{portal}: the portal's path, or L{None}.
    """
    path = section.get("portal", None)
    if path is None or path.lower() == "none":
        return {"portal": None}
    if not _PATH.match(path) or ".." in path.split("/"):
        raise section.error("portal", f"{path!r} is not a path: use /segments of letters, digits and ._~- "
                            "without a trailing slash")
    return {"portal": path}


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


@apiOptionParser
def parsePortalOption(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    C{portal = true}: list the API in the portal.  Also refuses an API
    path that collides with the portal's.
    """
    listed = section.getBool("portal", False)
    options = context.gateway.options if context.gateway is not None else {}
    portal = (options or {}).get("portal")
    path = section.get("path")
    if portal is not None and _overlaps(path, portal):
        raise section.error("path", f"{path} collides with the portal's path ([gateway] portal = {portal}); "
                            "move one of them")
    if listed and portal is None:
        raise section.error("portal", "lists the API in the portal, but [gateway] has no portal = /path")
    return {"portal": listed}


def authOf(api: Any) -> Dict[str, Any]:
    """
    How a consumer authenticates to C{api}: the plans and, for each, where
    its credential goes (names only, never a credential).
    """
    options = api.config.options
    plans = []
    for plan in api.config.plans:
        if plan == "keyless":
            plans.append({"plan": plan, "description": "No credentials needed."})
        elif plan == "api-key":
            settings = options.get("apiKey", {})
            plans.append({"plan": plan, "header": settings.get("header", "X-Api-Key"),
                          "query": settings.get("query") or None,
                          "description": "An API key, issued by the API's operators."})
        elif plan in ("jwt", "oauth2"):
            plans.append({"plan": plan, "header": "Authorization", "scheme": "Bearer", "query": "access_token",
                          "description": "A JSON Web Token." if plan == "jwt"
                          else "An OAuth 2 access token from your identity provider."})
    return {"plans": plans}


def summaryOf(api: Any) -> Dict[str, Any]:
    """
    What the list of APIs shows of one.
    """
    config = api.config
    return {"name": config.name, "path": config.path, "entrypoints": list(config.entrypoints),
            "plans": list(config.plans)}


class PortalResource(Resource):
    """
    The portal, under its path on the gateway's listener; the gateway's
    resource hands it the requests no API serves.

    @ivar gateway: the L{evgate.service.GatewayService} (its live APIs and
        listeners).
    @ivar path: the portal's path, bytes.
    """

    isLeaf = True

    def __init__(self, gateway: Any, path: str) -> None:
        super().__init__()
        self.gateway = gateway
        self.path = path.encode("ascii")

    def serves(self, path: bytes) -> bool:
        """
        Whether C{path} is the portal's.
        """
        return path == self.path or path.startswith(self.path + b"/")

    def listed(self) -> Dict[str, Any]:
        """
        The opted-in APIs, by name, in configuration order.
        """
        return {api.name: api for api in list(self.gateway.apis) if api.config.options.get("portal")}

    def render(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return writeProblem(request, MethodNotAllowed("the portal is read with GET"))
        rest = request.path[len(self.path):].decode("latin-1")
        if rest in ("", "/"):
            return self._file(request, "portal.html", "text/html; charset=utf-8")
        if rest[1:] in FILES:
            return self._file(request, rest[1:], FILES[rest[1:]])
        if rest == "/apis.json":
            return self._json(request, {"apis": [summaryOf(api) for api in self.listed().values()]})
        match = re.match(r"^/apis/([A-Za-z0-9._-]+?)(\.json)?$", rest)
        api = self.listed().get(match.group(1)) if match else None
        if api is None:
            return writeProblem(request, NotFound(f"the portal has no page at {request.path.decode('latin-1')[:200]}"))
        if match is not None and match.group(2):
            document = summaryOf(api)
            document["auth"] = authOf(api)
            document["asyncapi"] = asyncapiDocument(self.gateway, api)
            document["websocketPublish"] = bool(api.config.options.get("websocketPublish", True))
            return self._json(request, document)
        return self._file(request, "portal.html", "text/html; charset=utf-8")

    def _file(self, request: Request, name: str, contentType: str) -> bytes:
        request.setHeader(b"Content-Type", contentType.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-cache")
        with open(os.path.join(STATIC, name), "rb") as f:
            body = f.read()
        # The page names its script and style by absolute path (the same
        # page serves every depth; a <base> is refused by the CSP).  The
        # path is plain characters only (parsePortalKey).
        return body.replace(b"{{portal}}", self.path) if name.endswith(".html") else body

    def _json(self, request: Request, document: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-cache")
        return json.dumps(document, separators=(",", ":")).encode("utf-8")


def portalFor(gateway: Any) -> Optional[PortalResource]:
    """
    The portal of C{gateway}, if its C{[gateway]} has C{portal}.
    """
    path = gateway.settings.options.get("portal")
    return PortalResource(gateway, path) if path else None
