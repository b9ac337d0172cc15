"""
The systemd units of systemd/: C{systemd-analyze verify} accepts them
(warnings count as failures: systemd only warns about a misspelt
directive), their C{--check} pre-start command works, and socket activation
(C{listen = systemd:domain=INET:index=0}) serves through a socket that
C{systemd-socket-activate} holds, as evgate.socket does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from typing import List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from .helpers import ROOT, TWISTD, demoIni, freePort, httpRequest, waitFor

UNITS = os.path.join(ROOT, "systemd")
INSTALLED_TWISTD = "/opt/evgate/bin/twistd"

def demoOn(listen: str) -> str:
    """
    A configuration file's text: /demo listening on C{listen}.
    """
    return str(demoIni("http-post http-get", listen=listen))


def unitCopies(directory: str, edit: Tuple[str, str] = ("", "")) -> List[str]:
    """
    Copy the units to C{directory} with the virtualenv's twistd in place of
    the installed one (verify checks that commands exist), applying the
    textual replacement C{edit}; their paths.
    """
    paths = []
    for name in ("evgate.service", "evgate.socket"):
        with open(os.path.join(UNITS, name)) as f:
            text = f.read().replace(INSTALLED_TWISTD, TWISTD)
        if edit[0]:
            text = text.replace(edit[0], edit[1])
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    return paths


def verify(paths: List[str]) -> Tuple[int, str]:
    """
    Run C{systemd-analyze verify} on C{paths}: its exit status and output.
    """
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    return result.returncode, (result.stdout + result.stderr).strip()


class UnitTests(SynchronousTestCase):
    """
    The unit files.
    """

    def setUp(self) -> None:
        # Integration tests fail loudly rather than skip.
        self.assertIsNotNone(shutil.which("systemd-analyze"), "systemd-analyze is needed "
                             "(scripts/install-system-deps installs the systemd package)")
        self.directory = tempfile.mkdtemp(prefix="evgate-units-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_verify(self) -> None:
        """
        systemd-analyze verify accepts the service and the socket without a
        word.
        """
        self.assertEqual(verify(unitCopies(self.directory)), (0, ""))

    def test_verifyCatchesMistakes(self) -> None:
        """
        The check above is strict enough to matter: a misspelt directive or
        a bad value (which systemd only warns about), and a command that
        does not exist, each fail it.
        """
        for edit in (("Restart=on-failure", "Restart=sometimes"), ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
                     (TWISTD, "/nonexistent/twistd")):
            directory = tempfile.mkdtemp(dir=self.directory)
            self.assertNotEqual(verify(unitCopies(directory, edit)), (0, ""), edit)

    def test_checkBeforeStart(self) -> None:
        """
        The pre-start command of the service is twistd's --check of the
        configuration file: it passes on a good file and stops the start on
        a broken one.
        """
        (service, _) = unitCopies(self.directory)
        with open(service) as f:
            line = [text for text in f.read().splitlines() if text.startswith("ExecStartPre=")][0]
        command = shlex.split(line.split("=", 1)[1])
        ini = os.path.join(self.directory, "evgate.ini")
        command[command.index("/etc/evgate/evgate.ini")] = ini
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(ini, "w") as f:
            f.write(demoOn("systemd:domain=INET:index=0"))
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=self.directory)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(ini, "w") as f:
            f.write(demoOn("systemd:domain=INET"))
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=self.directory)
        self.assertEqual(result.returncode, 2)
        self.assertIn("[gateway] listen", result.stderr)


class SocketActivationTests(SynchronousTestCase):
    """
    evgate behind a socket that systemd (here systemd-socket-activate)
    holds.
    """

    def test_servesInheritedSocket(self) -> None:
        """
        With listen = systemd:domain=INET:index=0, the gateway serves on
        the socket it inherits (LISTEN_FDS), and its log names the port.
        """
        self.assertIsNotNone(shutil.which("systemd-socket-activate"), "systemd-socket-activate is needed")
        directory = tempfile.mkdtemp(prefix="evgate-socket-")
        self.addCleanup(shutil.rmtree, directory, True)
        ini = os.path.join(directory, "evgate.ini")
        with open(ini, "w") as f:
            f.write(demoOn("systemd:domain=INET:index=0"))
        port = freePort()
        log = open(os.path.join(directory, "twistd.log"), "w+")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            # --fdname: real systemd always names its sockets (LISTEN_FDNAMES,
            # the socket unit's name by default); Twisted insists on it.
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=evgate.socket",
             f"--setenv=PYTHONPATH={ROOT}",
             TWISTD, "-n", "--pidfile=", "evgate", "-c", ini],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

        self.addCleanup(stop)
        # The first connection starts the gateway, as systemd would.
        status, _, body = waitFor(lambda: _tryPost(port), 30, what="the socket-activated gateway")
        self.assertEqual(status, 202, body)
        status, _, body = httpRequest("GET", f"http://127.0.0.1:{port}/demo?timeout=0&limit=1")
        self.assertEqual(status, 200)
        log.seek(0)
        self.assertIn(f"evgate gateway listening on port {port}", log.read())


def _tryPost(port: int) -> object:
    try:
        return httpRequest("POST", f"http://127.0.0.1:{port}/demo", b"via systemd", timeout=10)
    except OSError:
        return None
