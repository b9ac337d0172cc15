"""
The gateway node as a twisted.application service: connectors, the hub,
the data-plane site and its listeners.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from evgate.config import Config, ConfigError, GatewayConfig
from evgate.connectors import buildConnector
from evgate.gateway import ApiRuntime, GatewayResource, GatewaySite, buildApis
from evgate.hub import Hub
from evgate.interfaces import IConnector
from evgate.logs import RequestLog, offerLogObserver
from evgate.metrics import CountingStore, GatewayMetrics, RateSampler
from evgate.reload import Reloader, ReloadService, checkConfig, reconfigService
from evgate.security.limits import buildLimits


class ListenerService(StreamServerEndpointService):
    """
    A listener that fails start-up when it cannot bind, and logs where it
    listens once it does (tests and operators read that line).
    """

    log = Logger()

    def __init__(self, description: str, factory: Any, reactor: Any, role: str,
                 configPath: str = "<config>") -> None:
        try:
            endpoint = serverFromString(reactor, description)
        except IndexError:
            # Twisted's systemd parser looks the index up among the
            # descriptors the process inherited.
            key = "listen" if role == "gateway" else role
            raise ConfigError(configPath, "gateway", key, f"{description}: no socket inherited from systemd at that "
                              "index (is evgate.socket active, with a ListenStream= per listener?)") from None
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.role = role
        self.port: Any = None
        self._listeners: List[Deferred] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        host = port.getHost()
        where = f"port {host.port}" if hasattr(host, "port") else str(getattr(host, "name", host))
        self.log.info("evgate {role} listening on {where} ({description})",
                      role=self.role, where=where, description=self.description)
        waiters, self._listeners = self._listeners, []
        for d in waiters:
            d.callback(port)
        return port

    def whenListening(self) -> Deferred:
        """
        A Deferred of the listening port, once there is one.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._listeners.append(d)
        return d


class AdoptedListener(Service):
    """
    In a worker process: accept on a listening socket inherited from the
    primary (see L{evgate.workers}).
    """

    log = Logger()

    def __init__(self, fd: int, factory: Any, reactor: Any) -> None:
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        Service.startService(self)
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        self.log.info("evgate gateway accepting on inherited descriptor {fd} (port {port})",
                      fd=self.fd, port=self.port.getHost().port)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self.port is not None:
            return self.port.stopListening()
        return None


class GatewayService(MultiService):
    """
    One evgate node.

    Entrypoints reach the node's settings through C{api.gateway}: the
    attributes of L{GatewayConfig} are readable on this object, and
    C{reactor} is the reactor it runs on.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, worker: Any = None) -> None:
        super().__init__()
        # A worker process (evgate.workers) serves the data plane only.
        self.worker = worker
        self.workerPool: Any = None
        self.config = config
        self.settings: GatewayConfig = config.gateway
        self.reactor = reactor
        # Counters and the Prometheus registry of this node (evgate.metrics),
        # before anything that counts; and the access log (evgate.logs).
        self.metrics = GatewayMetrics(self)
        self.requestLog = RequestLog(self.settings.accessLog)
        self.connectors: Dict[str, IConnector] = {}
        for name, endpoint in config.endpoints.items():
            connector = buildConnector(endpoint, reactor)
            connector.setServiceParent(self)
            self.connectors[name] = connector
        self.hub = Hub(self.connectors, reactor, window=self.settings.replayWindow)
        # Before the listeners, so that the limits store is connecting by
        # the time the first request comes.
        self.limits = buildLimits(self.settings, reactor)
        self.limits.setServiceParent(self)
        # Durable records (webhook subscriptions, keys): before the features
        # that use them, so that it stops after them (evgate.store).
        self.store: Any = None
        if self.settings.options.get("store") is not None:
            from evgate.store import buildStore

            self.store = buildStore(self.settings.options["store"], reactor, self.connectors, config.path)
            self.store.setServiceParent(self)
        self.apis: List[ApiRuntime] = buildApis(config, self.connectors, self.hub, self)
        self.resource = GatewayResource(self.apis)
        self.site = GatewaySite(self.resource, self.settings.maxMessageBytes, requestLog=self.requestLog,
                                metrics=self.metrics, reactor=reactor)
        self.listeners: List[Any] = []
        if worker is not None:
            for fd in worker.listenFds:
                adopted = AdoptedListener(fd, self.site, reactor)
                adopted.setServiceParent(self)
                self.listeners.append(adopted)
        else:
            for description in self.settings.listen:
                listener = ListenerService(description, self.site, reactor, "gateway", config.path)
                listener.setServiceParent(self)
                self.listeners.append(listener)
            if self.settings.workers > 1:
                from evgate.workers import WorkerPool

                self.workerPool = WorkerPool(self, self.settings.workers, reactor)
                self.workerPool.setServiceParent(self)
        # Webhook deliveries (evgate.webhook.service), and the admin API on
        # a listener of its own (evgate.admin.app): the primary's alone.
        self.webhooks: Any = None
        if worker is None and any("webhook" in api.config.entrypoints for api in self.apis):
            from evgate.webhook.service import WebhookService

            # Delivery outcomes are counted for /metrics as they are stored.
            self.webhooks = WebhookService(self, CountingStore(self.store, self.metrics), reactor)
            self.webhooks.setServiceParent(self)
        # Reload (SIGHUP, POST /reload: evgate.reload) and recent rates.
        self.reloader = Reloader(self)
        ReloadService(self.reloader).setServiceParent(self)
        self.rates = RateSampler(self.metrics, reactor)
        self.rates.setServiceParent(self)
        self.metrics.lastReload = reactor.seconds()
        self.admin: Any = None
        adminSettings = self.settings.options.get("admin")
        if adminSettings is not None and worker is None:
            from evgate.admin.app import AdminApp, adminSite

            self.admin = AdminApp(self, adminSettings.token)
            self.adminListener = ListenerService(adminSettings.listen, adminSite(self.admin, reactor), reactor,
                                                 "admin", config.path)
            self.adminListener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd's application: offer it the log observer of log-format
        # before twistd starts logging (evgate.logs).
        offerLogObserver(self.settings.options, parent)
        super().setServiceParent(parent)

    def checkConfig(self, path: Optional[str] = None) -> Any:
        """
        Read the configuration file again and plan a reload (see
        L{evgate.reload.checkConfig}).
        """
        return checkConfig(self, path)

    def reconfigService(self, plan: Any) -> Deferred:
        """
        Apply a plan of L{checkConfig} (see L{evgate.reload.reconfigService}).
        """
        return reconfigService(self, plan)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the service itself lacks: the settings.
        settings = self.__dict__.get("settings")
        if settings is not None and hasattr(settings, name):
            return getattr(settings, name)
        raise AttributeError(name)

    def api(self, name: str) -> Optional[ApiRuntime]:
        """
        The runtime of the API called C{name}.
        """
        for api in self.apis:
            if api.name == name:
                return api
        return None

    def stopService(self) -> Deferred:
        # Entrypoints first, so that streams end with their own goodbye
        # (an SSE comment, WebSocket close 1013) while the hub still runs;
        # then the hub, so that connectors close with no reader left.
        stopping = []
        for api in self.apis:
            for entrypoint in api.entrypoints:
                stop = getattr(entrypoint, "stop", None)
                if stop is not None:
                    stopping.append(maybeDeferred(stop))
        d = DeferredList(stopping, consumeErrors=True)

        def stopRest(_: Any) -> Deferred:
            self.hub.close()
            return maybeDeferred(super(GatewayService, self).stopService)

        d.addCallback(stopRest)
        return d

