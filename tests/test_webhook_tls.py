"""
Webhook delivery over HTTPS, the default: a throw-away CA and server
certificates made here (with C{cryptography}), a TLS receiver on
127.0.0.1, and a C{twistd -n evgate} subprocess that trusts the CA through
C{[gateway] webhook-ca-file}.  Also the key's configuration errors.

No broker is needed (the in-memory endpoint).  The end-to-end test methods
block; the gateway runs in another process.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any, Tuple

from cryptography import x509
from standardwebhooks.webhooks import Webhook
from twisted.trial.unittest import SynchronousTestCase, TestCase

from evgate.config import ConfigError, parseConfig
from evgate.webhook.client import WebhookTrust

from .helpers import GatewayIni, GatewayProcess, WebhookReceiver, httpRequest, waitFor
from .mtls_certificates import certificatePem as pem
from .mtls_certificates import issue, keyPem, makeCA
from .test_webhook_integration import TOKEN, admin


def trustingIni() -> GatewayIni:
    """
    /orders delivering to webhooks, trusting the CA in C{ca.pem} (relative
    to the INI's directory).  One attempt: a refused certificate pauses
    the subscription at once (there is no dlq), which the test waits for.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store="sqlite:evgate.sqlite").admin(TOKEN)
            .gateway(webhook_allow_private=True, webhook_ca_file="ca.pem").memory()
            .api("orders", entrypoints="http-post webhook", webhook={"timeout": 5, "retry.max-attempts": 1}))


def makeServerCertificate(caKey: Any, ca: x509.Certificate) -> Tuple[bytes, bytes]:
    """
    A server certificate for 127.0.0.1 signed by C{ca}: PEM certificate and
    PEM private key.
    """
    key, certificate = issue((caKey, ca), common="127.0.0.1", ips=["127.0.0.1"], server=True)
    return pem(certificate), keyPem(key)


def serverContext(directory: str, certificate: bytes, key: bytes) -> ssl.SSLContext:
    """
    A TLS server context presenting C{certificate}.
    """
    certFile = os.path.join(directory, "server.pem")
    keyFile = os.path.join(directory, "server.key")
    with open(certFile, "wb") as f:
        f.write(certificate)
    with open(keyFile, "wb") as f:
        f.write(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certFile, keyFile)
    return context


class HttpsDeliveryTests(TestCase):
    """
    A gateway that trusts a private CA delivers to receivers with that
    CA's certificates, and refuses any other certificate.
    """

    timeout = 90

    def setUp(self) -> None:
        self.caKey, self.ca = makeCA("evgate test CA")
        self.gateway = GatewayProcess(trustingIni())
        with open(os.path.join(self.gateway.directory, "ca.pem"), "wb") as f:
            f.write(pem(self.ca))
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def startWebhookReceiver(self, caKey: Any, ca: x509.Certificate) -> WebhookReceiver:
        """
        An HTTPS receiver on 127.0.0.1 with a certificate signed by C{ca}.
        """
        directory = tempfile.mkdtemp(prefix="evgate-tls-")
        receiver = WebhookReceiver(tls=serverContext(directory, *makeServerCertificate(caKey, ca)))
        self.addCleanup(receiver.stop)
        return receiver

    def publish(self, body: bytes) -> None:
        """
        POST one message through the gateway.
        """
        status, _, answer = httpRequest("POST", self.gateway.url("/orders"), body, {"Content-Type": "text/plain"})
        self.assertEqual(status, 202, answer)

    def subscription(self, id: str) -> Any:
        """
        The subscription C{id} as the admin API shows it.
        """
        status, view = admin(self.gateway, "GET", f"/apis/orders/subscriptions/{id}")
        self.assertEqual(status, 200, view)
        return view

    def test_deliveredSignedOverHttps(self) -> None:
        """
        Deliveries to an https callback whose certificate the private CA
        signed arrive, in order, signed so that standardwebhooks verifies
        them, each at its first attempt.
        """
        receiver = self.startWebhookReceiver(self.caKey, self.ca)
        self.assertTrue(receiver.url.startswith("https://127.0.0.1:"), receiver.url)
        status, created = admin(self.gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        bodies = [b"one", b"two", b"three"]
        for body in bodies:
            self.publish(body)
        waitFor(lambda: len(receiver.delivered()) == len(bodies), 30, what="the HTTPS deliveries")
        self.assertEqual(receiver.delivered(), bodies)
        verifier = Webhook(created["secret"])
        for request in receiver.all():
            verifier.verify(request.body, request.headers, json_parse=False)
        view = waitFor(lambda: (lambda v: v if v["counts"]["delivered"] == len(bodies) else None)(
            self.subscription(created["id"])), 20, what="the counts to be stored")
        self.assertEqual(view["counts"], {"delivered": 3, "failedAttempts": 0, "deadLettered": 0})

    def test_untrustedCertificateRefused(self) -> None:
        """
        A receiver whose certificate another CA signed gets no request: the
        attempt fails at the TLS handshake, is counted, and says why; with
        one attempt and no dlq the subscription pauses, well before any
        timeout.
        """
        otherKey, other = makeCA("someone else's CA")
        receiver = self.startWebhookReceiver(otherKey, other)
        _, created = admin(self.gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.publish(b"secret")
        view = waitFor(lambda: (lambda v: v if v["status"] == "paused" else None)(
            self.subscription(created["id"])), 30, what="the subscription to pause")
        self.assertEqual(receiver.all(), [])
        self.assertEqual(view["counts"], {"delivered": 0, "failedAttempts": 1, "deadLettered": 0})
        self.assertIn("certificate is not trusted", view["lastError"]["message"])
        self.assertIn("certificate is not trusted", view["pausedReason"])


MINIMAL = "[endpoint:m]\ntype = memory\n[api:a]\npath = /a\nendpoint = m\ntopic = t\nentrypoints = http-post\n"


class CaFileConfigTests(SynchronousTestCase):
    """
    C{[gateway] webhook-ca-file}: read at start, errors naming the file,
    section and key.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="evgate-cafile-")
        self.ini = os.path.join(self.directory, "evgate.ini")

    def parse(self, value: str) -> Any:
        """
        Parse a minimal configuration with C{webhook-ca-file = value}.
        """
        return parseConfig("[gateway]\nlisten = tcp:0\nwebhook-ca-file = " + value + "\n" + MINIMAL, self.ini)

    def write(self, name: str, data: bytes) -> str:
        """
        A file in the configuration's directory.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_relativeToTheConfiguration(self) -> None:
        """
        A relative path is read from the configuration file's directory; a
        bundle of several certificates is kept whole.
        """
        bundle = pem(makeCA("one")[1]) + b"\n" + pem(makeCA("two")[1])
        self.write("bundle.pem", bundle)
        trust = self.parse("bundle.pem").gateway.options["webhook-trust"]
        self.assertEqual((trust.caFile, len(trust.certificates)), (os.path.join(self.directory, "bundle.pem"), 2))
        trust.tlsPolicy()

    def test_defaultIsTheSystemTrust(self) -> None:
        """
        Without the key, receivers' certificates are checked against the
        system's trust store.
        """
        config = parseConfig("[gateway]\nlisten = tcp:0\n" + MINIMAL, self.ini)
        self.assertEqual(config.gateway.options["webhook-trust"], WebhookTrust())

    def assertKeyError(self, value: str, fragment: str) -> None:
        """
        Parsing with C{webhook-ca-file = value} fails at that key, with
        C{fragment} in a message that starts with the configuration file.
        """
        error = self.assertRaises(ConfigError, self.parse, value)
        self.assertEqual((error.section, error.key), ("gateway", "webhook-ca-file"), str(error))
        self.assertTrue(str(error).startswith(self.ini), str(error))
        self.assertIn(fragment, str(error))

    def test_unreadable(self) -> None:
        """
        A file that cannot be read is a configuration error saying which.
        """
        self.assertKeyError("missing.pem", f"cannot read {os.path.join(self.directory, 'missing.pem')}")

    def test_notCertificates(self) -> None:
        """
        A file without a PEM certificate, or with a broken one, is refused.
        """
        self.write("empty.pem", b"nothing here\n")
        self.assertKeyError("empty.pem", "holds no PEM certificate")
        self.write("broken.pem", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        self.assertKeyError("broken.pem", "certificate 1 is not a valid certificate")
