"""
The last hour of a node's figures, for the console's charts:
C{GET /metrics/history}.

A L{MetricsHistory} samples the node every L{INTERVAL} seconds into one
ring buffer of L{POINTS} points per series (an hour at 5 s), in memory.  It
reads what a Prometheus scrape reads (the tallies, summed with the worker
processes' last reports; the live subscribers; the webhook deliverers'
positions), so the data plane does no work for it, and it needs no
Prometheus server: a node's console can show the last hour on its own.

Series (C{kind}, labels, unit):

 - C{messagesIn}, C{messagesOut} (C{api}): messages per second over the
   interval (webhook deliveries count as out);
 - C{publishLatency} (C{api}, C{stat} = C{mean} or C{p95}): seconds from
   handing a message to the endpoint to its acknowledgement, over the
   messages published in the interval (p95 is the upper bound of the
   latency bucket it falls in);
 - C{subscribers} (C{api}, C{entrypoint}): live subscribers at the sample;
 - C{consumerLag} (C{api}, C{subscription}): messages between the
   endpoint's head and a webhook subscription's position (for Kafka, its
   consumer group's), where the endpoint knows its head;
 - C{errors} (C{api}, C{type}): per second over the interval, by type:
   C{4xx} and C{5xx} answers, C{webhook-failed} attempts, C{dead-letter}
   messages, C{dropped} messages of streams cut for being too slow.

A counter that goes backwards (an API removed and added again by reloads,
a worker restarted) counts as no traffic for that interval, never as a
negative rate.
"""

from __future__ import annotations

import datetime
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request

from evgate.admin.app import AdminApp, adminRoute
from evgate.errors import BadRequest
from evgate.metrics import LATENCY_BUCKETS, UNROUTED, headOffsets, lagOf, subscriberCount

if TYPE_CHECKING:
    from evgate.node import NodeContext

INTERVAL = 5.0
POINTS = 720

KINDS: Dict[str, str] = {
    "messagesIn": "messages/s",
    "messagesOut": "messages/s",
    "publishLatency": "seconds",
    "subscribers": "subscribers",
    "consumerLag": "messages",
    "errors": "errors/s",
}

SeriesKey = Tuple[str, Tuple[Tuple[str, str], ...]]


class Series:
    """
    One series: its kind, labels, and a ring buffer of C{(time, value)}.
    """

    __slots__ = ("kind", "labels", "points")

    def __init__(self, kind: str, labels: Tuple[Tuple[str, str], ...], size: int) -> None:
        self.kind = kind
        self.labels = labels
        self.points: Deque[Tuple[float, float]] = deque(maxlen=size)

    def since(self, moment: Optional[float]) -> List[Tuple[float, float]]:
        """
        The points taken after C{moment} (all of them for L{None}).
        """
        if moment is None:
            return list(self.points)
        return [point for point in self.points if point[0] > moment]


class MetricsHistory(Service):
    """
    Samples a node every C{interval} seconds into ring buffers of C{size}
    points (see the module docstring).
    """

    log = Logger()

    def __init__(self, node: "NodeContext", reactor: Any, interval: float = INTERVAL, size: int = POINTS) -> None:
        self.node = node
        self.reactor = reactor
        self.interval = interval
        self.size = size
        self.series: Dict[SeriesKey, Series] = {}
        self.loop: Optional[LoopingCall] = None
        # The counters at the previous sample, to turn them into rates.
        self._last: Optional[Tuple[float, Dict[str, Any]]] = None

    def startService(self) -> None:
        super().startService()
        self.loop = LoopingCall(self.sample)
        self.loop.clock = self.reactor
        self.loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("metrics history: the sampler stopped", f))

    def stopService(self) -> Any:
        super().stopService()
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        return None

    # -- sampling

    def _counters(self) -> Dict[str, Any]:
        node = self.node
        metrics = node.metrics
        perApi: Dict[str, Dict[str, Any]] = {}
        for (api, _), tally in list(metrics.allTallies().items()):
            if api == UNROUTED:
                continue
            figures = perApi.setdefault(api, {"in": 0, "out": 0, "latencySum": 0.0, "latencyCount": 0,
                                              "latency": [0] * (len(LATENCY_BUCKETS) + 1),
                                              "4xx": 0, "5xx": 0, "dropped": 0})
            figures["in"] += tally.messagesIn
            figures["out"] += tally.messagesOut
            figures["latencySum"] += tally.latencySum
            figures["latencyCount"] += tally.latencyCount
            figures["latency"] = [a + b for a, b in zip(figures["latency"], tally.latency, strict=True)]
            figures["dropped"] += tally.dropped
            for code, count in tally.codes.items():
                if 400 <= code < 500 and code != 499:
                    figures["4xx"] += count
                elif code >= 500:
                    figures["5xx"] += count
        for api, counts in list(metrics.webhooks.items()):
            known = perApi.get(api)
            if known is None:
                continue
            known["out"] += counts.delivered
            known["webhook-failed"] = counts.failedAttempts
            known["dead-letter"] = counts.deadLettered
        return perApi

    def sample(self) -> None:
        """
        Take one sample of every series.
        """
        # Milliseconds: the times clients send back as since.
        now = round(self.reactor.seconds(), 3)
        counters = self._counters()
        last = self._last
        self._last = (now, counters)
        apis = [api.name for api in list(self.node.apis)]
        if last is not None and now > last[0]:
            seconds = now - last[0]
            before = last[1]
            for api in apis:
                current = counters.get(api) or {}
                previous = before.get(api, {})

                def delta(name: str, current: Dict[str, Any] = current, previous: Dict[str, Any] = previous) -> float:
                    return float(max(0, current.get(name, 0) - previous.get(name, 0)))

                self._add("messagesIn", {"api": api}, now, delta("in") / seconds)
                self._add("messagesOut", {"api": api}, now, delta("out") / seconds)
                published = delta("latencyCount")
                if published:
                    self._add("publishLatency", {"api": api, "stat": "mean"}, now, delta("latencySum") / published)
                    buckets = [max(0, a - b) for a, b in zip(
                        current["latency"], previous.get("latency", [0] * len(current["latency"])), strict=True)]
                    self._add("publishLatency", {"api": api, "stat": "p95"}, now, _quantile(buckets, 0.95))
                for kind in ("4xx", "5xx", "webhook-failed", "dead-letter", "dropped"):
                    self._add("errors", {"api": api, "type": kind}, now, delta(kind) / seconds)
        for runtime in list(self.node.apis):
            for entrypoint in runtime.entrypoints:
                count = subscriberCount(self.node, runtime, entrypoint)
                if count is not None:
                    self._add("subscribers", {"api": runtime.name, "entrypoint": entrypoint.name}, now, count)
        self._sampleLag(now)
        self._forget(now)

    def _sampleLag(self, now: float) -> None:
        service = self.node.webhooks
        if service is None:
            return
        heads: Dict[str, Any] = {}
        for id, deliverer in sorted(service.deliverers.items()):
            apiName = deliverer.context.api
            if apiName not in heads:
                runtime = self.node.api(apiName)
                heads[apiName] = (headOffsets(runtime.connector, runtime.config.topic)
                                  if runtime is not None else None)
            head = heads[apiName]
            if head:
                self._add("consumerLag", {"api": apiName, "subscription": id}, now,
                          lagOf(head, deliverer.position))

    def _add(self, kind: str, labels: Dict[str, str], moment: float, value: float) -> None:
        frozen = tuple(sorted(labels.items()))
        series = self.series.get((kind, frozen))
        if series is None:
            series = self.series[(kind, frozen)] = Series(kind, frozen, self.size)
        series.points.append((moment, value))

    def _forget(self, now: float) -> None:
        # A series whose last point is older than the window (its API or
        # subscription is gone) is dropped.
        oldest = now - self.interval * self.size
        for key in [key for key, series in self.series.items() if series.points[-1][0] < oldest]:
            del self.series[key]

    # -- reading

    def query(self, kinds: Iterable[str], since: Optional[float] = None,
              api: Optional[str] = None) -> Dict[str, Any]:
        """
        The series of C{kinds} (of API C{api} only, if given), with their
        points after C{since}: the answer of C{GET /metrics/history}.
        """
        wanted = set(kinds)
        items = []
        for (kind, labels), series in sorted(self.series.items()):
            if kind not in wanted:
                continue
            labelMap = dict(labels)
            if api is not None and labelMap.get("api") != api:
                continue
            items.append({"kind": kind, "labels": labelMap, "unit": KINDS[kind],
                          "points": [[t, round(v, 6)] for t, v in series.since(since)]})
        return {"interval": self.interval, "points": self.size, "now": round(self.reactor.seconds(), 3),
                "series": items}


def _quantile(buckets: List[int], q: float) -> float:
    """
    The upper bound of the bucket (of L{LATENCY_BUCKETS}, the last one
    open) where quantile C{q} of the counted values falls.
    """
    total = sum(buckets)
    wanted = q * total
    running = 0
    for bound, count in zip(LATENCY_BUCKETS + (LATENCY_BUCKETS[-1] * 2,), buckets, strict=True):
        running += count
        if running >= wanted:
            return bound
    return LATENCY_BUCKETS[-1] * 2


def parseSince(text: str) -> float:
    """
    The C{since} query parameter as POSIX seconds: a number, or an RFC 3339
    time with a time zone.

    @raise BadRequest: if it is neither.
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"since {text[:40]!r} is neither POSIX seconds nor an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise BadRequest("since needs a time zone (Z or +hh:mm)")
    return moment.timestamp()


def historyOf(admin: AdminApp) -> MetricsHistory:
    """
    The node's L{MetricsHistory}.
    """
    history = getattr(admin.gateway, "history", None)
    assert history is not None, "the admin API runs without its metrics history"
    return history  # type: ignore[no-any-return]


@adminRoute("/metrics/history", methods=["GET"])
def metricsHistory(admin: AdminApp, request: Request) -> Dict[str, Any]:
    """
    The last hour of the series named by C{series} (a comma-separated list
    of kinds; all of them when absent), after C{since} (POSIX seconds or
    RFC 3339), of one C{api} when given.
    """
    args = request.args or {}

    def one(name: str) -> Optional[str]:
        values = args.get(name.encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest(f"{name} is given more than once")
        return str(values[0].decode("utf-8", "replace"))

    unknown = sorted(key.decode("latin-1") for key in args if key not in (b"series", b"since", b"api"))
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0][:40]!r} (known: series, since, api)")
    series = one("series")
    kinds = list(KINDS) if not series else [kind.strip() for kind in series.split(",") if kind.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise BadRequest(f"unknown series {kind[:40]!r} (known: {', '.join(KINDS)})",
                             extra={"known": list(KINDS)})
    since = one("since")
    return historyOf(admin).query(kinds, parseSince(since) if since is not None else None, one("api"))
