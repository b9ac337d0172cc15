"""
A worker process of a gateway node (see L{evgate.workers}); the primary
starts it as C{python -m evgate.worker --config PATH --index N
--listen-fds 4,5}.  Not meant to be started by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from evgate.config import ConfigError, loadConfig
from evgate.heap import tuneCollector
from evgate.logs import observerFor
from evgate.service import GatewayService
from evgate.workers import REPORT_FD, PrimaryLink, WorkerReporter


class WorkerRole:
    """
    What makes a L{evgate.service.GatewayService} a worker: its number and
    the listening sockets it inherited.
    """

    def __init__(self, index: int, listenFds: List[int]) -> None:
        self.index = index
        self.listenFds = listenFds


def _tagged(observer: Any, index: int) -> Any:
    # Every line says which worker wrote it: "[worker-1]" in text (the
    # primary's say "-" or a namespace), "worker": 1 in JSON lines.
    system = f"worker-{index}"

    def observe(event: Any) -> None:
        event.setdefault("log_system", system)
        event.setdefault("worker", index)
        observer(event)

    return observe


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evgate.worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fds", required=True)
    args = parser.parse_args(argv)
    try:
        config = loadConfig(args.config)
    except ConfigError as e:
        sys.stderr.write(f"evgate worker {args.index}: {e}\n")
        return 2
    # Imported here, not at the top: importing the reactor installs the
    # default one, and nothing may do that before the process chose it.
    from twisted.internet import reactor, stdio

    observer = observerFor(config.gateway.options) or textFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([_tagged(observer, args.index)], redirectStandardIO=False)
    role = WorkerRole(args.index, [int(fd) for fd in args.listen_fds.split(",") if fd])
    tuneCollector(reactor)
    gateway = GatewayService(config, reactor, worker=role)
    link = PrimaryLink(reactor)
    stdio.StandardIO(link, stdin=0, stdout=REPORT_FD, reactor=reactor)  # type: ignore[call-arg]
    WorkerReporter(gateway, link, reactor).setServiceParent(gateway)
    gateway.startService()
    reactor.addSystemEventTrigger("before", "shutdown", gateway.stopService)
    Logger().info("evgate worker {index} serving", index=args.index)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
