"""
C{POST /apis/<api>/messages}: publish a test message to an API's topic
from the admin API (the console's "Publish" box).

The body is C{{"content": "<text>", "key": "<key>"?, "headers": {...}?}}.
The message goes to the API's endpoint as a publish through the API would
(same topic, same size limit), without the API's plans: the admin token
is the credential.  It is counted as a publish of the API's C{admin}
entrypoint, so the charts show it.  The answer is C{202} with the
message's C{topic}, C{partition} and C{offset}.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from evgate.admin.app import AdminApp, Answer, adminRoute, readJson
from evgate.admin.ops import runtimeOf
from evgate.errors import BadRequest, Conflict, PayloadTooLarge
from evgate.message import Draft

_FIELDS = frozenset({"content", "key", "headers"})


@adminRoute("/apis/<api>/messages", methods=["POST"])
def publishTestMessage(admin: AdminApp, request: Request, api: str) -> Deferred:
    """
    Publish one message to API C{api}'s topic.
    """
    runtime = runtimeOf(admin, api)
    if not runtime.config.topic:
        raise Conflict(f"API {api} has no topic (it forwards HTTP)")
    document = readJson(request)
    if not isinstance(document, dict) or not isinstance(document.get("content"), str):
        raise BadRequest('the body is {"content": "<text>", "key": "<key>", "headers": {"name": "value"}}')
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (known: content, key, headers)")
    key = document.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise BadRequest("key is a non-empty string", extra={"field": "key"})
    headers = document.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                for k, v in headers.items()):
        raise BadRequest("headers is an object of strings", extra={"field": "headers"})
    content = document["content"].encode("utf-8")
    limit = admin.gateway.settings.maxMessageBytes
    if len(content) > limit:
        raise PayloadTooLarge(f"the content is larger than max-message-bytes ({limit})")
    draft = Draft(content=content, key=key, headers=tuple(headers.items()))
    reactor = admin.gateway.reactor
    began = reactor.seconds()
    d = runtime.connector.publish(runtime.config.topic, draft, admin.gateway.settings.publishTimeout)

    def published(position: Any) -> Answer:
        admin.gateway.metrics.tally(api, "admin").published(len(content), reactor.seconds() - began)
        answer: Dict[str, Any] = {"api": api, "topic": position.topic, "partition": position.partition,
                                  "offset": position.offset}
        return Answer(202, answer)

    d.addCallback(published)
    return d  # type: ignore[no-any-return]
