"""
Scenario 5, memory per idle subscriber: the growth of the gateway's RSS
over N idle streams (SSE and WebSocket), against the bare twisted.web
process holding as many SSE responses.  Target: at most 8 KiB each.

Method: start the server, open 200 streams (so that what every process
allocates once, the hub's stream included, is paid before), read the RSS,
open N more, wait for the RSS to settle, read it again: (after - before)
/ N.  Heartbeats stay at the API's default (15 s), as in production.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence, Tuple

from evbench import peers
from evbench.common import Settings, raiseFileLimit, rssBytes, say, table
from evbench.fanout import Clients

WARM = 200
TARGET_KIB = 8.0


def settle(pid: int, seconds: float = 3.0) -> int:
    """
    The RSS of C{pid} once it stopped moving by more than 64 KiB a second
    (at most C{seconds} x 4).
    """
    last = rssBytes(pid)
    for _ in range(int(seconds * 4)):
        time.sleep(1.0)
        now = rssBytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def measure(name: str, server: Any, path: str, mode: str, count: int) -> Dict[str, Any]:
    say(f"idle: {name}, {count} {mode} streams")
    warm = Clients(server.port, path, mode, WARM)
    clients = None
    try:
        warmed = warm.ready(60)
        before = settle(server.pid)
        clients = Clients(server.port, path, mode, count)
        ready = clients.ready(180)
        after = settle(server.pid)
    finally:
        if clients is not None:
            clients.close()
        warm.close()
    opened = ready["subscribers"]
    perStream = (after - before) / opened / 1024 if opened else None
    say(f"  {opened} open: {perStream or 0:.1f} KiB each")
    return {"contender": name, "mode": mode, "wanted": count, "opened": opened, "failed": ready["failed"],
            "warm_opened": warmed["subscribers"], "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
            "kib_per_stream": perStream}


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    raiseFileLimit()
    count = int(settings.extra.get("idle") or (2000 if settings.quick else 5000))
    rows: List[Dict[str, Any]] = []
    if settings.wants("bare"):
        with peers.bare() as server:
            rows.append(measure("bare twisted.web (held SSE responses)", server, "/stream", "sse", count))
    if settings.wants("evgate-sse") or settings.wants("evgate-ws"):
        ini = peers.evgateIni(entrypoints="http-post sse websocket")
        if settings.wants("evgate-sse"):
            with peers.evgate(ini) as server:
                rows.append(measure("evgate SSE (memory endpoint)", server, "/mem", "sse", count))
        if settings.wants("evgate-ws"):
            with peers.evgate(ini) as server:
                rows.append(measure("evgate WebSocket (memory endpoint)", server, "/mem", "ws", count))
    return {"rows": rows, "target_kib": TARGET_KIB}, render(rows)


def render(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [[r["contender"], r["opened"], r["rss_before_mib"], r["rss_after_mib"], r["kib_per_stream"],
              ("yes" if r["kib_per_stream"] is not None and r["kib_per_stream"] <= TARGET_KIB else "no")]
             for r in rows]
    return table("memory per idle subscriber (gateway RSS growth)",
                 ["contender", "streams", "RSS before MiB", "RSS after MiB", "KiB per stream",
                  f"<= {TARGET_KIB:g} KiB"], lines)
