"""
Webhook subscriptions as records of an L{evgate.interfaces.IStore}.

A subscription is one record of kind L{KIND}, keyed by its id::

    id, api, callbackUrl, headers, filter, secret, retry, maxInFlight, start
        what the subscriber asked for (retry: only the fields it gave;
        the API's webhook.retry.* keys fill in the rest when delivering;
        maxInFlight: None for the API's webhook.max-in-flight)
    paused, pausedReason
        the wish to deliver: set by an operator (pause/resume) or by a
        delivery that failed for good without a dead-letter destination
    state, lastError, position, lastDeliveredAt
        written by the node delivering: "active" or "failing", the last
        failure, the cursor after the last message settled
    delivered, failedAttempts, deadLettered
        counters, only ever incremented

Operators and delivering nodes write different fields (and use
L{IStore.update}, which merges), so a pause never races a position write
into being undone.
"""

from __future__ import annotations

import datetime
import secrets
from typing import Any, Dict, Optional

KIND = "webhook-subscription"

ID_PREFIX = "sub_"

ACTIVE = "active"
FAILING = "failing"
PAUSED = "paused"

HIDDEN = "(hidden)"


def newSubscriptionId() -> str:
    """
    A fresh subscription id: C{sub_} and 20 lower-case hex digits (80 random
    bits), safe in Kafka group names, MQTT share groups and URLs.
    """
    return ID_PREFIX + secrets.token_hex(10)


def isSubscriptionId(text: str) -> bool:
    """
    Whether C{text} has the shape of a subscription id.
    """
    rest = text[len(ID_PREFIX):]
    return text.startswith(ID_PREFIX) and len(rest) == 20 and all(c in "0123456789abcdef" for c in rest)


def timestamp(seconds: float) -> str:
    """
    An RFC 3339 UTC time (milliseconds) for POSIX C{seconds}.
    """
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def status(record: Dict[str, Any]) -> str:
    """
    What the admin API shows as C{status}: C{paused}, C{failing} or
    C{active}.
    """
    if record.get("paused"):
        return PAUSED
    return str(record.get("state") or ACTIVE)


def publicView(record: Dict[str, Any], retry: Optional[Dict[str, Any]] = None,
               maxInFlight: Optional[int] = None) -> Dict[str, Any]:
    """
    The subscription as the admin API shows it: everything but the secret,
    and the values of its headers hidden (they are often credentials).

    @param retry: the effective retry policy, when known.
    @param maxInFlight: the effective window, when known.
    """
    return {
        "id": record["id"],
        "api": record["api"],
        "callbackUrl": record["callbackUrl"],
        "headers": {name: HIDDEN for name in record.get("headers") or {}},
        "filter": record.get("filter"),
        "start": record.get("start"),
        "retry": retry if retry is not None else record.get("retry"),
        "maxInFlight": maxInFlight if maxInFlight is not None else record.get("maxInFlight"),
        "status": status(record),
        "pausedReason": record.get("pausedReason") if record.get("paused") else None,
        "position": record.get("position"),
        "lastError": record.get("lastError"),
        "lastDeliveredAt": record.get("lastDeliveredAt"),
        "counts": {
            "delivered": record.get("delivered", 0),
            "failedAttempts": record.get("failedAttempts", 0),
            "deadLettered": record.get("deadLettered", 0),
        },
        "createdAt": record.get("createdAt"),
    }
