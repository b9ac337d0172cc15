"""
End-to-end tests of the operations side of a real C{twistd -n evgate}
process: the admin listener's health, readiness, metrics and AsyncAPI
routes and console page; JSON log lines; and C{twistd evgate --check}.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .helpers import TWISTD, GatewayIni, GatewayProcess, demoIni, httpRequest, twistdEnvironment, waitFor

TOKEN = "ops-e2e-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

def opsIni(entrypoints: str = "http-post http-get sse", **gateway: Any) -> GatewayIni:
    """
    /demo with an admin API and access logs, and C{gateway}'s keys.
    """
    return demoIni(entrypoints, listen="tcp:0:interface=127.0.0.1", access_log=True, **gateway).admin(TOKEN)


class AdminEndToEndTests(SynchronousTestCase):
    """
    The admin listener of a running gateway, with JSON logs.
    """

    def setUp(self) -> None:
        self.gateway = GatewayProcess(opsIni(log_format="json")).start()
        self.addCleanup(self.gateway.stop)

    def test_routes(self) -> None:
        """
        /health and /ready answer without the token; /metrics counts what
        the data plane did, in the Prometheus format; /apis/demo/asyncapi
        and the console page are served.
        """
        gateway = self.gateway
        self.assertEqual(httpRequest("GET", gateway.adminUrl("/health"))[0], 200)
        status, _, body = httpRequest("GET", gateway.adminUrl("/ready"))
        self.assertEqual((status, json.loads(body)["status"]), (200, "ready"))
        for i in range(2):
            self.assertEqual(httpRequest("POST", gateway.url("/demo"), b"m%d" % i)[0], 202)
        self.assertEqual(httpRequest("GET", gateway.adminUrl("/metrics"))[0], 401)
        status, headers, body = httpRequest("GET", gateway.adminUrl("/metrics"), headers=AUTH)
        self.assertEqual(status, 200)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(body.decode()) for s in family.samples}
        self.assertEqual(samples[("evgate_requests_total", (("api", "demo"), ("code", "202"),
                                                            ("entrypoint", "http-post")))], 2)
        self.assertEqual(samples[("evgate_endpoint_connected", (("endpoint", "local"), ("type", "memory")))], 1)
        status, headers, body = httpRequest("GET", gateway.adminUrl("/apis/demo/asyncapi"), headers=AUTH)
        document = json.loads(body)
        self.assertEqual(document["servers"]["http"]["host"], f"127.0.0.1:{gateway.port}")
        status, headers, body = httpRequest("GET", gateway.adminUrl("/"))
        self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertIn(b"evgate", body)

    def test_jsonLogs(self) -> None:
        """
        With log-format = json every line the process writes is a JSON
        object, and the access log's lines carry their fields as keys.
        """
        gateway = self.gateway
        self.assertEqual(httpRequest("POST", gateway.url("/demo?key=k"), b"hello")[0], 202)

        def accessLine() -> object:
            for line in list(gateway.lines):
                record = json.loads(line)
                if record.get("namespace") == "evgate.access" and record.get("method") == "POST":
                    return record
            return None

        record = waitFor(accessLine, 30, what="the access line")
        self.assertEqual((record["api"], record["entrypoint"], record["status"], record["bytesIn"],
                          record["level"]), ("demo", "http-post", 202, 5, "info"))
        self.assertTrue(record["time"].endswith("Z"))
        for line in gateway.lines:
            self.assertIsInstance(json.loads(line), dict, line)


class CheckTests(SynchronousTestCase):
    """
    C{twistd evgate --check -c FILE}: validate a configuration and exit.
    """

    def check(self, text: str) -> subprocess.CompletedProcess:
        """
        Run --check on C{text}.
        """
        directory = tempfile.mkdtemp(prefix="evgate-check-")
        path = os.path.join(directory, "evgate.ini")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run([TWISTD, "evgate", "--check", "-c", path], capture_output=True, text=True,
                              timeout=60, cwd=directory, env=twistdEnvironment())

    def test_valid(self) -> None:
        """
        A valid file: exit status 0 and one line naming its APIs.
        """
        result = self.check(str(opsIni()))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"evgate: .*evgate\.ini is valid \(1 APIs: demo\)")

    def test_invalid(self) -> None:
        """
        A mistake: exit status 2 and one line naming the file, section and
        key, without a traceback.
        """
        result = self.check(str(opsIni("http-post fax")))
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stderr.strip(), r"^evgate: .*evgate\.ini \[api:demo\] entrypoints: unknown entrypoint")
        self.assertNotIn("Traceback", result.stderr + result.stdout)
