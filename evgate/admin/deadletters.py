"""
A webhook subscription's dead letters (see L{evgate.webhook.deadletters}):

    GET  /apis/<api>/subscriptions/<id>/dead-letters?limit=&cursor=
    POST /apis/<api>/subscriptions/<id>/dead-letters/redeliver

C{GET} reads the API's dead-letter destination (C{dlq}) from C{cursor}
(from its start without one) and answers the subscription's dead letters
among the records it scanned, oldest first, at most C{limit} of them
(default 50, at most 200), with the C{nextCursor} that goes on after them
and C{atHead} once nothing more is there.

C{POST} takes C{{"positions": ["<partition>:<offset>", ...]}} (or the list
alone), the C{position}s a page shows, or C{{"all": true}} (with an
optional C{"cursor"}: every dead letter of the subscription after it, up
to L{MAX_REDELIVER}, and C{nextCursor} to go on).  Each is delivered to
the subscription's callback once more; the answer reports each one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, adminRoute, readJson
from evgate.admin.subscriptions import webhooks
from evgate.entrypoints.http_get import intParameter
from evgate.errors import BadCursor, BadRequest, Conflict
from evgate.gateway import queryArgs
from evgate.message import Cursor, CursorError, Message
from evgate.webhook.deadletters import (
    Redelivery,
    ScanResult,
    deadLetterTag,
    deadLetterView,
    parsePosition,
    readDeadLetters,
    subscriptionOf,
)
from evgate.webhook.signing import secretKey

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

# Dead letters one redeliver request sends, at most.
MAX_REDELIVER = 100


def deadLettersOf(service: Any, api: Any) -> Any:
    """
    The API's L{evgate.webhook.delivery.DeadLetters}.

    @raise Conflict: if it has none.
    """
    dlq = service.entrypoint(api).deadLetters
    if dlq is None:
        raise Conflict(f"API {api.name} has no dlq: a message that cannot be delivered pauses its subscription "
                       "instead of becoming a dead letter")
    return dlq


def _cursor(text: Any, tag: bytes, field: str) -> Any:
    if text is None or text == "":
        return "earliest"
    if not isinstance(text, str):
        raise BadCursor(f"{field} is a cursor of the dead letters", extra={"field": field})
    try:
        return Cursor.decode(text, tag)
    except CursorError as e:
        raise BadCursor(f"{field} is not a cursor of these dead letters: {e}", extra={"field": field}) from None


def _page(result: ScanResult, dlq: Any, tag: bytes) -> Dict[str, Any]:
    return {
        "dlq": f"{dlq.endpoint}/{dlq.topic}",
        "items": [deadLetterView(m) for m in result.records],
        "nextCursor": result.cursor.encode(tag) if result.cursor is not None else None,
        "scanned": result.scanned,
        "atHead": result.atHead,
        "gaps": result.gaps,
    }


@adminRoute("/apis/<api>/subscriptions/<id>/dead-letters", methods=["GET"])
def listDeadLetters(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    A page of subscription C{id}'s dead letters, oldest first.
    """
    service = webhooks(admin, api)
    runtime = service.apiFor(api)
    dlq = deadLettersOf(service, runtime)
    tag = deadLetterTag(runtime.name, dlq.topic)
    limit = intParameter(request, "limit", DEFAULT_LIMIT, MAX_LIMIT) or DEFAULT_LIMIT
    raw = queryArgs(request).get(b"cursor")
    start = _cursor(raw[0].decode("latin-1") if raw else None, tag, "cursor")
    d = service.get(api, id)

    def read(record: Mapping[str, Any]) -> Deferred:
        return readDeadLetters(dlq.connector, dlq.topic, start, service.reactor,
                               keep=lambda m: subscriptionOf(m) == id,
                               enough=lambda r: len(r.records) >= limit)

    d.addCallback(read)
    d.addCallback(_page, dlq, tag)
    return d


def _wanted(document: Any, tag: bytes) -> Tuple[Optional[Set[Tuple[int, int]]], Any]:
    """
    The positions a redeliver body names (L{None} for all of them) and the
    cursor to read from.
    """
    if isinstance(document, list):
        document = {"positions": document}
    usage = 'the body is {"positions": ["<partition>:<offset>", ...]} or {"all": true, "cursor": "<cursor>"?}'
    if not isinstance(document, dict):
        raise BadRequest(usage)
    if document.get("all") is True:
        if set(document) - {"all", "cursor"}:
            raise BadRequest(usage)
        return None, _cursor(document.get("cursor"), tag, "cursor")
    positions = document.get("positions")
    if set(document) != {"positions"} or not isinstance(positions, list) or not positions:
        raise BadRequest(usage)
    if len(positions) > MAX_REDELIVER:
        raise BadRequest(f"at most {MAX_REDELIVER} positions at a time", extra={"field": "positions"})
    try:
        wanted = {parsePosition(p) for p in positions}
    except ValueError as e:
        raise BadRequest(str(e), extra={"field": "positions"}) from None
    # Read from the first wanted offset of each partition; the endpoint
    # reads the partitions the cursor does not name from their start.
    first: Dict[int, int] = {}
    for partition, offset in wanted:
        first[partition] = min(offset, first.get(partition, offset))
    return wanted, first


@adminRoute("/apis/<api>/subscriptions/<id>/dead-letters/redeliver", methods=["POST"])
def redeliverDeadLetters(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    Deliver dead letters of subscription C{id} to its callback once more;
    the answer reports each: C{{"results": [{"position", "ok", "status",
    "error"?}], "redelivered": n, "failed": n}}.
    """
    service = webhooks(admin, api)
    runtime = service.apiFor(api)
    dlq = deadLettersOf(service, runtime)
    tag = deadLetterTag(runtime.name, dlq.topic)
    wanted, start = _wanted(readJson(request), tag)
    settings = service.entrypoint(runtime).settings
    d = service.get(api, id)
    found: Dict[str, Any] = {}

    def read(record: Mapping[str, Any]) -> Deferred:
        found["record"] = record
        begin = start
        if isinstance(start, dict):
            heads = getattr(dlq.connector, "headOffsets", lambda topic: None)(dlq.topic) or {}
            begin = Cursor.fromMapping({**heads, **start}, dlq.connector.epoch())

        def keep(m: Message) -> bool:
            if wanted is not None:
                return (m.partition, m.offset) in wanted
            return subscriptionOf(m) == id

        limit = len(wanted) if wanted is not None else MAX_REDELIVER
        return readDeadLetters(dlq.connector, dlq.topic, begin, service.reactor, keep=keep,
                               enough=lambda r: len(r.records) >= limit)

    def deliver(result: ScanResult) -> Deferred:
        record = found["record"]
        mine = [m for m in result.records if subscriptionOf(m) == id]
        redelivery = Redelivery(record=record, key=secretKey(record["secret"]), http=service.http,
                                reactor=service.reactor, timeout=settings.timeout,
                                maxInFlight=settings.maxInFlight,
                                cloudEvents=runtime.config.options.get("webhookCloudEvents"))
        sent = redelivery.deliverAll(mine)
        sent.addCallback(answer, result, mine)
        return sent

    def answer(outcomes: List[Dict[str, Any]], result: ScanResult, mine: List[Message]) -> Dict[str, Any]:
        results = list(outcomes)
        if wanted is not None:
            seen = {(m.partition, m.offset) for m in result.records}
            for m in result.records:
                if subscriptionOf(m) != id:
                    results.append({"position": f"{m.partition}:{m.offset}", "ok": False, "status": None,
                                    "error": f"not a dead letter of subscription {id}"})
            for partition, offset in sorted(wanted - seen):
                results.append({"position": f"{partition}:{offset}", "ok": False, "status": None,
                                "error": "no such dead letter (gone with the dlq's retention, or never there)"})
        ok = sum(1 for r in results if r["ok"])
        document: Dict[str, Any] = {"results": results, "redelivered": ok, "failed": len(results) - ok}
        if wanted is None:
            document["nextCursor"] = result.cursor.encode(tag) if result.cursor is not None else None
            document["atHead"] = result.atHead
        return document

    d.addCallback(read)
    d.addCallback(deliver)
    return d
