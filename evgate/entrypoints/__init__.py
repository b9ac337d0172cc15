"""
Entrypoints: one module per client protocol, each an
L{evgate.interfaces.IEntrypoint}, registered by name in L{ENTRYPOINTS}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from evgate.entrypoints.http_get import HttpGetEntrypoint
from evgate.entrypoints.http_post import HttpPostEntrypoint
from evgate.entrypoints.sse import SseEntrypoint
from evgate.entrypoints.webhook import WebhookEntrypoint
from evgate.entrypoints.websocket import WebSocketEntrypoint
from evgate.interfaces import IEntrypoint
from evgate.proxy.entrypoint import HttpProxyEntrypoint
from evgate.registry import Registry

if TYPE_CHECKING:
    from evgate.gateway import ApiRuntime


# Registered in the order requests are offered to them: the most specific
# first (an upgrade, then an Accept header, then the method alone).
ENTRYPOINTS: Registry[IEntrypoint] = Registry(IEntrypoint, "entrypoint")
ENTRYPOINTS.register("websocket", WebSocketEntrypoint)
ENTRYPOINTS.register("sse", SseEntrypoint)
ENTRYPOINTS.register("http-get", HttpGetEntrypoint)
ENTRYPOINTS.register("http-post", HttpPostEntrypoint)
ENTRYPOINTS.register("webhook", WebhookEntrypoint)
ENTRYPOINTS.register("http-proxy", HttpProxyEntrypoint)


def buildEntrypoints(api: "ApiRuntime") -> List[IEntrypoint]:
    """
    The entrypoints of one API runtime, in the order they are offered
    requests.
    """
    return [ENTRYPOINTS.factory(name)(api) for name in ENTRYPOINTS if name in api.config.entrypoints]
