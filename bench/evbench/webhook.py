"""
Scenario 6, webhook: deliveries/s from a topic to a local receiver under
at-least-once (one message in flight per subscription, the order-keeping
default), with 1 and 10 subscriptions; then, against a receiver that takes
10 ms per request (C{slow}), one subscription with 1 in flight and one with
a window of 16 (C{maxInFlight}) over the topic's 64 message keys, whose
per-key order the receiver checks.

The topic is filled first; the subscriptions start at C{earliest}; the
clock runs from the first delivery to the last.  The ceiling is a plain
HTTP client posting the same messages to the same receiver one at a time
(what one-in-flight delivery can reach here at best).  Duplicates are
allowed by at-least-once and reported; a lost message is a failure.
"""

from __future__ import annotations

import json
import os
import resource
import time
from http.client import HTTPConnection
from typing import Any, Dict, List, Sequence, Tuple

from evbench import peers
from evbench.common import (
    RESULTS,
    CpuMeter,
    Settings,
    checkEvgate,
    deleteTopics,
    finishProfile,
    freePort,
    http,
    kafkaTopic,
    kafkaUp,
    pythonService,
    ratio,
    say,
    scratch,
    startProfile,
    table,
)
from evbench.fanout import PAD

TOKEN = "evbench-admin-token-0123456789abcdef"

# Message keys of the topic: seq % KEYS.
KEYS = 64

# The window of the window row.
WINDOW = 16


def keyOf(seq: int) -> str:
    return f"k{seq % KEYS:02d}"


def payload(seq: int) -> bytes:
    return f'{{"seq":{seq},"key":"{keyOf(seq)}","ts":{time.time():.6f},"pad":"{PAD}"}}'.encode()


def fill(topic: str, count: int) -> None:
    from confluent_kafka import Producer

    from evbench.common import KAFKA

    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 20})
    for i in range(count):
        producer.produce(topic, payload(i), key=keyOf(i))
        if i % 5000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"could not fill {topic}")


def ini(topic: str, adminPort: int, store: str) -> str:
    extra = (f"\n[api:hooks]\npath = /hooks\nendpoint = kafka\ntopic = {topic}\n"
             "entrypoints = http-post webhook\nstart = earliest\n")
    text = peers.evgateIni(topic=topic, entrypoints="http-post") + extra
    return text.replace("[endpoint:mem]", f"admin = tcp:port={adminPort}:interface=127.0.0.1\n"
                                          f"admin-token = {TOKEN}\nwebhook-allow-private = true\n"
                                          f"webhook-allow-http = true\nstore = sqlite:{store}\n\n[endpoint:mem]", 1)


def stats(port: int) -> Dict[str, Any]:
    return json.loads(http("GET", f"http://127.0.0.1:{port}/stats")[1])


def waitDelivered(port: int, paths: Sequence[str], wanted: int, limit: float) -> Dict[str, Any]:
    deadline = time.monotonic() + limit
    last: Dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = stats(port)
        if all(last.get(p, {}).get("received", 0) >= wanted for p in paths):
            break
        time.sleep(0.2)
    return last


def summarise(name: str, got: Dict[str, Any], paths: Sequence[str], wanted: int, cpu: Any,
              keyed: bool = False) -> Dict[str, Any]:
    """
    A row; C{keyed}: order is checked per message key (a window), else
    over the whole stream.
    """
    rows = [got.get(p, {}) for p in paths]
    received = sum(r.get("received", 0) for r in rows)
    first = min((r["first_at"] for r in rows if r), default=0.0)
    last = max((r["last_at"] for r in rows if r), default=0.0)
    return {"contender": name, "subscriptions": len(paths), "wanted": wanted * len(paths), "received": received,
            "duplicates": sum(r.get("duplicates", 0) for r in rows), "lost": wanted * len(paths) - received,
            "out_of_order": sum(r.get("reordered" if keyed else "gaps", 0) for r in rows),
            "deliveries_per_s": received / (last - first) if last > first else None,
            "serverCpu": cpu.percent if cpu is not None else None,
            # The gateway's CPU (every thread, from the subscriptions' creation to
            # the last delivery) per message delivered: steadier than the rate on
            # a shared machine.  For the plain client, its own CPU per request.
            "cpuUsPerDelivery": 1e6 * cpu.seconds / received if cpu is not None and received else None,
            "machineBusy": cpu.machine if cpu is not None else None}


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    notes: List[str] = []
    if not kafkaUp():
        return {"rows": []}, "### webhook\n\nthe dev Kafka broker did not answer.\n"
    store = os.path.join(scratch("store"), "store.db")
    problem = checkEvgate(ini("evbench-check", freePort(), store))
    if problem is not None:
        text = f"### webhook\n\nskipped: this evgate does not accept the webhook configuration: {problem}\n"
        return {"rows": [], "skipped": problem}, text
    wanted = 1000 if settings.quick else 3000
    limit = max(60.0, settings.duration * 6)
    rows: List[Dict[str, Any]] = []
    topic = kafkaTopic("webhook")
    fill(topic, wanted)
    port = freePort()
    try:
        with pythonService("receiver", "receiver", [str(port)], port) as receiver:
            if settings.wants("ceiling"):
                say("webhook: plain HTTP client, one at a time")
                before = resource.getrusage(resource.RUSAGE_SELF)
                conn = HTTPConnection("127.0.0.1", port)
                for i in range(wanted):
                    conn.request("POST", "/ceiling", payload(i), {"Content-Type": "application/json"})
                    conn.getresponse().read()
                conn.close()
                after = resource.getrusage(resource.RUSAGE_SELF)
                row = summarise("plain HTTP client, 1 in flight", stats(port), ["/ceiling"], wanted, None)
                used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                row["cpuUsPerDelivery"] = 1e6 * used / wanted
                rows.append(row)
            cases = [(f"evgate webhook, {count} subscription{'s' if count > 1 else ''}",
                      [f"/evgate-{count}-{i}" for i in range(count)], 1) for count in (1, 10)]
            cases += [("evgate webhook, slow receiver, 1 in flight", ["/slow-1"], 1),
                      (f"evgate webhook, slow receiver, window {WINDOW}", [f"/slow-{WINDOW}"], WINDOW)]
            for name, paths, window in cases:
                if not settings.wants(name):
                    continue
                adminPort = freePort()
                with peers.evgate(ini(topic, adminPort, store + f".{paths[0][1:]}")) as gw:
                    say(f"webhook: {name}")
                    meter = CpuMeter(gw.pids).start()
                    profile = os.path.join(RESULTS, "profiles", f"webhook-{paths[0][1:]}.txt")
                    spy = startProfile(gw, 6, profile) if settings.profile else None
                    for path in paths:
                        document = json.dumps({"callbackUrl": f"http://127.0.0.1:{port}{path}", "start": "earliest",
                                               **({"maxInFlight": window} if window > 1 else {})}).encode()
                        for _ in range(3):
                            # A 503 (the shared broker did not say where the topic
                            # starts in time) asks to try again.
                            status, body = http("POST", f"http://127.0.0.1:{adminPort}/apis/hooks/subscriptions",
                                                document, {"Authorization": f"Bearer {TOKEN}",
                                                           "Content-Type": "application/json"})
                            if status != 503:
                                break
                            say(f"  creating a subscription answered 503, trying again: {body[:200]!r}")
                        if status != 201:
                            raise RuntimeError(f"creating a subscription answered {status}: {body[:300]!r}")
                    got = waitDelivered(port, paths, wanted, limit)
                    meter.stop()
                    finishProfile(spy)
                    row = summarise(name, got, paths, wanted, meter, keyed=window > 1)
                    rows.append(row)
                    say(f"  {row['received']:,}/{row['wanted']:,} in order, "
                        f"{row['deliveries_per_s'] or 0:,.0f}/s, dup {row['duplicates']}")
            del receiver
    finally:
        deleteTopics([topic])
    return {"rows": rows, "notes": notes, "messages": wanted}, render(rows, notes)


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str]) -> str:
    ceiling = next((r for r in rows if r["contender"].startswith("plain")), None)
    lines = [[r["contender"], r["subscriptions"], r["deliveries_per_s"],
              ratio(r["deliveries_per_s"], ceiling["deliveries_per_s"]) if ceiling else None,
              f"{r['received']:,}/{r['wanted']:,}", r["lost"], r["duplicates"], r["out_of_order"], r["serverCpu"],
              r.get("cpuUsPerDelivery"), r.get("machineBusy")]
             for r in rows]
    text = table("webhook: deliveries to a local receiver (at-least-once; out of order: per key with a window)",
                 ["contender", "subs", "deliveries/s", "x plain client", "delivered", "lost", "dup", "out of order",
                  "server CPU %", "CPU us/delivery", "machine busy %"], lines)
    one = next((r for r in rows if r["contender"].endswith("slow receiver, 1 in flight")), None)
    window = next((r for r in rows if r["contender"].endswith(f"slow receiver, window {WINDOW}")), None)
    windowRatio = ratio(window["deliveries_per_s"], one["deliveries_per_s"]) if one and window else None
    if windowRatio is not None:
        notes = [*notes, f"window {WINDOW} against 1 in flight (slow receiver): {windowRatio:.1f}x"]
    return text + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
