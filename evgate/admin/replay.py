"""
C{POST /apis/<api>/subscriptions/<id>/replay}: deliver a webhook
subscription again from an earlier position.

The body is C{{"from": "<cursor>"}} (a cursor of the API, as SSE, HTTP GET
and WebSocket hand out and the subscription's C{position} shows) or
C{{"at": "<RFC 3339 time>"}} (the first message published at or after that
time).  The subscription's deliverer stops, its stored position becomes
the new one, and it starts again from there (a paused subscription stays
paused, and starts from there when resumed).

Which endpoints can:

 - the in-memory endpoint: C{from} and C{at} (its log keeps each message's
   time), within what its C{retention} still holds (an older position
   starts at the oldest message kept, and the deliverer says so);
 - Kafka: C{from} and C{at}.  A Kafka subscription's position is its
   consumer group's committed offsets, which every node delivering it
   shares; the subscription is paused on every node (through the store),
   the replay waits until the group has no members, commits the new
   offsets (C{at}: the consumer's C{offsets_for_times}) and resumes it
   (L{evgate.webhook.groupreplay}).  If members remain after the store's
   sync interval and a grace, the answer is a 503 and nothing moved;
 - MQTT: refused: the broker keeps no log to go back to.
"""

from __future__ import annotations

import bisect
import datetime
from typing import Any, Dict

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, adminRoute, readJson
from evgate.admin.subscriptions import webhooks
from evgate.connectors.memory import MemoryConnector
from evgate.errors import BadCursor, BadRequest, Conflict
from evgate.interfaces import IConsumerGroups, IRetainedLog
from evgate.message import Cursor, CursorError


class ReplayUnsupported(Conflict):
    """
    The API's endpoint cannot move a subscription's position that way.
    """

    slug = "replay-unsupported"
    title = "Replay not supported here"


def parseAt(value: Any) -> float:
    """
    C{at} as POSIX seconds.

    @raise BadRequest: if it is not an RFC 3339 time with a zone.
    """
    if not isinstance(value, str):
        raise BadRequest("at is an RFC 3339 time, such as 2026-11-28T10:00:00Z", extra={"field": "at"})
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"at {value[:40]!r} is not an RFC 3339 time", extra={"field": "at"}) from None
    if moment.tzinfo is None:
        raise BadRequest("at needs a time zone (Z or +hh:mm)", extra={"field": "at"})
    return moment.timestamp()


def memoryPositionAt(connector: MemoryConnector, topic: str, seconds: float) -> Cursor:
    """
    The cursor of the first message of C{topic} kept by the in-memory
    endpoint that was published at or after C{seconds} (the head, if none
    was).
    """
    log = connector.topicLog(topic)
    messages = list(log.messages)
    wanted = int(seconds * 1000)
    index = bisect.bisect_left([m.timestamp for m in messages], wanted)
    offset = messages[index].offset if index < len(messages) else log.nextOffset
    return Cursor.fromMapping({0: offset}, connector.epoch())


def fromCursor(api: Any, text: Any) -> Cursor:
    """
    The cursor C{from} of a replay body.

    @raise BadCursor: if it is not one of C{api}'s.
    """
    if not isinstance(text, str) or not text:
        raise BadCursor("from is a cursor of the API", extra={"field": "from"})
    try:
        return Cursor.decode(text, api.tag)
    except CursorError as e:
        raise BadCursor(f"from is not a cursor of API {api.name}: {e}", extra={"field": "from"}) from None


def replayPosition(api: Any, document: Dict[str, Any]) -> Cursor:
    """
    Where C{document} asks subscription deliveries of C{api} to start.

    @raise BadRequest: for a body that is not one of the two forms.
    @raise ReplayUnsupported: where the endpoint cannot do it.
    """
    connector = api.connector
    kind = connector.kind
    name = api.config.endpoint
    if not IRetainedLog.providedBy(connector):
        raise ReplayUnsupported(f"endpoint {name} ({kind}) keeps no log: there is nothing to replay")
    if "from" in document:
        return fromCursor(api, document["from"])
    seconds = parseAt(document["at"])
    if not isinstance(connector, MemoryConnector):
        raise ReplayUnsupported(f"endpoint {name} ({kind}) cannot find a position by time; "
                                "replay from a cursor instead", extra={"field": "at"})
    return memoryPositionAt(connector, api.config.topic, seconds)


@adminRoute("/apis/<api>/subscriptions/<id>/replay", methods=["POST"])
def replaySubscription(admin: AdminApp, request: Request, api: str, id: str) -> Deferred:
    """
    Deliver subscription C{id} again from C{from} (a cursor) or C{at} (a
    time); the answer is the subscription, with its new position.
    """
    service = webhooks(admin, api)
    runtime = service.apiFor(api)
    document = readJson(request)
    if not isinstance(document, dict) or len(document) != 1 or not ({"from", "at"} & set(document)):
        raise BadRequest('the body is {"from": "<cursor>"} or {"at": "<RFC 3339 time>"}')
    connector = runtime.connector
    if IConsumerGroups.providedBy(connector) and IRetainedLog.providedBy(connector):
        if "from" in document:
            d = service.replayGroup(api, id, offsets=fromCursor(runtime, document["from"]).asDict())
        else:
            d = service.replayGroup(api, id, at=int(parseAt(document["at"]) * 1000))
    else:
        d = service.replay(api, id, replayPosition(runtime, document))
    d.addCallback(lambda record: service.view(runtime, record))
    return d  # type: ignore[no-any-return]
