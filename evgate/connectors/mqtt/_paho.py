"""
What crosses from paho's thread: received messages as plain values, and the
paho client itself.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Tuple

from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5


@dataclass(frozen=True)
class _Incoming:
    """
    A PUBLISH received from the broker, as plain values (built on paho's
    thread).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    userProperties: Tuple[Tuple[str, str], ...]
    extra: Tuple[Tuple[str, Any], ...]
    subscriptionIds: Tuple[int, ...]
    timestamp: int


def _incoming(message: Any) -> _Incoming:
    # On paho's thread: plain Python only.
    props = message.properties
    user = tuple((str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or ()))
    extra: List[Tuple[str, Any]] = [("qos", int(message.qos)), ("retain", bool(message.retain))]
    contentType = getattr(props, "ContentType", None)
    if contentType is not None:
        extra.append(("contentType", contentType))
    expiry = getattr(props, "MessageExpiryInterval", None)
    if expiry is not None:
        extra.append(("messageExpiry", int(expiry)))
    responseTopic = getattr(props, "ResponseTopic", None)
    if responseTopic is not None:
        extra.append(("responseTopic", responseTopic))
    correlation = getattr(props, "CorrelationData", None)
    if correlation is not None:
        extra.append(("correlationData", base64.b64encode(bytes(correlation)).decode("ascii")))
    ids = getattr(props, "SubscriptionIdentifier", None) or ()
    return _Incoming(
        topic=message.topic,
        payload=bytes(message.payload),
        qos=int(message.qos),
        retain=bool(message.retain),
        userProperties=user,
        extra=tuple(extra),
        subscriptionIds=tuple(int(i) for i in ids),
        timestamp=int(time.time() * 1000),
    )


def _propertyValues(props: Any, names: Iterable[str]) -> Dict[str, Any]:
    return {name: getattr(props, name) for name in names if props is not None and hasattr(props, name)}


def pahoClient(clientId: str) -> Any:
    """
    A paho MQTT 5 client with the callback API of paho 2.
    """

    return Client(CallbackAPIVersion.VERSION2, client_id=clientId, protocol=MQTTv5)
