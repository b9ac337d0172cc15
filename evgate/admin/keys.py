"""
Admin routes of API keys (see docs/security.md):

    POST   /apis/<api>/keys          issue: {"name", "expiresAt"?} -> 201 {"id", "key", ...}
    GET    /apis/<api>/keys          list, without secrets
    GET    /apis/<api>/keys/<id>     one, without its secret
    PATCH  /apis/<api>/keys/<id>     set or clear its expiry: {"expiresAt": ... | null}
    DELETE /apis/<api>/keys/<id>     revoke at once (204)

C{expiresAt} is an RFC 3339 time (C{2027-01-01T00:00:00Z}) or POSIX
seconds, and must be in the future; answers write times in RFC 3339, UTC.
The key itself is in the answer of C{POST} only: the store keeps its
SHA-256.  The work is the node's L{evgate.security.apikey.KeyRegistry}'s;
these handlers translate HTTP.
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, Answer, adminRoute, readJson
from evgate.errors import BadRequest, Conflict, NotFound
from evgate.security.apikey import KIND, MAX_NAME, KeyRegistry, publicRecord

_FIELDS = frozenset({"name", "expiresAt"})


def registryFor(admin: AdminApp, api: str) -> KeyRegistry:
    """
    The node's key registry, once C{api} is known to be an API with the
    api-key plan.

    @raise NotFound: if there is no API C{api}.
    @raise Conflict: if it does not list the api-key plan.
    """
    runtime = admin.gateway.api(api)
    if runtime is None:
        raise NotFound(f"there is no API named {api}")
    if "api-key" not in runtime.config.plans:
        raise Conflict(f"API {api} does not list api-key in its plans")
    registry = admin.gateway.apiKeys
    if registry is None:
        # Not reached: the configuration refuses the api-key plan without
        # a store, and the registry exists whenever a store does.
        raise Conflict(f"API {api} has no store for its keys")
    return registry  # type: ignore[no-any-return]


def rfc3339(seconds: Optional[float]) -> Optional[str]:
    """
    POSIX C{seconds} as an RFC 3339 UTC time, or L{None}.
    """
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def parseTime(value: Any, now: float) -> float:
    """
    C{expiresAt} as POSIX seconds: an RFC 3339 string with a time zone, or
    a number.

    @raise BadRequest: if it is neither, or not in the future.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest("expiresAt is an RFC 3339 time (2027-01-01T00:00:00Z) or POSIX seconds")
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise BadRequest(f"expiresAt {value[:40]!r} is not an RFC 3339 time") from None
        if moment.tzinfo is None:
            raise BadRequest("expiresAt needs a time zone (Z or +hh:mm)")
        seconds = moment.timestamp()
    else:
        seconds = float(value)
    if seconds <= now:
        raise BadRequest("expiresAt is in the past")
    return seconds


def view(keyId: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """
    A key as the admin API shows it.
    """
    document = publicRecord(keyId, record)
    document["createdAt"] = rfc3339(document["createdAt"])
    document["expiresAt"] = rfc3339(document["expiresAt"])
    return document


@adminRoute("/apis/<api>/keys", methods=["POST"])
def issueKey(admin: AdminApp, request: Request, api: str) -> Deferred:
    """
    Issue a key for C{api}; the answer is the only one that shows it.
    """
    registry = registryFor(admin, api)
    document = readJson(request)
    if not isinstance(document, dict):
        raise BadRequest('the body is a JSON object: {"name": ..., "expiresAt": ...}')
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (known: name, expiresAt)")
    name = document.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise BadRequest(f"name is required: a string of 1 to {MAX_NAME} characters")
    expiresAt = document.get("expiresAt")
    if expiresAt is not None:
        expiresAt = parseTime(expiresAt, admin.gateway.reactor.seconds())
    d = registry.issue(api, name.strip(), expiresAt)

    def issued(result: Tuple[str, str, Dict[str, Any]]) -> Answer:
        keyId, key, record = result
        document = view(keyId, record)
        document["key"] = key
        return Answer(201, document, [("Location", f"/apis/{api}/keys/{keyId}")])

    return d.addCallback(issued)  # type: ignore[no-any-return]


@adminRoute("/apis/<api>/keys", methods=["GET"])
def listKeys(admin: AdminApp, request: Request, api: str) -> Deferred:
    """
    The keys of C{api}, without their secrets.
    """
    registry = registryFor(admin, api)

    def listed(rows: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
        return {"keys": [view(keyId, record) for keyId, record in rows]}

    return registry.listFor(api).addCallback(listed)  # type: ignore[no-any-return]


@adminRoute("/apis/<api>/keys/<keyId>", methods=["GET"])
def showKey(admin: AdminApp, request: Request, api: str, keyId: str) -> Deferred:
    """
    One key of C{api}, without its secret.
    """
    registry = registryFor(admin, api)

    def found(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        if record is None or record.get("api") != api:
            raise NotFound(f"API {api} has no key {keyId}")
        return view(keyId, record)

    return registry.store.get(KIND, keyId).addCallback(found)  # type: ignore[no-any-return]


@adminRoute("/apis/<api>/keys/<keyId>", methods=["DELETE"])
def revokeKey(admin: AdminApp, request: Request, api: str, keyId: str) -> Deferred:
    """
    Revoke a key: refused from the next request on, its streams closed now.
    """
    registry = registryFor(admin, api)

    def revoked(existed: bool) -> None:
        if not existed:
            raise NotFound(f"API {api} has no key {keyId}")

    return registry.revoke(api, keyId).addCallback(revoked)  # type: ignore[no-any-return]


@adminRoute("/apis/<api>/keys/<keyId>", methods=["PATCH"])
def setKeyExpiry(admin: AdminApp, request: Request, api: str, keyId: str) -> Deferred:
    """
    Set (or, with C{null}, clear) the expiry of a key of C{api}.  Requests
    from then on see it; streams opened before keep the expiry they were
    opened with (revoke the key to end them now).
    """
    registry = registryFor(admin, api)
    document = readJson(request)
    if not isinstance(document, dict) or set(document) != {"expiresAt"}:
        raise BadRequest('the body is {"expiresAt": <RFC 3339 time, POSIX seconds or null>}')
    expiresAt = document["expiresAt"]
    if expiresAt is not None:
        expiresAt = parseTime(expiresAt, admin.gateway.reactor.seconds())
    d = registry.store.get(KIND, keyId)

    def found(record: Optional[Dict[str, Any]]) -> Deferred:
        if record is None or record.get("api") != api:
            raise NotFound(f"API {api} has no key {keyId}")
        return registry.store.update(KIND, keyId, {"expiresAt": expiresAt})  # type: ignore[no-any-return]

    def updated(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        if record is None:
            raise NotFound(f"API {api} has no key {keyId}")
        if keyId in registry.records:
            registry.records[keyId] = record
        registry.log.info("set the expiry of API key {id} of {api} to {expiresAt}", id=keyId, api=api,
                          expiresAt=rfc3339(expiresAt) or "never")
        return view(keyId, record)

    return d.addCallback(found).addCallback(updated)  # type: ignore[no-any-return]
