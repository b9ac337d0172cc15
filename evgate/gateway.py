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
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, cast

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

# Problem answers live in evgate.answers (below the site and the admin API);
# imported from here by older code.
from evgate.answers import clientLeft, finishWithFailure, finishWithProblem, watchDeparture, writeProblem  # noqa: F401
from evgate.config import ApiConfig
from evgate.cors import applyCors, preflight
from evgate.errors import MethodNotAllowed, NotFound, Problem, Unauthorized
from evgate.hub import Hub
from evgate.interfaces import IBodyPipes, IConnector, IEntrypoint, IPlan, ISubtreeEntrypoint, ISynchronousPlan
from evgate.message import cursorTag
from evgate.metrics import tallyFor
from evgate.pipeline import NO_PIPELINE, Pipeline
from evgate.security.consumer import Consumer
from evgate.security.limits import admit

if TYPE_CHECKING:
    from evgate.node import NodeContext

# The site, its requests and channel live in evgate.site; imported from
# here by older code.
from evgate.site import GatewayRequest, GatewaySite, _Discard  # noqa: F401

log = Logger()


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
    node: "NodeContext"
    tag: bytes = b""
    # Counts of requests that reached the API but none of its entrypoints
    # (405s, preflights): see evgate.metrics.
    tally: Any = None
    # The API's transform steps and codecs (evgate.pipeline), built with it.
    pipeline: Pipeline = NO_PIPELINE
    # Those of its plans that answer at once (ISynchronousPlan), each with
    # what it answers with, asked without a Deferred: see synchronousPlans()
    # and GatewayResource.render.
    synchronousPlans: Dict[IPlan, Callable[[Request], Consumer]] = field(default_factory=dict)

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
            for method in entrypoint.methods:
                if method not in methods:
                    methods.append(method)
        return methods


def synchronousPlans(plans: Sequence[IPlan]) -> Dict[IPlan, Callable[[Request], Consumer]]:
    """
    Those of C{plans} that answer at once (L{ISynchronousPlan}), each with
    its C{consumerOf}: the value of L{ApiRuntime.synchronousPlans},
    computed once when the API is built rather than asked of a plan per
    request.
    """
    return {plan: ISynchronousPlan(plan).consumerOf for plan in plans if ISynchronousPlan.providedBy(plan)}


@dataclass
class ApiCall:
    """
    One authenticated request to one API.
    """

    api: ApiRuntime
    consumer: Consumer


@implementer(IBodyPipes)
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
        # The developer portal (evgate.portal), if [gateway] has one: it
        # gets what no API serves (the configuration keeps them apart).
        self.portal: Optional[Any] = None
        self.setApis(apis)

    def setApis(self, apis: Sequence[ApiRuntime]) -> None:
        """
        Serve C{apis} from now on (used at start and on reload).
        """
        self.byPath = {api.config.path.encode("ascii"): api for api in apis}
        self.bySubtree = {api.config.path.encode("ascii"): api for api in apis
                          if any(ISubtreeEntrypoint.providedBy(e) for e in api.entrypoints)}
        # Only the APIs that serve a subtree take bodies as they arrive: the
        # site skips the body pipe lookup when there are none.
        self.streamsBodies = bool(self.bySubtree)

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

    def bodyPipeFor(self, path: bytes) -> Optional[Callable[[Request, Optional[int]], Any]]:
        """
        For the API serving C{path}, if it takes request bodies as they
        arrive (the HTTP proxy), what opens the pipe a request's body goes
        to (see L{evgate.site.GatewayRequest.gotLength}); else L{None}.
        """
        api = self.route(path) if self.bySubtree else None
        if api is None:
            return None
        for entrypoint in api.entrypoints:
            if ISubtreeEntrypoint.providedBy(entrypoint):
                return cast(Callable[[Request, Optional[int]], Any], entrypoint.openBodyPipe)
        return None

    def render(self, request: Request) -> Any:
        api = self.route(request.path)
        if api is None:
            if self.portal is not None and self.portal.serves(request.path):
                return self.portal.render(request)
            return writeProblem(request, NotFound(f"no API is served at {request.path.decode('latin-1')}"))
        # What the access log and the request counts need (evgate.logs).
        request.evgateTally = api.tally  # type: ignore[attr-defined]
        # CORS: preflights carry no credentials, so they are answered before
        # the plans; every other answer, errors included, names the origin.
        answer = preflight(request, api)
        if answer is not None:
            return answer
        applyCors(request, api)
        # Answers may come after the client left (a publish acknowledged
        # late, a long poll): clientLeft tells them.
        watchDeparture(request)
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
        # A plan that knows its answer at once (keyless, ISynchronousPlan)
        # is asked without a Deferred, and so are the local limits: a
        # request they let through is rendered before this returns.  Any
        # other plan, or limits counted in Redis, answer with a Deferred.
        try:
            plan = presentedPlan(api, request)
            consumerOf = api.synchronousPlans.get(plan)
            who: Any = consumerOf(request) if consumerOf is not None else plan.authenticate(request)
        except Problem as problem:
            return writeProblem(request, problem)
        consumer = admit(api, entrypoint, request, who)
        if not isinstance(consumer, Deferred):
            request.evgateConsumer = consumer.id  # type: ignore[attr-defined]
            return entrypoint.render(request, ApiCall(api, consumer))

        def authenticated(who: Consumer) -> None:
            request.evgateConsumer = who.id  # type: ignore[attr-defined]
            result = entrypoint.render(request, ApiCall(api, who))
            if result is not NOT_DONE_YET and not request.finished:
                # As twisted.web does for a body returned from render: a
                # known length rather than chunked framing.
                if not request.responseHeaders.hasHeader(b"content-length"):
                    request.setHeader(b"Content-Length", b"%d" % (len(result),))
                request.write(result)
                request.finish()

        consumer.addCallback(authenticated)
        consumer.addErrback(lambda f: finishWithFailure(request, f, "authenticating"))
        return NOT_DONE_YET


def presentedPlan(api: ApiRuntime, request: Request) -> IPlan:
    """
    The plan of C{api} whose credentials C{request} carries: that one plan
    decides (keyless's "credentials" are none at all).  Credentials present
    but invalid never fall back to another plan.

    @raise Unauthorized: when the request carries credentials of two plans
        at once, or credentials that none of the API's plans takes.
    """
    presented = [plan for plan in api.plans if plan.present(request)]
    if len(presented) == 1:
        return presented[0]
    names = ", ".join(p.name for p in api.plans)
    challenges = [p.challenge for p in api.plans if p.challenge]
    headers = [("WWW-Authenticate", ", ".join(challenges))] if challenges else []
    if presented:
        detail = (f"the request carries credentials of several plans ({', '.join(p.name for p in presented)}); "
                  "send one")
    elif any(p.name == "keyless" for p in api.plans):
        detail = f"API {api.name} does not take the credentials the request carries (plans: {names})"
    else:
        detail = f"API {api.name} needs credentials ({names})"
        if any(p.name == "mtls" for p in api.plans):
            detail += "; for mtls, a client certificate on a TLS connection to an mtls: listener"
    raise Unauthorized(detail, headers=headers)


def authenticate(api: ApiRuntime, request: Request) -> Deferred:
    """
    Run the plan chain (see L{presentedPlan}).

    @return: a Deferred of the L{Consumer}, which may fail with a
        L{Problem}.
    """
    try:
        plan = presentedPlan(api, request)
    except Unauthorized as e:
        return fail(e)
    return plan.authenticate(request)


def queryArgs(request: Request) -> Dict[bytes, List[bytes]]:
    """
    The query parameters of C{request} (never L{None}).
    """
    return request.args or {}


def answerJSON(request: Request, status: int, body: bytes) -> None:
    """
    Answer C{request} with the JSON document C{body}, already encoded.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


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
