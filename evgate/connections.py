"""
What one client connection may take of a node (L{ConnectionLimits}, the
C{[gateway]} keys C{max-header-bytes}, C{request-head-timeout},
C{request-body-min-rate}, C{request-body-grace}, C{keep-alive-timeout} and
C{max-connections}) and the counts of connections refused or cut early
(L{ConnectionCounts}).  L{evgate.site} enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from evgate.ini import SectionReader, gatewayKeys


@dataclass(frozen=True)
class ConnectionLimits:
    """
    What one client connection may take of a node (C{[gateway]} keys).

    @ivar maxHeaderBytes: C{max-header-bytes}, the request line and headers.
    @ivar headTimeout: C{request-head-timeout}, seconds from a request's
        first bytes to the end of its headers.
    @ivar bodyMinRate: C{request-body-min-rate}, bytes per second a body
        must average after C{bodyGrace} seconds; C{0} turns it off.
    @ivar bodyGrace: C{request-body-grace}, seconds.
    @ivar keepAliveTimeout: C{keep-alive-timeout}, seconds a connection may
        sit idle between requests.
    @ivar maxConnections: C{max-connections}, open at once on this process.
    """

    maxHeaderBytes: int = 16384
    headTimeout: float = 10.0
    bodyMinRate: int = 1024
    bodyGrace: float = 10.0
    keepAliveTimeout: float = 60.0
    maxConnections: int = 10000


@gatewayKeys
def parseConnectionKeys(section: SectionReader) -> Dict[str, Any]:
    """
    The C{[gateway]} keys of L{ConnectionLimits}, as
    C{options["connectionLimits"]}.
    """
    default = ConnectionLimits()
    return {"connectionLimits": ConnectionLimits(
        maxHeaderBytes=section.getInt("max-header-bytes", default.maxHeaderBytes, minimum=1024,
                                      maximum=1024 * 1024),
        headTimeout=section.getFloat("request-head-timeout", default.headTimeout, minimum=0.1),
        bodyMinRate=section.getInt("request-body-min-rate", default.bodyMinRate, minimum=0),
        bodyGrace=section.getFloat("request-body-grace", default.bodyGrace, minimum=0.1),
        keepAliveTimeout=section.getFloat("keep-alive-timeout", default.keepAliveTimeout, minimum=0.1),
        maxConnections=section.getInt("max-connections", default.maxConnections, minimum=1),
    )}


def connectionLimits(options: Any) -> ConnectionLimits:
    """
    The L{ConnectionLimits} of a C{[gateway]} section's C{options}
    (the defaults when the key reader did not run).
    """
    limits = options.get("connectionLimits") if options is not None else None
    return limits if isinstance(limits, ConnectionLimits) else ConnectionLimits()


# Why connections were refused or closed early, as the reason label of
# evgate_connections_refused_total.
REFUSAL_REASONS = ("max-connections", "header-too-large", "bad-request", "head-timeout", "body-too-slow",
                   "keep-alive-timeout")


@dataclass
class ConnectionCounts:
    """
    The connection counters of one site, read when Prometheus scrapes.

    @ivar refused: connections refused or closed early, by reason (one of
        L{REFUSAL_REASONS}).
    """

    refused: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
