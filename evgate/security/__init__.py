"""
Plans: how callers of an API authenticate.  One module per plan, each an
L{evgate.interfaces.IPlan}.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, List

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

from evgate.interfaces import IPlan
from evgate.registry import Registry
from evgate.security.apikey import ApiKeyPlan
from evgate.security.jwt import JwtPlan
from evgate.security.keyless import KeylessPlan
from evgate.security.mtls import MtlsPlan
from evgate.security.oauth2 import OAuth2Plan

if TYPE_CHECKING:
    from evgate.gateway import ApiRuntime


# The plans by their name in an API's plans key.
PLANS: Registry[IPlan] = Registry(IPlan, "plan")
PLANS.register("keyless", KeylessPlan)
PLANS.register("api-key", ApiKeyPlan)
PLANS.register("jwt", JwtPlan)
PLANS.register("oauth2", OAuth2Plan)
PLANS.register("mtls", MtlsPlan)


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


def buildPlans(api: "ApiRuntime") -> List[IPlan]:
    """
    The plans of one API runtime, in configuration order.
    """
    return [PLANS.factory(name)(api) for name in api.config.plans]
