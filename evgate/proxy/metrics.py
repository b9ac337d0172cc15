"""
The metric families of C{http} endpoints, per API and target, built at
scrape time from L{evgate.proxy._pool.TargetStats}.
"""

from __future__ import annotations

from typing import Any, List

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from evgate.metrics import LATENCY_BUCKETS


def targetFamilies(endpoint: Any) -> List[Any]:
    """
    Requests, status classes, errors by stage, latency and health of every
    target of C{endpoint}.
    """
    labels = ["api", "endpoint", "target"]
    requests = CounterMetricFamily("evgate_proxy_responses", "Response heads received from upstream targets, "
                                   "by status class.", labels=labels + ["class"])
    errors = CounterMetricFamily("evgate_proxy_upstream_errors", "Upstream failures, by stage (connect, "
                                 "response-head, response-body, request-body).", labels=labels + ["stage"])
    latency = HistogramMetricFamily("evgate_proxy_latency_seconds", "Seconds from sending a request upstream "
                                    "to its response head.", labels=labels)
    up = GaugeMetricFamily("evgate_proxy_target_in_service", "1 while the target is in service (passive and "
                           "active health).", labels=["endpoint", "target"])
    now = endpoint.reactor.seconds()
    for target in endpoint.targets.targets:
        up.add_metric([endpoint.name, target.url], 1 if target.available(now) else 0)
        for api, stats in sorted(target.stats.items()):
            values = [api, endpoint.name, target.url]
            for label, count in sorted(stats.classes.items()):
                requests.add_metric(values + [label], count)
            for stage, count in sorted(stats.errors.items()):
                errors.add_metric(values + [stage], count)
            if stats.latencyCount:
                cumulative, buckets = 0, []
                for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), stats.latency, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                latency.add_metric(values, buckets, stats.latencySum)
    return [requests, errors, latency, up]
