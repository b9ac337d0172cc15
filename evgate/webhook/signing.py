"""
Standard Webhooks (https://www.standardwebhooks.com) secrets and
signatures.

A secret is C{whsec_} followed by the base64 of random bytes; the signing
key is those bytes.  A delivery carries::

    webhook-id:        a message id, the same on every attempt
    webhook-timestamp: seconds since the epoch, of this attempt
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

so a receiver checks the signature, rejects stale timestamps (replays) and
drops ids it has seen (retries after a lost acknowledgement).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


class BadSecret(ValueError):
    """
    A text that is not a C{whsec_} secret.
    """


def newSecret() -> str:
    """
    A fresh secret: C{whsec_} and the base64 of L{SECRET_BYTES} random bytes.
    """
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def secretKey(secret: str) -> bytes:
    """
    The signing key of C{secret}: the bytes its base64 part encodes.

    @raise BadSecret: if C{secret} is not C{whsec_<base64>} of at least 24
        bytes.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise BadSecret("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise BadSecret("a webhook secret is whsec_ and base64") from None
    if len(key) < 24:
        raise BadSecret("a webhook secret holds at least 24 bytes")
    return key


def signature(key: bytes, messageId: str, timestamp: int, body: bytes) -> str:
    """
    The C{webhook-signature} value of one attempt.
    """
    signed = messageId.encode("utf-8") + b"." + str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")
