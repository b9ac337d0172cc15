"""
Reloading evgate.ini without a restart: C{SIGHUP}, or C{POST /reload} on
the admin API.

In the manner of buildbot's C{checkConfig}/C{reconfigService}, a reload has
two phases:

 1. L{checkConfig} reads and parses the file again and compares it with the
    running configuration, section by section, as the text of each
    section.  Its answer is a L{ReloadPlan}: which APIs are added, changed,
    removed or unchanged, which endpoints are added or removed, and which
    changes only a restart can apply.  It also builds the runtimes of the
    added and changed APIs (which can still find mistakes, such as a
    dead-letter endpoint that does not exist).  Nothing running is touched.
 2. L{reconfigService} applies the plan at once, on the reactor thread, in
    one go: there is no moment when some of it is applied and some not.

What a reload does:

 - an added API is served from the next request on;
 - a changed API's runtime is replaced: requests from then on see the new
   definition, and its open streams are ended (SSE C{event: error} or a
   stream end, WebSocket 1013) so that clients reconnect, with their
   cursors, to the new definition;
 - a removed API's streams are ended the same way and its path answers 404;
 - an unchanged API keeps its runtime, and its open streams stay open;
 - an added endpoint's connector is started; a removed one (no API uses it
   any more) is stopped;
 - C{access-log} takes effect at once.

What it refuses, keeping the running configuration as it is:

 - a file that cannot be read or parsed: the error names the file, the
   section and the key (C{POST /reload} answers 400 with them; C{SIGHUP}
   logs them);
 - a change that only a restart can apply (L{RestartRequired}): any other
   C{[gateway]} key (listeners, the admin listener, the store,
   limits, log format, ...), and a I{changed} endpoint.  An endpoint's
   connector owns broker connections, threads and consumer groups that
   every API on it shares; replacing it under live streams is a restart in
   all but name, so evgate says so instead of doing half of it.  The whole
   reload is refused, not only that part: what runs is always one version
   of the file.

An API is "unchanged" when the text of its section is: a file that a
section names (a JWT key file, a token file) is read again only when the
section changes, or at a restart.  The admin token is the exception:
C{admin-token-file} is read at every reload, so that a new token in the
same file replaces the old one (which is refused from then on).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.config import Config, ConfigError, loadConfig
from evgate.connectors import buildConnector
from evgate.node import buildApis

if TYPE_CHECKING:
    from evgate.service import GatewayService

# [gateway] keys a reload applies; every other key needs a restart.  The
# admin token is one, so that it can be rotated without a restart: a
# reload reads admin-token-file again even when the key's text is the same.
RELOADABLE_GATEWAY_KEYS = frozenset({"access-log", "admin-token", "admin-token-file"})

log = Logger(namespace="evgate.reload")


class RestartRequired(Exception):
    """
    The new file differs from the running configuration in ways that only
    a restart applies.

    @ivar reasons: one phrase per such change, e.g. C{"[gateway] listen"}.
    """

    def __init__(self, reasons: List[str]) -> None:
        self.reasons = reasons
        super().__init__("restart required for " + "; ".join(reasons))


@dataclass
class ReloadPlan:
    """
    What a reload would do (see the module docstring).

    @ivar runtimes: the new runtimes of the added and changed APIs, built
        but not yet serving.
    @ivar connectors: the connectors of the added endpoints, not started.
    """

    config: Config
    added: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    endpointsAdded: List[str] = field(default_factory=list)
    endpointsRemoved: List[str] = field(default_factory=list)
    gatewayChanged: List[str] = field(default_factory=list)
    runtimes: Dict[str, Any] = field(default_factory=dict)
    connectors: Dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """
        Whether the file says what is running already.
        """
        return not (self.added or self.changed or self.removed or self.endpointsAdded or self.endpointsRemoved
                    or self.gatewayChanged)

    def summary(self) -> Dict[str, Any]:
        """
        The plan as a JSON document (the answer of C{POST /reload}).
        """
        return {
            "applied": True,
            "apis": {"added": self.added, "changed": self.changed, "removed": self.removed,
                     "unchanged": self.unchanged},
            "endpoints": {"added": self.endpointsAdded, "removed": self.endpointsRemoved},
            "gateway": {"changed": self.gatewayChanged},
        }


def _differing(old: Mapping[str, str], new: Mapping[str, str]) -> List[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def checkConfig(gateway: "GatewayService", path: Optional[str] = None) -> ReloadPlan:
    """
    Read the configuration file again and plan the reload of C{gateway}.

    @raise ConfigError: if the file cannot be read or has a mistake.
    @raise RestartRequired: if it changes what only a restart applies.
    """
    config = loadConfig(path if path is not None else gateway.config.path)
    running: Mapping[str, Mapping[str, str]] = gateway.config.sections
    sections = config.sections
    plan = ReloadPlan(config)
    reasons: List[str] = []

    for key in _differing(running.get("gateway", {}), sections.get("gateway", {})):
        if key in RELOADABLE_GATEWAY_KEYS:
            plan.gatewayChanged.append(key)
        else:
            reasons.append(f"[gateway] {key}")
    if _adminToken(config) not in (None, _runningAdminToken(gateway)) and "admin-token" not in plan.gatewayChanged:
        # The token file's content changed (its name did not).
        plan.gatewayChanged.append("admin-token")
    for name in sorted(set(gateway.connectors) | set(config.endpoints)):
        section = f"endpoint:{name}"
        if name not in gateway.connectors:
            plan.endpointsAdded.append(name)
        elif name not in config.endpoints:
            plan.endpointsRemoved.append(name)
        elif running.get(section) != sections.get(section):
            keys = ", ".join(_differing(running.get(section, {}), sections.get(section, {})))
            reasons.append(f"[{section}] {keys}")
    if reasons:
        raise RestartRequired(reasons)

    current = {api.name: api for api in gateway.apis}
    for name in config.apis:
        section = f"api:{name}"
        if name not in current:
            plan.added.append(name)
        elif running.get(section) != sections.get(section):
            plan.changed.append(name)
        else:
            plan.unchanged.append(name)
    plan.removed = sorted(set(current) - set(config.apis))
    for name in plan.endpointsAdded:
        plan.connectors[name] = buildConnector(config.endpoints[name], gateway.reactor)
    if plan.added or plan.changed:
        plan.runtimes = _build(gateway, plan)
    return plan


def _build(gateway: "GatewayService", plan: ReloadPlan) -> Dict[str, Any]:
    """
    The runtimes of the added and changed APIs of C{plan}, built now so
    that a mistake found while building (a dead-letter endpoint that does
    not exist) refuses the reload before anything changed.
    """
    config = plan.config
    subset = replace(config, gateway=gateway.config.gateway,
                     apis={n: config.apis[n] for n in plan.added + plan.changed})
    # The runtimes may look up endpoints that this same reload adds: they
    # are in the node's table while building (synchronously, on the
    # reactor thread: nothing else can see them meanwhile).
    connectors = gateway.connectors
    connectors.update(plan.connectors)
    try:
        return {runtime.name: runtime for runtime in buildApis(subset, connectors, gateway.node)}
    finally:
        for name in plan.connectors:
            del connectors[name]


def reconfigService(gateway: "GatewayService", plan: ReloadPlan) -> Deferred:
    """
    Apply C{plan} (from L{checkConfig}) to C{gateway}, all at once.

    @return: a Deferred of C{plan} that fires once removed endpoints have
        stopped and webhook deliveries follow the new definitions.
    """
    waits: List[Deferred] = []
    config = plan.config
    for name in plan.endpointsAdded:
        connector = plan.connectors[name]
        gateway.connectors[name] = connector
        connector.setServiceParent(gateway)
        log.info("reload: endpoint {endpoint} ({kind}) started", endpoint=name, kind=connector.kind)

    current = {api.name: api for api in gateway.apis}
    apis = [current[name] if name in plan.unchanged else plan.runtimes[name] for name in config.apis]
    retired = [current[name] for name in plan.changed + plan.removed]
    gateway.node.apis = apis
    gateway.resource.setApis(apis)
    for runtime in retired:
        _stopEntrypoints(runtime)
    for name in plan.removed:
        gateway.metrics.forget(name)

    for name in plan.endpointsRemoved:
        for (endpoint, _), stream in list(gateway.hub.streams.items()):
            if endpoint == name:
                stream.close()
        # Connectors are services of the node as well (IConnector says so).
        retiring: Any = gateway.connectors.pop(name)
        waits.append(maybeDeferred(retiring.disownServiceParent))
        log.info("reload: endpoint {endpoint} stopped", endpoint=name)

    if "access-log" in plan.gatewayChanged:
        gateway.requestLog.enabled = config.gateway.accessLog
    token = _adminToken(config)
    if gateway.admin is not None and token is not None and token != gateway.admin.token:
        # From the next request on, the old token is refused.
        gateway.admin.token = token
        log.info("reload: the admin token changed")
    # The running configuration is the new file's; [gateway] keeps the
    # settings that run (equal but for the keys a reload applies, which
    # are applied above).
    gateway.node.config = replace(config, gateway=gateway.config.gateway)
    waits.append(_followWebhooks(gateway, plan))
    gateway.metrics.reloads["applied"] += 1
    gateway.metrics.lastReload = gateway.reactor.seconds()
    log.info("reload: applied {path}: APIs added: {added}; changed: {changed}; removed: {removed}; "
             "{unchanged} unchanged", path=config.path, added=_names(plan.added), changed=_names(plan.changed),
             removed=_names(plan.removed), unchanged=len(plan.unchanged))
    return DeferredList(waits, consumeErrors=True).addCallback(lambda _: plan)


def _adminToken(config: Config) -> Optional[bytes]:
    """
    The admin token of C{config}, if it has an admin API.
    """
    settings = config.gateway.options.get("admin")
    return settings.token if settings is not None else None


def _runningAdminToken(gateway: "GatewayService") -> Optional[bytes]:
    return gateway.admin.token if gateway.admin is not None else None


def _names(names: List[str]) -> str:
    return ", ".join(names) if names else "none"


def _stopEntrypoints(runtime: Any) -> None:
    # The streams of a retired runtime end as at shutdown: their clients
    # reconnect with their cursors and meet the new definition.
    for entrypoint in runtime.entrypoints:
        entrypoint.stop()
    # A plan may hold on to the node (an API-key plan listens for
    # revocations to close its streams); a retired one lets go.
    for plan in runtime.plans:
        plan.stop()


def _followWebhooks(gateway: "GatewayService", plan: ReloadPlan) -> Deferred:
    """
    Bring webhook deliveries in line with the new APIs: deliverers of
    changed or removed APIs stop, and those of changed APIs start again
    with the new settings at the sync that follows.
    """
    service = gateway.webhooks
    if service is None:
        if any("webhook" in api.config.entrypoints for api in gateway.apis):
            gateway.startWebhooks()
        return succeed(None)
    touched = set(plan.changed) | set(plan.removed)
    stops = [service._stopDeliverer(id) for id, deliverer in list(service.deliverers.items())
             if deliverer.context.api in touched]
    d: Deferred = DeferredList(stops, consumeErrors=True)
    d.addCallback(lambda _: service.sync() if service.running else None)
    return d


class Reloader:
    """
    Runs the reloads of one gateway, one at a time, and keeps the outcome
    of the last one for the admin API.

    @ivar last: the outcome of the last reload, as a JSON document.
    """

    log = Logger()

    def __init__(self, gateway: "GatewayService") -> None:
        self.gateway = gateway
        self.last: Optional[Dict[str, Any]] = None
        self.running: Optional[Deferred] = None

    def reload(self) -> Deferred:
        """
        Reload now (or after the reload under way).

        @return: a Deferred of the L{ReloadPlan} applied; it fails with
            L{ConfigError} or L{RestartRequired} when nothing was applied.
        """
        if self.running is not None:
            after: Deferred = Deferred()

            def again(result: Any) -> Any:
                self.reload().chainDeferred(after)
                return result

            self.running.addBoth(again)
            return after
        gateway = self.gateway
        metrics = gateway.metrics
        try:
            plan = checkConfig(gateway)
        except (ConfigError, RestartRequired) as e:
            metrics.reloads["refused"] += 1
            self.last = self._outcome(False, str(e))
            return fail(e)
        except Exception as e:
            metrics.reloads["refused"] += 1
            self.log.failure("reload: unexpected error reading {path}", path=gateway.config.path)
            self.last = self._outcome(False, f"unexpected error: {e}")
            return fail(e)
        if plan.empty:
            metrics.reloads["unchanged"] += 1
            self.last = self._outcome(True, "no change")
            self.log.info("reload: {path} has no change", path=gateway.config.path)
            return succeed(plan)
        running = self.running = reconfigService(gateway, plan)

        def done(result: Any) -> Any:
            self.running = None
            self.last = self._outcome(True, "applied", plan.summary())
            pool = gateway.node.workerPool
            if pool is not None and not isinstance(result, Failure):
                # Each worker reads the file again itself.
                pool.reload()
            return result

        running.addBoth(done)
        return running

    def _outcome(self, applied: bool, detail: str, summary: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        outcome: Dict[str, Any] = {"applied": applied, "detail": detail, "at": self.gateway.reactor.seconds()}
        if summary is not None:
            outcome.update(summary)
            outcome["applied"] = applied
        return outcome

    def reloadFromSignal(self) -> None:
        """
        Reload for C{SIGHUP}: the outcome goes to the log.
        """
        self.log.info("reload: SIGHUP received; reading {path}", path=self.gateway.config.path)
        d = self.reload()

        def refused(failure: Any) -> None:
            if failure.check(ConfigError, RestartRequired):
                self.log.error("reload refused, still running the previous configuration: {error}",
                               error=failure.getErrorMessage())
            else:
                self.log.failure("reload failed", failure)

        d.addErrback(refused)


class ReloadService(Service):
    """
    Reloads on C{SIGHUP}: installs the handler while it runs, when the
    gateway runs on the process's reactor in the main thread (not in
    tests on a Clock).

    The handler only schedules the reload on the reactor
    (C{callFromThread} is the one reactor call a signal handler may make);
    the reload runs there like any other event.
    """

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader
        self.previous: Any = None
        self.installed = False

    def startService(self) -> None:
        super().startService()
        reactor = self.reloader.gateway.reactor
        if _isProcessReactor(reactor) and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGHUP, self._hangup)
            self.installed = True

    def stopService(self) -> Any:
        super().stopService()
        if self.installed:
            signal.signal(signal.SIGHUP, self.previous if self.previous is not None else signal.SIG_DFL)
            self.installed = False
        return None

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reloader.gateway.reactor.callFromThread(self.reloader.reloadFromSignal)


def _isProcessReactor(reactor: Any) -> bool:
    installed = sys.modules.get("twisted.internet.reactor")
    return installed is not None and reactor is installed
