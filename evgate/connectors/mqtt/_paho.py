"""
What crosses from paho's thread: received messages as plain values, and the
paho client itself.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from evgate.errors import BadRequest


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


class _ReasonClient(Client):
    """
    A paho client that remembers why its last connection attempt failed.

    paho calls C{on_connect_fail} with no reason: a refused TCP connection,
    an untrusted broker certificate and a refused client certificate look
    alike.  The reason is the exception its socket set-up raised, so that
    is where it is kept (C{lastConnectError}, read by the connector's
    C{on_connect_fail} on the same thread).
    """

    lastConnectError: Optional[BaseException] = None

    def _create_socket(self) -> Any:
        try:
            sock = super()._create_socket()
        except OSError as e:
            self.lastConnectError = e
            raise
        self.lastConnectError = None
        return sock


def pahoClient(clientId: str) -> Any:
    """
    A paho MQTT 5 client with the callback API of paho 2.
    """

    return _ReasonClient(CallbackAPIVersion.VERSION2, client_id=clientId, protocol=MQTTv5)


def connectFailure(error: Optional[BaseException]) -> Tuple[str, bool]:
    """
    One line on why a connection attempt failed, and whether it is a
    refusal (TLS: the broker will not let the gateway in as configured)
    rather than a broker that is away.
    """
    if error is None:
        return "the connection failed", False
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"TLS failed: the broker's certificate is not trusted: {error.verify_message or error} "
                "(check tls-ca and host)"), True
    if isinstance(error, ssl.SSLError):
        text = error.reason or str(error)
        if "ALERT" in str(text).upper():
            return (f"TLS failed: the broker refused the client certificate: {text} (check tls-cert and "
                    "tls-key: expired, or not signed by a CA the broker trusts?)"), True
        return f"TLS failed: {text}", True
    return f"{error.strerror or error}" if isinstance(error, OSError) else str(error), False


# What an MQTT string may not hold: U+0000 is forbidden [MQTT-1.5.4-2], and
# Mosquitto also refuses the control characters and non-characters the
# specification says a receiver may refuse [MQTT-1.5.4-3], by disconnecting.
_NOT_MQTT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff"
                            "\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff"
                            "\U0004fffe\U0004ffff\U0005fffe\U0005ffff\U0006fffe\U0006ffff"
                            "\U0007fffe\U0007ffff\U0008fffe\U0008ffff\U0009fffe\U0009ffff"
                            "\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff"
                            "\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff"
                            "\U0010fffe\U0010ffff]")


def publishProperties(draft: Any) -> Any:
    """
    The MQTT 5 PUBLISH properties of C{draft}: its content-type header as
    the content type, the other headers as user properties.

    @raise BadRequest: for a header MQTT cannot carry.
    """
    # Every header is kept, repeated names included, in order: MQTT 5
    # user properties are an ordered list in which names may repeat.
    properties = Properties(PacketTypes.PUBLISH)
    user: List[Tuple[str, str]] = []
    for name, value in draft.headers:
        bad = _NOT_MQTT_TEXT.search(name) or _NOT_MQTT_TEXT.search(value)
        if bad is not None:
            # Mosquitto closes the connection of a client that sends
            # such a string: every subscription and publish of this
            # endpoint would pay for one bad header.
            raise BadRequest(f"message header {name!r} holds U+{ord(bad.group()):04X}: MQTT user properties "
                             "cannot carry control characters or Unicode non-characters")
        if name.lower() == "content-type":
            properties.ContentType = value
        else:
            user.append((name, value))
    if user:
        properties.UserProperty = user
    return properties
