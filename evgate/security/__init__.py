"""
Plans: how callers of an API authenticate.  One module per plan, each an
L{evgate.interfaces.IPlan}.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, List

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

PLANS = {
    "keyless": ("evgate.security.keyless", "KeylessPlan"),
    "api-key": ("evgate.security.apikey", "ApiKeyPlan"),
    "jwt": ("evgate.security.jwt", "JwtPlan"),
    "oauth2": ("evgate.security.oauth2", "OAuth2Plan"),
}


# Query parameters that carry credentials (access_token, api-key, ...):
# their values never reach the access log.
_CREDENTIAL_PARAMETER = re.compile(rb"([?&;](?:[^=&;]*token[^=&;]*|api[-_.]?key)=)[^&;]*", re.IGNORECASE)


def redactedUri(uri: bytes) -> bytes:
    """
    C{uri} with the values of credential query parameters replaced by
    C{REDACTED}.
    """
    return _CREDENTIAL_PARAMETER.sub(rb"\1REDACTED", uri)


class _RedactedRequest:
    # What the access log formatter reads of a request, with the URI
    # redacted.
    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = redactedUri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def redactedLogFormatter(timestamp: str, request: Any) -> str:
    """
    Twisted's combined access log line, without the credentials that
    browsers must put in URLs (EventSource and WebSocket cannot set
    headers).
    """
    return combinedLogFormatter(timestamp, _RedactedRequest(request))  # type: ignore[no-any-return]


def buildPlans(api: Any) -> List[Any]:
    """
    The plans of one API runtime, in configuration order.
    """
    built = []
    for name in api.config.plans:
        module, cls = PLANS[name]
        built.append(getattr(importlib.import_module(module), cls)(api))
    return built
