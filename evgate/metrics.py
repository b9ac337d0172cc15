"""
What a gateway node counts, and its Prometheus exposition.

The data plane's cost
=====================

Every request and every batch a subscriber writes passes through here, so
the counting must cost next to nothing.  It is plain integer arithmetic on
a L{evgate.tallies.Tally}, one per (API, entrypoint), that the entrypoint holds from the
moment it is built: no label is looked up, no lock taken, no object made
per message.  Counts are per batch (a subscriber adds the length of the
batch it was handed, a stream adds the length of the bytes it wrote), never
one operation per message per subscriber.

Everything else is read when Prometheus scrapes: L{GatewayCollector} walks
the tallies, the live subscribers of each entrypoint, the connectors'
C{connected}, the limits' Redis fall-backs and the webhook deliverers, and
turns them into metric families.  Nothing keeps a gauge up to date on
every event.

Each L{evgate.service.GatewayService} has its own L{CollectorRegistry}
(L{GatewayMetrics.registry}), never prometheus_client's global one: two
gateways in one test process, or a reload, never see each other's series.

Tallies outlive reloads: an API whose definition changes gets new
entrypoints, which pick up the same tallies, so its counters keep counting
instead of starting again at zero.  A removed API's tallies are dropped,
and its series disappear.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from evgate.interfaces import IHeadOffsets, IMetricsSource, IStore, IStreamingEntrypoint
from evgate.tallies import LATENCY_BUCKETS, UNROUTED, Tally, WebhookCounts
from evgate.tallies import countPage as countPage  # re-exported: the entrypoints import these from here
from evgate.tallies import tallyFor as tallyFor
from evgate.tallies import tallyOf as tallyOf

if TYPE_CHECKING:
    from evgate.node import NodeContext

class GatewayMetrics:
    """
    The counters of one gateway node and its own Prometheus registry.

    @ivar node: the L{evgate.node.NodeContext} whose live state the
        collector reads at scrape time.
    """

    def __init__(self, node: "NodeContext") -> None:
        self.node = node
        self.tallies: Dict[Tuple[str, str], Tally] = {}
        self.webhooks: Dict[str, WebhookCounts] = {}
        self.reloads: Dict[str, int] = {"applied": 0, "refused": 0, "unchanged": 0}
        self.lastReload: Optional[float] = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(self))

    def tally(self, api: str, entrypoint: str) -> Tally:
        """
        The tally of C{entrypoint} of API C{api}, made on first use.
        """
        key = (api, entrypoint)
        tally = self.tallies.get(key)
        if tally is None:
            tally = self.tallies[key] = Tally(api, entrypoint)
        return tally

    def unrouted(self) -> Tally:
        """
        The tally of requests that reached no API.
        """
        return self.tally(UNROUTED, UNROUTED)

    def webhookCounts(self, api: str) -> WebhookCounts:
        """
        The webhook delivery counts of API C{api}, made on first use.
        """
        counts = self.webhooks.get(api)
        if counts is None:
            counts = self.webhooks[api] = WebhookCounts()
        return counts

    def forget(self, api: str) -> None:
        """
        Drop the counters of API C{api} (it was removed by a reload).
        """
        for key in [key for key in self.tallies if key[0] == api]:
            del self.tallies[key]
        self.webhooks.pop(api, None)

    def allTallies(self) -> Dict[Tuple[str, str], Tally]:
        """
        The tallies of this node: this process's, plus the last report of
        each worker process (L{evgate.workers}), summed.
        """
        pool = self.node.workerPool
        reports = pool.liveReports() if pool is not None else []
        if not reports:
            return self.tallies
        merged: Dict[Tuple[str, str], Tally] = {}

        def add(api: str, entrypoint: str, fields: Mapping[str, Any]) -> None:
            tally = merged.get((api, entrypoint))
            if tally is None:
                tally = merged[(api, entrypoint)] = Tally(api, entrypoint)
            for code, count in fields["codes"].items():
                tally.codes[int(code)] = tally.codes.get(int(code), 0) + count
            for name in ("messagesIn", "bytesIn", "messagesOut", "bytesOut", "dropped", "latencySum",
                         "latencyCount", "waiting", "shed"):
                setattr(tally, name, getattr(tally, name) + fields.get(name, 0))
            tally.latency = [a + b for a, b in zip(tally.latency, fields["latency"], strict=True)]

        for (api, entrypoint), own in list(self.tallies.items()):
            add(api, entrypoint, {"codes": own.codes, "latency": own.latency,
                                  **{name: getattr(own, name) for name in Tally.__slots__[3:] if name != "latency"}})
        for report in reports:
            for api, entrypoint, fields in report.get("tallies", ()):
                add(api, entrypoint, fields)
        return merged

    def totals(self, api: str) -> Dict[str, int]:
        """
        The messages and bytes in and out of API C{api}, over its
        entrypoints (webhook deliveries count as messages out).
        """
        totals = {"messagesIn": 0, "bytesIn": 0, "messagesOut": 0, "bytesOut": 0}
        for (name, _), tally in list(self.allTallies().items()):
            if name == api:
                totals["messagesIn"] += tally.messagesIn
                totals["bytesIn"] += tally.bytesIn
                totals["messagesOut"] += tally.messagesOut
                totals["bytesOut"] += tally.bytesOut
        counts = self.webhooks.get(api)
        if counts is not None:
            totals["messagesOut"] += counts.delivered
        return totals

    def exposition(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """
        The registry in the text format C{accept} asks for (Prometheus text
        by default, OpenMetrics when asked): the body and its media type.
        """
        encoder, contentType = choose_encoder(accept or "")
        return encoder(self.registry), contentType


def headOffsets(connector: Any, topic: str) -> Optional[Mapping[int, int]]:
    """
    The next offset of every partition of C{topic}, where the endpoint knows
    it without asking a broker (an L{IHeadOffsets}: the in-memory endpoint,
    Kafka).  L{None} elsewhere.
    """
    if IHeadOffsets.providedBy(connector):
        return connector.headOffsets(topic)  # type: ignore[no-any-return]
    return None


def lagOf(head: Mapping[int, int], cursor: Any) -> int:
    """
    How many messages lie between C{cursor} (an L{evgate.message.Cursor},
    or L{None} for a reader that has not started) and C{head}.
    """
    if cursor is None:
        return 0
    offsets = cursor.asDict()
    return sum(max(0, next - offsets.get(partition, next)) for partition, next in head.items())


class GatewayCollector(Collector):
    """
    Turns a node's tallies and live state into metric families when
    Prometheus scrapes (see the module docstring).
    """

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        metrics = self.metrics
        node = metrics.node
        tallies = sorted(metrics.allTallies().values(), key=lambda t: (t.api, t.entrypoint))
        yield from self._traffic(tallies)
        yield from self._subscribers(node)
        yield from self._webhooks(node)
        yield from self._endpoints(node)
        yield from self._node(node)

    def _traffic(self, tallies: List[Tally]) -> Iterator[Any]:
        labels = ["api", "entrypoint"]
        requests = CounterMetricFamily("evgate_requests", "Requests answered, by API, entrypoint and status "
                                       "(101: WebSocket; 499: the client left before the answer).",
                                       labels=labels + ["code"])
        families = {
            "messagesIn": CounterMetricFamily("evgate_messages_in", "Messages published and acknowledged by "
                                              "the endpoint.", labels=labels),
            "bytesIn": CounterMetricFamily("evgate_message_bytes_in", "Content bytes of the messages published.",
                                           labels=labels),
            "messagesOut": CounterMetricFamily("evgate_messages_out", "Messages handed to subscribers, after "
                                               "their filters.", labels=labels),
            "bytesOut": CounterMetricFamily("evgate_bytes_out", "Bytes written to subscribers (frames and "
                                            "pages).", labels=labels),
            "dropped": CounterMetricFamily("evgate_messages_dropped", "Messages dropped unwritten when a "
                                           "subscriber too far behind was cut (it resumes with its cursor).",
                                           labels=labels),
            "shed": CounterMetricFamily("evgate_subscribers_shed", "Streams cut, slowest first, because the node "
                                        "held more than max-queued-bytes (they resume with their cursor).",
                                        labels=labels),
        }
        latency = HistogramMetricFamily("evgate_publish_latency_seconds", "Seconds from handing a message to "
                                        "the endpoint to its acknowledgement.", labels=labels)
        for tally in tallies:
            values = [tally.api, tally.entrypoint]
            for code, count in sorted(tally.codes.items()):
                requests.add_metric(values + [str(code)], count)
            if tally.api == UNROUTED:
                continue
            for name, family in families.items():
                family.add_metric(values, getattr(tally, name))
            if tally.latencyCount:
                cumulative, buckets = 0, []
                for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), tally.latency, strict=True):
                    cumulative += count
                    buckets.append((_bound(bound), cumulative))
                latency.add_metric(values, buckets, tally.latencySum)
        yield requests
        yield from families.values()
        yield latency

    def _subscribers(self, node: "NodeContext") -> Iterator[Any]:
        live = GaugeMetricFamily("evgate_subscribers", "Live subscribers: open event streams and WebSockets, "
                                 "waiting long polls, running webhook deliverers.", labels=["api", "entrypoint"])
        lag = GaugeMetricFamily("evgate_subscriber_lag_messages", "Messages between the endpoint's head and the "
                                "furthest-behind live stream, where the endpoint knows its head.",
                                labels=["api", "entrypoint"])
        for api in list(node.apis):
            head = None
            for entrypoint in api.entrypoints:
                count = subscriberCount(node, api, entrypoint)
                if count is None:
                    continue
                live.add_metric([api.name, entrypoint.name], count)
                if not IStreamingEntrypoint.providedBy(entrypoint) or not entrypoint.live:
                    continue
                streams = entrypoint.live
                if head is None:
                    head = headOffsets(api.connector, api.config.topic) or {}
                if head:
                    behind = max(lagOf(head, getattr(s, "written", None)) for s in list(streams))
                    lag.add_metric([api.name, entrypoint.name], behind)
        yield live
        yield lag

    def _webhooks(self, node: "NodeContext") -> Iterator[Any]:
        metrics = self.metrics
        delivered = CounterMetricFamily("evgate_webhook_deliveries", "Webhook messages delivered (2xx).",
                                        labels=["api"])
        failed = CounterMetricFamily("evgate_webhook_failed_attempts", "Webhook attempts that failed (each is "
                                     "retried or dead-lettered).", labels=["api"])
        dead = CounterMetricFamily("evgate_webhook_dead_letters", "Webhook messages sent to the dead-letter "
                                   "destination.", labels=["api"])
        for api, counts in sorted(metrics.webhooks.items()):
            delivered.add_metric([api], counts.delivered)
            failed.add_metric([api], counts.failedAttempts)
            dead.add_metric([api], counts.deadLettered)
        yield delivered
        yield failed
        yield dead
        lag = GaugeMetricFamily("evgate_webhook_lag_messages", "Messages between the endpoint's head and a webhook "
                                "subscription's position, where the endpoint knows its head.",
                                labels=["api", "subscription"])
        service = node.webhooks
        if service is not None:
            heads: Dict[str, Any] = {}
            for id, deliverer in sorted(service.deliverers.items()):
                apiName = deliverer.context.api
                if apiName not in heads:
                    runtime = node.api(apiName)
                    heads[apiName] = (headOffsets(runtime.connector, runtime.config.topic)
                                      if runtime is not None else None)
                head = heads[apiName]
                if head:
                    lag.add_metric([apiName, id], lagOf(head, deliverer.position))
        yield lag

    def _endpoints(self, node: "NodeContext") -> Iterator[Any]:
        up = GaugeMetricFamily("evgate_endpoint_connected", "1 while the endpoint's broker is reachable.",
                               labels=["endpoint", "type"])
        for name, connector in sorted(node.connectors.items()):
            up.add_metric([name, connector.kind], 1 if connector.connected else 0)
        yield up
        # Endpoints that count more (http: per target) expose their own.
        for _, connector in sorted(node.connectors.items()):
            if IMetricsSource.providedBy(connector):
                yield from connector.metricFamilies()

    def _node(self, node: "NodeContext") -> Iterator[Any]:
        metrics = self.metrics
        shared = node.limits.shared
        if shared is not None:
            fallbacks = CounterMetricFamily("evgate_limits_store_fallbacks", "Limit checks counted on this node "
                                            "because the shared limits store (Redis) was unreachable.")
            fallbacks.add_metric([], shared.fallbacks)
            yield fallbacks
        yield from _connections(node.site)
        reloads = CounterMetricFamily("evgate_config_reloads", "Configuration reloads, by result.",
                                      labels=["result"])
        for result, count in sorted(metrics.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        if metrics.lastReload is not None:
            last = GaugeMetricFamily("evgate_config_last_reload_timestamp_seconds", "When the configuration "
                                     "was last applied (start or reload), POSIX seconds.")
            last.add_metric([], metrics.lastReload)
            yield last


def _connections(site: Any) -> Iterator[Any]:
    # The data plane site's connection counts (evgate.site).
    counts = getattr(site, "connectionCounts", None)
    if counts is None:
        return
    refused = CounterMetricFamily("evgate_connections_refused", "Connections refused or closed early by the "
                                  "connection limits, by reason.", labels=["reason"])
    for reason, count in sorted(counts.refused.items()):
        refused.add_metric([reason], count)
    yield refused
    opened = GaugeMetricFamily("evgate_connections_open", "Connections open on the data plane's listeners.")
    opened.add_metric([], site.openConnections)
    yield opened


def subscriberCount(node: "NodeContext", api: Any, entrypoint: Any) -> Optional[int]:
    """
    The live subscribers of one entrypoint on this node (its worker
    processes included), or L{None} for one that has none by nature
    (http-post).
    """
    count = localSubscriberCount(node, api, entrypoint)
    pool = node.workerPool
    if count is None or pool is None:
        return count
    for report in pool.liveReports():
        for name, kind, more in report.get("subscribers", ()):
            if name == api.name and kind == entrypoint.name:
                count += more
    return count


def localSubscriberCount(node: "NodeContext", api: Any, entrypoint: Any) -> Optional[int]:
    """
    L{subscriberCount} of this process alone.
    """
    if entrypoint.name == "webhook":
        service = node.webhooks
        if service is None:
            return 0
        return sum(1 for d in list(service.deliverers.values()) if d.context.api == api.name)
    if IStreamingEntrypoint.providedBy(entrypoint):
        return len(entrypoint.live)
    if entrypoint.name == "http-get":
        return int(entrypoint.tally.waiting)
    return None


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


@implementer(IStore)
class CountingStore:
    """
    The node's store as its webhook service sees it: every update that
    adds to a subscription's C{delivered}, C{failedAttempts} or
    C{deadLettered} counts is also counted here, per API, for Prometheus.

    This watches the one place every delivery outcome already goes through
    (the deliverer's coalesced store writes), so that the webhook code
    needs no hooks of its own.  Everything else is passed through.
    """

    KINDS = ("delivered", "failedAttempts", "deadLettered")

    def __init__(self, store: Any, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics

    @property
    def description(self) -> str:
        """
        The wrapped store's description.
        """
        return self.store.description  # type: ignore[no-any-return]

    @property
    def isOpen(self) -> bool:
        """
        Whether the wrapped store is open.
        """
        return bool(self.store.isOpen)

    def get(self, kind: str, id: str) -> Any:
        return self.store.get(kind, id)

    def list(self, kind: str) -> Any:
        return self.store.list(kind)

    def create(self, kind: str, id: str, record: Any) -> Any:
        return self.store.create(kind, id, record)

    def put(self, kind: str, id: str, record: Any) -> Any:
        return self.store.put(kind, id, record)

    def delete(self, kind: str, id: str) -> Any:
        return self.store.delete(kind, id)

    def update(self, kind: str, id: str, changes: Any, increments: Any = None) -> Any:
        """
        L{evgate.interfaces.IStore.update}, counting delivery outcomes once
        the store has them.
        """
        d = self.store.update(kind, id, changes, increments)
        if increments and any(increments.get(name) for name in self.KINDS):

            def count(record: Any) -> Any:
                if record is not None:
                    counts = self.metrics.webhookCounts(str(record.get("api")))
                    for name in self.KINDS:
                        setattr(counts, name, getattr(counts, name) + int(increments.get(name, 0)))
                return record

            d.addCallback(count)
        return d


class RateSampler(Service):
    """
    Samples every API's message totals every C{interval} seconds and keeps
    a minute of samples, so that the admin API can tell recent rates (the
    console shows them).  The data plane is not involved: this reads the
    tallies, like a scrape.
    """

    def __init__(self, metrics: GatewayMetrics, reactor: Any, interval: float = 5.0, window: float = 60.0) -> None:
        self.metrics = metrics
        self.reactor = reactor
        self.interval = interval
        self.samples: Deque[Tuple[float, Dict[str, Tuple[int, int]]]] = deque(
            maxlen=max(2, int(window / interval) + 1))
        self.loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self.loop = LoopingCall(self.sample)
        self.loop.clock = self.reactor
        self.loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        return None

    def _now(self) -> Dict[str, Tuple[int, int]]:
        now: Dict[str, Tuple[int, int]] = {}
        for api in list(self.metrics.node.apis):
            totals = self.metrics.totals(api.name)
            now[api.name] = (totals["messagesIn"], totals["messagesOut"])
        return now

    def sample(self) -> None:
        """
        Take one sample of every API's totals.
        """
        self.samples.append((self.reactor.seconds(), self._now()))

    def rates(self, api: str) -> Dict[str, Optional[float]]:
        """
        Messages per second in and out of API C{api} since the oldest
        sample kept (at most the window), or L{None} before there is one.
        """
        if not self.samples:
            return {"messagesInPerSecond": None, "messagesOutPerSecond": None, "seconds": None}
        then, totals = self.samples[0]
        seconds = self.reactor.seconds() - then
        current = self.metrics.totals(api)
        if seconds <= 0:
            return {"messagesInPerSecond": 0.0, "messagesOutPerSecond": 0.0, "seconds": 0.0}
        before = totals.get(api, (0, 0))
        return {
            "messagesInPerSecond": round(max(0, current["messagesIn"] - before[0]) / seconds, 3),
            "messagesOutPerSecond": round(max(0, current["messagesOut"] - before[1]) / seconds, 3),
            "seconds": round(seconds, 3),
        }
