"""
twistd's entry to evgate: C{twistd -n evgate -c evgate.ini}.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.python import usage

from evgate.config import ConfigError, loadConfig
from evgate.heap import tuneCollector
from evgate.service import GatewayService

DEFAULT_CONFIG = "/etc/evgate/evgate.ini"


class Options(usage.Options):
    """
    Command-line options of the evgate twistd plugin.
    """

    synopsis = "[-c evgate.ini] [--check]"
    longdesc = (
        "Run the evgate event-native API gateway: HTTP, SSE, WebSocket and webhook "
        "entrypoints in front of Kafka, MQTT 5 and an embedded in-memory broker. "
        "Everything is configured in one INI file; see docs/configuration.md."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The configuration file (INI) to run."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration file, print the result and exit."],
    ]


def _fail(message: str) -> "SystemExit":
    sys.stderr.write(f"evgate: {message}\n")
    sys.stderr.flush()
    return SystemExit(2)


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Build the gateway service described by the configuration file.

    A mistake in the file ends the process with one line on standard error
    naming the file, section and key, and exit status 2: no traceback for a
    user's mistake.
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    try:
        config = loadConfig(options["config"])
    except ConfigError as e:
        raise _fail(str(e)) from None
    if options["check"]:
        apis = ", ".join(sorted(config.apis))
        sys.stdout.write(f"evgate: {options['config']} is valid ({len(config.apis)} APIs: {apis})\n")
        sys.stdout.flush()
        raise SystemExit(0)
    # This process serves from here on (see evgate.heap).
    tuneCollector(reactor)
    try:
        return GatewayService(config, reactor)
    except ConfigError as e:
        raise _fail(str(e)) from None
