"""
End-to-end tests of client certificates: a real C{twistd -n evgate}
process with a plain TCP listener and an C{mtls:} listener, and the
standard library's TLS client holding certificates made here with
C{cryptography} (a throw-away server CA, a clients CA the listener trusts
and one it does not).

The configuration is the one docs/security.md shows.  The test methods
block; the gateway runs in another process.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import ssl
import time
from typing import Dict, Optional, Tuple

from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, waitFor
from .mtls_certificates import Issued, certificatePem, issue, makeCA, writeIssued

SERVER_CA = makeCA("Gateway CA")
CLIENTS_CA = makeCA("Clients CA")
UNTRUSTED_CA = makeCA("Someone else")


def mtlsIni() -> GatewayIni:
    """
    A plain listener and an mtls one (files relative to the INI); /orders
    behind mtls with each caller seeing its own messages, /limited behind
    mtls with a rate limit per consumer, /open keyless.
    """
    listen = ("tcp:0:interface=127.0.0.1 "
              "mtls:0:interface=127.0.0.1:certKey=gateway.pem:privateKey=gateway.key:caCerts=clients-ca.pem")
    return (GatewayIni(listen=listen, access_log=True).memory()
            .api("orders", entrypoints="http-post http-get sse", plans="mtls", start="earliest",
                 filter="headers.to == claims.cn")
            .api("limited", plans="mtls", rate_limit="2/min")
            .api("open", plans="keyless"))


class MtlsEndToEndTests(TestCase):
    """
    One gateway process with an mtls listener.
    """

    timeout = 120

    def setUp(self) -> None:
        self.gateway = GatewayProcess(mtlsIni())
        directory = self.gateway.directory
        writeIssued(directory, "gateway", issue(SERVER_CA, "localhost", dns=["localhost"], ips=["127.0.0.1"],
                                                server=True))
        with open(os.path.join(directory, "clients-ca.pem"), "wb") as f:
            f.write(certificatePem(CLIENTS_CA[1]))
        with open(os.path.join(directory, "server-ca.pem"), "wb") as f:
            f.write(certificatePem(SERVER_CA[1]))
        self.directory = directory
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.tlsPort = self.gateway.ports[1]

    def context(self, client: Optional[Issued] = None, name: str = "client") -> ssl.SSLContext:
        """
        A TLS client context that trusts the gateway's CA and presents
        C{client}, if given.
        """
        context = ssl.create_default_context(cafile=os.path.join(self.directory, "server-ca.pem"))
        if client is not None:
            cert, key = writeIssued(self.directory, name, client)
            context.load_cert_chain(cert, key)
        return context

    def request(self, context: ssl.SSLContext, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
        """
        One request on a new TLS connection to the mtls listener.
        """
        connection = http.client.HTTPSConnection("127.0.0.1", self.tlsPort, context=context, timeout=15)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def test_identifiedByCertificate(self) -> None:
        """
        A certificate of the trusted CA is served as its CN: the operator
        filter C{headers.to == claims.cn} gives each caller its own
        messages, and the access log names the consumer.
        """
        alice = self.context(issue(CLIENTS_CA, "alice"), "alice")
        bob = self.context(issue(CLIENTS_CA, "bob"), "bob")
        for to in ("alice", "bob"):
            status, _, body = self.request(alice, "POST", "/orders", f"for {to}".encode(),
                                           {"X-Message-Header-to": to})
            self.assertEqual(status, 202, body)
        status, _, body = self.request(alice, "GET", "/orders?timeout=0")
        self.assertEqual(status, 200, body)
        self.assertIn(b"for alice", body)
        self.assertNotIn(b"for bob", body)
        status, _, body = self.request(bob, "GET", "/orders?timeout=0")
        self.assertIn(b"for bob", body)
        self.assertNotIn(b"for alice", body)
        waitFor(lambda: "consumer=alice" in self.gateway.output(), 10, what="the access log line")

    def test_noCertificate(self) -> None:
        """
        Without a certificate the handshake completes: a keyless API is
        served, and an mtls API answers 401 with a problem and the plan's
        challenge.  The same on the plain listener.
        """
        anonymous = self.context()
        self.assertEqual(self.request(anonymous, "POST", "/open", b"x")[0], 202)
        status, headers, body = self.request(anonymous, "POST", "/orders", b"x")
        self.assertEqual(status, 401, body)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(headers["www-authenticate"], 'MutualTLS realm="orders"')
        self.assertIn("client certificate", json.loads(body)["detail"])
        connection = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=15)
        self.addCleanup(connection.close)
        connection.request("POST", "/orders", body=b"x")
        self.assertEqual(connection.getresponse().status, 401)

    def assertRefused(self, context: ssl.SSLContext) -> None:
        """
        A request with C{context} never gets an HTTP answer: the gateway
        ends the handshake (with TLS 1.3 the client learns it on its first
        read).
        """
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            self.request(context, "POST", "/open", b"x")

    def test_untrustedCertificate(self) -> None:
        """
        A certificate of a CA the listener does not trust fails the
        handshake, also for a keyless API.
        """
        self.assertRefused(self.context(issue(UNTRUSTED_CA, "mallory"), "mallory"))

    def test_expiredCertificate(self) -> None:
        """
        An expired certificate of the trusted CA fails the handshake.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        expired = issue(CLIENTS_CA, "alice", notBefore=now - datetime.timedelta(days=2),
                        notAfter=now - datetime.timedelta(days=1))
        self.assertRefused(self.context(expired, "expired"))

    def test_rateLimitPerConsumer(self) -> None:
        """
        C{rate-limit = 2/min} counts per certificate identity: alice's
        third request is a 429, bob still has his two.
        """
        alice = self.context(issue(CLIENTS_CA, "alice"), "alice")
        bob = self.context(issue(CLIENTS_CA, "bob"), "bob")
        statuses = [self.request(alice, "POST", "/limited", b"x")[0] for _ in range(3)]
        self.assertEqual(statuses, [202, 202, 429])
        self.assertEqual(self.request(bob, "POST", "/limited", b"x")[0], 202)

    def test_streamEndsWithTheCertificate(self) -> None:
        """
        An SSE stream opened with a certificate that expires in a few
        seconds ends then with an error event.
        """
        notAfter = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=4)
        context = self.context(issue(CLIENTS_CA, "alice", notAfter=notAfter), "short")
        connection = http.client.HTTPSConnection("127.0.0.1", self.tlsPort, context=context, timeout=15)
        self.addCleanup(connection.close)
        connection.request("GET", "/orders", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        received = b""
        while b"event: error" not in received:
            chunk = response.read1(4096)
            if not chunk:
                break
            received += chunk
        self.assertIn(b"event: error", received)
        self.assertIn(b"credentials of this stream expired", received)
        self.assertGreaterEqual(time.time(), notAfter.timestamp() - 1)

