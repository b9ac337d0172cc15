"""
What the parts of one gateway node share.

A L{NodeContext} is the one object an entrypoint, a plan, the metrics
collector, the webhook service or a reload reaches the rest of the node
through: the reactor, the configuration, the hub and connectors, the API
runtimes, the limits and the store.  L{evgate.service.GatewayService}
builds it and owns it; everything else is handed it.

It is deliberately plain data, not a service: it starts and stops nothing,
so that a test can build one by hand with the pieces it needs.

This module also builds the API runtimes (L{buildApis}): an API runtime
needs the entrypoint and plan registries, which need L{evgate.gateway}
(for L{evgate.gateway.ApiCall}, L{evgate.gateway.Consumer}); building here
keeps L{evgate.gateway} free of imports back into its own callers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from evgate.config import Config, GatewayConfig
from evgate.entrypoints import buildEntrypoints
from evgate.gateway import ApiRuntime, synchronousPlans
from evgate.interfaces import IConnector, IStore
from evgate.pipeline import buildPipeline
from evgate.security import buildPlans

if TYPE_CHECKING:
    from evgate.hub import Hub
    from evgate.logs import RequestLog
    from evgate.metrics import GatewayMetrics
    from evgate.security.apikey import KeyRegistry
    from evgate.security.limits import Limits
    from evgate.site import GatewaySite
    from evgate.webhook.service import WebhookService
    from evgate.workers import WorkerPool


class NodeContext:
    """
    The shared state of one gateway node.

    Filled in by L{evgate.service.GatewayService} as it builds the node, in
    the order the parts depend on each other (the metrics first, because
    everything counts; the connectors before the hub; the store before the
    APIs).  Reload replaces C{config} and C{apis}; nothing else changes
    while the node runs.

    @ivar reactor: the reactor the node runs on.
    @ivar config: the running configuration.
    @ivar hub: the fan-out of upstream subscriptions (L{evgate.hub.Hub}).
    @ivar connectors: endpoint name -> L{IConnector}.
    @ivar apis: the live API runtimes, in configuration order.
    @ivar limits: the node's limit counters (L{evgate.security.limits.Limits}).
    @ivar store: the durable records (L{IStore}), or L{None} if the node
        has no store.
    @ivar metrics: the node's counters (L{evgate.metrics.GatewayMetrics}).
    @ivar requestLog: the data plane's access log (L{evgate.logs.RequestLog}).
    @ivar apiKeys: the node's API keys (L{evgate.security.apikey.KeyRegistry}),
        or L{None} if the node has no store to keep them in.
    @ivar webhooks: the webhook deliveries, or L{None} on a node (or worker
        process) without them.
    @ivar workerPool: the worker processes of a primary with workers, or
        L{None}.
    @ivar site: the data plane's L{evgate.site.GatewaySite} (its connection
        counts are metrics), or L{None} before it is built.
    """

    hub: "Hub"
    limits: "Limits"
    metrics: "GatewayMetrics"
    requestLog: "RequestLog"

    def __init__(self, reactor: Any, config: Config) -> None:
        self.reactor = reactor
        self.config = config
        self.connectors: Dict[str, IConnector] = {}
        self.apis: List[ApiRuntime] = []
        self.store: Optional[IStore] = None
        self.apiKeys: Optional["KeyRegistry"] = None
        self.webhooks: Optional["WebhookService"] = None
        self.workerPool: Optional["WorkerPool"] = None
        self.site: Optional["GatewaySite"] = None

    @property
    def settings(self) -> GatewayConfig:
        """
        The node's C{[gateway]} settings (C{config.gateway}).
        """
        return self.config.gateway

    def api(self, name: str) -> Optional[ApiRuntime]:
        """
        The runtime of the API called C{name}, or L{None}.
        """
        for api in self.apis:
            if api.name == name:
                return api
        return None


def buildApis(config: Config, connectors: Mapping[str, IConnector], node: NodeContext) -> List[ApiRuntime]:
    """
    The runtimes of every API in C{config}, on C{node}; C{connectors} is
    the endpoint table they are built against (the node's, plus those a
    reload is adding).
    """
    apis = []
    for api in config.apis.values():
        runtime = ApiRuntime(api, connectors[api.endpoint], node.hub, [], [], node)
        runtime.pipeline = buildPipeline(runtime)
        runtime.entrypoints = buildEntrypoints(runtime)
        runtime.plans = buildPlans(runtime)
        runtime.synchronousPlans = synchronousPlans(runtime.plans)
        apis.append(runtime)
    return apis
