"""
C{GET /apis/<api>/asyncapi}: an AsyncAPI 3.0 document generated from an
API's definition.

The document describes the API from the gateway's side (AsyncAPI's
"application"): clients I{send} messages that the gateway I{receives}
(C{http-post}, WebSocket frames), and the gateway I{sends} messages to
subscribers (C{sse}, C{http-get} long polls, WebSocket, webhooks).

 - C{servers}: one per gateway listener (C{listen}), C{http}/C{https},
   plus C{ws}/C{wss} when the API has the WebSocket entrypoint.  The host
   is the listener's interface, or C{localhost} when it listens on every
   interface, and its port is the bound one once it listens (so C{tcp:0}
   and C{systemd:} listeners show their real port);
 - one channel, the API, at its path, with one message;
 - one operation per entrypoint (two for a WebSocket that publishes);
 - C{securitySchemes}: one per plan that takes credentials (API key in a
   header and, unless refused, in the query; a bearer JWT; a bearer OAuth 2
   access token checked by introspection).  An API with the C{keyless}
   plan also serves callers without credentials, which AsyncAPI cannot
   say in an operation's C{security}: such operations list none, and
   their description says so.

The document is valid against the official AsyncAPI 3.0.0 JSON schema
(tests/test_asyncapi.py checks it with C{jsonschema}).
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from typing import Any, Dict, List, Tuple

from twisted.web.server import Request

from evgate.admin.app import AdminApp, Answer, adminRoute
from evgate.errors import NotFound
from evgate.proxy.problems import NotAnEventApi
from evgate.schemas.described import messagePayload

MEDIA_TYPE = "application/vnd.aai.asyncapi+json;version=3.0.0"

_INTERFACE = re.compile(r"(?:^|:)interface=([^:]+)")
_PORT = re.compile(r"^(?:tcp6?|ssl):(\d+)")


def evgateVersion() -> str:
    """
    The installed version of evgate.
    """
    try:
        return version("evgate")
    except Exception:  # not installed as a distribution (a source tree)
        return "0"


def _key(name: str) -> str:
    # AsyncAPI component keys: ^[a-zA-Z0-9.\-_]+$
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def listenerAddresses(gateway: Any) -> List[Tuple[str, int, bool]]:
    """
    C{(host, port, tls)} of every gateway listener: the bound port when it
    listens, else the configured one (0 when unknown, as for systemd).
    """
    addresses = []
    for index, description in enumerate(gateway.settings.listen):
        listener = gateway.listeners[index] if index < len(gateway.listeners) else None
        port = 0
        bound = getattr(listener, "port", None)
        if bound is not None and hasattr(bound.getHost(), "port"):
            port = bound.getHost().port
        else:
            match = _PORT.match(description)
            if match:
                port = int(match.group(1))
        interface = _INTERFACE.search(description)
        host = interface.group(1).replace("\\", "") if interface else "localhost"
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        if ":" in host:
            host = f"[{host}]"
        tls = description.startswith("ssl:") or "tls" in description.split(":", 1)[0]
        addresses.append((host, port, tls))
    return addresses


def securitySchemes(api: Any) -> Dict[str, Dict[str, Any]]:
    """
    The security schemes of C{api}'s plans that take credentials.
    """
    schemes: Dict[str, Dict[str, Any]] = {}
    options = api.config.options
    for plan in api.config.plans:
        if plan == "api-key":
            settings = options.get("apiKey", {})
            schemes["apiKeyHeader"] = {
                "type": "httpApiKey", "name": settings.get("header", "X-Api-Key"), "in": "header",
                "description": "An API key issued through the admin API (plan api-key).",
            }
            if settings.get("query"):
                schemes["apiKeyQuery"] = {
                    "type": "httpApiKey", "name": settings["query"], "in": "query",
                    "description": "The API key as a query parameter, for clients that cannot set headers "
                                   "(EventSource).",
                }
        elif plan == "jwt":
            schemes["jwt"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                              "description": "A JSON Web Token (plan jwt)."}
        elif plan == "oauth2":
            scopes = options.get("oauth2", {}).get("scopes", ())
            detail = f" Required scopes: {' '.join(scopes)}." if scopes else ""
            schemes["oauth2"] = {"type": "http", "scheme": "bearer",
                                 "description": "An OAuth 2 access token, checked by token introspection "
                                                "(plan oauth2)." + detail}
    return schemes


def asyncapiDocument(gateway: Any, api: Any) -> Dict[str, Any]:
    """
    The AsyncAPI 3.0 document of the API runtime C{api} of C{gateway}.
    """
    config = api.config
    channel = _key(config.name)
    entrypoints = config.entrypoints
    servers: Dict[str, Any] = {}
    for index, (host, port, tls) in enumerate(listenerAddresses(gateway)):
        where = f"{host}:{port}" if port else host
        suffix = "" if index == 0 else f"-{index}"
        servers[f"http{suffix}"] = {"host": where, "protocol": "https" if tls else "http",
                                    "description": f"evgate listener {gateway.settings.listen[index]}"}
        if "websocket" in entrypoints:
            servers[f"ws{suffix}"] = {"host": where, "protocol": "wss" if tls else "ws",
                                      "description": f"evgate listener {gateway.settings.listen[index]}, "
                                                     "WebSocket upgrade"}
    schemes = securitySchemes(api)
    keyless = "keyless" in config.plans
    security = [{"$ref": f"#/components/securitySchemes/{name}"} for name in schemes]
    message = {"$ref": f"#/channels/{channel}/messages/message"}
    channelRef = {"$ref": f"#/channels/{channel}"}
    httpServers = [{"$ref": f"#/servers/{name}"} for name in servers if name.startswith("http")]
    wsServers = [{"$ref": f"#/servers/{name}"} for name in servers if name.startswith("ws")]

    def operation(action: str, title: str, description: str, bindings: Dict[str, Any]) -> Dict[str, Any]:
        if keyless:
            description += " Callers without credentials are served too (plan keyless)."
        op: Dict[str, Any] = {"action": action, "channel": channelRef, "title": title,
                              "description": description, "messages": [message]}
        if bindings:
            op["bindings"] = bindings
        if security and not keyless:
            op["security"] = security
        return op

    operations: Dict[str, Any] = {}
    if "http-post" in entrypoints:
        operations["publish"] = operation(
            "receive", "Publish over HTTP",
            f"POST {config.path} with the message as the body; the key in the `key` query parameter or the "
            f"{gateway.settings.keyHeader} header, message headers as {gateway.settings.headerPrefix}<name>. "
            "Answered 202 with the position once the endpoint acknowledged.",
            {"http": {"method": "POST"}})
    if "http-get" in entrypoints:
        operations["poll"] = operation(
            "send", "Consume by long poll",
            f"GET {config.path}?cursor=&limit=&timeout= answers a page of messages and nextCursor "
            "(JSON, text or XML).",
            {"http": {"method": "GET", "query": {"type": "object", "properties": {
                "cursor": {"type": "string", "description": "Where to resume: the nextCursor of the last page."},
                "limit": {"type": "integer", "minimum": 0},
                "timeout": {"type": "integer", "minimum": 0, "description": "Milliseconds to wait."},
                "filter": {"type": "string", "description": "A CEL filter expression."},
            }}}})
    if "sse" in entrypoints:
        operations["stream"] = operation(
            "send", "Consume as Server-Sent Events",
            f"GET {config.path} with Accept: text/event-stream; resume with Last-Event-ID or ?cursor=.",
            {"http": {"method": "GET"}})
    if "websocket" in entrypoints:
        operations["websocketSubscribe"] = operation(
            "send", "Consume over a WebSocket",
            f"A WebSocket to {config.path} receives every message; subprotocol evgate.json frames them as "
            "JSON envelopes with ids.", {"ws": {}})
        if config.options.get("websocketPublish", True):
            operations["websocketPublish"] = operation(
                "receive", "Publish over a WebSocket",
                "Each frame a client sends is published (under evgate.json: a JSON document with key, "
                "headers and content); acknowledgements come back in order.", {"ws": {}})
    if "webhook" in entrypoints:
        operations["webhook"] = operation(
            "send", "Webhook deliveries",
            f"Messages are POSTed to the callback URLs of subscriptions made on the admin API "
            f"(POST /apis/{config.name}/subscriptions), signed as Standard Webhooks.",
            {"http": {"method": "POST"}})

    channelObject: Dict[str, Any] = {
        "address": config.path,
        "title": config.name,
        "description": f"API {config.name}: topic {config.topic} of endpoint {config.endpoint} "
                       f"({api.connector.kind}).",
        "messages": {"message": {"$ref": "#/components/messages/message"}},
    }
    wanted = httpServers + (wsServers if "websocket" in entrypoints else [])
    if wanted:
        channelObject["servers"] = wanted
    components: Dict[str, Any] = {
        "messages": {"message": {
            "name": "message",
            "title": f"A message of {config.name}",
            "summary": "The message content as published; evgate does not constrain its format.",
            "headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Message headers (from " + gateway.settings.headerPrefix + "<name> request "
                                       "headers, or the broker's)."},
            "payload": {"description": "The content, as published."},
        }},
    }
    payload = messagePayload(api)
    if payload is not None:
        # The schema the API writes and reads its content with (evgate.schemas):
        # readers and publishers see it as JSON.
        described = components["messages"]["message"]
        described["payload"] = payload
        described["contentType"] = "application/json"
        described["summary"] = ("JSON content, stored on the topic in the schema's binary form "
                                "(see docs/schemas.md).")
    if schemes:
        components["securitySchemes"] = schemes
    document: Dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {"title": config.name, "version": evgateVersion(),
                 "description": f"Generated by evgate from the definition of API {config.name}."},
        "defaultContentType": "application/octet-stream",
        "channels": {channel: channelObject},
        "operations": operations,
        "components": components,
    }
    if servers:
        document["servers"] = servers
    return document


@adminRoute("/apis/<api>/asyncapi", methods=["GET"])
def asyncapi(admin: AdminApp, request: Request, api: str) -> Any:
    """
    The AsyncAPI 3.0 document of API C{api}, as JSON.
    """
    runtime = admin.gateway.api(api)
    if runtime is None:
        raise NotFound(f"there is no API named {api}")
    if "http-proxy" in runtime.config.entrypoints:
        raise NotAnEventApi(f"API {api} is an HTTP proxy API: it has no AsyncAPI document (see docs/proxy.md)")
    body = json.dumps(asyncapiDocument(admin.gateway, runtime), indent=2).encode("utf-8")
    return Answer(200, body, [("Content-Type", MEDIA_TYPE)])
