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

An API whose entrypoint serves its path's subtree (the HTTP proxy,
L{evgate.proxy}) is also found by prefix, only when the exact lookup
misses and only on whole segments as sent: C{/billing} owns
C{/billing/x}, not C{/billingx}, C{//billing/x} or C{/billing%2Fx}.  What
lies under the prefix is the proxy's to check (a dot segment, raw or
encoded, is refused there, so that no upstream normalisation climbs out
of the prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from evgate.config import ApiConfig, Config
from evgate.entrypoints.cors import applyCors, preflight
from evgate.errors import MethodNotAllowed, NotFound, PayloadTooLarge, Problem, Unauthorized
from evgate.hub import Hub
from evgate.interfaces import IConnector, IEntrypoint, IPlan
from evgate.message import cursorTag
from evgate.metrics import tallyFor

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


class GatewayRequest(Request):
    """
    A request that refuses a body bigger than the site's limit as soon as it
    knows, without reading or buffering the rest of it.
    """

    _received = 0
    _refused = False
    # What the access log and the request counts read (evgate.logs): set
    # by the gateway resource and the entrypoints as the request goes.
    evgateStarted: Optional[float] = None
    evgateTally: Any = None
    evgateConsumer: Optional[str] = None
    evgateStream: Any = None
    evgateMessages: Optional[int] = None
    # The body of a request processed while it arrives (L{_streamBody}).
    _streamedBody: Any = None
    _streamStarted = False

    def _limit(self) -> int:
        return getattr(getattr(self.channel, "site", None), "maxBodyBytes", 1 << 62) if self.channel else 1 << 62

    def gotLength(self, length: Optional[int]) -> None:
        if length != 0 and self._streamBody(length):
            return
        if length is not None and length > self._limit():
            self.content = _Discard()  # type: ignore[assignment]
            self._refuse()
            return
        super().gotLength(length)

    def _streamBody(self, length: Optional[int]) -> bool:
        # An API that takes request bodies as they arrive (the HTTP proxy,
        # whose module evgate.proxy._forward explains the design) gets the
        # request now, with a pipe for its body instead of a file; the end
        # of the body comes to requestReceived.  Its size is the
        # upstream's business, not max-message-bytes.
        channel = self.channel
        resource = getattr(getattr(channel, "site", None), "resource", None)
        streams = getattr(resource, "streamsBody", None)
        if channel is None or streams is None or not streams(channel._path.split(b"?", 1)[0]):
            return False
        from evgate.proxy._forward import RequestBodyPipe

        self.content = self._streamedBody = RequestBodyPipe(self, length)  # type: ignore[assignment]
        self.requestReceived(channel._command, channel._path, channel._version)
        if self.finished:
            # Refused before the body (credentials, limits): no
            # "100 Continue" invites it.
            self.requestHeaders.removeHeader(b"expect")
        return True

    def handleContentChunk(self, data: bytes) -> None:
        if self._streamedBody is not None:
            self._streamedBody.write(data)
            return
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if self._streamedBody is not None:
            if self._streamStarted:
                # The channel's end of the body, for a request processed
                # since its headers.
                self._streamedBody.bodyEnded()
                return
            self._streamStarted = True
        # For the access log's duration; one clock read per request.
        site = getattr(self.channel, "site", None)
        if site is not None:
            self.evgateStarted = site.reactor.seconds()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        # A request whose client left before it was finished (a stream the
        # client closed, a long poll given up) is never finished: this is
        # where it ends for the access log and the request counts.
        site = getattr(self, "site", None)
        super().connectionLost(reason)
        if not self.finished and site is not None and getattr(site, "requestLog", None) is not None:
            site.requestLog.requestEnded(self, lost=True)

    def write(self, data: bytes) -> None:
        body = self._streamedBody
        if body is not None and not self.startedWriting and not body.ended and self.channel is not None:
            # Answered before the whole body came: the connection ends with
            # this response, as the rest of the body may never be read.
            self.setHeader(b"Connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        body = self._streamedBody
        if body is not None and not body.ended and self.channel is not None:
            # What is left of the body in this read is not a next request.
            self.channel.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        super().finish()

    def _refuse(self) -> None:
        self._refused = True
        # The request line and headers are known at this point; answering
        # needs them for the HTTP version and keep-alive decision.
        self.method = getattr(self.channel, "_command", b"POST")
        self.uri = getattr(self.channel, "_path", b"/")
        self.path = self.uri.split(b"?", 1)[0]
        self.clientproto = getattr(self.channel, "_version", b"HTTP/1.1")
        problem = PayloadTooLarge(f"the message is larger than max-message-bytes ({self._limit()} bytes)")
        self.setHeader(b"Connection", b"close")
        body = writeProblem(self, problem)
        self.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        channel = self.channel
        self.write(body)
        self.finish()
        # The rest of the body is still on its way: close rather than read it.
        if channel is not None:
            channel.loseConnection()


class _Discard:
    """
    A body sink for a refused request.
    """

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
        pass

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class GatewaySite(Site):
    """
    The gateway's site: L{GatewayRequest}s, counted and logged by its
    L{evgate.logs.RequestLog} (the data plane's; the admin site has none).
    """

    requestFactory = GatewayRequest

    def __init__(self, resource: Resource, maxBodyBytes: int, accessLog: bool = False,
                 requestLog: Any = None, metrics: Any = None, **kwargs: Any) -> None:
        # Credentials in query strings stay out of twisted.web's own
        # formatter, should anything use it.
        from evgate.security import redactedLogFormatter

        kwargs.setdefault("logFormatter", redactedLogFormatter)
        # A message body is the message, never a form: not parsing it saves
        # a MIME header parse per POST (a quarter of the publish path) and
        # keeps a form-encoded body's fields out of the query parameters
        # (a body "key=x" must not set the message key).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.maxBodyBytes = maxBodyBytes
        if requestLog is None and accessLog:
            from evgate.logs import RequestLog

            requestLog = RequestLog(True)
        self.requestLog = requestLog
        self.metrics = metrics

    def log(self, request: Any) -> None:
        # evgate's own line (evgate.logs), not twisted.web's combined log:
        # it names the API and consumer, and costs little when off.
        if self.requestLog is not None:
            self.requestLog.requestEnded(request)


class GatewayResource(Resource):
    """
    The root of the data plane: finds the API owning the request path, picks
    its entrypoint, runs its plans, and hands over.
    """

    isLeaf = True

    def __init__(self, apis: Sequence[ApiRuntime] = ()) -> None:
        super().__init__()
        self.byPath: Dict[bytes, ApiRuntime] = {}
        self.bySubtree: Dict[bytes, ApiRuntime] = {}
        self.setApis(apis)

    def setApis(self, apis: Sequence[ApiRuntime]) -> None:
        """
        Serve C{apis} from now on (used at start and on reload).
        """
        self.byPath = {api.config.path.encode("ascii"): api for api in apis}
        self.bySubtree = {api.config.path.encode("ascii"): api for api in apis
                          if any(getattr(e, "servesSubtree", False) for e in api.entrypoints)}

    def route(self, path: bytes) -> Optional[ApiRuntime]:
        """
        The API serving C{path}: by its exact path, else, for APIs that
        serve their subtree, by the longest whole-segment prefix (see the
        module docstring).
        """
        api = self.byPath.get(path)
        if api is not None or not self.bySubtree:
            return api
        end = len(path)
        while True:
            end = path.rfind(b"/", 0, end)
            if end <= 0:
                return None
            api = self.bySubtree.get(path[:end])
            if api is not None:
                return api

    def streamsBody(self, path: bytes) -> bool:
        """
        Whether the API serving C{path} takes request bodies as they
        arrive (see L{GatewayRequest.gotLength}).
        """
        api = self.route(path) if self.bySubtree else None
        return api is not None and any(getattr(e, "streamsRequestBody", False) for e in api.entrypoints)

    def render(self, request: Request) -> Any:
        api = self.route(request.path)
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
