"""
The C{oauth2} plan: an opaque access token, checked by the authorization
server's token introspection endpoint (RFC 7662).

    plans = oauth2
    oauth2.introspection-url  = https://idp.example/oauth2/introspect
    oauth2.client-id          = evgate
    oauth2.client-secret-file = /etc/evgate/introspection.secret
    oauth2.scopes             = orders:read      ; all of them are required

The token comes like a JWT's (C{Authorization: Bearer}, or C{access_token}
in the query).  When an API lists both jwt and oauth2, tokens shaped like a
JWT go to the jwt plan and the others here, whatever the order of the
plans.

The gateway posts C{token=...} with its client credentials (HTTP basic
auth) and reads C{active}, C{scope}, C{exp}, C{sub} / C{client_id}.  An
inactive or expired token is a 401; an active one without every configured
scope a 403 (C{WWW-Authenticate: Bearer error="insufficient_scope"}).  An
endpoint that does not answer within C{oauth2.timeout} seconds (default 5),
or answers with anything but a 200 and a JSON object, makes the request a
503 with C{Retry-After}: the token may be perfectly good, so the client is
told to retry rather than to log in again.

Answers are cached by the SHA-256 of the token (the token itself is never
kept) in a least-recently-used map of at most C{oauth2.cache-size} entries:
an active answer until the token's C{exp} but at most C{oauth2.cache-ttl}
seconds (default 60; this is how long a token revoked at the authorization
server may still pass), an inactive one for L{INACTIVE_TTL} seconds.
Concurrent requests with the same token share one introspection call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote

import treq
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from evgate import jsonlimits
from evgate.errors import AuthenticationUnavailable
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IPlan
from evgate.security.consumer import Consumer
from evgate.security.jwt import (
    MAX_TOKEN_BYTES,
    bearerChallenge,
    bearerToken,
    hasPlan,
    insufficient,
    invalidToken,
    looksLikeJwt,
    ownedKeys,
    readSecretFile,
    twoBearerTokens,
)

DEFAULT_TIMEOUT = 5.0
DEFAULT_CACHE_SIZE = 10000
DEFAULT_CACHE_TTL = 60.0
# Seconds an inactive answer is kept: long enough to absorb a client that
# retries a dead token in a loop, short enough not to matter otherwise.
INACTIVE_TTL = 10.0


class IntrospectionCache:
    """
    Introspection answers by token digest, bounded in size (least recently
    used first out) and in time (each entry has its own deadline).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: "OrderedDict[bytes, Tuple[float, Mapping[str, Any]]]" = OrderedDict()

    def get(self, digest: bytes, now: float) -> Optional[Mapping[str, Any]]:
        """
        The answer kept for C{digest}, if it is still valid at C{now}.
        """
        entry = self.entries.get(digest)
        if entry is None:
            return None
        until, answer = entry
        if now >= until:
            del self.entries[digest]
            return None
        self.entries.move_to_end(digest)
        return answer

    def put(self, digest: bytes, answer: Mapping[str, Any], until: float) -> None:
        """
        Keep C{answer} for C{digest} until C{until}.
        """
        self.entries[digest] = (until, answer)
        self.entries.move_to_end(digest)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


@implementer(IPlan)
class OAuth2Plan:
    """
    Authenticates a caller by token introspection (see the module's
    docstring).
    """

    name = "oauth2"
    log = Logger()

    def __init__(self, api: Any, http: Any = None) -> None:
        self.api = api
        options = api.config.options["oauth2"]
        self.options = options
        self.reactor = api.node.reactor
        self.http = http
        self.challenge = bearerChallenge(api)
        self.cache = IntrospectionCache(options["cacheSize"])
        self.requiredScopes: Tuple[str, ...] = options["scopes"]
        self._inFlight: Dict[bytes, List[Deferred]] = {}
        self.introspections = 0

    def _client(self) -> Any:
        if self.http is None:
            self.http = treq
        return self.http

    def present(self, request: Request) -> bool:
        token = bearerToken(request)
        if token is None:
            return False
        return not (looksLikeJwt(token) and hasPlan(self.api, "jwt"))

    def authenticate(self, request: Request) -> Deferred:
        token = bearerToken(request) or b""
        if twoBearerTokens(request):
            return fail(invalidToken(self.api, "the request carries two different bearer tokens (header and "
                                               "access_token); send one"))
        if not token or len(token) > MAX_TOKEN_BYTES:
            d: Deferred = Deferred()
            d.errback(invalidToken(self.api, "the bearer token is empty or too long"))
            return d
        digest = hashlib.sha256(token).digest()
        answer = self.cache.get(digest, self.reactor.seconds())
        if answer is not None:
            return succeed(answer).addCallback(self._judge)
        return self._introspect(token, digest).addCallback(self._judge)

    def stop(self) -> None:
        """
        Nothing to release: introspections under way finish on their own.
        """

    def _introspect(self, token: bytes, digest: bytes) -> Deferred:
        waiter: Deferred = Deferred()
        waiting = self._inFlight.get(digest)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._inFlight[digest] = [waiter]
        self.introspections += 1
        options = self.options
        # RFC 6749, 2.3.1: the credentials are form-encoded before they go
        # into the basic auth header.
        auth = (quote(options["clientId"], safe=""), quote(options["clientSecret"], safe=""))
        d = self._client().post(
            options["url"],
            data={"token": token.decode("latin-1"), "token_type_hint": "access_token"},
            auth=auth,
            headers={b"Accept": [b"application/json"]},
        )
        d.addTimeout(options["timeout"], self.reactor)
        d.addCallback(self._received)
        d.addCallback(self._parsed, digest)
        d.addErrback(self._unavailable)

        def settle(result: Any) -> None:
            for w in self._inFlight.pop(digest, []):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        d.addBoth(settle)
        return waiter

    def _received(self, response: Any) -> Deferred:
        if response.code != 200:
            # The body is read and dropped so that the connection is free.
            response.content().addErrback(lambda f: None)
            raise _BadAnswer(f"HTTP {response.code}")
        return response.content()  # type: ignore[no-any-return]

    def _parsed(self, body: bytes, digest: bytes) -> Mapping[str, Any]:
        try:
            answer = jsonlimits.loads(body)
        except ValueError:
            raise _BadAnswer("the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise _BadAnswer('the answer has no boolean "active"')
        now = self.reactor.seconds()
        if answer["active"]:
            until = now + self.options["cacheTtl"]
            exp = answer.get("exp")
            if isinstance(exp, (int, float)) and not isinstance(exp, bool):
                until = min(until, float(exp))
        else:
            until = now + min(INACTIVE_TTL, self.options["cacheTtl"])
        if until > now:
            self.cache.put(digest, answer, until)
        return answer

    def _unavailable(self, failure: Any) -> None:
        if failure.check(TimeoutError):
            reason = f"no answer within {self.options['timeout']:g} s"
        else:
            reason = failure.getErrorMessage() or failure.type.__name__
        self.log.warn("{api}: token introspection at {url} failed: {reason}", api=self.api.name,
                      url=self.options["url"], reason=reason)
        raise AuthenticationUnavailable("the authorization server did not answer the token introspection; "
                                        "retry later")

    def _judge(self, answer: Mapping[str, Any]) -> Consumer:
        api = self.api
        if not answer.get("active"):
            raise invalidToken(api, "the token is not active (expired, revoked or unknown)")
        now = self.reactor.seconds()
        exp = answer.get("exp")
        expiresAt: Optional[float] = None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            if now >= exp:
                raise invalidToken(api, "the token expired")
            expiresAt = float(exp)
        nbf = answer.get("nbf")
        if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now < nbf:
            raise invalidToken(api, "the token is not valid yet")
        scope = answer.get("scope")
        granted = set(scope.split()) if isinstance(scope, str) else set()
        missing = [s for s in self.requiredScopes if s not in granted]
        if missing:
            raise insufficient(api, f"the token lacks the scope {' '.join(missing)}",
                               scope=" ".join(self.requiredScopes))
        subject = None
        for name in ("sub", "client_id", "username"):
            value = answer.get(name)
            if isinstance(value, str) and value:
                subject = value
                break
        if subject is None:
            raise insufficient(api, "the introspection answer names no subject or client")
        return Consumer(id=subject, plan=self.name, claims=dict(answer), expiresAt=expiresAt)


class _BadAnswer(Exception):
    """
    The introspection endpoint answered with something unusable.
    """


@apiOptionParser
def parseOAuth2Options(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{oauth2.*} keys of an API (see the module's docstring); an error if
    they are set on an API without the oauth2 plan.
    """
    ownedKeys(section, context, "oauth2", "oauth2.")
    if "oauth2" not in context.plans:
        return {}
    url = section.get("oauth2.introspection-url")
    if not url.startswith(("https://", "http://")):
        raise section.error("oauth2.introspection-url", f"{url!r} is not an http(s) URL")
    secret = readSecretFile(section, "oauth2.client-secret-file")
    try:
        secretText = secret.decode("utf-8")
    except UnicodeDecodeError:
        raise section.error("oauth2.client-secret-file", "the secret is not UTF-8 text") from None
    return {"oauth2": {
        "url": url,
        "clientId": section.get("oauth2.client-id"),
        "clientSecret": secretText,
        "scopes": section.getList("oauth2.scopes", ()),
        "timeout": section.getFloat("oauth2.timeout", DEFAULT_TIMEOUT, minimum=0.1),
        "cacheSize": section.getInt("oauth2.cache-size", DEFAULT_CACHE_SIZE, minimum=1, maximum=10_000_000),
        "cacheTtl": section.getFloat("oauth2.cache-ttl", DEFAULT_CACHE_TTL),
    }}
