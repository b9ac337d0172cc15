"""
A client of the Confluent schema registry REST API, on the reactor (treq).

What it caches, and why:

 - a schema by id, forever: an id names one schema text for the life of
   the registry, so once a message's schema is known, a registry outage
   does not stop messages written with it;
 - a subject's C{latest} version, for L{RegistryClient.subjectTtl} seconds
   (a new version is picked up that much later), and past that while the
   registry cannot be reached (publishing goes on with the version it had);
 - a pinned subject version, forever (it cannot change).

Concurrent asks for the same thing share one request. Answers are parsed
with a size bound; errors are L{RegistryError}, never a hang: every request
has a timeout.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from evgate import jsonlimits
from evgate.schemas.errors import RegistryError

# The registry's media type; it also accepts plain application/json.
MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
# A schema text can be large (generated .proto files), but an answer of
# more than this is not a registry talking.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
MAX_ANSWER_DEPTH = 64
SCHEMA_TYPES = ("AVRO", "PROTOBUF", "JSON")


@dataclass(frozen=True)
class Reference:
    """
    A schema's reference to another registered schema: C{name} is how the
    schema refers to it (an import path for Protobuf, a type name for
    Avro, a URL for JSON Schema).
    """

    name: str
    subject: str
    version: int


@dataclass(frozen=True)
class RegisteredSchema:
    """
    A schema as the registry holds it.

    @ivar schemaId: its id (what the wire format carries).
    @ivar schemaType: C{AVRO}, C{PROTOBUF} or C{JSON}.
    @ivar text: the schema (Avro JSON, .proto text, or JSON Schema JSON).
    @ivar subject: the subject it was looked up under, if any.
    @ivar version: its version in that subject, if any.
    """

    schemaId: int
    schemaType: str
    text: str
    references: Tuple[Reference, ...] = ()
    subject: Optional[str] = None
    version: Optional[int] = None


def parseAnswer(body: bytes) -> Any:
    """
    A registry answer's JSON, bounded in size and depth.

    @raise RegistryError: if it is too large, too deep or not JSON.
    """
    try:
        return jsonlimits.loads(body, maxDepth=MAX_ANSWER_DEPTH, maxBytes=MAX_ANSWER_BYTES)
    except jsonlimits.JsonLimitError as e:
        raise RegistryError(f"registry answer refused: {e}") from None
    except ValueError as e:
        raise RegistryError(f"registry answer is not JSON: {e}") from None


def _inferType(text: str) -> str:
    """
    The language of a schema whose answer names none. Confluent omits
    C{schemaType} for Avro only; Apicurio also omits it for Protobuf schemas
    registered as base64 descriptors (as Confluent's serializers do), so
    text that is not JSON is Protobuf, and JSON with C{$schema} is JSON Schema.
    """
    try:
        parsed = jsonlimits.loads(text, maxDepth=MAX_ANSWER_DEPTH)
    except ValueError:
        return "PROTOBUF"
    if isinstance(parsed, dict) and "$schema" in parsed:
        return "JSON"
    return "AVRO"


def _schemaFrom(answer: Any, schemaId: Optional[int] = None) -> RegisteredSchema:
    if not isinstance(answer, dict) or not isinstance(answer.get("schema"), str):
        raise RegistryError("registry answer has no schema text")
    schemaType = answer.get("schemaType") or _inferType(answer["schema"])
    if schemaType not in SCHEMA_TYPES:
        raise RegistryError(f"schema type {schemaType!r} is not one of {', '.join(SCHEMA_TYPES)}")
    references = []
    for raw in answer.get("references") or ():
        try:
            references.append(Reference(str(raw["name"]), str(raw["subject"]), int(raw["version"])))
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"registry answer has a malformed reference: {raw!r}") from None
    sid = answer.get("id", schemaId)
    if not isinstance(sid, int):
        raise RegistryError("registry answer has no schema id")
    version = answer.get("version")
    return RegisteredSchema(schemaId=sid, schemaType=schemaType, text=answer["schema"],
                            references=tuple(references), subject=answer.get("subject"),
                            version=version if isinstance(version, int) else None)


class RegistryClient:
    """
    Asks one schema registry for schemas, with the caches described in the
    module docstring.

    @ivar url: the base URL (for Apicurio, C{.../apis/ccompat/v7}).
    @ivar subjectTtl: seconds a subject's latest version is trusted.
    """

    log = Logger()

    def __init__(self, url: str, username: Optional[str] = None, password: Optional[str] = None,
                 caCertificates: Tuple[bytes, ...] = (), reactor: Any = None, http: Any = None,
                 subjectTtl: float = 30.0, timeout: float = 10.0) -> None:
        if reactor is None:
            # The global reactor only when none is given (tests pass theirs),
            # as twisted.application does: importing it installs one.
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.url = url.rstrip("/")
        self.reactor = reactor
        self.subjectTtl = subjectTtl
        self.timeout = timeout
        self._headers: Dict[bytes, List[bytes]] = {b"Accept": [f"{MEDIA_TYPE}, application/json".encode()]}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            self._headers[b"Authorization"] = [f"Basic {token}".encode("ascii")]
        self._pool: Any = None
        self._http = http if http is not None else self._makeClient(caCertificates)
        self._byId: Dict[int, RegisteredSchema] = {}
        self._pinned: Dict[Tuple[str, int], RegisteredSchema] = {}
        self._latest: Dict[str, Tuple[float, RegisteredSchema]] = {}
        self._pending: Dict[Any, List[Deferred]] = {}

    @classmethod
    def fromSettings(cls, settings: Any, reactor: Any = None, **kwargs: Any) -> "RegistryClient":
        """
        A client for an endpoint's L{evgate.schemas.config.RegistrySettings}.
        """
        return cls(settings.url, username=settings.username, password=settings.password,
                   caCertificates=settings.caCertificates, reactor=reactor, **kwargs)

    def _makeClient(self, caCertificates: Tuple[bytes, ...]) -> Any:
        policy = BrowserLikePolicyForHTTPS()
        if caCertificates:
            root = trustRootFromCertificates([Certificate.loadPEM(pem) for pem in caCertificates])
            policy = BrowserLikePolicyForHTTPS(trustRoot=root)
        pool = self._pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        return HTTPClient(Agent(self.reactor, contextFactory=policy, pool=pool))

    def close(self) -> Deferred:
        """
        Close the kept-alive connections to the registry (on shutdown).
        """
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    # ---------------------------------------------------------------- asks

    def knownSchema(self, schemaId: int) -> Optional[RegisteredSchema]:
        """
        The schema of C{schemaId} if it is already cached (no request).
        """
        return self._byId.get(schemaId)

    def schemaById(self, schemaId: int) -> "Deferred[RegisteredSchema]":
        """
        The schema registered under C{schemaId}; cached forever.
        """
        known = self._byId.get(schemaId)
        if known is not None:
            return succeed(known)

        def fetched(answer: Any) -> RegisteredSchema:
            schema = _schemaFrom(answer, schemaId)
            if schema.schemaId != schemaId:
                schema = RegisteredSchema(schemaId, schema.schemaType, schema.text, schema.references)
            self._byId[schemaId] = schema
            return schema

        return self._shared(("id", schemaId), lambda: self._get(f"/schemas/ids/{schemaId}").addCallback(fetched))

    def subjectVersion(self, subject: str, version: Union[int, str] = "latest") -> "Deferred[RegisteredSchema]":
        """
        Version C{version} (a number, or C{"latest"}) of C{subject}.
        """
        if version != "latest":
            pinned = self._pinned.get((subject, int(version)))
            if pinned is not None:
                return succeed(pinned)
        else:
            cached = self._latest.get(subject)
            if cached is not None and self.reactor.seconds() - cached[0] < self.subjectTtl:
                return succeed(cached[1])

        def fetched(answer: Any) -> RegisteredSchema:
            schema = _schemaFrom(answer)
            self._byId.setdefault(schema.schemaId, schema)
            if schema.version is not None:
                self._pinned[(subject, schema.version)] = schema
            if version == "latest":
                self._latest[subject] = (self.reactor.seconds(), schema)
            return schema

        def stale(failure: Failure) -> RegisteredSchema:
            failure.trap(RegistryError)
            cached = self._latest.get(subject) if version == "latest" else None
            error = failure.value
            assert isinstance(error, RegistryError)
            if cached is None or error.notFound:
                return failure  # type: ignore[return-value]
            self.log.warn("schema registry {url}: {error}; going on with version {version} of {subject}",
                          url=self.url, error=error.message, version=cached[1].version, subject=subject)
            return cached[1]

        path = f"/subjects/{quote(subject, safe='')}/versions/{quote(str(version), safe='')}"
        return self._shared(("subject", subject, str(version)),
                            lambda: self._get(path).addCallback(fetched).addErrback(stale))

    def register(self, subject: str, text: str, schemaType: str = "AVRO",
                 references: Tuple[Reference, ...] = ()) -> "Deferred[int]":
        """
        Register C{text} under C{subject} (or find it there): its schema id.
        """
        body: Dict[str, Any] = {"schema": text}
        if schemaType != "AVRO":
            body["schemaType"] = schemaType
        if references:
            body["references"] = [{"name": r.name, "subject": r.subject, "version": r.version} for r in references]

        def registered(answer: Any) -> int:
            if not isinstance(answer, dict) or not isinstance(answer.get("id"), int):
                raise RegistryError("registry answer to a registration has no id")
            return int(answer["id"])

        path = f"/subjects/{quote(subject, safe='')}/versions"
        return self._request(b"POST", path, json.dumps(body).encode("utf-8")).addCallback(registered)

    # ---------------------------------------------------------------- plumbing

    def _shared(self, key: Any, make: Callable[[], Deferred]) -> Deferred:
        """
        One request for everyone asking C{key} at the same time.
        """
        waiters = self._pending.get(key)
        mine: Deferred = Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._pending[key] = [mine]

        def done(result: Any) -> None:
            del self._pending[key]
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        make().addBoth(done)
        return mine

    def _get(self, path: str) -> Deferred:
        return self._request(b"GET", path)

    def _request(self, method: bytes, path: str, body: Optional[bytes] = None) -> Deferred:
        url = self.url + path
        headers = dict(self._headers)
        if body is not None:
            headers[b"Content-Type"] = [MEDIA_TYPE.encode()]
        try:
            d = self._http.request(method.decode("ascii"), url, headers=headers, data=body)
        except Exception as e:  # a malformed URL raises before any I/O
            return fail(RegistryError(f"cannot ask {url}: {e}"))
        timeout = self.reactor.callLater(self.timeout, d.cancel)

        def answered(response: Any) -> Deferred:
            return self._read(response).addCallback(lambda raw: (response.code, raw))

        def parsed(result: Tuple[int, bytes]) -> Any:
            code, raw = result
            if 200 <= code < 300:
                return parseAnswer(raw)
            message, errorCode = f"HTTP {code}", None
            try:
                answer = parseAnswer(raw)
                if isinstance(answer, dict):
                    message = f"HTTP {code}: {answer.get('message') or answer.get('detail') or message}"
                    errorCode = answer.get("error_code")
            except RegistryError:
                pass
            raise RegistryError(f"{method.decode()} {url}: {message}", status=code, code=errorCode)

        def failed(failure: Failure) -> None:
            if failure.check(RegistryError):
                failure.raiseException()
            if failure.check(CancelledError):
                raise RegistryError(f"{method.decode()} {url}: no answer within {self.timeout:g} s")
            kind = failure.type.__name__ if failure.type is not None else "error"
            raise RegistryError(f"{method.decode()} {url}: {failure.getErrorMessage() or kind}")

        def stopTimer(result: Any) -> Any:
            if timeout.active():
                timeout.cancel()
            return result

        return d.addCallback(answered).addBoth(stopTimer).addCallback(parsed).addErrback(failed)

    def _read(self, response: Any) -> Deferred:
        length = getattr(response, "length", None)
        if isinstance(length, int) and length > MAX_ANSWER_BYTES:
            raise RegistryError(f"registry answer of {length} bytes is over {MAX_ANSWER_BYTES}")
        chunks: List[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > MAX_ANSWER_BYTES:
                raise RegistryError(f"registry answer is over {MAX_ANSWER_BYTES} bytes")
            chunks.append(data)

        return treq.collect(response, collect).addCallback(lambda _: b"".join(chunks))
