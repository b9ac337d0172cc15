"""
Shared test machinery: an in-memory gateway for unit tests, and a real
C{twistd -n evgate} subprocess for end-to-end tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, List, Optional

from twisted.internet.task import Clock

from evgate.config import parseConfig
from evgate.service import GatewayService

from .fixtures import (  # noqa: F401  (re-exported: tests import their fixtures from here)
    KAFKA,
    MQTT_HOST,
    MQTT_PORT,
    QUICK_KAFKA,
    REDIS,
    REDIS_HOST,
    REDIS_PORT,
    Delivery,
    GatewayIni,
    LocalHttpServer,
    WebhookReceiver,
    demoIni,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

def memoryGateway(retention: int = 100, entrypoints: str = "http-post http-get",
                  start: str = "latest", clock: Optional[Clock] = None,
                  extra: str = "") -> GatewayService:
    """
    A gateway on the memory endpoint, driven by C{clock}, not started (no
    listener); use C{StubTreq(gateway.resource)} to talk to it.
    """
    text = MEMORY_INI.format(retention=retention, entrypoints=entrypoints, start=start) + extra
    return GatewayService(parseConfig(text, "test.ini"), clock if clock is not None else Clock())


# The memory gateway's INI as a template (for tests that edit its text).
MEMORY_INI = str(GatewayIni().memory(retention="{retention}")
                 .api("demo", entrypoints="{entrypoints}", start="{start}"))


def twistdEnvironment() -> "dict[str, str]":
    """
    The environment a C{twistd} subprocess needs to import this checkout's
    evgate.
    """
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def waitFor(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
            what: str = "condition") -> Any:
    """
    Poll C{condition} (from a test thread, for subprocess tests) until it
    returns something true, or fail after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def freePort() -> int:
    """
    A TCP port that was free a moment ago on 127.0.0.1.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """
    C{twistd -n evgate -c <ini>} in a subprocess.  The INI's C{listen} may
    use C{tcp:0}: the port is read from the process's log.
    """

    def __init__(self, ini: "str | GatewayIni", name: str = "gateway") -> None:
        self.directory = tempfile.mkdtemp(prefix="evgate-test-")
        self.ini = os.path.join(self.directory, f"{name}.ini")
        with open(self.ini, "w") as f:
            f.write(str(ini))
        self.process: Optional[subprocess.Popen] = None
        self.lines: List[str] = []
        self.ports: List[int] = []
        self.adminPorts: List[int] = []
        self._reader: Optional[threading.Thread] = None

    def start(self, timeout: float = 30.0) -> "GatewayProcess":
        """
        Start the process and wait until every gateway listener logged its
        port.
        """
        env = twistdEnvironment()
        self.lines = []
        self.ports = []
        self.adminPorts = []
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "evgate", "-c", self.ini],
            cwd=self.directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        expected = self.listenerCount()
        admin = 1 if re.search(r"(?m)^\s*admin\s*=\s*(?!none\s*$)\S", open(self.ini).read()) else 0
        waitFor(lambda: (len(self.ports) >= expected and len(self.adminPorts) >= admin)
                or self.process.poll() is not None, timeout, what="the gateway to listen")
        if self.process.poll() is not None:
            raise AssertionError("gateway exited at start:\n" + self.output())
        # Listening happens before the reactor runs; one answered request
        # proves the process serves (and has its signal handlers).
        httpRequest("GET", self.url("/"), timeout=timeout)
        return self

    def listenerCount(self) -> int:
        """
        How many gateway listeners the INI declares.
        """
        for line in open(self.ini):
            match = re.match(r"\s*listen\s*=\s*(.*)", line)
            if match:
                return len(match.group(1).split())
        return 1

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            match = re.search(r"evgate (gateway|admin) listening on port (\d+)", line)
            if match:
                (self.ports if match.group(1) == "gateway" else self.adminPorts).append(int(match.group(2)))

    @property
    def port(self) -> int:
        """
        The first gateway port.
        """
        return self.ports[0]

    def url(self, path: str) -> str:
        """
        An URL on the gateway.
        """
        return f"http://127.0.0.1:{self.port}{path}"

    def adminUrl(self, path: str) -> str:
        """
        An URL on the admin listener.
        """
        return f"http://127.0.0.1:{self.adminPorts[0]}{path}"

    def output(self) -> str:
        """
        Everything the process printed so far.
        """
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """
        Stop the process and return its exit status.
        """
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"gateway did not stop within {timeout}s:\n" + self.output()) from None
        if self._reader is not None:
            self._reader.join(5)
        return self.process.returncode


def httpRequest(method: str, url: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
                timeout: float = 30.0) -> "tuple[int, dict, bytes]":
    """
    A blocking HTTP request with the standard library (an independent client):
    status, lower-cased headers, body.  Never raises for HTTP errors.
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def jsonOf(body: bytes) -> Any:
    """
    The JSON document in C{body}.
    """
    return json.loads(body.decode("utf-8"))
