"""
The signing keys a JWT is checked against: one configured key
(L{StaticKey}) or the set an issuer publishes at a JWKS URL (L{JwksKeys}).

The algorithms a key verifies follow from its type (L{algorithmsForKey});
a token's header never chooses them.  A JWKS is fetched with treq and
cached; a token whose C{kid} is unknown refreshes it, at most once per
C{jwt.jwks-min-refresh} seconds, so that a flood of made-up C{kid}s cannot
turn the gateway into a load generator against the identity provider.
The checks of the token itself are in L{evgate.security.jwt}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jwt as pyjwt
import treq
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from evgate import jsonlimits
from evgate.errors import AuthenticationUnavailable

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
EDDSA_ALGORITHMS = ("EdDSA",)

DEFAULT_JWKS_MIN_REFRESH = 10.0
DEFAULT_JWKS_MAX_AGE = 300.0
DEFAULT_JWKS_TIMEOUT = 5.0


def algorithmsForKey(key: Any) -> Tuple[str, ...]:
    """
    The JWS algorithms a public key (a C{cryptography} key object) can
    verify.  This, not a token's header, decides what a token may use.

    @raise ValueError: for a key type no JWS algorithm uses.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits is too weak (2048 at least)")
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = EC_ALGORITHMS.get(key.curve.name)
        if algorithms is None:
            raise ValueError(f"no JWS algorithm uses the curve {key.curve.name}")
        return algorithms
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return EDDSA_ALGORITHMS
    raise ValueError(f"{type(key).__name__} is not a key JWS signatures use")


def loadPublicKey(pem: bytes) -> Any:
    """
    The public key in C{pem}: a C{PUBLIC KEY} block or a certificate.

    @raise ValueError: if C{pem} holds neither.
    """
    if b"-----BEGIN CERTIFICATE-----" in pem:
        return x509.load_pem_x509_certificate(pem).public_key()
    if b"PRIVATE KEY-----" in pem:
        raise ValueError("this is a private key; the gateway needs the issuer's public key only")
    return load_pem_public_key(pem)


class StaticKey:
    """
    One configured key (a secret or a PEM public key) and the algorithms it
    verifies.
    """

    def __init__(self, key: Any, algorithms: Sequence[str]) -> None:
        self.key = key
        self.algorithms = tuple(algorithms)

    def keyFor(self, header: Mapping[str, Any]) -> Any:
        """
        The key and algorithms for a token with C{header}.
        """
        return succeed((self.key, self.algorithms))


class UnknownKey(Exception):
    """
    A token names a key the issuer does not publish.
    """


class JwksKeys:
    """
    The keys published at a JWKS URL, fetched with treq and cached.

    The set is fetched on first use, again when it is older than
    C{maxAge}, and again when a token names an unknown C{kid} (key
    rotation) but never more often than once per C{minRefresh} seconds.
    While a fetch fails, the keys fetched before go on serving; with no keys
    at all the caller gets L{AuthenticationUnavailable} (503), not a 401,
    because the token may be fine.
    """

    # The namespace it logged under before it left evgate.security.jwt:
    # operators filter logs by it.
    log = Logger(namespace="evgate.security.jwt.JwksKeys")

    def __init__(self, url: str, reactor: Any, minRefresh: float = DEFAULT_JWKS_MIN_REFRESH,
                 maxAge: float = DEFAULT_JWKS_MAX_AGE, timeout: float = DEFAULT_JWKS_TIMEOUT,
                 http: Any = None) -> None:
        self.url = url
        self.reactor = reactor
        self.minRefresh = minRefresh
        self.maxAge = maxAge
        self.timeout = timeout
        self.http = http
        self.keys: Dict[Optional[str], Tuple[Any, Tuple[str, ...]]] = {}
        self.fetchedAt: Optional[float] = None
        self.attemptedAt: Optional[float] = None
        self.fetches = 0
        self._inFlight: Optional[List[Deferred]] = None

    def _client(self) -> Any:
        if self.http is None:
            self.http = treq
        return self.http

    def keyFor(self, header: Mapping[str, Any]) -> Deferred:
        """
        The key and algorithms for a token with C{header}: a Deferred that
        fails with L{UnknownKey} or L{AuthenticationUnavailable}.
        """
        kid = header.get("kid")
        now = self.reactor.seconds()
        fresh = self.fetchedAt is not None and now - self.fetchedAt < self.maxAge
        found = self._lookup(kid)
        mayRefresh = self.attemptedAt is None or now - self.attemptedAt >= self.minRefresh
        if found is not None:
            # A known key serves at once; an old set is refreshed behind
            # the request rather than in front of it.
            if not fresh and mayRefresh:
                self.refresh()
            return succeed(found)
        if not mayRefresh:
            if self.fetchedAt is None:
                return fail(AuthenticationUnavailable(
                    f"the signing keys at {self.url} could not be fetched; retry later"))
            return fail(UnknownKey(f"no key {str(kid)[:64]!r} in the issuer's key set"))

        def looked(_: Any) -> Any:
            found = self._lookup(kid)
            if found is not None:
                return found
            if self.fetchedAt is None:
                raise AuthenticationUnavailable(f"the signing keys at {self.url} could not be fetched; retry later")
            raise UnknownKey(f"no key {str(kid)[:64]!r} in the issuer's key set")

        return self.refresh().addCallback(looked)

    def _lookup(self, kid: Any) -> Optional[Tuple[Any, Tuple[str, ...]]]:
        if kid is None:
            # A token without kid is fine against a set of one key.
            if len(self.keys) == 1:
                return next(iter(self.keys.values()))
            return None
        if not isinstance(kid, str):
            return None
        return self.keys.get(kid)

    def refresh(self) -> Deferred:
        """
        Fetch the key set now (joining a fetch under way); the Deferred
        fires with L{None} whether or not the fetch worked.
        """
        waiter: Deferred = Deferred()
        if self._inFlight is not None:
            self._inFlight.append(waiter)
            return waiter
        self._inFlight = [waiter]
        self.attemptedAt = self.reactor.seconds()
        self.fetches += 1
        d = self._client().get(self.url, headers={b"Accept": [b"application/json"]})
        d.addTimeout(self.timeout, self.reactor)
        d.addCallback(self._received)
        d.addCallback(self._parsed)
        d.addErrback(self._fetchFailed)
        d.addBoth(self._settle)
        return waiter

    def _received(self, response: Any) -> Deferred:
        if response.code != 200:
            raise ValueError(f"HTTP {response.code}")
        return response.content()  # type: ignore[no-any-return]

    def _parsed(self, body: bytes) -> None:
        document = jsonlimits.loads(body)
        keys = parseJwks(document)
        if not keys:
            raise ValueError("the set holds no usable signing key")
        self.keys = keys
        self.fetchedAt = self.reactor.seconds()
        self.log.info("fetched {count} signing keys from {url}", count=len(keys), url=self.url)

    def _fetchFailed(self, failure: Any) -> None:
        self.log.warn("cannot fetch the signing keys from {url}: {error}; {state}",
                      url=self.url, error=failure.getErrorMessage() or failure.type.__name__,
                      state="keeping the keys fetched before" if self.keys else "no keys yet")

    def _settle(self, result: Any) -> None:
        waiters, self._inFlight = self._inFlight or [], None
        for waiter in waiters:
            waiter.callback(None)


def parseJwks(document: Any) -> Dict[Optional[str], Tuple[Any, Tuple[str, ...]]]:
    """
    The usable signing keys of a JWKS document, by C{kid}: each with the
    algorithms it verifies.  Symmetric (C{oct}) keys, encryption keys and
    keys PyJWT cannot read are left out: a published secret would let
    anyone sign.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    keys: Dict[Optional[str], Tuple[Any, Tuple[str, ...]]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") == "oct" or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = pyjwt.PyJWK(jwk).key
            allowed = algorithmsForKey(key)
        except Exception:
            continue
        alg = jwk.get("alg")
        if alg is not None:
            if alg not in allowed:
                continue
            allowed = (alg,)
        kid = jwk.get("kid")
        keys[kid if isinstance(kid, str) else None] = (key, allowed)
    return keys
