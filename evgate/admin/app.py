"""
The admin API: a Klein app on a listener of its own.

Configuration (C{[gateway]}): C{admin} is a server endpoint string (a TCP
listener without C{interface=} binds to loopback: C{tcp:8081} means
C{tcp:8081:interface=127.0.0.1}); no C{admin} (or C{admin = none}) means no
admin listener.  With C{admin} set, a token is required: C{admin-token}, or
C{admin-token-file} (a file holding it; relative to the configuration
file).  Every request but C{GET /health} carries
C{Authorization: Bearer <token>}; the token is compared in constant time.

Adding routes (how feature modules extend the API)
==================================================

A feature module registers its routes with L{adminRoute} when it is
imported, and is listed in L{ADMIN_MODULES} so that the app imports it::

    # evgate/admin/keys.py
    from evgate.admin.app import AdminApp, Answer, adminRoute, readJson

    @adminRoute("/apis/<api>/keys", methods=["POST"])
    def createKey(admin: AdminApp, request, api: str):
        document = readJson(request)
        ...                      # may return a Deferred
        return Answer(201, {...})

 - the handler gets the L{AdminApp} (C{admin.gateway} is the
   L{evgate.service.GatewayService}: its APIs, connectors, C{store},
   C{webhooks}), the request and the URL's variables (Werkzeug rules:
   C{<name>} matches one path segment);
 - it returns (or a Deferred fires with) a JSON-able value (200), an
   L{Answer} (status, document, headers), or L{None} (204);
 - it raises (or fails with) an L{evgate.errors.Problem} for a 4xx/5xx:
   the client gets C{application/problem+json}; anything else is a logged
   500;
 - every route needs the token, unless registered with C{public=True}
   (for an exact path without variables, like C{/health}).  The token is
   checked by L{AdminResource} before Klein routes the request, so a
   route cannot forget it, and an unknown path without a token is a 401,
   not a 404: the API's shape is not shown to strangers.

Routes (docs/admin-api.md documents each, with examples):

 - public: C{GET /health} (here), C{GET /ready} (L{evgate.admin.ops}), the
   console's files C{GET /}, C{/console.js}, C{/console.css},
   C{/charts.js}, C{/deadletters.js} (L{evgate.admin.console});
 - L{evgate.admin.ops}: C{GET /metrics}, C{GET /endpoints}, C{GET /apis},
   C{GET /apis/<api>}, C{GET /apis/<api>/tail}, C{POST /reload};
 - L{evgate.admin.reloadplan}: C{GET /reload/plan};
 - L{evgate.admin.samples}: C{GET /metrics/history};
 - L{evgate.admin.asyncapi}: C{GET /apis/<api>/asyncapi};
 - L{evgate.admin.messages}: C{POST /apis/<api>/messages};
 - L{evgate.admin.keys}: C{POST|GET /apis/<api>/keys},
   C{GET|PATCH|DELETE /apis/<api>/keys/<keyId>};
 - L{evgate.admin.subscriptions}: C{POST|GET /apis/<api>/subscriptions},
   C{GET|DELETE /apis/<api>/subscriptions/<id>}, C{POST .../<id>/pause},
   C{POST .../<id>/resume};
 - L{evgate.admin.replay}: C{POST /apis/<api>/subscriptions/<id>/replay};
 - L{evgate.admin.deadletters}: C{GET .../<id>/dead-letters},
   C{POST .../<id>/dead-letters/redeliver}.
"""

from __future__ import annotations

import hmac
import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Set, Tuple

from klein import Klein
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from evgate.answers import writeProblem
from evgate.errors import BadRequest, MethodNotAllowed, NotFound, Problem, Unauthorized, UnsupportedMediaType
from evgate.ini import SectionReader, gatewayKeys
from evgate.jsonlimits import loads as jsonLoads
from evgate.secrets import readSecretText

# The site (and with it its [gateway] keys: this module is one of those
# parseConfig imports, see evgate.config.EXTENSION_MODULES).
from evgate.site import GatewaySite, connectionLimits

# Feature modules whose routes the admin app serves; each registers them
# with adminRoute when imported.
ADMIN_MODULES: Tuple[str, ...] = (
    "evgate.admin.subscriptions",
    "evgate.admin.keys",
    "evgate.admin.ops",
    "evgate.admin.asyncapi",
    "evgate.admin.console",
    "evgate.admin.samples",
    "evgate.admin.replay",
    "evgate.admin.deadletters",
    "evgate.admin.messages",
    "evgate.admin.reloadplan",
)

# The largest request body the admin API reads.
MAX_BODY_BYTES = 65536

MIN_TOKEN_LENGTH = 16

log = Logger()


@dataclass(frozen=True)
class AdminSettings:
    """
    The C{admin*} keys of C{[gateway]}.

    @ivar listen: the server endpoint string, loopback made explicit.
    @ivar token: the bearer token, UTF-8.
    """

    listen: str
    token: bytes = field(repr=False)


def loopbackByDefault(description: str) -> str:
    """
    C{description} with C{interface=} added to a TCP or SSL listener that
    lacks one: C{127.0.0.1}, or C{::1} for C{tcp6}.  A bare port number is
    a TCP port.
    """
    if description.isdigit():
        description = f"tcp:{description}"
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "ssl", "tcp6") and not re.search(r"(^|:)interface=", description):
        loopback = "\\:\\:1" if kind == "tcp6" else "127.0.0.1"
        description = f"{description}:interface={loopback}"
    return description


@gatewayKeys
def parseAdminKeys(section: SectionReader) -> Mapping[str, Any]:
    """
    C{admin}, C{admin-token} and C{admin-token-file}, as L{AdminSettings}
    (or L{None}) under C{options["admin"]}.
    """
    listen = section.get("admin", None)
    token = section.get("admin-token", None)
    tokenFile = section.get("admin-token-file", None)
    if listen is None or listen.lower() == "none":
        for key, value in (("admin-token", token), ("admin-token-file", tokenFile)):
            if value is not None:
                raise section.error(key, "is only used with admin = <endpoint>, which is not set")
        return {"admin": None}
    if token is not None and tokenFile is not None:
        raise section.error("admin-token-file", "set admin-token or admin-token-file, not both")
    if token is None and tokenFile is None:
        raise section.error("admin", "the admin API needs a token: set admin-token or admin-token-file "
                            "(for example: openssl rand -base64 32 > admin.token)")
    key = "admin-token"
    if tokenFile is not None:
        key = "admin-token-file"
        token = readSecretText(section, key)
    assert token is not None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise section.error(key, f"the token must be at least {MIN_TOKEN_LENGTH} characters without spaces")
    description = loopbackByDefault(listen)
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parser raises many kinds; all mean a bad string
        raise section.error("admin", f"bad endpoint {listen!r}: {e}") from None
    return {"admin": AdminSettings(description, token.encode("utf-8"))}


@dataclass
class Answer:
    """
    A route's answer other than a plain 200: a status, a JSON document (or
    L{None} for no body, or C{bytes} for a body in another format, whose
    C{Content-Type} is then in C{headers}) and extra headers.  A route may
    also return an C{IResource} (a stream), which renders itself.
    """

    status: int
    document: Any = None
    headers: Sequence[Tuple[str, str]] = ()


class AdminApp:
    """
    The admin API of one gateway node.  Routes are registered on the class
    (L{adminRoute}); an instance binds them to its gateway.
    """

    routes = Klein()
    public: Set[str] = set()
    log = Logger()

    def __init__(self, gateway: Any, token: bytes) -> None:
        self.gateway = gateway
        self.token = token
        loadAdminModules()

    def resource(self) -> Resource:
        """
        The resource to serve: the token check in front of the routes.
        """
        return AdminResource(self, self.routes.resource())

    @routes.handle_errors(HTTPException)
    def routingError(self, request: IRequest, failure: Failure) -> bytes:
        """
        Werkzeug's routing errors (no such route, wrong method) as problem
        documents.
        """
        assert isinstance(request, Request)
        code = getattr(failure.value, "code", 404)
        if code == 405:
            allowed = getattr(failure.value, "valid_methods", None) or []
            return _problemBody(request, MethodNotAllowed(
                f"{request.method.decode('latin-1')} is not served here; allowed: {', '.join(allowed)}",
                headers=[("Allow", ", ".join(allowed))]))
        return _problemBody(request, NotFound(f"no admin route at {request.path.decode('latin-1')[:200]}"))

    def authorized(self, request: Request) -> bool:
        """
        Whether C{request} carries the admin token.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return False
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self.token)


def loadAdminModules() -> None:
    """
    Import the feature modules of L{ADMIN_MODULES} (once).
    """
    for name in ADMIN_MODULES:
        importlib.import_module(name)


class AdminResource(Resource):
    """
    The root of the admin listener: refuses requests without the token
    (except to public paths), then hands them to Klein.
    """

    isLeaf = True

    def __init__(self, app: AdminApp, routes: Resource) -> None:
        super().__init__()
        self.app = app
        self.routes = routes

    def render(self, request: Request) -> Any:
        request.setHeader(b"Cache-Control", b"no-store")
        path = request.path.decode("latin-1")
        if path not in AdminApp.public and not self.app.authorized(request):
            peer = request.getClientAddress()
            self.app.log.info("admin: refused {method} {path} from {peer}: no valid token",
                              method=request.method.decode("latin-1"), path=path[:200],
                              peer=getattr(peer, "host", str(peer)))
            return _problemBody(request, Unauthorized(
                "the admin API needs Authorization: Bearer <admin token>",
                headers=[("WWW-Authenticate", 'Bearer realm="evgate admin"')]))
        return self.routes.render(request)


def _problemBody(request: Request, problem: Problem) -> bytes:
    return writeProblem(request, problem)


def _render(request: Request, result: Any) -> Any:
    if IResource.providedBy(result):
        # A response that renders itself (a stream): Klein renders it.
        return result
    if isinstance(result, Answer):
        answer = result
    elif result is None:
        answer = Answer(204)
    else:
        answer = Answer(200, result)
    request.setResponseCode(answer.status)
    for name, value in answer.headers:
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    if answer.document is None or answer.status == 204:
        return b""
    if isinstance(answer.document, bytes):
        # A body in a format of its own; its Content-Type is in headers.
        return answer.document
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(answer.document, indent=None, separators=(",", ":")).encode("utf-8")


def _renderFailure(request: Request, failure: Failure, where: str) -> bytes:
    if isinstance(failure.value, Problem):
        return _problemBody(request, failure.value)
    log.failure("admin: unexpected error in {where}", failure, where=where)
    return _problemBody(request, Problem("an internal error occurred; it has been logged"))


Handler = Callable[..., Any]


def adminRoute(path: str, methods: List[str], public: bool = False) -> Callable[[Handler], Handler]:
    """
    Register the decorated function as the handler of C{methods} on
    C{path} (a Werkzeug rule); see the module docstring.

    @param public: serve it without the token (exact paths only).
    """
    def register(f: Handler) -> Handler:
        where = f"{f.__module__}.{f.__qualname__}"
        if public:
            if "<" in path:
                raise ValueError(f"public admin route {path} must be an exact path")
            AdminApp.public.add(path)

        def handle(admin: AdminApp, request: Request, **kwargs: Any) -> Any:
            d = maybeDeferred(f, admin, request, **kwargs)
            d.addCallbacks(lambda result: _render(request, result),
                           lambda failure: _renderFailure(request, failure, where))
            return d

        handle.__name__ = f.__name__
        handle.__qualname__ = f.__qualname__
        # Endpoint names must be unique across modules: Klein keys handlers
        # by them, and a clash would silently replace a route.
        AdminApp.routes.route(path, methods=methods, endpoint=where)(handle)
        return f

    return register


def readJson(request: Request) -> Any:
    """
    The JSON document of C{request}'s body.

    @raise UnsupportedMediaType: if the body is declared as something other
        than JSON.
    @raise BadRequest: if it is too large, empty or not JSON.
    """
    contentType = request.getHeader(b"content-type")
    if contentType is not None:
        media = contentType.split(b";", 1)[0].strip().lower()
        if media != b"application/json" and not media.endswith(b"+json"):
            raise UnsupportedMediaType("the admin API takes application/json bodies")
    body = request.content.read(MAX_BODY_BYTES + 1) if request.content is not None else b""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise BadRequest("the body must be a JSON document")
    try:
        return jsonLoads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        # JsonTooDeep included: its message names the limit.
        raise BadRequest(f"the body is not JSON: {e}") from None


@adminRoute("/health", methods=["GET"], public=True)
def health(admin: AdminApp, request: Request) -> Dict[str, Any]:
    """
    Liveness: the process serves requests.  Needs no token, and says
    nothing more.
    """
    return {"status": "ok"}


def adminSite(app: AdminApp, reactor: Any) -> Any:
    """
    The site of the admin listener: bodies over L{MAX_BODY_BYTES} are
    refused before they are read, and the connection limits of
    C{[gateway]} (L{evgate.site.ConnectionLimits}) apply as on the data
    plane.
    """
    settings = getattr(getattr(app, "gateway", None), "settings", None)
    limits = connectionLimits(getattr(settings, "options", None))
    return GatewaySite(app.resource(), MAX_BODY_BYTES, False, reactor=reactor, limits=limits)
