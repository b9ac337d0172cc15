"""
What crosses from paho's thread: received messages as plain values, and the
paho client itself.
"""

from __future__ import annotations

import base64
import ssl
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

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
