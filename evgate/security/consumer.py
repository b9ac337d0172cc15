"""
Who is calling: what every plan's authentication produces.

A module of its own, below the plans and the gateway resource, so that
both can import it at the top (L{evgate.gateway} re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Consumer:
    """
    Who is calling: the result of a plan's authentication.

    @ivar id: a stable identity for limits and logs (C{"anonymous"} for
        keyless callers, else the key id, token subject or certificate).
    @ivar plan: the name of the plan that authenticated the caller.
    @ivar claims: what the credentials say about the caller (JWT claims,
        introspection answer), visible to filters as C{claims}.
    @ivar expiresAt: POSIX seconds when the credentials expire, if they do.
    """

    id: str
    plan: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    expiresAt: Optional[float] = None
