"""
The C{jwt} plan: a JSON Web Token signed by an issuer the operator trusts.

Where the token is
==================

C{Authorization: Bearer <token>}, or the C{access_token} query parameter
(RFC 6750, 2.3) because a browser's C{EventSource} and C{WebSocket} cannot
set headers.  The header wins when both are sent.

Which key checks it
===================

Exactly one of::

    jwt.secret-file      = /etc/evgate/orders.hs256     HS256/384/512
    jwt.public-key-file  = /etc/evgate/issuer.pem       RS/PS (RSA), ES (EC), EdDSA
    jwt.jwks-url         = https://idp.example/jwks.json

The algorithms a token may use are fixed by the configured key's type
(L{algorithmsForKey}), never taken from the token: a token signed with
C{alg: none}, or with HS256 using the RSA public key as the HMAC secret
(algorithm confusion), names an algorithm outside that set and is refused
before any signature is checked.  The signature itself is PyJWT's business;
this module holds no cryptography of its own.

A JWKS is fetched with treq and cached (L{JwksKeys}): a token whose C{kid}
is unknown refreshes it, at most once per C{jwt.jwks-min-refresh} seconds, so
that a flood of made-up C{kid}s cannot turn the gateway into a load
generator against the identity provider.

What is checked
===============

 - signature, then C{exp} (required unless C{jwt.require-expiry = false})
   and C{nbf}, with C{jwt.leeway} seconds (default 30) of clock skew, on the
   reactor's clock: 401;
 - C{iss} against C{jwt.issuer} and C{aud} against C{jwt.audience} when they
   are configured: 401 (the token was not meant for this API);
 - C{jwt.required-claims} must be present and every C{jwt.claims.<name> =
   value} must hold (equal, or contained in a list or space-separated
   claim): 403 (a valid caller without the right).

The claims reach filters as C{claims} (L{evgate.gateway.Consumer.claims}),
so that an operator filter such as C{headers.tenant == claims.tenant}
scopes a subscription to its caller; C{exp} becomes C{Consumer.expiresAt},
at which streams are closed.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jwt as pyjwt
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from evgate.errors import Forbidden, Unauthorized
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IPlan
from evgate.secrets import readSecretBytes, resolvePath
from evgate.security.consumer import Consumer
from evgate.security.jwks import (
    DEFAULT_JWKS_MAX_AGE,
    DEFAULT_JWKS_MIN_REFRESH,
    DEFAULT_JWKS_TIMEOUT,
    EC_ALGORITHMS,
    EDDSA_ALGORITHMS,
    RSA_ALGORITHMS,
    JwksKeys,
    StaticKey,
    UnknownKey,
    algorithmsForKey,
    loadPublicKey,
)
from evgate.security.jwks import parseJwks as parseJwks  # re-exported from its old home

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# RFC 7518, 3.2: an HMAC key at least as long as the hash output.
MIN_SECRET_BYTES = 32
# Longer than any real token; refused before parsing.
MAX_TOKEN_BYTES = 16384

DEFAULT_LEEWAY = 30.0

_JWT_SHAPE = re.compile(rb"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_TOKEN68 = re.compile(rb"^[A-Za-z0-9._~+/-]+=*$")


# credentials shared by the bearer plans (jwt and oauth2)


def bearerToken(request: Request) -> Optional[bytes]:
    """
    The bearer token of C{request}: the C{Authorization: Bearer} header, else
    the C{access_token} query parameter, else L{None}.  An C{Authorization}
    header of another scheme (C{Basic}) is not a bearer token.
    """
    header = request.getHeader(b"authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return value.strip()
    query = queryValue(request, b"access_token")
    return query.strip() if query is not None else None


def twoBearerTokens(request: Request) -> bool:
    """
    Whether C{request} carries a bearer token in its C{Authorization}
    header and a different one in C{access_token}: an ambiguous request,
    refused rather than guessed at.
    """
    header = request.getHeader(b"authorization")
    query = queryValue(request, b"access_token")
    if header is None or query is None:
        return False
    scheme, _, value = header.strip().partition(b" ")
    return scheme.lower() != b"bearer" or value.strip() != query.strip()


def queryValue(request: Request, name: bytes) -> Optional[bytes]:
    """
    The first value of the query parameter C{name} of C{request}, if any.
    """
    args: Dict[bytes, List[bytes]] = request.args or {}
    values = args.get(name)
    return values[0] if values else None


def looksLikeJwt(token: bytes) -> bool:
    """
    Whether C{token} has the shape of a signed JWT (three base64url parts),
    which is how the jwt and oauth2 plans of one API share bearer tokens.
    """
    return bool(_JWT_SHAPE.match(token))


def hasPlan(api: Any, name: str) -> bool:
    """
    Whether the API runtime C{api} lists the plan C{name}.
    """
    return name in api.config.plans


def _quoted(text: str) -> str:
    # An auth-param value is a quoted-string: no quotes or backslashes, and
    # Latin-1 only because it ends up in a header.
    cleaned = text.replace("\\", "").replace('"', "'")
    return cleaned.encode("latin-1", "replace").decode("latin-1")[:200]


def bearerChallenge(api: Any, error: Optional[str] = None, description: Optional[str] = None,
                    scope: Optional[str] = None) -> str:
    """
    The C{WWW-Authenticate} value of a bearer plan (RFC 6750, 3).
    """
    parts = [f'Bearer realm="{_quoted(api.name)}"']
    if error is not None:
        parts.append(f'error="{error}"')
    if description is not None:
        parts.append(f'error_description="{_quoted(description)}"')
    if scope is not None:
        parts.append(f'scope="{_quoted(scope)}"')
    return ", ".join(parts)


def invalidToken(api: Any, detail: str) -> Unauthorized:
    """
    The 401 for a bearer token that is present but not acceptable.
    """
    return Unauthorized(detail, headers=[("WWW-Authenticate", bearerChallenge(api, "invalid_token", detail))])


def insufficient(api: Any, detail: str, scope: Optional[str] = None) -> Forbidden:
    """
    The 403 for a valid bearer token that lacks a scope or claim.
    """
    error = "insufficient_scope"
    return Forbidden(detail, headers=[("WWW-Authenticate", bearerChallenge(api, error, detail, scope))])


def readSecretFile(section: SectionReader, key: str) -> bytes:
    """
    The content of the file named by C{key}, without its trailing newline
    (see L{evgate.secrets}: systemd credentials, permissions).
    """
    return readSecretBytes(section, key)


def ownedKeys(section: SectionReader, context: ApiContext, plan: str, prefix: str) -> List[str]:
    """
    The keys of C{section} that start with C{prefix}; an error if there are
    some and the API does not list C{plan}.
    """
    keys = [k for k in section.keys() if k.startswith(prefix)]
    if keys and plan not in context.plans:
        raise section.error(keys[0], f"is only used by the {plan} plan, which this API does not list")
    return keys


# the plan


@implementer(IPlan)
class JwtPlan:
    """
    Authenticates a caller by a signed JWT (see the module's docstring).
    """

    name = "jwt"
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        options = api.config.options["jwt"]
        self.options = options
        self.reactor = api.node.reactor
        self.challenge = bearerChallenge(api)
        if options["jwksUrl"] is not None:
            self.keys: Any = JwksKeys(options["jwksUrl"], self.reactor, options["jwksMinRefresh"],
                                      options["jwksMaxAge"], options["jwksTimeout"])
        else:
            self.keys = StaticKey(options["key"], options["algorithms"])

    def present(self, request: Request) -> bool:
        token = bearerToken(request)
        if token is None:
            return False
        # Opaque tokens belong to the oauth2 plan when the API has one.
        return looksLikeJwt(token) or not hasPlan(self.api, "oauth2")

    def authenticate(self, request: Request) -> Deferred:
        token = bearerToken(request) or b""
        api = self.api
        if twoBearerTokens(request):
            return fail(invalidToken(api, "the request carries two different bearer tokens (header and "
                                             "access_token); send one"))
        if len(token) > MAX_TOKEN_BYTES or not looksLikeJwt(token):
            return fail(invalidToken(api, "the bearer token is not a JWT"))
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            return fail(invalidToken(api, "the bearer token is not a JWT"))
        alg = header.get("alg")
        if alg not in self.options["algorithms"]:
            return fail(invalidToken(api, f"tokens signed with {str(alg)[:20]!r} are not accepted here"))
        d = self.keys.keyFor(header)
        d.addCallback(self._verify, token, alg)
        d.addErrback(self._unknownKey)
        return d  # type: ignore[no-any-return]

    def stop(self) -> None:
        """
        Nothing to release: key sets are fetched when a token needs them.
        """

    def _unknownKey(self, failure: Any) -> Any:
        failure.trap(UnknownKey)
        raise invalidToken(self.api, str(failure.value))

    def _verify(self, found: Tuple[Any, Tuple[str, ...]], token: bytes, alg: str) -> Consumer:
        key, allowed = found
        api = self.api
        options = self.options
        if alg not in allowed:
            raise invalidToken(api, f"the issuer's key does not sign with {alg}")
        try:
            claims = pyjwt.decode(
                token, key, algorithms=[alg],
                audience=options["audience"] or None,
                issuer=options["issuer"],
                options={
                    # Time is checked below on the reactor's clock, the
                    # clock that also closes streams at expiry.
                    "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                    "verify_aud": bool(options["audience"]),
                    "verify_iss": options["issuer"] is not None,
                },
            )
        except pyjwt.InvalidIssuerError:
            raise invalidToken(api, "the token was issued by another issuer") from None
        except pyjwt.InvalidAudienceError:
            raise invalidToken(api, "the token is meant for another audience") from None
        except pyjwt.MissingRequiredClaimError as e:
            raise invalidToken(api, f"the token has no {e.claim} claim") from None
        except pyjwt.PyJWTError as e:
            # Signature, encoding: say no more than that to the client.
            self.log.debug("{api}: JWT refused: {error}", api=api.name, error=str(e))
            raise invalidToken(api, "the token's signature or encoding is invalid") from None
        expiresAt = self._checkTime(claims)
        self._checkClaims(claims)
        subject = claims.get(options["consumerClaim"])
        if not isinstance(subject, str) or not subject:
            raise insufficient(api, f"the token has no {options['consumerClaim']} claim naming the caller")
        return Consumer(id=subject, plan=self.name, claims=claims, expiresAt=expiresAt)

    def _checkTime(self, claims: Mapping[str, Any]) -> Optional[float]:
        api = self.api
        now = self.reactor.seconds()
        leeway = self.options["leeway"]
        exp = claims.get("exp")
        if exp is None:
            if self.options["requireExpiry"]:
                raise invalidToken(api, "the token has no exp claim")
        elif not _isNumber(exp):
            raise invalidToken(api, "the token's exp claim is not a number")
        elif now > exp + leeway:
            raise invalidToken(api, f"the token expired at {_iso(exp)}")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _isNumber(nbf):
                raise invalidToken(api, "the token's nbf claim is not a number")
            if now + leeway < nbf:
                raise invalidToken(api, f"the token is not valid before {_iso(nbf)}")
        # Streams close at the exp the token carries, leeway included, so
        # that a stream never outlives what a request would be allowed.
        return float(exp) + leeway if exp is not None else None

    def _checkClaims(self, claims: Mapping[str, Any]) -> None:
        api = self.api
        for name in self.options["requiredClaims"]:
            if name not in claims:
                raise insufficient(api, f"the token has no {name} claim, which this API requires")
        for name, wanted in self.options["claims"].items():
            if not claimHolds(claims.get(name), wanted):
                raise insufficient(api, f"the token's {name} claim does not allow this API")


def claimHolds(value: Any, wanted: str) -> bool:
    """
    Whether the claim C{value} grants C{wanted}: equal to it, one of a list,
    or one of the words of a space-separated string (as C{scope} is).
    """
    if isinstance(value, str):
        return value == wanted or wanted in value.split()
    if isinstance(value, bool):
        return str(value).lower() == wanted.lower()
    if isinstance(value, (int, float)):
        return str(value) == wanted
    if isinstance(value, list):
        return any(isinstance(v, str) and v == wanted for v in value)
    return False


def _isNumber(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _iso(seconds: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, ValueError, OSError):
        return str(seconds)


@apiOptionParser
def parseJwtOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{jwt.*} keys of an API (see the module's docstring); an error if
    they are set on an API without the jwt plan.
    """
    keys = ownedKeys(section, context, "jwt", "jwt.")
    if "jwt" not in context.plans:
        return {}
    sources = [k for k in ("jwt.secret-file", "jwt.public-key-file", "jwt.jwks-url") if section.has(k)]
    if len(sources) != 1:
        raise section.error("plans", "the jwt plan needs exactly one of jwt.secret-file, "
                            "jwt.public-key-file and jwt.jwks-url"
                            + (f" (found {', '.join(sources)})" if sources else ""))
    source = sources[0]
    key: Any = None
    jwksUrl: Optional[str] = None
    if source == "jwt.secret-file":
        key = readSecretFile(section, source)
        if len(key) < MIN_SECRET_BYTES:
            raise section.error(source, f"the secret is {len(key)} bytes; HMAC needs at least "
                                f"{MIN_SECRET_BYTES} random bytes")
        # Each HMAC needs a key as long as its hash: a 32-byte secret can
        # only do HS256.
        family: Tuple[str, ...] = tuple(a for a in HMAC_ALGORITHMS if len(key) * 8 >= int(a[2:]))
    elif source == "jwt.public-key-file":
        path = resolvePath(section, source, section.get(source))
        try:
            with open(path, "rb") as f:
                key = loadPublicKey(f.read())
            family = algorithmsForKey(key)
        except OSError as e:
            raise section.error(source, f"cannot read {path}: {e.strerror}") from None
        except ValueError as e:
            raise section.error(source, f"{path}: {e}") from None
    else:
        jwksUrl = section.get(source)
        if not jwksUrl.startswith(("https://", "http://")):
            raise section.error(source, f"{jwksUrl!r} is not an http(s) URL")
        family = RSA_ALGORITHMS + tuple(a for v in EC_ALGORITHMS.values() for a in v) + EDDSA_ALGORITHMS
    algorithms = section.getList("jwt.algorithms", family)
    for alg in algorithms:
        if alg not in family:
            raise section.error("jwt.algorithms", f"{alg} cannot be verified with the key of {source} "
                                f"(possible: {' '.join(family)})")
    claims: Dict[str, str] = {}
    for name in keys:
        if name.startswith("jwt.claims."):
            claim = name[len("jwt.claims."):]
            if not claim:
                raise section.error(name, "names no claim")
            claims[claim] = section.get(name)
    return {"jwt": {
        "key": key,
        "jwksUrl": jwksUrl,
        "algorithms": tuple(algorithms),
        "issuer": section.get("jwt.issuer", None) or None,
        "audience": section.getList("jwt.audience", ()),
        "leeway": section.getFloat("jwt.leeway", DEFAULT_LEEWAY),
        "requireExpiry": section.getBool("jwt.require-expiry", True),
        "requiredClaims": section.getList("jwt.required-claims", ()),
        "claims": claims,
        "consumerClaim": section.get("jwt.consumer-claim", "sub"),
        "jwksMinRefresh": section.getFloat("jwt.jwks-min-refresh", DEFAULT_JWKS_MIN_REFRESH),
        "jwksMaxAge": section.getFloat("jwt.jwks-max-age", DEFAULT_JWKS_MAX_AGE, minimum=1.0),
        "jwksTimeout": section.getFloat("jwt.jwks-timeout", DEFAULT_JWKS_TIMEOUT, minimum=0.1),
    }}
