"""
The request headers of a delivery: the Standard Webhooks ones, where the
message is, the message's own headers, and the subscription's.

Header names and values that HTTP cannot carry as they are are
percent-encoded (L{headerName}, L{headerValue}), so that a receiver gets
every message header back with C{urllib.parse.unquote}.
"""

from __future__ import annotations

import json
import string
from typing import Any, Dict, Mapping
from urllib.parse import quote

from twisted.web.http_headers import Headers

from evgate.message import Message
from evgate.webhook.client import USER_AGENT
from evgate.webhook.signing import signature

# Header names the subscription's own headers may not use: ours, and the
# ones that frame the HTTP message.
RESERVED_HEADERS = frozenset({
    "content-type", "content-length", "content-encoding", "transfer-encoding", "host", "connection",
    "keep-alive", "upgrade", "te", "trailer", "expect", "proxy-authorization", "user-agent",
})
RESERVED_PREFIXES = ("webhook-", "evgate-")

_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$&'*+-.^_`|~")
# A comma is encoded too: a receiver (or a proxy) may fold repeated
# evgate-header-<name> lines into one, joined by commas (RFC 9110, 5.3),
# and the values must still split apart exactly.
_VALUE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%,")

def headerName(name: str) -> str:
    """
    A message header name as an HTTP header name: lower-cased, with every
    byte that is not a token character percent-encoded.
    """
    out = []
    for char in name.lower():
        if char in _TCHAR:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out) or "%00"


def headerValue(value: str) -> str:
    """
    A text as an HTTP header value: UTF-8, with C{%}, C{,}, every byte
    outside printable ASCII, and spaces at either end (which HTTP would
    strip) percent-encoded, so that C{urllib.parse.unquote} restores it.
    """
    encoded = quote(value, safe=_VALUE_SAFE + " ")
    if encoded.startswith(" "):
        encoded = "%20" + encoded[1:]
    if encoded.endswith(" "):
        encoded = encoded[:-1] + "%20"
    return encoded


def checkStaticHeaders(headers: Any) -> Dict[str, str]:
    """
    A subscription's own C{headers}, checked: an object of names to
    strings, names that are HTTP tokens and not reserved, values without
    control characters.

    @raise ValueError: with a sentence for the client.
    """
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise ValueError("headers must be an object of header names to strings")
    if len(headers) > 32:
        raise ValueError("headers may name at most 32 headers")
    checked: Dict[str, str] = {}
    for name, value in headers.items():
        if not name or len(name) > 256 or any(c not in _TCHAR for c in name):
            raise ValueError(f"header name {name[:80]!r} is not a valid HTTP header name")
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIXES):
            raise ValueError(f"header {name} is set by the gateway and cannot be given")
        if not isinstance(value, str) or len(value) > 8192:
            raise ValueError(f"header {name} must have a string value of at most 8192 characters")
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value) or any(ord(c) > 0xFF for c in value):
            raise ValueError(f"header {name} has characters that cannot be sent in an HTTP header")
        checked[name] = value
    return checked


def deliveryHeaders(staticHeaders: Mapping[str, str], key: bytes, subscription: str, message: Message,
                    messageId: str, timestamp: int) -> Headers:
    """
    The headers of one attempt to deliver C{message} for subscription
    C{subscription}, whose own headers are C{staticHeaders} and signing key
    C{key}.
    """
    headers = Headers()
    for name, value in staticHeaders.items():
        headers.addRawHeader(name, value.encode("latin-1"))
    contentType = b"application/octet-stream"
    for name, value in message.headers:
        if name.lower() == "content-type":
            # As it is, when HTTP can carry it; a receiver decodes
            # nothing here.
            if value and all(0x20 <= ord(c) < 0x7F for c in value):
                contentType = value.strip().encode("ascii")
            continue
        # CloudEvents attributes in the HTTP binding (webhook.cloudevents =
        # binary) are headers of their own; the rest are evgate-header-*.
        prefix = "" if name.lower().startswith("ce-") else "evgate-header-"
        headers.addRawHeader((prefix + headerName(name)).encode("ascii"),
                             headerValue(value).encode("ascii"))
    headers.setRawHeaders(b"content-type", [contentType])
    headers.setRawHeaders(b"user-agent", [USER_AGENT])
    headers.setRawHeaders(b"webhook-id", [messageId.encode("ascii")])
    headers.setRawHeaders(b"webhook-timestamp", [str(timestamp).encode("ascii")])
    headers.setRawHeaders(b"webhook-signature", [
        signature(key, messageId, timestamp, message.content).encode("ascii")])
    meta = {
        "evgate-subscription": subscription,
        "evgate-topic": headerValue(message.topic),
        "evgate-partition": str(message.partition),
        "evgate-offset": str(message.offset),
        "evgate-timestamp": str(message.timestamp),
    }
    if message.key is not None:
        meta["evgate-key"] = headerValue(message.key)
    for name, value in message.extra.items():
        text = value if isinstance(value, str) else _json(value)
        meta["evgate-meta-" + headerName(name)] = headerValue(text)
    for name, value in meta.items():
        headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
    return headers


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
