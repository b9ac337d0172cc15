"""
TLS on the gateway's port: C{listen = ssl:0:privateKey=...:certKey=...}
with a self-signed certificate made here with C{cryptography}, served by a
gateway in this process on the real reactor, and a client that trusts
exactly that certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from evgate.config import parseConfig
from evgate.service import GatewayService

from .helpers import demoIni


def selfSigned(directory: str, name: str = "localhost") -> Tuple[str, str, bytes]:
    """
    A self-signed certificate for C{name} and 127.0.0.1 with its key, as
    files in C{directory}: their paths and the certificate's PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    keyPath = os.path.join(directory, "gateway.key")
    certPath = os.path.join(directory, "gateway.pem")
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(pem)
    return keyPath, certPath, pem


class TlsListenerTests(TestCase):
    """
    The gateway on an C{ssl:} listener.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key, cert, self.pem = selfSigned(directory)
        ini = demoIni("http-post http-get", listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        self.gateway = GatewayService(parseConfig(str(ini), "tls.ini"), reactor)
        self.gateway.startService()
        self.addCleanup(self.gateway.stopService)
        port = self.gateway.listeners[0].port
        yield None
        self.url = f"https://localhost:{port.getHost().port}/demo"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def client(self, trusted: bool) -> Any:
        """
        A treq client that trusts the gateway's certificate, or the
        platform's roots only.
        """
        root = Certificate.loadPEM(self.pem) if trusted else None
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=root), pool=self.pool)
        return HTTPClient(agent)

    @inlineCallbacks
    def test_trusted(self) -> Any:
        """
        A client that trusts the self-signed certificate publishes and
        consumes over TLS.
        """
        client = self.client(trusted=True)
        response = yield client.post(self.url, data=b"over tls")
        self.assertEqual(response.code, 202)
        yield response.content()
        response = yield client.get(self.url + "?timeout=0")
        self.assertEqual(response.code, 200)
        yield response.content()

    @inlineCallbacks
    def test_untrusted(self) -> Any:
        """
        A client that does not trust the certificate refuses the connection.
        """
        from OpenSSL.SSL import Error as TLSError
        from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

        client = self.client(trusted=False)
        error = yield self.assertFailure(client.post(self.url, data=b"x"), ResponseNeverReceived,
                                         RequestTransmissionFailed)
        self.assertTrue(error.reasons[0].check(TLSError), error.reasons)
