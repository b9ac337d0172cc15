"""
Shared machinery of the security tests: keys made once per run, tokens
made with PyJWT (an independent implementation), and a memory gateway on a
Clock spoken to through StubTreq.  No tests here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any, Dict, List, Optional

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from .helpers import memoryGateway

URL = "http://gateway.test/demo"
# The Clock starts here, so that tokens carry realistic times.
NOW = 1_800_000_000.0
ISSUER = "https://issuer.test/"
AUDIENCE = "evgate-demo"

_keys: Dict[str, Any] = {}


def rsaKey(name: str = "rsa") -> rsa.RSAPrivateKey:
    """
    An RSA private key, made once per run per C{name}.
    """
    if name not in _keys:
        _keys[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _keys[name]  # type: ignore[no-any-return]


def ecKey(name: str = "ec") -> ec.EllipticCurvePrivateKey:
    """
    A P-256 private key, made once per run per C{name}.
    """
    if name not in _keys:
        _keys[name] = ec.generate_private_key(ec.SECP256R1())
    return _keys[name]  # type: ignore[no-any-return]


def publicPem(key: Any) -> bytes:
    """
    The PEM of the public half of C{key}.
    """
    return key.public_key().public_bytes(serialization.Encoding.PEM,  # type: ignore[no-any-return]
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**overrides: Any) -> Dict[str, Any]:
    """
    The claims of a valid token at L{NOW}; C{None} values drop a claim.
    """
    base: Dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": int(NOW),
                            "exp": int(NOW) + 3600, "tenant": "acme"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any = None, algorithm: str = "RS256", headers: Optional[dict] = None, **overrides: Any) -> str:
    """
    A JWT made by PyJWT with C{key} (default: the RSA key).
    """
    return pyjwt.encode(claims(**overrides), key if key is not None else rsaKey(), algorithm=algorithm,
                        headers=headers)


def b64(data: bytes) -> str:
    """
    Unpadded base64url, as JWS writes it.
    """
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def handMade(header: dict, payload: dict, secret: Optional[bytes] = None) -> str:
    """
    A token PyJWT would refuse to make: C{alg: none} (no C{secret}), or an
    HMAC with any bytes as its secret (the RSA public key, for algorithm
    confusion).
    """
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if secret is None:
        return signing + "."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[header["alg"]]
    return signing + "." + b64(hmac.new(secret, signing.encode(), digest).digest())


class PlanTestCase(SynchronousTestCase):
    """
    A memory gateway on a Clock at L{NOW}, with the [api:demo] lines of
    L{apiLines}, spoken to through StubTreq.  Outbound StubTreqs (JWKS,
    introspection) listed in C{self.outbound} are flushed with it.
    """

    entrypoints = "http-post http-get"

    def apiLines(self) -> str:
        """
        The lines added to [api:demo].
        """
        return ""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.outbound: List[StubTreq] = []
        self.gateway = memoryGateway(entrypoints=self.entrypoints, clock=self.clock, extra=self.apiLines())
        self.api = self.gateway.api("demo")
        self.treq = StubTreq(self.gateway.resource)

    def file(self, name: str, content: bytes) -> str:
        """
        Write C{content} to C{name} in the test's directory; its path.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def plan(self, name: str) -> Any:
        """
        The demo API's plan called C{name}.
        """
        for plan in self.api.plans:
            if plan.name == name:
                return plan
        raise AssertionError(f"no plan {name}")

    def flush(self) -> None:
        """
        Run everything that is ready: the clock's zero-delay calls and every
        StubTreq, until nothing moves.
        """
        for _ in range(6):
            self.clock.advance(0)
            self.treq.flush()
            for stub in self.outbound:
                stub.flush()

    def call(self, method: str = "POST", url: str = URL, headers: Optional[dict] = None,
             data: bytes = b"hello", advance: float = 0) -> Any:
        """
        Make a request and return the response with its body read (as
        C{response.body}).
        """
        kwargs: Dict[str, Any] = {"headers": headers or {}}
        if method == "POST":
            kwargs["data"] = data
        else:
            kwargs["params"] = {"timeout": "0"} if "timeout" not in url else {}
        d = self.treq.request(method, url, **kwargs)
        self.flush()
        if advance:
            self.clock.advance(advance)
            self.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        response.body = body
        return response

    def bearer(self, value: str, **kwargs: Any) -> Any:
        """
        POST with C{Authorization: Bearer <value>}.
        """
        return self.call(headers={"Authorization": f"Bearer {value}"}, **kwargs)

    def problem(self, response: Any, status: int) -> dict:
        """
        Assert C{response} is a problem of C{status}; return its document.
        """
        self.assertEqual(response.code, status, response.body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/problem+json"])
        document = json.loads(response.body)
        self.assertEqual(document["status"], status)
        return document

    def challenge(self, response: Any) -> str:
        """
        The C{WWW-Authenticate} of C{response} (which must have one).
        """
        values = response.headers.getRawHeaders("www-authenticate")
        self.assertTrue(values, "no WWW-Authenticate")
        return values[0]  # type: ignore[no-any-return]
