"""
The upstream targets of an C{http} endpoint: which one a request goes to,
and which ones are out of service.

Choosing
========

C{load-balancing} picks among the targets in service:

 - C{round-robin}: each in turn;
 - C{least-connections}: the one with the fewest requests in flight
   (ties in turn), for upstreams whose requests vary in cost;
 - C{weighted}: smooth weighted round-robin (C{url=weight} in C{targets}):
   a target of weight 3 gets three requests for every one of a target of
   weight 1, interleaved rather than in bursts.

Health
======

Passive: a target that fails a request (cannot be connected to, or drops
or times out before the response head) is out of service for
C{fail-timeout} seconds after C{max-fails} failures in a row; a response,
any response, puts the count back to zero.  Active (C{health-check =
/path every 5s}): a GET of the path on every target at that interval; a
target that does not answer 2xx or 3xx within the interval is out until
it does.  When every target is out, requests are refused with a 503
rather than sent where they will fail.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

from twisted.logger import Logger

from evgate.metrics import LATENCY_BUCKETS

BALANCING = ("round-robin", "least-connections", "weighted")


class TargetStats:
    """
    What one target has seen, per API: read by the metrics collector at
    scrape time (plain arithmetic on the data plane, as L{evgate.metrics}
    asks).

    @ivar classes: responses by status class (C{"2xx"} ...).
    @ivar errors: failures by stage (C{connect}, C{response-head},
        C{response-body} ...).
    @ivar latency: seconds from sending to the response head, per bucket of
        L{LATENCY_BUCKETS} (not cumulative; the last slot is +Inf).
    """

    __slots__ = ("requests", "classes", "errors", "latency", "latencySum", "latencyCount")

    def __init__(self) -> None:
        self.requests = 0
        self.classes: Dict[str, int] = {}
        self.errors: Dict[str, int] = {}
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latencySum = 0.0
        self.latencyCount = 0

    def answered(self, code: int, seconds: float) -> None:
        """
        Count a response head with status C{code}, C{seconds} after the
        request was handed over.
        """
        self.requests += 1
        label = f"{code // 100}xx"
        self.classes[label] = self.classes.get(label, 0) + 1
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latencySum += seconds
        self.latencyCount += 1

    def failed(self, stage: str) -> None:
        """
        Count a failure at C{stage}.
        """
        self.errors[stage] = self.errors.get(stage, 0) + 1


class Target:
    """
    One upstream server of an C{http} endpoint.

    @ivar url: the target as configured, C{scheme://host:port[/base]}.
    @ivar basePath: the path of C{url} (without a trailing slash), put
        before every forwarded path.
    @ivar inFlight: requests sent and not yet answered in full.
    @ivar healthy: the active health check's opinion (True until it has
        one).
    @ivar downUntil: reactor seconds until which passive health keeps the
        target out.
    """

    def __init__(self, url: str, weight: int = 1) -> None:
        parts = urlsplit(url)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.basePath = parts.path.rstrip("/")
        hostForUrl = f"[{self.host}]" if ":" in self.host else self.host
        self.origin = f"{self.scheme}://{hostForUrl}:{self.port}".encode("ascii")
        defaultPort = 443 if self.scheme == "https" else 80
        self.hostHeader = (hostForUrl if self.port == defaultPort else f"{hostForUrl}:{self.port}").encode("ascii")
        self.weight = weight
        self.inFlight = 0
        self.healthy = True
        self.downUntil = 0.0
        self.failures = 0
        self.currentWeight = 0
        self.stats: Dict[str, TargetStats] = {}

    def statsFor(self, api: str) -> TargetStats:
        """
        The counters of this target for API C{api}, made on first use.
        """
        stats = self.stats.get(api)
        if stats is None:
            stats = self.stats[api] = TargetStats()
        return stats

    def available(self, now: float) -> bool:
        """
        Whether the target is in service at reactor time C{now}.
        """
        return self.healthy and now >= self.downUntil

    def __repr__(self) -> str:
        return f"<Target {self.url}>"


class TargetPool:
    """
    The targets of one endpoint, the choice among them and their passive
    health (see the module docstring).
    """

    log = Logger()

    def __init__(self, name: str, targets: Sequence[Target], balancing: str, reactor: Any,
                 maxFails: int = 1, failTimeout: float = 10.0) -> None:
        if balancing not in BALANCING:
            raise ValueError(f"unknown load-balancing {balancing!r}")
        self.name = name
        self.targets = list(targets)
        self.balancing = balancing
        self.reactor = reactor
        self.maxFails = maxFails
        self.failTimeout = failTimeout
        self._next = 0

    def inService(self) -> List[Target]:
        """
        The targets that are in service now.
        """
        now = self.reactor.seconds()
        return [t for t in self.targets if t.available(now)]

    def choose(self, exclude: Set[Target] = frozenset()) -> Optional[Target]:  # type: ignore[assignment]
        """
        The target for the next request, leaving out C{exclude} (the ones
        this request already tried); L{None} when none is left in service.
        """
        candidates = [t for t in self.inService() if t not in exclude]
        if not candidates:
            return None
        if self.balancing == "weighted":
            return self._weighted(candidates)
        if self.balancing == "least-connections":
            fewest = min(t.inFlight for t in candidates)
            candidates = [t for t in candidates if t.inFlight == fewest]
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen

    def _weighted(self, candidates: List[Target]) -> Target:
        # Smooth weighted round-robin: every candidate gains its weight,
        # the richest is chosen and pays the total.  Weights 5,1,1 give
        # a a b a c a a rather than a a a a a b c.
        total = 0
        best = candidates[0]
        for target in candidates:
            target.currentWeight += target.weight
            total += target.weight
            if target.currentWeight > best.currentWeight:
                best = target
        best.currentWeight -= total
        return best

    def failed(self, target: Target, stage: str) -> None:
        """
        C{target} failed a request at C{stage}: after C{maxFails} in a row
        it is out of service for C{failTimeout} seconds.
        """
        target.failures += 1
        if target.failures >= self.maxFails and self.failTimeout > 0:
            target.downUntil = self.reactor.seconds() + self.failTimeout
            target.failures = 0
            self.log.warn("endpoint {endpoint}: target {target} out of service for {seconds:g}s "
                          "after failing at {stage}", endpoint=self.name, target=target.url,
                          seconds=self.failTimeout, stage=stage)

    def succeeded(self, target: Target) -> None:
        """
        C{target} answered: its run of failures is over.
        """
        target.failures = 0


def parseTargets(words: Sequence[str]) -> List[Tuple[str, int]]:
    """
    C{targets} words, each C{url} or C{url=weight}, as (url, weight).

    @raise ValueError: for a word that is neither.
    """
    parsed = []
    for word in words:
        url, _, weight = word.partition("=")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{word!r} is not an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{word!r}: a target has no query or fragment")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"{word!r} has a bad port") from None
        if weight:
            if not weight.isdigit() or not 1 <= int(weight) <= 1000:
                raise ValueError(f"{word!r}: a weight is a whole number from 1 to 1000")
        parsed.append((url, int(weight) if weight else 1))
    return parsed
