"""
The keyless plan: anyone may call, as the anonymous consumer.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from evgate.gateway import Consumer
from evgate.interfaces import IPlan

ANONYMOUS = Consumer(id="anonymous", plan="keyless")


@implementer(IPlan)
class KeylessPlan:
    """
    Accepts every request without credentials.  An API that lists other
    plans too still refuses a request whose credentials of those plans are
    invalid: keyless is the fall-back for I{no} credentials only.
    """

    name = "keyless"

    def __init__(self, api: Any) -> None:
        self.api = api

    def present(self, request: Any) -> bool:
        return True

    def authenticate(self, request: Any) -> Consumer:
        return ANONYMOUS
