"""
Tests for L{evgate.config}: the INI model and its error messages.
"""

import os
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from evgate.config import ConfigError, loadConfig, parseConfig

from .helpers import ROOT, TWISTD

GOOD = """
[gateway]
listen = tcp:8080
max-message-bytes = 1048576

[endpoint:local]
type = memory
retention = 10000

[api:demo]
path = /demo
endpoint = local
topic = demo
entrypoints = http-post http-get
plans = keyless
start = latest
"""


def replaced(old: str, new: str) -> str:
    """
    The good configuration with one line changed.
    """
    assert old in GOOD, old
    return GOOD.replace(old, new)


class ParseTests(SynchronousTestCase):
    """
    A valid file becomes a frozen model.
    """

    def test_model(self) -> None:
        """
        Every key of the example reaches the model.
        """
        config = parseConfig(GOOD, "evgate.ini")
        self.assertEqual(config.gateway.listen, ("tcp:8080",))
        self.assertEqual(config.gateway.maxMessageBytes, 1048576)
        self.assertEqual(config.endpoints["local"].type, "memory")
        self.assertEqual(config.endpoints["local"].options["retention"], 10000)
        api = config.apis["demo"]
        self.assertEqual((api.path, api.endpoint, api.topic, api.entrypoints, api.plans, api.start),
                         ("/demo", "local", "demo", ("http-post", "http-get"), ("keyless",), "latest"))

    def test_defaults(self) -> None:
        """
        Keys left out take their documented defaults.
        """
        config = parseConfig("[endpoint:m]\ntype = memory\n[api:a]\npath = /a\nendpoint = m\n"
                             "topic = t\nentrypoints = http-get\n")
        self.assertEqual(config.gateway.listen, ("tcp:8080",))
        self.assertEqual(config.endpoints["m"].options["retention"], 10000)
        self.assertEqual(config.apis["a"].plans, ("keyless",))
        self.assertEqual(config.apis["a"].start, "latest")

    def test_noInterpolation(self) -> None:
        """
        Percent signs are taken literally (interpolation is off).
        """
        config = parseConfig(replaced("topic = demo", "topic = de%(mo)s"))
        self.assertEqual(config.apis["demo"].topic, "de%(mo)s")

    def test_inlineComments(self) -> None:
        """
        C{; comment} after a value is a comment; C{#} inside a value is not.
        """
        config = parseConfig(replaced("retention = 10000", "retention = 500   ; per topic")
                             .replace("topic = demo", "topic = sensors/#"))
        self.assertEqual(config.endpoints["local"].options["retention"], 500)
        self.assertEqual(config.apis["demo"].topic, "sensors/#")

    def test_severalListeners(self) -> None:
        """
        C{listen} takes several endpoint strings.
        """
        config = parseConfig(replaced("listen = tcp:8080", "listen = tcp:8080 unix:/tmp/evgate.sock"))
        self.assertEqual(config.gateway.listen, ("tcp:8080", "unix:/tmp/evgate.sock"))


class ErrorTests(SynchronousTestCase):
    """
    Every mistake is one L{ConfigError} naming file, section and key.
    """

    def assertError(self, text: str, section: object, key: object, fragment: str) -> None:
        """
        Parsing C{text} fails at C{section}/C{key} with C{fragment} in the
        message, and the message starts with the file name.
        """
        error = self.assertRaises(ConfigError, parseConfig, text, "/etc/evgate/evgate.ini")
        self.assertEqual((error.section, error.key), (section, key), str(error))
        self.assertIn(fragment, str(error))
        self.assertTrue(str(error).startswith("/etc/evgate/evgate.ini"), str(error))
        self.assertNotIn("\n", str(error))

    def test_notIni(self) -> None:
        """
        A line that is not INI is reported with its line number and text,
        on one line.
        """
        text = "[gateway]\nlisten = tcp:0\nthis is not ini\n"
        self.assertError(text, None, None, "line 3: not a key = value, [section] or comment: this is not ini")

    def test_unknownSection(self) -> None:
        """
        A section that is neither gateway, endpoint nor api is refused.
        """
        self.assertError(GOOD + "[apis:x]\n", "apis:x", None, "unknown section")

    def test_unknownKey(self) -> None:
        """
        A misspelt key is refused, in every kind of section.
        """
        self.assertError(replaced("retention = 10000", "retension = 10000"),
                         "endpoint:local", "retension", "unknown key")
        self.assertError(replaced("start = latest", "start = latest\nstrat = x"), "api:demo", "strat", "unknown key")
        self.assertError(replaced("max-message-bytes", "max-msg-bytes"), "gateway", "max-msg-bytes", "unknown key")

    def test_missingKey(self) -> None:
        """
        A required key left out is named.
        """
        self.assertError(replaced("topic = demo\n", ""), "api:demo", "topic", "missing")
        self.assertError(replaced("type = memory\n", ""), "endpoint:local", "type", "missing")

    def test_badEndpointString(self) -> None:
        """
        A listen value Twisted cannot parse is refused with its text.
        """
        self.assertError(replaced("listen = tcp:8080", "listen = tcp:eighty"), "gateway", "listen", "tcp:eighty")
        self.assertError(replaced("listen = tcp:8080", "listen = carrier-pigeon:1"), "gateway", "listen",
                         "carrier-pigeon")
        self.assertError(replaced("listen = tcp:8080", "listen = systemd:domain=INET"), "gateway", "listen",
                         "index")

    def test_unknownEndpoint(self) -> None:
        """
        An API naming an endpoint that has no section is refused.
        """
        self.assertError(replaced("endpoint = local", "endpoint = kafka9"), "api:demo", "endpoint",
                         "unknown endpoint 'kafka9' (known: local)")

    def test_duplicatePath(self) -> None:
        """
        Two APIs on one path are refused.
        """
        self.assertError(GOOD + "[api:twin]\npath = /demo\nendpoint = local\ntopic = t\nentrypoints = http-get\n",
                         "api:twin", "path", "already the path of [api:demo]")

    def test_badValues(self) -> None:
        """
        Values of the wrong kind or out of range are refused with what was
        expected.
        """
        self.assertError(replaced("retention = 10000", "retention = lots"), "endpoint:local", "retention",
                         "expected an integer")
        self.assertError(replaced("retention = 10000", "retention = 0"), "endpoint:local", "retention",
                         "at least 1")
        self.assertError(replaced("start = latest", "start = yesterday"), "api:demo", "start",
                         "expected one of latest, earliest")
        self.assertError(replaced("type = memory", "type = rabbit"), "endpoint:local", "type", "expected one of")
        self.assertError(replaced("entrypoints = http-post http-get", "entrypoints = http-post carrier"),
                         "api:demo", "entrypoints", "unknown entrypoint 'carrier'")
        self.assertError(replaced("plans = keyless", "plans = magic"), "api:demo", "plans", "unknown plan")
        self.assertError(replaced("path = /demo", "path = demo"), "api:demo", "path", "not a context path")
        self.assertError(replaced("path = /demo", "path = /a/../b"), "api:demo", "path", "not a context path")
        self.assertError(replaced("path = /demo", "path = /demo/"), "api:demo", "path", "not a context path")

    def test_duplicateKey(self) -> None:
        """
        A key given twice in one section is refused with its line.
        """
        self.assertError(replaced("topic = demo", "topic = demo\ntopic = other"), "api:demo", "topic",
                         "appears twice")

    def test_storeEndpoint(self) -> None:
        """
        A Kafka store must name a Kafka endpoint, and --check sees it.
        """
        self.assertError(replaced("max-message-bytes = 1048576", "store = kafka:local/evgate-store"),
                         "gateway", "store", "[endpoint:local] is of type memory; the store needs kafka")

    def test_workers(self) -> None:
        """
        C{workers > 1} is refused for what would live in one process only:
        a memory endpoint, locally counted limits, API keys without a
        shared store, and listeners other than plain TCP.
        """
        kafka = ("[endpoint:local]\ntype = memory\nretention = 10000",
                 "[endpoint:local]\ntype = kafka\nbootstrap.servers = 127.0.0.1:9092")
        workers = ("listen = tcp:8080", "listen = tcp:8080\nworkers = 2")
        self.assertError(replaced(*workers), "gateway", "workers", "memory endpoint [endpoint:local] of [api:demo]")
        onKafka = replaced(*workers).replace(*kafka)
        self.assertEqual(parseConfig(onKafka, "x.ini").gateway.workers, 2)
        self.assertError(onKafka.replace("start = latest", "start = latest\nrate-limit = 5/s"), "gateway",
                         "workers", "limits-store = redis://")
        self.assertEqual(parseConfig(onKafka.replace("start = latest", "start = latest\nrate-limit = 5/s").replace(
            "workers = 2", "workers = 2\nlimits-store = redis://127.0.0.1:6379/0"), "x.ini").gateway.workers, 2)
        self.assertError(onKafka.replace("plans = keyless", "plans = api-key").replace(
            "workers = 2", "workers = 2\nstore = memory"), "gateway", "workers", "API keys of [api:demo]")
        self.assertError(onKafka.replace("listen = tcp:8080", "listen = unix:/tmp/evgate.sock"), "gateway",
                         "workers", "plain TCP listeners only")
        self.assertError(onKafka.replace("workers = 2", "workers = 0"), "gateway", "workers", "at least 1")

    def test_noApi(self) -> None:
        """
        A file without any API is refused: there would be nothing to serve.
        """
        self.assertError("[endpoint:m]\ntype = memory\n", None, None, "no [api:NAME]")

    def test_unreadableFile(self) -> None:
        """
        A missing file is named with the reason.
        """
        error = self.assertRaises(ConfigError, loadConfig, "/nonexistent/evgate.ini")
        self.assertIn("/nonexistent/evgate.ini: cannot read", str(error))


class CommandLineTests(SynchronousTestCase):
    """
    C{twistd evgate} stops with one line and a non-zero status on a mistake.
    """


    def test_mistakeIsOneLine(self) -> None:
        """
        A configuration mistake prints exactly one line naming the file,
        section and key, no traceback, and exits with status 2.
        """
        with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as f:
            f.write(replaced("endpoint = local", "endpoint = nowhere"))
        self.addCleanup(os.unlink, f.name)
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "evgate", "-c", f.name], capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr + result.stdout)
        self.assertEqual(result.stderr.strip().splitlines(),
                         [f"evgate: {f.name} [api:demo] endpoint: unknown endpoint 'nowhere' (known: local)"])
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_portInUse(self) -> None:
        """
        A listener whose port is taken stops start-up with one line naming
        the file, section, key and reason, exit status 2, no traceback;
        with workers (one socket per process) too.
        """
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        kafka = ("[endpoint:local]\ntype = memory\nretention = 10000",
                 "[endpoint:local]\ntype = kafka\nbootstrap.servers = 127.0.0.1:9092")
        one = replaced("listen = tcp:8080", f"listen = tcp:{port}:interface=127.0.0.1")
        for text in (one, one.replace("max-message-bytes", "workers = 2\nmax-message-bytes").replace(*kafka)):
            with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as f:
                f.write(text)
            self.addCleanup(os.unlink, f.name)
            result = subprocess.run([TWISTD, "-n", "--pidfile=", "evgate", "-c", f.name], capture_output=True,
                                    text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 2, output)
            self.assertIn(f"evgate: {f.name} [gateway] listen: cannot listen on 127.0.0.1:{port}: "
                          "Address already in use", output)
            self.assertNotIn("Traceback", output)

    def test_check(self) -> None:
        """
        C{--check} validates a file without starting and says so.
        """
        path = os.path.join(ROOT, "etc", "evgate.ini")
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "evgate", "--check", "-c", path], capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("is valid", result.stdout)

    def test_help(self) -> None:
        """
        C{twistd evgate --help} documents C{-c/--config}.
        """
        result = subprocess.run([TWISTD, "evgate", "--help"], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config=", result.stdout)
        self.assertIn("-c", result.stdout)
