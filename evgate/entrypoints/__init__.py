"""
Entrypoints: one module per client protocol, each an
L{evgate.interfaces.IEntrypoint}.
"""

from __future__ import annotations

import importlib
from typing import Any, List

# name -> (module, class).  Listed in the order requests are offered to them:
# the most specific first (an upgrade, then an Accept header, then the
# method alone).
ENTRYPOINTS = {
    "websocket": ("evgate.entrypoints.websocket", "WebSocketEntrypoint"),
    "sse": ("evgate.entrypoints.sse", "SseEntrypoint"),
    "http-get": ("evgate.entrypoints.http_get", "HttpGetEntrypoint"),
    "http-post": ("evgate.entrypoints.http_post", "HttpPostEntrypoint"),
    "webhook": ("evgate.entrypoints.webhook", "WebhookEntrypoint"),
    "http-proxy": ("evgate.proxy.entrypoint", "HttpProxyEntrypoint"),
}


def buildEntrypoints(api: Any) -> List[Any]:
    """
    The entrypoints of one API runtime, in the order they are offered
    requests.
    """
    built = []
    for name, (module, cls) in ENTRYPOINTS.items():
        if name in api.config.entrypoints:
            factory = getattr(importlib.import_module(module), cls)
            built.append(factory(api))
    return built
