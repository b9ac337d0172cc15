"""
The gateway node as a twisted.application service: connectors, the hub,
the data-plane site and its listeners.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.admin.app import AdminApp, adminSite
from evgate.admin.ops import Tails
from evgate.admin.samples import MetricsHistory
from evgate.config import Config, ConfigError, GatewayConfig
from evgate.connectors import buildConnector
from evgate.gateway import ApiRuntime, GatewayResource, GatewaySite
from evgate.hub import Hub
from evgate.ini import descriptionFields
from evgate.interfaces import IConnector, IStore
from evgate.logs import RequestLog, offerLogObserver
from evgate.metrics import CountingStore, GatewayMetrics, RateSampler
from evgate.node import NodeContext, buildApis
from evgate.portal import portalFor
from evgate.reload import Reloader, ReloadService, checkConfig, reconfigService
from evgate.security.apikey import KeyRegistry
from evgate.security.limits import Limits, buildLimits
from evgate.site import connectionLimits
from evgate.store import buildStore
from evgate.webhook.service import WebhookService
from evgate.workers import WorkerPool


def cannotListen(path: str, role: str, error: CannotListenError) -> SystemExit:
    """
    End start-up for a listener that cannot bind (a port in use, an
    address the host lacks): one line naming the file, section and key,
    exit status 2, like any mistake in the file.
    """
    key = "listen" if role == "gateway" else role
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    where = f"{error.interface or '*'}:{error.port}"
    sys.stderr.write(f"evgate: {path} [gateway] {key}: cannot listen on {where}: {reason}\n")
    sys.stderr.flush()
    return SystemExit(2)


class ListenerService(Service):
    """
    A listener that fails start-up when it cannot bind, and logs where it
    listens once it does (tests and operators read that line).

    It calls C{endpoint.listen} itself and keeps the Deferred, rather than
    subclass C{StreamServerEndpointService}, whose port and "raise a bind
    failure at once" switch are private attributes.
    """

    log = Logger()

    def __init__(self, description: str, factory: Any, reactor: Any, role: str,
                 configPath: str = "<config>", endpoint: Any = None) -> None:
        try:
            # An endpoint evgate builds itself (an mtls: listener) comes
            # made; Twisted's descriptions are parsed here.
            if endpoint is None:
                endpoint = serverFromString(reactor, description)
        except IndexError:
            # Twisted's systemd parser looks the index up among the
            # descriptors the process inherited.
            key = "listen" if role == "gateway" else role
            raise ConfigError(configPath, "gateway", key, f"{description}: no socket inherited from systemd at that "
                              "index (is evgate.socket active, with a ListenStream= per listener?)") from None
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.role = role
        self.configPath = configPath
        self.port: Any = None
        self.listening: Optional[Deferred] = None
        self._listeners: List[Deferred] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        # TCP, UNIX and systemd endpoints listen synchronously: a bind
        # failure has already failed the Deferred when listen returns, and
        # raising it here is what aborts twistd's start-up.
        failures: List[Failure] = []
        self.listening = self.endpoint.listen(self.factory)
        self.listening.addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            if isinstance(error, CannotListenError):
                raise cannotListen(self.configPath, self.role, error) from None
            failures[0].raiseException()

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self.listening is not None and not self.listening.called:
            self.listening.cancel()
        if self.port is None:
            return succeed(None)
        return maybeDeferred(self.port.stopListening)

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

    def fdFor(self, index: int) -> int:
        """
        The listening descriptor worker C{index} accepts on: this one,
        shared (see L{ReusePortListener} for one each).
        """
        return int(self.port.fileno())


class ReusePortListener(Service):
    """
    A TCP listener of a node with workers: one socket per process, all
    bound to the same address with C{SO_REUSEPORT}, so that the kernel
    spreads connections evenly over the processes (on one shared socket,
    whichever process wakes first takes the connection, and a busy one
    rarely does).  The first socket is this process's; the others wait
    for the workers.
    """

    log = Logger()

    def __init__(self, description: str, address: "TcpAddress", factory: Any, reactor: Any, count: int,
                 configPath: str = "<config>") -> None:
        self.description = description
        self.configPath = configPath
        self.address = address
        self.factory = factory
        self.reactor = reactor
        self.count = count
        self.sockets: List[socket.socket] = []
        self.port: Any = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        family = self.address.family
        interface = self.address.interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        port = self.address.port
        try:
            for _ in range(self.count):
                sock = socket.socket(family, socket.SOCK_STREAM)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((interface, port))
                port = sock.getsockname()[1]
                sock.listen(self.address.backlog)
                sock.setblocking(False)
        except OSError as e:
            self._close()
            raise cannotListen(self.configPath, "gateway", CannotListenError(interface, port, e)) from None
        self.port = self.reactor.adoptStreamPort(self.sockets[0].fileno(), family, self.factory)
        self.log.info("evgate gateway listening on port {port} ({description}, one socket per process)",
                      port=port, description=self.description)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)

    def whenListening(self) -> Deferred:
        return succeed(self.port)

    def fdFor(self, index: int) -> int:
        return self.sockets[index].fileno()

    def stopService(self) -> Any:
        Service.stopService(self)
        d = maybeDeferred(self.port.stopListening) if self.port is not None else succeed(None)

        def closed(result: Any) -> Any:
            self._close()
            return result

        return d.addBoth(closed)

    def _close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


@dataclass(frozen=True)
class TcpAddress:
    """
    Where a TCP listener binds, as its strports description says.
    """

    family: int
    port: int
    interface: str = ""
    backlog: int = 50


def tcpAddress(description: str) -> TcpAddress:
    """
    The address of the C{tcp:} or C{tcp6:} strports C{description}
    (port, then interface and backlog, positionally or by name, as Twisted
    reads them).  Twisted's endpoints keep these in private attributes and
    its parser is private: a listener that binds its own sockets reads its
    description itself.

    @raise ValueError: if C{description} is not a TCP description.
    """
    kind, *rest = descriptionFields(description)
    kind = kind.lower()
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"not a TCP description: {description}")
    values: Dict[str, str] = {}
    positional = ["port", "interface", "backlog"]
    for field in rest:
        name, equals, value = field.partition("=")
        if equals:
            values[name] = value
        elif positional:
            values[positional.pop(0)] = field
    return TcpAddress(family=socket.AF_INET6 if kind == "tcp6" else socket.AF_INET, port=int(values["port"]),
                      interface=values.get("interface", ""), backlog=int(values.get("backlog", 50)))


def reusePortAddress(description: str, reactor: Any) -> Optional[TcpAddress]:
    """
    The TCP address of C{description} when a node with workers can give
    each process its own socket for it (L{ReusePortListener}), else
    L{None}.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        return None
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return tcpAddress(description)
    return None


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
    One evgate node: it builds the node's parts, shares them through its
    L{NodeContext} (C{node}), and starts and stops them in order.

    The attributes tests and the admin API read (C{hub}, C{connectors},
    C{apis}, C{metrics}, C{store}, C{webhooks}, C{settings} ...) read
    through to the node context; the node's settings are
    C{node.settings}.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, worker: Any = None) -> None:
        super().__init__()
        # A worker process (evgate.workers) serves the data plane only.
        self.worker = worker
        node = self.node = NodeContext(reactor, config)
        self.reactor = reactor
        settings = node.settings
        # Counters and the Prometheus registry of this node (evgate.metrics),
        # before anything that counts; and the access log (evgate.logs).
        node.metrics = GatewayMetrics(node)
        node.requestLog = RequestLog(settings.accessLog)
        for name, endpoint in config.endpoints.items():
            connector = buildConnector(endpoint, reactor)
            # Connectors and stores are services too (see their interfaces).
            IService(connector).setServiceParent(self)
            node.connectors[name] = connector
        node.hub = Hub(node.connectors, reactor, window=settings.replayWindow)
        # Before the listeners, so that the limits store is connecting by
        # the time the first request comes.
        node.limits = buildLimits(settings, reactor)
        node.limits.setServiceParent(self)
        # Durable records (webhook subscriptions, keys): before the features
        # that use them, so that it stops after them (evgate.store).
        if settings.options.get("store") is not None:
            store = buildStore(settings.options["store"], reactor, node.connectors, config.path)
            IService(store).setServiceParent(self)
            node.store = store
            # The API keys live in the store; the registry is the node's,
            # shared by every API with the api-key plan (and the admin API).
            node.apiKeys = KeyRegistry(node)
            node.apiKeys.setServiceParent(self)
        node.apis = buildApis(config, node.connectors, node)
        self.resource = GatewayResource(node.apis)
        self.resource.portal = portalFor(self)
        self.site = GatewaySite(self.resource, settings.maxMessageBytes, requestLog=node.requestLog,
                                metrics=node.metrics, reactor=reactor,
                                limits=connectionLimits(settings.options))
        node.site = self.site
        self.listeners: List[Any] = []
        if worker is not None:
            for fd in worker.listenFds:
                adopted = AdoptedListener(fd, self.site, reactor)
                adopted.setServiceParent(self)
                self.listeners.append(adopted)
        else:
            workers = settings.workers
            mtls = settings.options.get("mtlsListeners", {})
            for description in settings.listen:
                tcp = reusePortAddress(description, reactor) if workers > 1 else None
                if tcp is not None:
                    listener: Any = ReusePortListener(description, tcp, self.site, reactor, workers, config.path)
                else:
                    made = mtls[description].endpoint(reactor) if description in mtls else None
                    listener = ListenerService(description, self.site, reactor, "gateway", config.path, made)
                listener.setServiceParent(self)
                self.listeners.append(listener)
            if workers > 1:
                node.workerPool = WorkerPool(self, settings.workers, reactor)
                node.workerPool.setServiceParent(self)
        # Webhook deliveries (evgate.webhook.service), and the admin API on
        # a listener of its own (evgate.admin.app): the primary's alone.
        if worker is None and any("webhook" in api.config.entrypoints for api in node.apis):
            self.startWebhooks()
        # Reload (SIGHUP, POST /reload: evgate.reload) and recent rates.
        self.reloader = Reloader(self)
        ReloadService(self.reloader).setServiceParent(self)
        self.rates = RateSampler(node.metrics, reactor)
        self.rates.setServiceParent(self)
        node.metrics.lastReload = reactor.seconds()
        self.admin: Optional[AdminApp] = None
        self.tails: Optional[Tails] = None
        self.history: Optional[MetricsHistory] = None
        adminSettings = settings.options.get("admin")
        if adminSettings is not None and worker is None:
            self.admin = AdminApp(self, adminSettings.token)
            # The admin API's live tails end when the node stops.
            self.tails = Tails()
            self.tails.setServiceParent(self)
            # The last hour of figures, for the console's charts.
            self.history = MetricsHistory(node, reactor)
            self.history.setServiceParent(self)
            self.adminListener = ListenerService(adminSettings.listen, adminSite(self.admin, reactor), reactor,
                                                 "admin", config.path)
            self.adminListener.setServiceParent(self)

    def startWebhooks(self) -> "WebhookService":
        """
        Start delivering webhooks (at start, or when a reload adds the
        first API with the webhook entrypoint).
        """
        node = self.node
        # Delivery outcomes are counted for /metrics as they are stored.
        service = node.webhooks = WebhookService(node, CountingStore(node.store, node.metrics), node.reactor)
        service.setServiceParent(self)
        return service

    # The node's parts, as tests and the admin API name them.

    @property
    def config(self) -> Config:
        """
        The running configuration (C{node.config}).
        """
        return self.node.config

    @property
    def settings(self) -> GatewayConfig:
        """
        The node's C{[gateway]} settings (C{node.settings}).
        """
        return self.node.settings

    @property
    def hub(self) -> Hub:
        """
        The node's hub.
        """
        return self.node.hub

    @property
    def connectors(self) -> Dict[str, IConnector]:
        """
        The node's connectors by endpoint name.
        """
        return self.node.connectors

    @property
    def apis(self) -> List[ApiRuntime]:
        """
        The live API runtimes.
        """
        return self.node.apis

    @property
    def metrics(self) -> GatewayMetrics:
        """
        The node's counters.
        """
        return self.node.metrics

    @property
    def requestLog(self) -> RequestLog:
        """
        The data plane's access log.
        """
        return self.node.requestLog

    @property
    def limits(self) -> Limits:
        """
        The node's limit counters.
        """
        return self.node.limits

    @property
    def store(self) -> Optional[IStore]:
        """
        The node's store, if it has one.
        """
        return self.node.store

    @property
    def apiKeys(self) -> Optional[KeyRegistry]:
        """
        The node's API keys, if it has a store.
        """
        return self.node.apiKeys

    @property
    def webhooks(self) -> Optional["WebhookService"]:
        """
        The node's webhook deliveries, if any.
        """
        return self.node.webhooks

    @property
    def workerPool(self) -> Optional[WorkerPool]:
        """
        The worker processes of a primary with workers.
        """
        return self.node.workerPool

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

    def api(self, name: str) -> Optional[ApiRuntime]:
        """
        The runtime of the API called C{name}.
        """
        return self.node.api(name)

    def stopService(self) -> Deferred:
        # Entrypoints first, so that streams end with their own goodbye
        # (an SSE comment, WebSocket close 1013) while the hub still runs;
        # then the hub, so that connectors close with no reader left.
        stopping = []
        for api in self.node.apis:
            for entrypoint in api.entrypoints:
                stopping.append(maybeDeferred(entrypoint.stop))
            for plan in api.plans:
                stopping.append(maybeDeferred(plan.stop))
        d = DeferredList(stopping, consumeErrors=True)

        def stopRest(_: Any) -> Deferred:
            self.hub.close()
            return maybeDeferred(super(GatewayService, self).stopService)

        d.addCallback(stopRest)
        return d

