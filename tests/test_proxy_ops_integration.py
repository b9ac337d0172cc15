"""
The HTTP proxy in operation, against real upstreams and a C{twistd -n
evgate} process: HTTPS targets and the TLS options (a private nginx and a
standard library server that asks for client certificates, with a CA made
here), active health checks, rate limits and quotas, and a reload under a
request in flight.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Dict, Tuple

from cryptography import x509
from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, LocalHttpServer, freePort, httpRequest, jsonOf, waitFor
from .mtls_certificates import certificatePem as pem
from .mtls_certificates import issue, keyPem, makeCA
from .test_proxy_integration import NGINX, UpstreamProcess, _connects, request
from .test_webhook_tls import makeServerCertificate

TOKEN = "proxy-ops-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def makeClientCertificate(caKey: Any, ca: x509.Certificate, common: str) -> Tuple[bytes, bytes]:
    """
    A client certificate for C{common} signed by C{ca}: PEM certificate and
    PEM private key.
    """
    key, certificate = issue((caKey, ca), common=common)
    return pem(certificate), keyPem(key)


def write(directory: str, name: str, data: bytes) -> str:
    """
    C{data} in the file C{name} of C{directory}; its path.
    """
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class TlsNginx:
    """
    A private nginx answering C{hello over tls} on two HTTPS ports: one with
    the certificate C{trustedCert}/C{trustedKey}, one with
    C{otherCert}/C{otherKey}.
    """

    def __init__(self, directory: str, trusted: Tuple[str, str], other: Tuple[str, str]) -> None:
        self.directory = tempfile.mkdtemp(prefix="evgate-nginx-tls-")
        self.trustedPort = freePort()
        self.otherPort = freePort()
        d = self.directory
        servers = ""
        for port, (cert, key) in ((self.trustedPort, trusted), (self.otherPort, other)):
            servers += f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ default_type text/plain; return 200 "hello over tls $uri\\n"; }}
    }}"""
        config = f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
{servers}
}}
"""
        path = write(d, "nginx.conf", config.encode())
        self.process = subprocess.Popen([NGINX, "-c", path, "-p", d], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        waitFor(lambda: _connects(self.trustedPort) and _connects(self.otherPort), 20, what="nginx to listen")

    def stop(self) -> None:
        """
        End nginx.
        """
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class _ClientNameHandler(BaseHTTPRequestHandler):
    # Answers with the common name of the client's certificate.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        peer = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        body = ("client " + (names[0] if names else "-") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TlsTargetTests(TestCase):
    """
    HTTPS targets: verified against C{ca-file} by default, refused with a
    C{tls} 502 when untrusted, reachable unverified with C{verify = false},
    and with a client certificate for an upstream that requires one.
    """

    timeout = 120

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="evgate-proxy-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        caKey, ca = makeCA("evgate test CA")
        otherKey, other = makeCA("a CA nobody trusts")
        caFile = write(directory, "ca.pem", pem(ca))
        cert, key = makeServerCertificate(caKey, ca)
        trusted = (write(directory, "server.pem", cert), write(directory, "server.key", key))
        cert, key = makeServerCertificate(otherKey, other)
        untrusted = (write(directory, "other.pem", cert), write(directory, "other.key", key))
        cert, key = makeClientCertificate(caKey, ca, "evgate-client")
        clientCert, clientKey = write(directory, "client.pem", cert), write(directory, "client.key", key)

        self.nginx = TlsNginx(directory, trusted, untrusted)
        self.addCleanup(self.nginx.stop)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*trusted)
        context.load_verify_locations(caFile)
        context.verify_mode = ssl.CERT_REQUIRED
        self.mtls = LocalHttpServer(_ClientNameHandler, tls=context)
        self.addCleanup(self.mtls.stop)

        ini = GatewayIni(listen="tcp:0:interface=127.0.0.1")
        good, bad, mtls = self.nginx.trustedPort, self.nginx.otherPort, self.mtls.port
        endpoints: Dict[str, Dict[str, Any]] = {
            "trusted": {"targets": f"https://127.0.0.1:{good}", "ca_file": caFile},
            "untrusted": {"targets": f"https://127.0.0.1:{bad}", "ca_file": caFile},
            "insecure": {"targets": f"https://127.0.0.1:{bad}", "verify": False},
            "mtls": {"targets": f"https://127.0.0.1:{mtls}", "ca_file": caFile, "client_cert": clientCert,
                     "client_key": clientKey},
            "nocert": {"targets": f"https://127.0.0.1:{mtls}", "ca_file": caFile},
        }
        for name, keys in endpoints.items():
            ini.endpoint(name, "http", response_timeout="5s", **keys)
            ini.section(f"api:{name}", path=f"/{name}", endpoint=name, entrypoints="http-proxy")
        self.gateway = GatewayProcess(ini).start()
        self.addCleanup(self.gateway.stop)

    def test_trustedTarget(self) -> None:
        """
        A target whose certificate the C{ca-file} CA signed answers through
        the proxy (its name, 127.0.0.1, verified too).
        """
        status, _, body = request(self.gateway.port, "GET", "/trusted/x")
        self.assertEqual((status, body), (200, b"hello over tls /x\n"))

    def test_untrustedTarget(self) -> None:
        """
        A target with a certificate from another CA is a 502 problem whose
        stage is C{tls} and whose detail says why, at once (never a hang).
        """
        started = time.monotonic()
        status, headers, body = request(self.gateway.port, "GET", "/untrusted/x", timeout=10)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status, 502)
        self.assertEqual(headers["content-type"], "application/problem+json")
        problem = jsonOf(body)
        self.assertEqual((problem["type"], problem["stage"]), ("https://evgate.dev/problems/upstream-failed", "tls"))
        self.assertIn("certificate verify failed", problem["detail"])
        self.assertTrue(any("failed at tls" in line for line in self.gateway.lines), self.gateway.output())

    def test_verifyFalse(self) -> None:
        """
        C{verify = false} reaches the same untrusted target.
        """
        status, _, body = request(self.gateway.port, "GET", "/insecure/y")
        self.assertEqual((status, body), (200, b"hello over tls /y\n"))

    def test_clientCertificate(self) -> None:
        """
        C{client-cert}/C{client-key} are presented to an upstream that
        requires a client certificate, which sees its name.
        """
        status, _, body = request(self.gateway.port, "GET", "/mtls/z")
        self.assertEqual((status, body), (200, b"client evgate-client\n"))

    def test_missingClientCertificate(self) -> None:
        """
        Without a client certificate, the upstream's refusal of the
        handshake is a 502 at the C{tls} stage, not a hang nor a bare
        connection error.
        """
        started = time.monotonic()
        status, _, body = request(self.gateway.port, "GET", "/nocert/z", timeout=10)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(status, 502)
        problem = jsonOf(body)
        self.assertEqual(problem["stage"], "tls")
        self.assertIn("certificate", problem["detail"])


def metric(gateway: GatewayProcess, prefix: str) -> "str | None":
    """
    The value of the first metric line of C{gateway} that starts with
    C{prefix}, or L{None}.
    """
    _, _, body = httpRequest("GET", gateway.adminUrl("/metrics"), headers=AUTH)
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return line.rsplit(" ", 1)[1]
    return None


def upstreamCount(upstream: UpstreamProcess) -> Dict[str, int]:
    """
    What the echo upstream has seen: C{requests} and C{health} checks.
    """
    status, _, body = request(upstream.port, "GET", "/count")
    return jsonOf(body)


class OperationsTests(TestCase):
    """
    Active health, limits and reload against two echo upstreams.
    """

    timeout = 180

    def setUp(self) -> None:
        self.a = UpstreamProcess()
        self.addCleanup(self.a.stop)
        self.b = UpstreamProcess()
        self.addCleanup(self.b.stop)
        self.ini = self.iniText()
        self.gateway = GatewayProcess(self.ini).start()
        self.addCleanup(self.gateway.stop)
        self.port = self.gateway.port

    def iniText(self, reloaded: bool = False) -> GatewayIni:
        """
        The gateway's file; C{reloaded}: the /live API moved to upstream B
        with a rewrite, and its old endpoint removed.
        """
        ini = GatewayIni(listen="tcp:0:interface=127.0.0.1").admin(TOKEN, "tcp:0:interface=127.0.0.1")
        a, b = self.a.port, self.b.port
        ini.endpoint("checked", "http", targets=f"http://127.0.0.1:{a} http://127.0.0.1:{b}",
                     health_check="/health every 300ms")
        ini.endpoint("b", "http", targets=f"http://127.0.0.1:{b}")
        ini.section("api:checked", path="/checked", endpoint="checked", entrypoints="http-proxy")
        ini.section("api:limited", path="/limited", endpoint="b", entrypoints="http-proxy", rate_limit="3/h")
        ini.section("api:quota", path="/quota", endpoint="b", entrypoints="http-proxy", quota="2/day")
        if reloaded:
            ini.section("api:live", path="/live", endpoint="b", entrypoints="http-proxy", rewrite="/v2")
        else:
            ini.endpoint("a", "http", targets=f"http://127.0.0.1:{a}")
            ini.section("api:live", path="/live", endpoint="a", entrypoints="http-proxy")
        return ini

    def served(self, path: str) -> Dict[str, Any]:
        """
        The echo of a proxied GET of C{path}.
        """
        status, _, body = request(self.port, "GET", path)
        self.assertEqual(status, 200, body)
        return jsonOf(body)

    def test_activeHealth(self) -> None:
        """
        A target whose /health answers 500 goes out of rotation (metric 0,
        a warning logged, no request reaches it) and comes back once it
        answers 200 again (metric 1, logged, requests reach it).
        """
        target = f'evgate_proxy_target_in_service{{endpoint="checked",target="http://127.0.0.1:{self.a.port}"}}'
        waitFor(lambda: upstreamCount(self.a)["health"] >= 1, 10, what="a first health check")
        self.assertEqual(metric(self.gateway, target), "1.0")
        request(self.a.port, "GET", "/set-health?code=500")
        waitFor(lambda: metric(self.gateway, target) == "0.0", 10, what="target A out of service")
        self.assertTrue(any("fails its health check (status 500)" in line for line in self.gateway.lines))
        before = upstreamCount(self.a)["requests"]
        ports = {self.served("/checked/x")["port"] for _ in range(6)}
        self.assertEqual(ports, {self.b.port})
        self.assertEqual(upstreamCount(self.a)["requests"], before)

        request(self.a.port, "GET", "/set-health?code=200")
        waitFor(lambda: metric(self.gateway, target) == "1.0", 10, what="target A back in service")
        self.assertTrue(any("passes its health check again" in line for line in self.gateway.lines))
        seen: set = set()
        waitFor(lambda: seen.add(self.served("/checked/x")["port"]) or seen == {self.a.port, self.b.port}, 10,
                what="requests to reach both targets")

    def test_rateLimit(self) -> None:
        """
        The fourth request of a C{3/h} window is a 429 problem with
        Retry-After, and never reaches the upstream; a C{2/day} quota
        refuses the third the same way.
        """
        if time.time() % 3600 > 3590:
            # Fixed windows: do not start across an hour's boundary.
            time.sleep(3600 - time.time() % 3600 + 0.5)
        for path, allowed in (("/limited/x", 3), ("/quota/x", 2)):
            before = upstreamCount(self.b)["requests"]
            for _ in range(allowed):
                status, headers, _ = request(self.port, "GET", path)
                self.assertEqual(status, 200)
                self.assertIn("ratelimit-remaining", headers)
            status, headers, body = request(self.port, "GET", path)
            self.assertEqual(status, 429, body)
            self.assertEqual(headers["content-type"], "application/problem+json")
            self.assertGreater(int(headers["retry-after"]), 0)
            self.assertIn("retryAfter", jsonOf(body))
            self.assertEqual(upstreamCount(self.b)["requests"], before + allowed, path)

    def test_reloadKeepsRequestsInFlight(self) -> None:
        """
        A reload that moves /live to another endpoint (with a rewrite) and
        removes its old endpoint lets a slow response from the old target
        finish intact, while requests from then on use the new definition.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/live/drip?chunks=12&seconds=0.25")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        first = response.readline()
        self.assertEqual(first, b"line 0\n")

        with open(self.gateway.ini, "w") as f:
            f.write(str(self.iniText(reloaded=True)))
        status, _, body = httpRequest("POST", self.gateway.adminUrl("/reload"), b"", headers=AUTH)
        self.assertEqual(status, 200, body)
        summary = jsonOf(body)
        self.assertEqual((summary["apis"]["changed"], summary["endpoints"]["removed"]), (["live"], ["a"]))

        seen = self.served("/live/after")
        self.assertEqual((seen["port"], seen["uri"]), (self.b.port, "/v2/after"))
        rest = response.read()
        connection.close()
        self.assertEqual(first + rest, b"".join(b"line %d\n" % i for i in range(12)))

    def test_upgradeRefusalChunked(self) -> None:
        """
        An upstream that refuses an upgrade with a chunked body gets its
        body to the client whole.
        """
        status, headers, body = request(self.port, "GET", "/live/refuse",
                                        headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        self.assertEqual((status, body), (403, b"refused: no upgrade here\n"))

    def test_connectionNamedHeaders(self) -> None:
        """
        Headers the upstream names in its own Connection header do not
        reach the client; the others do.
        """
        status, headers, _ = request(self.port, "GET", "/live/h")
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-upstream"], "echo")
        self.assertNotIn("x-private", headers)

