"""
The C{mtls} plan and the C{mtls:} listener, without sockets: requests
whose transport is a fake TLS transport holding a client certificate made
here with C{cryptography}, a memory gateway on a Clock, and the
configuration errors of the listener and the plan's keys.

The real handshakes (trusted, untrusted, expired and missing certificates)
are in L{tests.test_security_mtls_e2e}.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Optional

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.errors import Forbidden, Unauthorized
from evgate.gateway import authenticate
from evgate.interfaces import IPlan
from evgate.security import PLANS
from evgate.security.mtls import MtlsPlan, certificateClaims, identityOf, peerCertificate
from evgate.security.mtls_listener import MtlsListener

from .helpers import memoryGateway
from .mtls_certificates import certificatePem, issue, keyPem, makeCA, writeIssued

CA = makeCA("Clients CA")
OTHER_CA = makeCA("Partners CA")


@implementer(ISSLTransport)
class CertificateTransport:
    """
    The part of a TLS transport the plan reads: the peer's certificate
    (pyOpenSSL's X509, as Twisted gives it), or none.
    """

    def __init__(self, certificate: Optional[x509.Certificate]) -> None:
        self.peer = crypto.X509.from_cryptography(certificate) if certificate is not None else None

    def getPeerCertificate(self) -> Any:
        return self.peer


def requestWith(certificate: Optional[x509.Certificate] = None, tls: bool = True,
                headers: Optional[dict] = None) -> DummyRequest:
    """
    A request on a connection with C{certificate} (a TLS connection unless
    C{tls} is false), with C{headers}.
    """
    request = DummyRequest([b""])
    if tls:
        request.transport = CertificateTransport(certificate)
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    return request


class ClaimsTests(SynchronousTestCase):
    """
    What a certificate says: L{certificateClaims} and L{identityOf}.
    """

    def test_claims(self) -> None:
        """
        The claims hold the subject and issuer as RFC 4514 strings, the CN,
        the serial in hex, every kind of SAN, the validity in POSIX seconds
        and the SHA-256 fingerprint.
        """
        notAfter = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        _, certificate = issue(CA, "alice", organization="Acme", dns=["alice.example", "a.example"],
                               emails=["alice@acme.example"], uris=["spiffe://acme/alice"], ips=["10.0.0.1"],
                               serial=0xBEEF01, notAfter=notAfter)
        claims = certificateClaims(certificate)
        self.assertEqual(claims["subject"], "O=Acme,CN=alice")
        self.assertEqual(claims["issuer"], "CN=Clients CA")
        self.assertEqual((claims["cn"], claims["serial"]), ("alice", "BEEF01"))
        self.assertEqual(claims["san"], {"dns": ["alice.example", "a.example"], "email": ["alice@acme.example"],
                                         "uri": ["spiffe://acme/alice"], "ip": ["10.0.0.1"]})
        self.assertEqual(claims["notAfter"], int(notAfter.timestamp()))
        self.assertLess(claims["notBefore"], time.time())
        self.assertEqual(len(claims["sha256"]), 64)

    def test_identities(self) -> None:
        """
        Each C{mtls.identity} picks its name (the first of its kind), and
        none when the certificate lacks it.
        """
        claims = certificateClaims(issue(CA, "alice", dns=["alice.example", "b.example"],
                                         emails=["alice@acme.example"], uris=["spiffe://acme/alice"])[1])
        self.assertEqual([identityOf(claims, i) for i in ("cn", "san-dns", "san-email", "san-uri")],
                         ["alice", "alice.example", "alice@acme.example", "spiffe://acme/alice"])
        bare = certificateClaims(issue(CA, None)[1])
        self.assertEqual((bare["cn"], bare["san"]["dns"]), (None, []))
        self.assertEqual([identityOf(bare, i) for i in ("cn", "san-dns", "san-email", "san-uri")], [None] * 4)

    def test_peerCertificate(self) -> None:
        """
        The peer certificate comes from a TLS transport; a plain one, or a
        TLS connection without a client certificate, has none.
        """
        _, certificate = issue(CA, "alice")
        self.assertEqual(peerCertificate(requestWith(certificate)), certificate)
        self.assertIsNone(peerCertificate(requestWith(None)))
        self.assertIsNone(peerCertificate(requestWith(tls=False)))

    def test_peerCertificateBroken(self) -> None:
        """
        A TLS connection that cannot say (it broke) has no certificate.
        """
        request = requestWith(None)

        def broken() -> Any:
            raise SSL.Error("gone")

        request.transport.getPeerCertificate = broken
        self.assertIsNone(peerCertificate(request))


class MtlsTestCase(SynchronousTestCase):
    """
    The plan on a memory gateway whose Clock runs at the real time (the
    certificates are made now), with the demo API's C{plans} and more
    C{lines}.
    """

    plans = "mtls"
    lines = ""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        extra = f"plans = {self.plans}\n" + self.lines
        self.gateway = memoryGateway(clock=self.clock, extra=extra)
        self.api = self.gateway.api("demo")
        self.plan = [p for p in self.api.plans if p.name == "mtls"][0]

    def consumer(self, certificate: x509.Certificate) -> Any:
        """
        The consumer the gateway's plan chain makes of a request with
        C{certificate}.
        """
        return self.successResultOf(authenticate(self.api, requestWith(certificate)))

    def refused(self, request: DummyRequest, problem: type) -> Any:
        """
        The plan chain refuses C{request} with C{problem}; the problem.
        """
        return self.failureResultOf(authenticate(self.api, request), problem).value


class PlanTests(MtlsTestCase):
    """
    An API whose only plan is mtls, identified by the CN.
    """

    def test_interface(self) -> None:
        """
        The plan is registered as C{mtls} and provides L{IPlan}.
        """
        self.assertIs(PLANS.classOf("mtls"), MtlsPlan)
        self.assertTrue(verifyClass(IPlan, MtlsPlan))
        self.assertTrue(verifyObject(IPlan, self.plan))

    def test_present(self) -> None:
        """
        The plan's credentials are present on a connection with a client
        certificate, and only then.
        """
        self.assertTrue(self.plan.present(requestWith(issue(CA, "alice")[1])))
        self.assertFalse(self.plan.present(requestWith(None)))
        self.assertFalse(self.plan.present(requestWith(tls=False)))

    def test_consumer(self) -> None:
        """
        The consumer is the certificate's CN, with the certificate's claims
        and its notAfter as expiry.
        """
        _, certificate = issue(CA, "alice", dns=["alice.example"])
        consumer = self.consumer(certificate)
        self.assertEqual((consumer.id, consumer.plan), ("alice", "mtls"))
        self.assertEqual(consumer.claims["san"]["dns"], ["alice.example"])
        self.assertEqual(consumer.expiresAt, certificate.not_valid_after_utc.timestamp())
        self.assertEqual(self.consumer(certificate), consumer)

    def test_noCertificate(self) -> None:
        """
        Without a client certificate (TLS without one, or plain TCP), the
        request is a 401 whose challenge names the plan and whose detail
        says what is missing.
        """
        for request in (requestWith(None), requestWith(tls=False)):
            problem = self.refused(request, Unauthorized)
            self.assertIn("client certificate", problem.detail)
            self.assertIn(("WWW-Authenticate", 'MutualTLS realm="demo"'), problem.headers)

    def test_expiredSinceTheHandshake(self) -> None:
        """
        A keep-alive connection that outlives its certificate is refused
        from then on (401), though the certificate was good at the
        handshake and its consumer is known.
        """
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60)
        _, certificate = issue(CA, "alice", notAfter=soon)
        self.assertEqual(self.consumer(certificate).id, "alice")
        self.clock.advance(61)
        problem = self.refused(requestWith(certificate), Unauthorized)
        self.assertIn("expired", problem.detail)

    def test_notYetValid(self) -> None:
        """
        A certificate whose notBefore is ahead of the gateway's clock is a
        401.
        """
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        _, certificate = issue(CA, "alice", notBefore=later, notAfter=later + datetime.timedelta(hours=1))
        self.assertIn("not valid yet", self.refused(requestWith(certificate), Unauthorized).detail)

    def test_noCommonName(self) -> None:
        """
        A certificate without the name that identifies the caller is a 403
        saying which name and key.
        """
        problem = self.refused(requestWith(issue(CA, None, dns=["x.example"])[1]), Forbidden)
        self.assertIn("subject CN", problem.detail)
        self.assertIn("mtls.identity = cn", problem.detail)

    def test_withBearerToo(self) -> None:
        """
        On an API whose only plan is mtls, a bearer token beside the
        certificate is no plan's credentials: the certificate decides (as
        an API-key API ignores a bearer token).
        """
        request = requestWith(issue(CA, "alice")[1], headers={b"authorization": b"Bearer x.y.z"})
        self.assertEqual(self.successResultOf(authenticate(self.api, request)).id, "alice")


class IdentityOptionTests(MtlsTestCase):
    """
    C{mtls.identity = san-dns} with allowed issuers and subjects.
    """

    lines = ("mtls.identity = san-dns\n"
             "mtls.allowed-issuers =\n  CN=Clients CA\n  CN=Other*\n"
             "mtls.allowed-subjects =\n  *.billing.example\n  alice.example\n")

    def test_consumer(self) -> None:
        """
        The consumer is the first DNS name.
        """
        _, certificate = issue(CA, "alice", dns=["alice.example", "b.example"])
        self.assertEqual(self.consumer(certificate).id, "alice.example")
        self.assertEqual(self.consumer(issue(CA, "x", dns=["eu.billing.example"])[1]).id, "eu.billing.example")

    def test_noCommonName(self) -> None:
        """
        Without a DNS name, the certificate names nobody: 403.
        """
        problem = self.refused(requestWith(issue(CA, "alice")[1]), Forbidden)
        self.assertIn("dns subjectAltName", problem.detail)

    def test_issuerNotAllowed(self) -> None:
        """
        A certificate of a CA the listener trusts but the API does not list
        is a 403 naming the issuer and the key.
        """
        problem = self.refused(requestWith(issue(OTHER_CA, "alice", dns=["alice.example"])[1]), Forbidden)
        self.assertIn("CN=Partners CA", problem.detail)
        self.assertIn("mtls.allowed-issuers", problem.detail)

    def test_subjectNotAllowed(self) -> None:
        """
        A name that no pattern of C{mtls.allowed-subjects} matches is a 403.
        """
        problem = self.refused(requestWith(issue(CA, "x", dns=["billing.example.evil"])[1]), Forbidden)
        self.assertIn("mtls.allowed-subjects", problem.detail)


class CombinedPlansTests(SynchronousTestCase):
    """
    The mtls plan next to keyless and jwt on one API.
    """

    def gatewayApi(self, plans: str, lines: str = "") -> Any:
        """
        The demo API of a memory gateway with C{plans}.
        """
        clock = Clock()
        clock.advance(time.time())
        return memoryGateway(clock=clock, extra=f"plans = {plans}\n{lines}").api("demo")

    def test_keylessAndMtls(self) -> None:
        """
        With keyless and mtls, a certificate identifies its caller and a
        request without one is anonymous.
        """
        api = self.gatewayApi("keyless mtls")
        self.assertEqual(self.successResultOf(authenticate(api, requestWith(issue(CA, "alice")[1]))).id, "alice")
        self.assertEqual(self.successResultOf(authenticate(api, requestWith(None))).id, "anonymous")
        self.assertEqual(self.successResultOf(authenticate(api, requestWith(tls=False))).id, "anonymous")

    def test_certificateIgnoredElsewhere(self) -> None:
        """
        On an API that does not list mtls, the connection's certificate is
        not credentials: a keyless API serves it as anonymous.
        """
        api = self.gatewayApi("keyless")
        self.assertEqual(self.successResultOf(authenticate(api, requestWith(issue(CA, "alice")[1]))).id,
                         "anonymous")

    def test_certificateAndToken(self) -> None:
        """
        On an API with mtls and jwt, a certificate and a bearer token at
        once are ambiguous: 401 naming both plans; each alone goes to its
        plan.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        secret = os.path.join(directory, "jwt.secret")
        with open(secret, "w") as f:
            f.write("s" * 32)
        api = self.gatewayApi("mtls jwt", f"jwt.secret-file = {os.path.abspath(secret)}\n")
        both = requestWith(issue(CA, "alice")[1], headers={b"authorization": b"Bearer a.b.c"})
        problem = self.failureResultOf(authenticate(api, both), Unauthorized).value
        self.assertIn("several plans (mtls, jwt)", problem.detail)
        self.assertEqual(self.successResultOf(authenticate(api, requestWith(issue(CA, "bob")[1]))).id, "bob")
        token = requestWith(None, headers={b"authorization": b"Bearer a.b.c"})
        self.failureResultOf(authenticate(api, token), Unauthorized)


MINIMAL = "[endpoint:local]\ntype = memory\n[api:demo]\npath = /demo\nendpoint = local\ntopic = demo\n" \
          "entrypoints = http-post\n"


class ListenerConfigTests(SynchronousTestCase):
    """
    C{listen = mtls:...}: read with its files when the configuration is,
    every mistake naming the file, C{[gateway]} and C{listen}.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.ini = os.path.join(self.directory, "evgate.ini")
        server = issue(CA, "localhost", dns=["localhost"], server=True)
        self.cert, self.key = writeIssued(self.directory, "server", server)
        self.write("clients-ca.pem", certificatePem(CA[1]) + certificatePem(OTHER_CA[1]))

    def write(self, name: str, data: bytes) -> str:
        """
        A file in the configuration's directory.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def parse(self, listen: str) -> Any:
        """
        A minimal configuration with C{listen = listen}, parsed.
        """
        return parseConfig(f"[gateway]\nlisten = {listen}\n" + MINIMAL, self.ini)

    def assertListenError(self, listen: str, fragment: str) -> None:
        """
        Parsing with C{listen} fails at C{[gateway] listen} with
        C{fragment} in a message that starts with the file's name.
        """
        error = self.assertRaises(ConfigError, self.parse, listen)
        self.assertEqual((error.section, error.key), ("gateway", "listen"), str(error))
        self.assertTrue(str(error).startswith(self.ini), str(error))
        self.assertIn(fragment, str(error))

    def test_read(self) -> None:
        """
        A listener with relative paths (to the configuration's directory),
        two client CAs, and an interface; its options verify peers without
        requiring a certificate.
        """
        description = "mtls:8443:interface=127.0.0.1:certKey=server.pem:privateKey=server.key:caCerts=clients-ca.pem"
        config = self.parse("tcp:8080 " + description)
        listener = config.gateway.options["mtlsListeners"][description]
        self.assertIsInstance(listener, MtlsListener)
        self.assertEqual((listener.port, listener.interface, listener.backlog), (8443, "127.0.0.1", 50))
        self.assertEqual(len(listener.authorities), 2)
        options = listener.options()
        self.assertEqual((options.verify, options.requireCertificate), (True, False))
        connection = SSL.Connection(options.getContext(), None)
        self.assertEqual([n.CN for n in connection.get_client_ca_list()], ["Clients CA", "Partners CA"])

    def test_keyInTheCertificateFile(self) -> None:
        """
        Without C{privateKey}, the key is read from C{certKey}'s file, which
        may also hold the chain after the leaf.
        """
        with open(self.cert, "rb") as f, open(self.key, "rb") as k:
            self.write("bundle.pem", f.read() + certificatePem(CA[1]) + k.read())
        description = "mtls:0:certKey=bundle.pem:caCerts=clients-ca.pem"
        listener = self.parse(description).gateway.options["mtlsListeners"][description]
        self.assertEqual(len(listener.chain), 1)

    def test_required(self) -> None:
        """
        C{certKey} and C{caCerts} are required; the port must be a port.
        """
        self.assertListenError("mtls:0:certKey=server.pem", "caCerts= is required")
        self.assertListenError("mtls:0:caCerts=clients-ca.pem", "certKey= is required")
        self.assertListenError("mtls:https:certKey=server.pem:caCerts=clients-ca.pem", "the port must be a number")
        self.assertListenError("mtls:70000:certKey=server.pem:caCerts=clients-ca.pem", "between 0 and 65535")

    def test_unknownField(self) -> None:
        """
        A field the listener does not know (a typo) is refused, naming the
        fields it knows.
        """
        self.assertListenError("mtls:0:certKey=server.pem:caCert=clients-ca.pem", "unknown field 'caCert'")
        self.assertListenError("mtls:0:certKey=server.pem:certKey=server.pem:caCerts=x", "certKey is given twice")

    def test_files(self) -> None:
        """
        Files that cannot be read, hold no certificate or key, or a key that
        is not the certificate's, are refused naming the field and file.
        """
        self.assertListenError("mtls:0:certKey=server.pem:privateKey=server.key:caCerts=missing.pem",
                               f"caCerts: cannot read {os.path.join(self.directory, 'missing.pem')}")
        self.write("empty.pem", b"nothing\n")
        self.assertListenError("mtls:0:certKey=server.pem:privateKey=server.key:caCerts=empty.pem",
                               "holds no PEM certificate")
        self.assertListenError("mtls:0:certKey=server.pem:caCerts=clients-ca.pem", "privateKey")
        self.write("other.key", keyPem(issue(CA, "x")[0]))
        self.assertListenError("mtls:0:certKey=server.pem:privateKey=other.key:caCerts=clients-ca.pem",
                               "privateKey is not the key of the certificate in certKey")

    def test_notWithWorkers(self) -> None:
        """
        Worker processes share plain TCP listeners only: an mtls listener
        with workers is refused.
        """
        error = self.assertRaises(ConfigError, parseConfig,
                                  "[gateway]\nlisten = mtls:0:certKey=server.pem:privateKey=server.key:"
                                  "caCerts=clients-ca.pem\nworkers = 2\n" + MINIMAL, self.ini)
        self.assertEqual(error.key, "workers")


class PlanConfigTests(SynchronousTestCase):
    """
    The C{mtls.*} keys of an API.
    """

    def parse(self, lines: str) -> Any:
        """
        A configuration whose demo API has C{lines}.
        """
        return parseConfig("[gateway]\nlisten = tcp:0\n" + MINIMAL + lines, "mtls.ini")

    def test_defaults(self) -> None:
        """
        The identity is the CN by default, with no issuer or subject
        patterns.
        """
        options = self.parse("plans = mtls\n").apis["demo"].options["mtls"]
        self.assertEqual(options, {"identity": "cn", "allowedIssuers": (), "allowedSubjects": ()})

    def test_badIdentity(self) -> None:
        """
        An identity that is not one of the four is refused at its key.
        """
        error = self.assertRaises(ConfigError, self.parse, "plans = mtls\nmtls.identity = email\n")
        self.assertEqual((error.section, error.key), ("api:demo", "mtls.identity"))

    def test_keysWithoutThePlan(self) -> None:
        """
        C{mtls.*} keys on an API without the plan are a mistake.
        """
        error = self.assertRaises(ConfigError, self.parse, "plans = keyless\nmtls.identity = cn\n")
        self.assertEqual(error.key, "mtls.identity")
        self.assertIn("mtls plan", str(error))
