"""
The C{api-key} plan: a key the admin API issued for one API.

    plans = api-key
    api-key.header = X-Api-Key      ; the default
    api-key.query  = api-key        ; the default; empty to refuse keys in URLs

A client sends its key in the header, or in the query for clients that
cannot set headers (a browser's C{EventSource}).  Keys are issued, listed
and revoked with the admin API (L{evgate.admin.keys}):
C{POST /apis/{api}/keys} answers the key once, and only its SHA-256 is
stored.

Keys and lookups
================

A key is C{evg_<id>_<secret>}: a 12-character id (not secret: it names the
key in lists, logs and limits) and 256 random bits.  The gateway finds the
key's record by the id and compares the SHA-256 of the whole key with the
stored one with C{hmac.compare_digest}: the time a lookup takes says
nothing about the secret.

Every node keeps the records of its APIs' keys in memory
(L{KeyRegistry}), loaded from the store at start and reloaded every
C{refresh} seconds, so that a request never waits on the store (until the
first load has finished, an unknown id is looked up in the store).  A key
revoked through this node's admin API stops working at once, and its
streams are closed.  One issued or revoked on another node sharing the
store is honoured here as soon as this node's store learns of it when the
store reports its changes (an L{evgate.interfaces.IWatchableStore}, such
as the Kafka store: within milliseconds), and otherwise within one refresh
(SQLite).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

# evgate.store registers the store key of [gateway], which the api-key
# plan's parser checks.
import evgate.store  # noqa: F401
from evgate.errors import Unauthorized
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IPlan, IStreamingEntrypoint, IWatchableStore
from evgate.security.consumer import Consumer
from evgate.security.jwt import ownedKeys, queryValue

if TYPE_CHECKING:
    from evgate.node import NodeContext

KIND = "api-key"
PREFIX = "evg_"
ID_LENGTH = 12
_ID_ALPHABET = string.ascii_lowercase + string.digits
_KEY = re.compile(r"^evg_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
DEFAULT_HEADER = "X-Api-Key"
DEFAULT_QUERY = "api-key"
DEFAULT_REFRESH = 5.0
MAX_NAME = 200


def newKey() -> Tuple[str, str]:
    """
    A fresh key id and the key itself.
    """
    keyId = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    return keyId, f"{PREFIX}{keyId}_{secrets.token_urlsafe(32)}"


def keyDigest(key: str) -> str:
    """
    The stored form of C{key}: its SHA-256, in hex.  A key holds 256 random
    bits, so a plain hash is as good as a slow one here.
    """
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def splitKey(key: str) -> Optional[str]:
    """
    The id in C{key}, or L{None} when C{key} is not shaped like a key.
    """
    match = _KEY.match(key)
    return match.group(1) if match else None


def publicRecord(keyId: str, record: Mapping[str, Any]) -> Dict[str, Any]:
    """
    What the admin API shows of a key: everything but its digest.
    """
    return {"id": keyId, "api": record.get("api"), "name": record.get("name"),
            "createdAt": record.get("createdAt"), "expiresAt": record.get("expiresAt")}


class KeyRegistry(Service):
    """
    The API keys of one node, in memory, backed by the store.

    @ivar records: key id -> stored record, for every key of every API.
    """

    log = Logger()

    def __init__(self, node: "NodeContext", refresh: float = DEFAULT_REFRESH) -> None:
        self.node = node
        self.reactor = node.reactor
        self.refresh = refresh
        self.records: Dict[str, Dict[str, Any]] = {}
        self.loaded = False
        self.revokedListeners: List[Callable[[str, Mapping[str, Any]], None]] = []
        self._loop: Optional[LoopingCall] = None
        self._loading: Optional[Deferred] = None
        self._unwatch: Optional[Callable[[], None]] = None
        # Changes the store reported: a reload that began before one of
        # them read older records, and must not undo it.
        self._changes = 0

    @property
    def store(self) -> Any:
        """
        The node's L{evgate.interfaces.IStore}.

        @raise RuntimeError: if the node has none.
        """
        store = self.node.store
        if store is None:
            raise RuntimeError("API keys need a store: set store in [gateway]")
        return store

    def startService(self) -> None:
        super().startService()
        store = self.node.store
        if store is not None and IWatchableStore.providedBy(store):
            self._unwatch = store.watch(KIND, self._changed)
        self._loop = LoopingCall(self.reload)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh, now=True).addErrback(
            lambda f: self.log.failure("reloading API keys", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self._loading

    def _changed(self, keyId: str, record: Optional[Dict[str, Any]]) -> None:
        """
        The store says the key C{keyId} was issued or changed (C{record}) or
        revoked (L{None}), on whichever node.
        """
        self._changes += 1
        if isinstance(record, dict):
            self.records[keyId] = record
            return
        known = self.records.pop(keyId, None)
        if known is not None:
            # Revoked through another node's admin API (this node's own
            # revocations drop the key before the store hears of them).
            self.log.info("API key {id} was revoked elsewhere", id=keyId)
            self._revoked(keyId, known)

    def reload(self) -> Deferred:
        """
        Read every key record from the store; keys gone from it are revoked
        here too.  Errors are logged: the keys in memory go on serving.
        """
        if self._loading is not None:
            return self._loading
        changes = self._changes
        d = self.store.list(KIND)

        def loaded(rows: List[Tuple[str, Dict[str, Any]]]) -> None:
            if changes != self._changes and self.loaded:
                # The store reported changes while this list was on its
                # way: they are newer than it.  The next reload catches up.
                return
            fresh = {keyId: record for keyId, record in rows if isinstance(record, dict)}
            gone = [k for k in self.records if k not in fresh]
            self.records = fresh
            if not self.loaded:
                self.loaded = True
                self.log.info("loaded {count} API keys", count=len(fresh))
            for keyId in gone:
                self.log.info("API key {id} was revoked elsewhere", id=keyId)
                self._revoked(keyId, {})

        def failed(failure: Any) -> None:
            self.log.failure("cannot read API keys from the store; keeping those in memory", failure)

        def done(result: Any) -> None:
            self._loading = None

        d.addCallbacks(loaded, failed)
        if not d.called:
            # A load under way is joined rather than doubled.
            self._loading = d
            d.addBoth(done)
        return d

    def find(self, keyId: str) -> Deferred:
        """
        The record of C{keyId}, or L{None}: from memory, or, before the first
        load finished, from the store.
        """
        record = self.records.get(keyId)
        if record is not None or self.loaded:
            return succeed(record)
        d = self.store.get(KIND, keyId)

        def found(stored: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
            # Keep it unless a load or a revocation moved on meanwhile.
            if stored is not None and not self.loaded:
                self.records[keyId] = stored
            return stored

        return d.addCallback(found)  # type: ignore[no-any-return]

    def issue(self, api: str, name: str, expiresAt: Optional[float]) -> Deferred:
        """
        Issue a key for C{api}: a Deferred of C{(id, key, record)}.  The key
        itself is in the answer only; the store keeps its digest.
        """
        keyId, key = newKey()
        record = {"api": api, "name": name, "digest": keyDigest(key),
                  "createdAt": self.reactor.seconds(), "expiresAt": expiresAt}

        def stored(created: bool) -> Any:
            if not created:
                # Two ids alike in 36**12: draw again rather than overwrite.
                return self.issue(api, name, expiresAt)
            self.records[keyId] = record
            self.log.info("issued API key {id} ({name}) for {api}", id=keyId, name=name, api=api)
            return keyId, key, record

        return self.store.create(KIND, keyId, record).addCallback(stored)  # type: ignore[no-any-return]

    def listFor(self, api: str) -> Deferred:
        """
        The records of C{api}'s keys, from the store: C{(id, record)} pairs.
        """
        d = self.store.list(KIND)
        return d.addCallback(lambda rows: [(i, r) for i, r in rows  # type: ignore[no-any-return]
                                           if isinstance(r, dict) and r.get("api") == api])

    def revoke(self, api: str, keyId: str) -> Deferred:
        """
        Revoke C{keyId} of C{api}: it stops working on this node now, its
        streams close now, and the store forgets it.  A Deferred of whether
        there was such a key.
        """
        record = self.records.get(keyId)
        if record is not None and record.get("api") == api:
            del self.records[keyId]
            self._revoked(keyId, record)
        d = self.store.get(KIND, keyId)

        def check(stored: Optional[Dict[str, Any]]) -> Any:
            if stored is None or stored.get("api") != api:
                return record is not None and record.get("api") == api
            return self.store.delete(KIND, keyId).addCallback(lambda _: True)

        d.addCallback(check)
        d.addCallback(self._logRevoked, api, keyId)
        return d  # type: ignore[no-any-return]

    def _logRevoked(self, existed: bool, api: str, keyId: str) -> bool:
        if existed:
            self.log.info("revoked API key {id} of {api}", id=keyId, api=api)
        return existed

    def _revoked(self, keyId: str, record: Mapping[str, Any]) -> None:
        for listener in list(self.revokedListeners):
            try:
                listener(keyId, record)
            except Exception:
                self.log.failure("closing the streams of revoked API key {id}", id=keyId)


def closeStreamsOf(api: Any, consumerId: str, plan: str) -> int:
    """
    Close every live stream of C{api} whose consumer is C{consumerId} of
    C{plan}, as credentials that expired (SSE C{event: error}, WebSocket
    1008); how many were closed.
    """
    closed = 0
    for entrypoint in api.entrypoints:
        if not IStreamingEntrypoint.providedBy(entrypoint):
            continue
        for subscriber in list(entrypoint.live):
            consumer = subscriber.call.consumer
            if consumer.id == consumerId and consumer.plan == plan and not subscriber.closed:
                subscriber.credentialsExpired()
                closed += 1
    return closed


@implementer(IPlan)
class ApiKeyPlan:
    """
    Authenticates a caller by an API key (see the module's docstring).
    """

    name = "api-key"
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        options = api.config.options["apiKey"]
        self.header: bytes = options["header"].encode("ascii")
        self.query: Optional[bytes] = options["query"].encode("ascii") if options["query"] else None
        self.challenge = f'ApiKey realm="{api.name}", header="{options["header"]}"'
        self.reactor = api.node.reactor
        registry = api.node.apiKeys
        if registry is None:
            # The configuration refuses the api-key plan without a store.
            raise RuntimeError("API keys need a store: set store in [gateway]")
        self.registry: KeyRegistry = registry
        self.registry.revokedListeners.append(self._revoked)

    def stop(self) -> None:
        """
        Stop listening for revocations: a retired runtime has no streams
        left to close.
        """
        if self._revoked in self.registry.revokedListeners:
            self.registry.revokedListeners.remove(self._revoked)

    def _revoked(self, keyId: str, record: Mapping[str, Any]) -> None:
        if record.get("api", self.api.name) == self.api.name:
            closeStreamsOf(self.api, keyId, self.name)

    def _key(self, request: Request) -> Optional[bytes]:
        value = request.getHeader(self.header)
        if value is None and self.query is not None:
            value = queryValue(request, self.query)
        return value

    def present(self, request: Request) -> bool:
        return self._key(request) is not None

    def authenticate(self, request: Request) -> Deferred:
        header = request.getHeader(self.header)
        query = queryValue(request, self.query) if self.query is not None else None
        if header is not None and query is not None and header.strip() != query.strip():
            # Two keys: which one the client meant is a guess the gateway
            # does not make.
            return _refused(self._unauthorized("the request carries two different API keys (header and query "
                                               "parameter); send one"))
        raw = (self._key(request) or b"").strip()
        try:
            key = raw.decode("ascii")
        except UnicodeDecodeError:
            key = ""
        keyId = splitKey(key)
        if keyId is None:
            return _refused(self._unauthorized("the API key is not a key this gateway issued"))
        d = self.registry.find(keyId)
        d.addCallback(self._check, keyId, key)
        return d

    def _check(self, record: Optional[Mapping[str, Any]], keyId: str, key: str) -> Consumer:
        # Compare digests whether or not the id is known, so that both
        # paths cost the same.
        stored = record.get("digest", "") if record is not None else "0" * 64
        matches = hmac.compare_digest(keyDigest(key), str(stored))
        if record is None or not matches or record.get("api") != self.api.name:
            raise self._unauthorized("the API key is unknown or revoked")
        expiresAt = record.get("expiresAt")
        if expiresAt is not None and self.reactor.seconds() >= expiresAt:
            raise self._unauthorized("the API key expired")
        return Consumer(id=keyId, plan=self.name, claims={"keyId": keyId, "name": record.get("name")},
                        expiresAt=expiresAt)

    def _unauthorized(self, detail: str) -> Unauthorized:
        return Unauthorized(detail, headers=[("WWW-Authenticate", self.challenge)])


def _refused(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_FORBIDDEN_HEADERS = frozenset({"authorization", "cookie", "host", "content-type", "content-length"})


@apiOptionParser
def parseApiKeyOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    C{api-key.header} and C{api-key.query} (see the module's docstring).
    """
    ownedKeys(section, context, "api-key", "api-key.header")
    ownedKeys(section, context, "api-key", "api-key.query")
    if "api-key" not in context.plans:
        return {}
    header = section.get("api-key.header", DEFAULT_HEADER)
    if not _HEADER_NAME.match(header) or header.lower() in _FORBIDDEN_HEADERS:
        raise section.error("api-key.header", f"{header!r} cannot carry API keys")
    query = section.get("api-key.query", DEFAULT_QUERY)
    if query and not re.match(r"^[A-Za-z0-9._~-]+$", query):
        raise section.error("api-key.query", f"{query!r} is not a plain query parameter name")
    store = context.gateway.options.get("store", "unset") if context.gateway.options else "unset"
    if store is None:
        raise section.error("plans", "the api-key plan keeps its keys in the store: set store in [gateway] "
                            "(e.g. store = sqlite:/var/lib/evgate/evgate.sqlite)")
    return {"apiKey": {"header": header, "query": query}}
