"""
The per-(API, entrypoint) counts of a gateway node: L{Tally}, the counts
of webhook deliveries (L{WebhookCounts}), and how an entrypoint finds its
tally (L{tallyFor}, L{tallyOf}).

Every request and every batch a subscriber writes is counted here, so the
counting is plain integer arithmetic on an object the entrypoint holds
from the moment it is built: no label is looked up, no lock taken, no
object made per message.  The node's registry of tallies and their
Prometheus exposition are in L{evgate.metrics}.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Dict, Tuple

# Upper bounds (seconds) of the publish latency histogram: from a memory
# endpoint's microseconds to a Kafka broker that takes its time.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# The label value of requests that reached no API (unknown path, a body
# refused before routing).
UNROUTED = "-"


class Tally:
    """
    The counters of one entrypoint of one API, updated by the data plane
    with plain arithmetic and read at scrape time.

    @ivar codes: responses by HTTP status (101 for WebSocket upgrades, 499
        for requests whose client left before an answer).
    @ivar messagesIn: messages published (acknowledged by the endpoint).
    @ivar messagesOut: messages handed to subscribers, after their filters.
    @ivar dropped: messages handed to a stream and dropped unwritten because
        the stream was cut for falling too far behind.
    @ivar latency: publish latencies, per bucket of L{LATENCY_BUCKETS}
        (not cumulative; the last slot is +Inf).
    """

    __slots__ = ("api", "entrypoint", "codes", "messagesIn", "bytesIn", "messagesOut", "bytesOut", "dropped",
                 "latency", "latencySum", "latencyCount", "waiting", "shed")

    def __init__(self, api: str, entrypoint: str) -> None:
        self.api = api
        self.entrypoint = entrypoint
        self.codes: Dict[int, int] = {}
        self.messagesIn = 0
        self.bytesIn = 0
        self.messagesOut = 0
        self.bytesOut = 0
        self.dropped = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latencySum = 0.0
        self.latencyCount = 0
        # Long polls waiting for messages now (a gauge, not a counter).
        self.waiting = 0
        # Streams cut because the node held more than max-queued-bytes.
        self.shed = 0

    def answered(self, code: int) -> None:
        """
        Count one response with status C{code}.
        """
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1

    def published(self, size: int, seconds: float) -> None:
        """
        Count one message of C{size} bytes that the endpoint acknowledged
        C{seconds} after it was handed over.
        """
        self.messagesIn += 1
        self.bytesIn += size
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latencySum += seconds
        self.latencyCount += 1


    def publishedMany(self, count: int, size: int, seconds: float) -> None:
        """
        Count C{count} messages of C{size} bytes in all that the endpoint
        acknowledged together, C{seconds} after they were handed over.
        """
        self.messagesIn += count
        self.bytesIn += size
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.latencySum += seconds * count
        self.latencyCount += count


def tallyFor(api: Any, entrypoint: str) -> Tally:
    """
    The tally of C{entrypoint} on the API runtime C{api}: its node's (kept
    across reloads), or a private one when the node counts nothing (tests
    that build runtimes by hand).
    """
    return api.node.metrics.tally(api.name, entrypoint)  # type: ignore[no-any-return]


def tallyOf(request: Any, api: Any, entrypoint: str) -> Tally:
    """
    The tally the gateway resource gave C{request} (see
    L{evgate.gateway.GatewayResource.render}), else that of C{entrypoint} of
    C{api}.
    """
    tally = getattr(request, "evgateTally", None)
    if isinstance(tally, Tally):
        return tally
    return tallyFor(api, entrypoint)


def countPage(tally: Tally, request: Any, messages: int, size: int) -> None:
    """
    Count a page of C{messages} in C{size} bytes written to C{request} (a
    long poll's answer), and note the count for its access line.
    """
    tally.messagesOut += messages
    tally.bytesOut += size
    request.evgateMessages = messages


class WebhookCounts:
    """
    Webhook deliveries of one API on this node.
    """

    __slots__ = ("delivered", "failedAttempts", "deadLettered")

    def __init__(self) -> None:
        self.delivered = 0
        self.failedAttempts = 0
        self.deadLettered = 0
