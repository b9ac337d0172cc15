"""
Worker processes: C{workers = N} in C{[gateway]} serves the data plane
from N processes on the same listening sockets, so that a node uses more
than one core.

The process twistd starts (the I{primary}) binds the listeners, then starts
N-1 workers with C{python -m evgate.worker}, handing each the listening
sockets as inherited descriptors.  The kernel spreads new connections over
every process accepting on them.  Each worker reads the same configuration
file and runs its own connectors, hub and plans; the primary alone runs
the admin API, webhook deliveries and the store's writes.

Between a worker and the primary:

 - the worker's standard input is a pipe from the primary: when it closes
   (the primary is gone), the worker stops;
 - descriptor 3 of the worker is a pipe to the primary, on which it writes
   a JSON line with its counters every L{REPORT_INTERVAL} seconds; the
   primary's C{/metrics} and C{/apis} add them to its own;
 - C{SIGHUP} reloads: the primary forwards it to every worker after a
   reload it applied (each worker reads the file again itself);
 - C{SIGTERM} stops: the primary sends it to every worker when it stops,
   and waits for them.

A worker that exits while the primary runs is started again after
L{RESTART_DELAY} seconds.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger

from evgate.metrics import localSubscriberCount

REPORT_FD = 3
FIRST_LISTEN_FD = 4
REPORT_INTERVAL = 1.0
RESTART_DELAY = 1.0
STOP_TIMEOUT = 15.0
# A report line longer than this is not a report.
MAX_REPORT = 16 * 1024 * 1024


def snapshot(gateway: Any) -> Dict[str, Any]:
    """
    The counters of C{gateway} (a worker) that the primary adds to its
    own: every tally, and the live subscribers per API and entrypoint.
    """
    tallies = []
    for tally in list(gateway.metrics.tallies.values()):
        tallies.append([tally.api, tally.entrypoint, {
            "codes": {str(code): count for code, count in tally.codes.items()},
            "messagesIn": tally.messagesIn, "bytesIn": tally.bytesIn, "messagesOut": tally.messagesOut,
            "bytesOut": tally.bytesOut, "dropped": tally.dropped, "latency": tally.latency,
            "latencySum": tally.latencySum, "latencyCount": tally.latencyCount, "waiting": tally.waiting,
        }])
    subscribers = []
    for api in list(gateway.apis):
        for entrypoint in api.entrypoints:
            count = localSubscriberCount(gateway.node, api, entrypoint)
            if count is not None:
                subscribers.append([api.name, entrypoint.name, count])
    return {"pid": os.getpid(), "tallies": tallies, "subscribers": subscribers}


class WorkerProtocol(ProcessProtocol):
    """
    The primary's end of one worker: its reports and its exit.
    """

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.buffer = b""
        self.ended: Deferred = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT_FD:
            return
        self.buffer += data
        if len(self.buffer) > MAX_REPORT:
            self.buffer = b""
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines[-1:]:
            try:
                self.pool.reports[self.index] = json.loads(line)
            except ValueError:
                self.pool.log.warn("worker {index} sent a report that is not JSON", index=self.index)

    def processEnded(self, reason: Any) -> None:
        self.pool.ended(self.index, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    The primary's workers: started once its listeners listen, started again
    when one exits, signalled on reload and stop.
    """

    log = Logger()

    def __init__(self, gateway: Any, count: int, reactor: Any, executable: str = sys.executable) -> None:
        self.gateway = gateway
        self.count = count
        self.reactor = reactor
        self.executable = executable
        self.configPath = os.path.abspath(gateway.config.path)
        self.processes: Dict[int, Tuple[Any, WorkerProtocol]] = {}
        self.reports: Dict[int, Dict[str, Any]] = {}
        self.restarts: Dict[int, Any] = {}

    def startService(self) -> None:
        Service.startService(self)
        d = gatherResults([listener.whenListening() for listener in self.gateway.listeners])
        d.addCallback(self._listening)
        d.addErrback(lambda f: self.log.failure("workers: the listeners did not start; no worker started", f))

    def _listening(self, ports: List[Any]) -> None:
        if not self.running:
            return
        for index in range(1, self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        """
        Start worker C{index}.
        """
        self.restarts.pop(index, None)
        if not self.running:
            return
        # Each listener's socket for this worker: its own with SO_REUSEPORT,
        # else the one the primary accepts on too.
        inherited = [listener.fdFor(index) for listener in self.gateway.listeners]
        listenFds = [FIRST_LISTEN_FD + i for i in range(len(inherited))]
        argv = [self.executable, "-m", "evgate.worker", "--config", self.configPath, "--index", str(index),
                "--listen-fds", ",".join(str(fd) for fd in listenFds)]
        childFDs: Dict[int, Any] = {0: "w", 1: 1, 2: 2, REPORT_FD: "r"}
        for fd, parent in zip(listenFds, inherited, strict=True):
            childFDs[fd] = parent
        protocol = WorkerProtocol(self, index)
        process = self.reactor.spawnProcess(protocol, self.executable, argv, env=dict(os.environ),
                                            childFDs=childFDs)
        self.processes[index] = (process, protocol)
        self.log.info("workers: started worker {index} (pid {pid})", index=index, pid=process.pid)

    def ended(self, index: int, reason: Any) -> None:
        """
        Worker C{index} exited: forget its counters; start it again unless
        the primary is stopping.
        """
        self.processes.pop(index, None)
        self.reports.pop(index, None)
        if not self.running:
            return
        self.log.error("workers: worker {index} exited ({reason}); starting it again in {delay:g} s",
                       index=index, reason=reason.getErrorMessage(), delay=RESTART_DELAY)
        self.restarts[index] = self.reactor.callLater(RESTART_DELAY, self.spawn, index)

    def signal(self, name: str) -> None:
        """
        Send signal C{name} (C{"HUP"}, C{"TERM"}, C{"KILL"}) to every worker.
        """
        for process, _ in list(self.processes.values()):
            try:
                process.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def reload(self) -> None:
        """
        The primary applied a reload: every worker reads the file again.
        """
        if self.processes:
            self.log.info("workers: asking {count} workers to reload", count=len(self.processes))
        self.signal("HUP")

    def liveReports(self) -> List[Dict[str, Any]]:
        """
        The last report of every running worker.
        """
        return [self.reports[index] for index in sorted(self.reports) if index in self.processes]

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        if not self.processes:
            return None
        waiting = [protocol.ended for _, protocol in self.processes.values()]
        self.signal("TERM")
        killer = self.reactor.callLater(STOP_TIMEOUT, self.signal, "KILL")
        d = DeferredList(waiting, consumeErrors=True)

        def stopped(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return d.addBoth(stopped)


class PrimaryLink(Protocol):
    """
    A worker's end of its pipes (standard input, and descriptor 3 for its
    reports): the reactor stops when the primary goes away.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.log.info("worker: the primary process is gone; stopping")
            self.reactor.stop()

    def report(self, document: Dict[str, Any]) -> None:
        """
        Send one report to the primary.
        """
        if self.transport is not None:
            self.transport.write(json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n")


class WorkerReporter(Service):
    """
    In a worker: report its counters to the primary every
    L{REPORT_INTERVAL} seconds.
    """

    def __init__(self, gateway: Any, link: PrimaryLink, reactor: Any) -> None:
        self.gateway = gateway
        self.link = link
        self.reactor = reactor
        self.call: Any = None

    def startService(self) -> None:
        Service.startService(self)
        self._tick()

    def _tick(self) -> None:
        self.link.report(snapshot(self.gateway))
        self.call = self.reactor.callLater(REPORT_INTERVAL, self._tick)

    def stopService(self) -> None:
        Service.stopService(self)
        if self.call is not None and self.call.active():
            self.call.cancel()
