"""
Operations routes of the admin API:

    GET  /ready              readiness: every endpoint connected (no token)
    GET  /metrics            Prometheus text (or OpenMetrics when asked)
    GET  /endpoints          every endpoint, its type and connection state
    GET  /apis               every API with live figures
    GET  /apis/<api>         one API: its definition as loaded, live figures
    GET  /apis/<api>/tail    the API's messages as they pass, NDJSON
    POST /reload             read evgate.ini again (see evgate.reload)

(C{GET /health} is in L{evgate.admin.app}; C{GET /apis/<api>/asyncapi} in
L{evgate.admin.asyncapi}; the console page in L{evgate.admin.console}.)
docs/operations.md documents them.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Set

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate.admin.app import AdminApp, Answer, adminRoute
from evgate.answers import clientLeft, watchDeparture
from evgate.errors import BadFilter, EndpointUnavailable, NotFound, Problem
from evgate.filters import FilterSyntaxError, SubscriptionFilter, clientFilterText, compileFilter
from evgate.hub import Event, HubSubscription
from evgate.ini import ConfigError
from evgate.interfaces import ISubscriber
from evgate.message import Cursor
from evgate.metrics import subscriberCount
from evgate.reload import RestartRequired

# Keys of an API section whose values are not shown: secrets and keys.
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential)|(^|[.-])key$", re.IGNORECASE)

# The most content bytes of one message a tail line carries.
TAIL_CONTENT_BYTES = 4096
TAIL_HEARTBEAT = 15.0


class BadConfiguration(Problem):
    """
    The configuration file has a mistake; nothing was applied.
    """

    status = 400
    slug = "bad-configuration"
    title = "Bad configuration"


class RestartNeeded(Problem):
    """
    The configuration file changes what only a restart applies; nothing was
    applied.
    """

    status = 409
    slug = "restart-required"
    title = "Restart required"


@adminRoute("/ready", methods=["GET"], public=True)
def ready(admin: AdminApp, request: Request) -> Any:
    """
    Readiness: 200 when every endpoint is connected and the store is open,
    else a 503 problem naming what is not: C{notConnected} lists the
    endpoints, C{endpoints} maps each to why (its connector's
    C{notConnectedReason}: "authentication failed: ...").  Needs no token, like C{/health}: load
    balancers and orchestrators probe it.
    """
    connectors = admin.gateway.connectors
    down = sorted(name for name, connector in connectors.items() if not connector.connected)
    # Why each is down, when its connector knows (a refused password, an
    # untrusted certificate, a broker that does not answer).
    reasons = {name: connectors[name].notConnectedReason or "not connected" for name in down}
    store = admin.gateway.store
    if store is not None and not store.isOpen:
        # A node whose shared store has not been read up to its end cannot
        # check keys or own subscriptions yet.
        raise EndpointUnavailable(f"not ready: the store {store.description} is still being read",
                                  extra={"notConnected": down, "endpoints": reasons, "storeOpen": False})
    if down:
        extra: Dict[str, Any] = {"notConnected": down, "endpoints": reasons}
        problem = limitsStoreProblem(admin.gateway)
        if problem is not None:
            extra["limitsStore"] = problem
        raise EndpointUnavailable(f"not ready: endpoint{'s' if len(down) > 1 else ''} {', '.join(down)} "
                                  f"{'are' if len(down) > 1 else 'is'} not connected: "
                                  + "; ".join(f"{name}: {reasons[name]}" for name in down),
                                  extra=extra)
    answer: Dict[str, Any] = {"status": "ready", "endpoints": len(admin.gateway.connectors)}
    # A shared limits store that cannot be used does not make the node
    # unready: it counts on its own meanwhile (evgate.security.limits).
    problem = limitsStoreProblem(admin.gateway)
    if problem is not None:
        answer["limitsStore"] = problem
    return answer


def limitsStoreProblem(gateway: Any) -> Optional[str]:
    """
    Why the shared limits store (Redis) cannot be used, or L{None}.
    """
    shared = gateway.limits.shared
    return shared.problem if shared is not None else None


@adminRoute("/metrics", methods=["GET"])
def metrics(admin: AdminApp, request: Request) -> Answer:
    """
    The node's metrics in the Prometheus text format (OpenMetrics when the
    Accept header asks for it).
    """
    accept = request.getHeader(b"accept")
    body, contentType = admin.gateway.metrics.exposition(accept.decode("latin-1") if accept else None)
    return Answer(200, body, [("Content-Type", contentType)])


@adminRoute("/endpoints", methods=["GET"])
def endpoints(admin: AdminApp, request: Request) -> Dict[str, Any]:
    """
    Every endpoint: type, connection state, and the APIs on it.
    """
    gateway = admin.gateway
    items = []
    for name, connector in sorted(gateway.connectors.items()):
        items.append({
            "name": name,
            "type": connector.kind,
            "connected": bool(connector.connected),
            "apis": [api.name for api in gateway.apis if api.config.endpoint == name],
        })
    return {"items": items}


def definition(gateway: Any, api: Any) -> Dict[str, str]:
    """
    The API's section as loaded, with secret values hidden.
    """
    section: Mapping[str, str] = gateway.config.sections.get(f"api:{api.name}", {})
    return {key: ("(hidden)" if _SECRET_KEY.search(key) else value) for key, value in section.items()}


def liveFigures(gateway: Any, api: Any) -> Dict[str, Any]:
    """
    What API C{api} is doing: subscribers per entrypoint, totals, requests
    by status, recent rates.
    """
    subscribers: Dict[str, int] = {}
    requests: Dict[str, int] = {}
    for entrypoint in api.entrypoints:
        count = subscriberCount(gateway, api, entrypoint)
        if count is not None:
            subscribers[entrypoint.name] = count
    for (name, _), tally in list(gateway.metrics.allTallies().items()):
        if name == api.name:
            for code, count in tally.codes.items():
                requests[str(code)] = requests.get(str(code), 0) + count
    figures: Dict[str, Any] = {"subscribers": subscribers, "requests": requests}
    figures.update(gateway.metrics.totals(api.name))
    figures["rates"] = gateway.rates.rates(api.name)
    return figures


def apiView(gateway: Any, api: Any) -> Dict[str, Any]:
    """
    The admin API's view of one API.
    """
    config = api.config
    connector = api.connector
    return {
        "name": config.name,
        "path": config.path,
        "endpoint": config.endpoint,
        "endpointType": connector.kind,
        "endpointConnected": bool(connector.connected),
        "topic": config.topic,
        "entrypoints": list(config.entrypoints),
        "plans": list(config.plans),
        "start": config.start,
        "live": liveFigures(gateway, api),
    }


def runtimeOf(admin: AdminApp, api: str) -> Any:
    """
    The runtime of API C{api}.

    @raise NotFound: if there is none.
    """
    runtime = admin.gateway.api(api)
    if runtime is None:
        raise NotFound(f"there is no API named {api}")
    return runtime


@adminRoute("/apis", methods=["GET"])
def listApis(admin: AdminApp, request: Request) -> Dict[str, Any]:
    """
    Every API, with live figures.
    """
    gateway = admin.gateway
    return {"items": [apiView(gateway, api) for api in gateway.apis]}


@adminRoute("/apis/<api>", methods=["GET"])
def getApi(admin: AdminApp, request: Request, api: str) -> Dict[str, Any]:
    """
    One API: its definition as loaded (secrets hidden) and live figures.
    """
    runtime = runtimeOf(admin, api)
    view = apiView(admin.gateway, runtime)
    view["definition"] = definition(admin.gateway, runtime)
    return view


@adminRoute("/reload", methods=["POST"])
def reload(admin: AdminApp, request: Request) -> Deferred:
    """
    Read the configuration file again and apply it (see
    L{evgate.reload}): 200 with what changed; 400 naming the file, section
    and key of a mistake; 409 when only a restart can apply the change.
    Either error leaves the running configuration as it was.
    """
    d = admin.gateway.reloader.reload()

    def applied(plan: Any) -> Dict[str, Any]:
        if plan.empty:
            return {"applied": True, "detail": "no change"}
        return plan.summary()  # type: ignore[no-any-return]

    def refused(failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ConfigError):
            raise BadConfiguration(str(error), extra={"file": error.path, "section": error.section,
                                                      "key": error.key, "applied": False})
        if isinstance(error, RestartRequired):
            raise RestartNeeded(str(error), extra={"restartRequired": error.reasons,
                                                           "applied": False})
        failure.raiseException()

    d.addCallbacks(applied, refused)
    return d


@adminRoute("/apis/<api>/tail", methods=["GET"])
def tail(admin: AdminApp, request: Request, api: str) -> Resource:
    """
    The messages of API C{api} as they pass, one JSON document per line
    (C{application/x-ndjson}), from now on: for the console's live tail.
    C{?filter=} is a filter expression, as subscribers give it
    (docs/filters.md); the API's own C{filter} is not applied, so that the
    console sees every message unless asked.
    """
    runtime = runtimeOf(admin, api)
    return TailResource(tailsOf(admin.gateway), runtime, tailFilter(request))


def tailFilter(request: Request) -> Optional[SubscriptionFilter]:
    """
    The filter of a tail: its C{filter} query parameter, compiled.

    @raise BadFilter: if it does not compile; the problem says where.
    """
    text = clientFilterText(request)
    if text is None:
        return None
    try:
        program = compileFilter(text)
    except FilterSyntaxError as e:
        raise BadFilter(f"the filter query parameter is not a valid filter: {e}",
                        extra={"line": e.line, "column": e.column}) from None
    return SubscriptionFilter(None, program, {})


class Tails(Service):
    """
    The open tails of one node; they end when it stops.
    """

    def __init__(self) -> None:
        self.live: Set["TailSubscriber"] = set()

    def stopService(self) -> Any:
        super().stopService()
        for subscriber in list(self.live):
            subscriber.finish({"end": "the gateway is stopping"})
        return None


def tailsOf(gateway: Any) -> Tails:
    """
    The node's L{Tails} (the service makes them with the admin API).
    """
    tails = gateway.tails
    assert tails is not None, "the admin API runs without its tails"
    return tails  # type: ignore[no-any-return]


class TailResource(Resource):
    """
    The response of one tail.
    """

    isLeaf = True

    def __init__(self, tails: Tails, api: Any, filter: Optional[SubscriptionFilter] = None) -> None:
        super().__init__()
        self.tails = tails
        self.api = api
        self.filter = filter

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        request.setHeader(b"X-Accel-Buffering", b"no")
        watchDeparture(request)
        TailSubscriber(self.tails, self.api, request, self.filter).subscribe()
        return NOT_DONE_YET


@implementer(ISubscriber)
class TailSubscriber:
    """
    One tail: a hub subscriber that writes each message as a JSON line.

    A tail is for people watching; it must never slow the API down.  It
    does not pause the hub: while its transport pushes back it skips
    messages, and says how many when it writes again.
    """

    log = Logger()

    def __init__(self, tails: Tails, api: Any, request: Request, filter: Optional[SubscriptionFilter] = None) -> None:
        self.filter = filter
        self.tails = tails
        self.api = api
        self.request = request
        self.reactor = api.node.reactor
        self.subscription: Optional[HubSubscription] = None
        self.paused = False
        self.skipped = 0
        self.done = False
        self.heartbeat: Any = None

    def subscribe(self) -> None:
        """
        Attach to the hub at the live head.
        """
        api = self.api
        self.tails.live.add(self)
        self.request.notifyFinish().addBoth(self._gone)
        self.request.registerProducer(self, True)
        self.subscription = api.hub.subscribe(api.config.endpoint, api.config.topic, "latest", self,
                                           self.filter)
        self.heartbeat = self.reactor.callLater(TAIL_HEARTBEAT, self._beat)

    def _gone(self, result: Any) -> None:
        self._end()

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self.tails.live.discard(self)
        if self.heartbeat is not None and self.heartbeat.active():
            self.heartbeat.cancel()
        if self.subscription is not None:
            self.subscription.close()

    def _write(self, lines: List[Dict[str, Any]]) -> None:
        if self.done or self.paused:
            return
        if self.skipped:
            lines = [{"skipped": self.skipped}] + lines
            self.skipped = 0
        self.request.write(b"".join(json.dumps(line, separators=(",", ":")).encode("utf-8") + b"\n"
                                    for line in lines))

    def _beat(self) -> None:
        # An empty line now and then: proxies and the client see the
        # stream alive, and a dead connection is noticed.
        if not self.done:
            if not self.paused:
                self.request.write(b"\n")
            self.heartbeat = self.reactor.callLater(TAIL_HEARTBEAT, self._beat)

    def finish(self, last: Dict[str, Any]) -> None:
        """
        Write C{last} and end the response.
        """
        if self.done:
            return
        request = self.request
        self._end()
        if not clientLeft(request):
            request.write(json.dumps(last).encode("utf-8") + b"\n")
            request.unregisterProducer()
            request.finish()

    # ISubscriber

    def started(self, cursor: Cursor) -> None:
        self._write([{"subscribed": {"api": self.api.name, "cursor": cursor.encode(self.api.tag)}}])

    def deliver(self, events: List[Event]) -> None:
        if self.done:
            return
        if self.paused:
            self.skipped += len(events)
            return
        self._write([tailLine(event, self.api.tag) for event in events])

    def gap(self, cursor: Cursor, reason: str) -> None:
        self._write([{"gap": {"detail": reason, "cursor": cursor.encode(self.api.tag)}}])

    def advanced(self, cursor: Cursor) -> None:
        pass

    def failed(self, reason: Failure) -> None:
        self.finish({"end": f"the upstream subscription failed: {reason.getErrorMessage()}"})

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self._end()


def tailLine(event: Event, tag: bytes) -> Dict[str, Any]:
    """
    The tail's line of one message: its id, key, headers, metadata and up
    to L{TAIL_CONTENT_BYTES} of its content (text, or base64).
    """
    message = event.message
    line: Dict[str, Any] = {
        "id": event.token(tag),
        "key": message.key,
        "headers": dict(message.headers),
        "metadata": message.metadata(),
        "size": len(message.content),
    }
    try:
        line["content"] = message.content.decode("utf-8")[:TAIL_CONTENT_BYTES]
    except UnicodeDecodeError:
        line["content"] = base64.b64encode(message.content[:TAIL_CONTENT_BYTES]).decode("ascii")
        line["encoding"] = "base64"
    if len(message.content) > TAIL_CONTENT_BYTES:
        line["truncated"] = True
    return line
