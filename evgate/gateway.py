"""
The gateway's data plane: the twisted.web site that maps an API's path to
its plan chain and entrypoints.

The data plane is a plain L{Resource} with a dictionary lookup on the exact
request path rather than a routing table: every request pays for its
routing, and an API gateway's routes are known exact paths.  (The admin
API, which has real routes, is a Klein app.)  The path is matched as the
client sent it, not normalised, so C{/orders/../admin}, C{//orders} or
C{/orders%2F} are simply unknown paths and no trick reaches an API
without its plans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from evgate.config import ApiConfig, Config
from evgate.entrypoints.cors import applyCors, preflight
from evgate.errors import MethodNotAllowed, NotFound, Problem, Unauthorized
from evgate.hub import Hub
from evgate.interfaces import IConnector, IEntrypoint, IPlan
from evgate.message import cursorTag
from evgate.metrics import tallyFor

# The site, its requests and channel live in evgate.site; imported from
# here by older code.
from evgate.site import GatewayRequest, GatewaySite, _Discard  # noqa: F401

log = Logger()


@dataclass(frozen=True)
class Consumer:
    """
    Who is calling: the result of a plan's authentication.

    @ivar id: a stable identity for limits and logs (C{"anonymous"} for
        keyless callers, else the key id, token subject or certificate).
    @ivar plan: the name of the plan that authenticated the caller.
    @ivar claims: what the credentials say about the caller (JWT claims,
        introspection answer), visible to filters as C{claims}.
    @ivar expiresAt: POSIX seconds when the credentials expire, if they do.
    """

    id: str
    plan: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    expiresAt: Optional[float] = None


@dataclass
class ApiRuntime:
    """
    A loaded API: its definition and the live objects that serve it.
    """

    config: ApiConfig
    connector: IConnector
    hub: Hub
    entrypoints: List[IEntrypoint]
    plans: List[IPlan]
    gateway: Any
    tag: bytes = b""
    # Counts of requests that reached the API but none of its entrypoints
    # (405s, preflights): see evgate.metrics.
    tally: Any = None

    def __post_init__(self) -> None:
        self.tag = cursorTag(self.config.name, self.config.topic)
        self.tally = tallyFor(self, "-")

    @property
    def name(self) -> str:
        """
        The API's name.
        """
        return self.config.name

    def allowedMethods(self) -> List[bytes]:
        """
        The methods this API's entrypoints serve, for 405's C{Allow}.
        """
        methods = []
        for entrypoint in self.entrypoints:
            for method in getattr(entrypoint, "methods", ()):
                if method not in methods:
                    methods.append(method)
        return methods


@dataclass
class ApiCall:
    """
    One authenticated request to one API.
    """

    api: ApiRuntime
    consumer: Consumer


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
    if request.finished or getattr(request, "_disconnected", False):
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
    if failure.check(Problem):
        finishWithProblem(request, failure.value)
        return
    log.failure("unexpected error {context}", failure, context=context)
    finishWithProblem(request, Problem("an internal error occurred; it has been logged"))


class GatewayResource(Resource):
    """
    The root of the data plane: finds the API owning the request path, picks
    its entrypoint, runs its plans, and hands over.
    """

    isLeaf = True

    def __init__(self, apis: Sequence[ApiRuntime] = ()) -> None:
        super().__init__()
        self.byPath: Dict[bytes, ApiRuntime] = {}
        self.setApis(apis)

    def setApis(self, apis: Sequence[ApiRuntime]) -> None:
        """
        Serve C{apis} from now on (used at start and on reload).
        """
        self.byPath = {api.config.path.encode("ascii"): api for api in apis}

    def render(self, request: Request) -> Any:
        api = self.byPath.get(request.path)
        if api is None:
            return writeProblem(request, NotFound(f"no API is served at {request.path.decode('latin-1')}"))
        # What the access log and the request counts need (evgate.logs).
        request.evgateTally = api.tally  # type: ignore[attr-defined]
        # CORS: preflights carry no credentials, so they are answered before
        # the plans; every other answer, errors included, names the origin.
        answer = preflight(request, api)
        if answer is not None:
            return answer
        applyCors(request, api)
        entrypoint = None
        for candidate in api.entrypoints:
            if candidate.accepts(request):
                entrypoint = candidate
                break
        if entrypoint is not None:
            request.evgateTally = entrypoint.tally  # type: ignore[attr-defined]
        if entrypoint is None:
            allowed = api.allowedMethods()
            allow = b", ".join(allowed)
            request.setHeader(b"Allow", allow)
            return writeProblem(request, MethodNotAllowed(
                f"{request.method.decode('latin-1')} is not served by API {api.name}; "
                f"allowed: {allow.decode('ascii') or 'none'}"))
        consumer = admit(api, entrypoint, request, authenticate(api, request))
        if isinstance(consumer, Deferred):
            def authenticated(who: Consumer) -> None:
                request.evgateConsumer = who.id  # type: ignore[attr-defined]
                result = entrypoint.render(request, ApiCall(api, who))
                if result is not NOT_DONE_YET and not request.finished:
                    request.write(result)
                    request.finish()

            consumer.addCallback(authenticated)
            consumer.addErrback(lambda f: finishWithFailure(request, f, "authenticating"))
            return NOT_DONE_YET
        request.evgateConsumer = consumer.id  # type: ignore[attr-defined]
        return entrypoint.render(request, ApiCall(api, consumer))


def admit(api: ApiRuntime, entrypoint: IEntrypoint, request: Request, consumer: Any) -> Any:
    """
    The limits step of the plan chain (see L{evgate.security.limits.admit}).
    """
    from evgate.security.limits import admit as admitWithin

    return admitWithin(api, entrypoint, request, consumer)


def authenticate(api: ApiRuntime, request: Request) -> Any:
    """
    Run the plan chain: the plan whose credentials the request carries
    decides; credentials present but invalid never fall back to another
    plan.

    @return: a L{Consumer} when that is known at once, else a Deferred of
        one (which may fail with a L{Problem}).
    """
    keyless = None
    for plan in api.plans:
        if plan.name == "keyless":
            keyless = plan
            continue
        if plan.present(request):
            return maybeDeferred(plan.authenticate, request)
    if keyless is not None:
        return keyless.authenticate(request)
    challenges = [getattr(p, "challenge", p.name) for p in api.plans]
    d: Deferred = Deferred()
    d.errback(Unauthorized(
        f"API {api.name} needs credentials ({', '.join(p.name for p in api.plans)})",
        headers=[("WWW-Authenticate", ", ".join(challenges))],
    ))
    return d


def queryArgs(request: Request) -> Dict[bytes, List[bytes]]:
    """
    The query parameters of C{request} (never L{None}).
    """
    return request.args or {}


def jsonBody(request: Request, status: int, document: Any) -> bytes:
    """
    Set C{request} up for a JSON response and return its body.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    # Known length: a plain body rather than chunked framing, also when
    # the body is written later (after a broker's acknowledgement).
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    return body


def buildApis(config: Config, connectors: Mapping[str, IConnector], hub: Hub, gateway: Any) -> List[ApiRuntime]:
    """
    The runtimes of every API in C{config}.
    """
    from evgate.entrypoints import buildEntrypoints
    from evgate.security import buildPlans

    apis = []
    for api in config.apis.values():
        runtime = ApiRuntime(api, connectors[api.endpoint], hub, [], [], gateway)
        runtime.entrypoints = buildEntrypoints(runtime)
        runtime.plans = buildPlans(runtime)
        apis.append(runtime)
    return apis
