"""
Scenario 1, publish: one record per HTTP POST, answered after the broker's
delivery report, 50 concurrent connections from wrk.

Contenders: evgate on Kafka (C{POST /kafka}) and on its memory endpoint
(C{POST /mem}), the Strimzi HTTP Bridge (C{POST /topics/{topic}},
C{application/vnd.kafka.json.v2+json}), and the bare twisted.web POST
handler (202 at once: the ceiling of one Twisted process), with and
without form parsing.  Every evgate row is the production shape: a
keyless plan under a rate limit that never refuses, so that every request
is counted and answered with C{RateLimit-*} headers, and metrics on.  Two
rows are there to price a feature: the memory API without the rate limit
(C{evgate-free}), and with the access log on (C{evgate-logged}).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from evbench import peers
from evbench.common import (
    RESULTS,
    Settings,
    deleteTopics,
    kafkaTopic,
    kafkaUp,
    measureWrk,
    ratio,
    say,
    summariseProfile,
    table,
)

RECORD = {"id": 12345, "customer": "customer-7", "amount": 42.5, "note": "x" * 40}
BODY = json.dumps(RECORD, separators=(",", ":")).encode()
BRIDGE_TYPE = "application/vnd.kafka.json.v2+json"
# The JVM compiles its hot paths during the first seconds of load; a
# shorter warm-up would measure its interpreter.
JVM_WARMUP = 10.0
WORKERS = 2  # evgate processes in the "workers" row: one per core here
# The production shape: keyless callers under a rate limit high enough
# never to refuse, so that every request pays for the counting and the
# RateLimit-* headers.
LIMIT = "1000000/s"
# The memory API without a rate limit: the price of the limit.
FREE_API = """
[api:free]
path = /free
endpoint = mem
topic = bench-free
entrypoints = http-post
"""


def bridgeBody(records: int = 1) -> bytes:
    """
    The bridge's produce request for C{records} copies of L{RECORD}.
    """
    return json.dumps({"records": [{"value": RECORD} for _ in range(records)]}, separators=(",", ":")).encode()


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    notes: List[str] = []
    topics: List[str] = []
    kafka = kafkaUp()
    if not kafka:
        notes.append("the dev Kafka broker did not answer: the Kafka contenders were skipped")
    # Every contender is started first and measured in turn, round after
    # round, so that a disturbance of the shared machine hits one round of
    # one contender rather than one contender for good; the table shows the
    # median round.
    services: List[Any] = []
    targets: List[Tuple[str, Any, str, bytes, str, float]] = []
    try:
        if settings.wants("bare"):
            server = peers.bare().start()
            services.append(server)
            targets.append(("bare twisted.web (202 at once)", server,
                            f"http://127.0.0.1:{server.port}/publish-only", BODY, "application/json", 0.0))
        if settings.wants("bare-noform"):
            server = peers.bare(noForm=True).start()
            services.append(server)
            targets.append(("bare twisted.web, parsePOSTFormSubmission=False", server,
                            f"http://127.0.0.1:{server.port}/publish-only", BODY, "application/json", 0.0))
        if settings.wants("evgate-memory") or settings.wants("evgate-free") or settings.wants("evgate-kafka"):
            topic = kafkaTopic("publish") if kafka else "evbench-unused"
            topics.append(topic)
            server = peers.evgate(peers.evgateIni(topic=topic, entrypoints="http-post", limit=LIMIT,
                                                  extra=FREE_API)).start()
            services.append(server)
            if settings.wants("evgate-memory"):
                targets.append(("evgate-memory, keyless + rate limit", server, f"http://127.0.0.1:{server.port}/mem",
                                BODY, "application/json", 0.0))
            if settings.wants("evgate-free"):
                targets.append(("evgate-free memory, keyless, no rate limit", server,
                                f"http://127.0.0.1:{server.port}/free", BODY, "application/json", 0.0))
            if kafka and settings.wants("evgate-kafka"):
                targets.append(("evgate-kafka, keyless + rate limit", server, f"http://127.0.0.1:{server.port}/kafka",
                                BODY, "application/json", 0.0))
        if settings.wants("evgate-logged"):
            # The production shape with the access log on, written where
            # twistd -n writes it (standard output, to a file here as
            # journald would take it): what one log line per request costs.
            ini = peers.evgateIni(entrypoints="http-post", limit=LIMIT)
            server = peers.evgate(ini.replace("[gateway]\n", "[gateway]\naccess-log = true\n", 1),
                                  name="evgate-logged").start()
            services.append(server)
            targets.append(("evgate-logged memory, keyless + rate limit + access log", server,
                            f"http://127.0.0.1:{server.port}/mem", BODY, "application/json", 0.0))
        if kafka and settings.wants("evgate-workers"):
            topic = kafkaTopic("publish-workers")
            topics.append(topic)
            server = peers.evgate(peers.evgateKafkaIni(topic, "http-post", WORKERS, limit=LIMIT)).start()
            services.append(server)
            targets.append((f"evgate-workers kafka, {WORKERS} workers, keyless + rate limit", server,
                            f"http://127.0.0.1:{server.port}/kafka", BODY, "application/json", 0.0))
        if kafka and settings.wants("strimzi"):
            try:
                bridge = peers.strimziBridge().start()
            except (peers.Unavailable, RuntimeError) as e:
                notes.append(f"Strimzi bridge: {e}")
            else:
                services.append(bridge)
                topic = kafkaTopic("publish-bridge")
                topics.append(topic)
                targets.append((f"strimzi bridge {bridge.version}", bridge,  # type: ignore[attr-defined]
                                f"http://127.0.0.1:{bridge.port}/topics/{topic}", bridgeBody(), BRIDGE_TYPE,
                                JVM_WARMUP))
        rounds: Dict[str, List[Dict[str, Any]]] = {name: [] for name, *_ in targets}
        for index in range(settings.rounds):
            for name, server, url, body, ctype, jvmWarmup in targets:
                warmup = max(settings.warmup, jvmWarmup) if index == 0 else settings.warmup
                say(f"publish round {index + 1}/{settings.rounds}: {name}")
                result = measureWrk(server, url, Settings(**{**settings.__dict__, "warmup": warmup}), body, ctype,
                                    profileTo=profileFor(settings, name) if index == 0 else None)
                rounds[name].append(result)
                say(f"  {result['rps']:,.0f} req/s p50 {result['p50']:.1f} ms p99 {result['p99']:.1f} ms "
                    f"server {result['serverCpu']:.0f}% ({result['serverCpuPerRequestUs'] or 0:.0f} us/req) "
                    f"wrk {result['wrkCpu']:.0f}% broker {result['brokerCpu']:.0f}% other {result['otherCpu']:.0f}%")
    finally:
        for service in services:
            service.stop()
        deleteTopics(topics)
    rows = [dict(median(results), contender=name, rounds=results) for name, results in rounds.items() if results]
    for row in rows:
        if any(r.get("brokerRestarted") for r in row["rounds"]):
            notes.append(f"{row['contender']}: the Kafka broker was restarted by another process during a round")
    text = render(rows, notes, settings)
    profiles = {r["contender"]: summariseProfile(p) for r in rows
                for p in [profileFor(settings, r["contender"])] if p and os.path.exists(p)}
    if profiles:
        text += profileText(profiles)
    return {"rows": rows, "notes": notes, "body_bytes": len(BODY), "profiles": profiles}, text


def profileFor(settings: Settings, name: str) -> Any:
    if not settings.profile or not name.startswith("evgate"):
        return None
    return os.path.join(RESULTS, "profiles", f"publish-{name.replace(' ', '-')}.txt")


def median(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    The round with the median requests/s, with the spread of all rounds.
    """
    ordered = sorted(results, key=lambda r: r["rps"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["rps_min"], out["rps_max"] = ordered[0]["rps"], ordered[-1]["rps"]
    return out


def profileText(profiles: Dict[str, Any]) -> str:
    text = "\nProfiles (py-spy, share of samples of the gateway process):\n"
    for label, top in profiles.items():
        text += f"\n{label}:\n" + "".join(f"  {s:5.1f}% self {t:5.1f}% total  {name}\n" for name, s, t in top)
    return text


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str], settings: Settings) -> str:
    def find(prefix: str) -> Any:
        return next((r for r in rows if r["contender"].startswith(prefix)), None)

    # The reference is the bare handler with form parsing off, as evgate's
    # site has it: what one Twisted process can do.
    bare, bridge = find("bare twisted.web, parsePOSTFormSubmission=False") or find("bare twisted.web (202"), \
        find("strimzi")
    lines = []
    for r in rows:
        lines.append([r["contender"], r["rps"], f"{r['rps_min']:,.0f}-{r['rps_max']:,.0f}", r["p50"], r["p99"],
                      ratio(r["rps"], bridge["rps"]) if bridge else None,
                      ratio(r["p99"], bridge["p99"]) if bridge else None,
                      ratio(r["rps"], bare["rps"]) if bare else None,
                      sum(r["errors"].values()), r["serverCpu"], r.get("serverCpuPerRequestUs"), r["wrkCpu"],
                      r.get("brokerCpu"), r.get("otherCpu")])
    text = table(f"publish: 1 record per POST, {settings.connections} connections, {settings.duration:g} s x "
                 f"{settings.rounds} rounds (wrk; median round)",
                 ["contender", "req/s", "range", "p50 ms", "p99 ms", "x strimzi req/s", "x strimzi p99", "x bare (no form) req/s",
                  "errors", "server CPU %", "server CPU µs/req", "wrk CPU %", "broker CPU %", "other CPU %"], lines)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text
