"""
The keyless plan: anyone may call, as the anonymous consumer.

Keyless is for requests that carry I{no} credentials.  A request that
carries credentials (C{Authorization}, C{access_token}, or an API-key
header or query parameter of this node) is not keyless, whether or not
the API lists a plan for them: a client whose key is wrong, or sent to the
wrong API, learns it with a 401 instead of being served as anonymous.
On an API that also lists C{mtls}, a client certificate on the connection
is credentials too; elsewhere it is not (it belongs to the connection,
not to the request).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, FrozenSet, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request
from zope.interface import implementer

from evgate.config import Config
from evgate.interfaces import IPlan, ISynchronousPlan
from evgate.security.apikey import DEFAULT_HEADER, DEFAULT_QUERY
from evgate.security.consumer import Consumer
from evgate.security.mtls import peerCertificate

if TYPE_CHECKING:
    from evgate.gateway import ApiRuntime

ANONYMOUS = Consumer(id="anonymous", plan="keyless")

# What carries a bearer token (RFC 6750), on every API of every node.
BEARER_HEADER = b"authorization"
BEARER_QUERY = b"access_token"


def credentialCarriers(config: Config) -> Tuple[FrozenSet[bytes], FrozenSet[bytes]]:
    """
    The request headers (lower case) and query parameters that carry
    credentials on the node configured by C{config}: C{Authorization} and
    C{access_token}, and the API-key header and query parameter of every
    API (the defaults included, so that a node without API keys still
    knows C{X-Api-Key} for what it is).
    """
    headers = {BEARER_HEADER, DEFAULT_HEADER.lower().encode("ascii")}
    queries = {BEARER_QUERY, DEFAULT_QUERY.encode("ascii")}
    for api in config.apis.values():
        options = api.options.get("apiKey")
        if options:
            headers.add(options["header"].lower().encode("ascii"))
            if options["query"]:
                queries.add(options["query"].encode("ascii"))
    return frozenset(headers), frozenset(queries)


@implementer(IPlan, ISynchronousPlan)
class KeylessPlan:
    """
    Accepts every request that carries no credentials (see the module's
    docstring).  Its "credentials" are their absence: L{present} is true
    for a request without any, so that the plan chain picks keyless for
    those and never for a request with credentials.
    """

    name = "keyless"
    # Nothing to ask a client for: a 401 on a keyless-only API comes from
    # credentials it should not have sent.
    challenge = ""

    def __init__(self, api: "ApiRuntime") -> None:
        self.api = api
        self._config: object = None
        self._headers: Tuple[bytes, ...] = ()
        self._queries: FrozenSet[bytes] = frozenset()
        self._mtls = "mtls" in api.config.plans

    def _carriers(self) -> None:
        # The node's configuration changes on reload (an API with its own
        # API-key header may come); recomputed then, not per request.
        config = self.api.node.config
        headers, self._queries = credentialCarriers(config)
        self._headers = tuple(sorted(headers))
        self._config = config

    def present(self, request: Request) -> bool:
        """
        Whether C{request} carries no credentials at all.
        """
        if self._config is not self.api.node.config:
            self._carriers()
        # A client certificate is credentials on an API that takes it
        # (evgate.security.mtls), and only there: it belongs to the
        # connection, which may serve other APIs too.
        if self._mtls and peerCertificate(request) is not None:
            return False
        headers = request.requestHeaders
        for name in self._headers:
            if headers.hasHeader(name):
                return False
        args = request.args
        if args:
            for name in self._queries:
                if name in args:
                    return False
        return True

    def consumerOf(self, request: Request) -> Consumer:
        """
        The anonymous consumer, at once (L{ISynchronousPlan}: the gateway
        makes no Deferred for it).
        """
        return ANONYMOUS

    def authenticate(self, request: Request) -> Deferred:
        """
        The anonymous consumer.
        """
        return succeed(ANONYMOUS)

    def stop(self) -> None:
        """
        Nothing to release.
        """
