"""
Scenario 4, poll: HTTP GET consumption of a topic that already holds the
records, in records/s, one client reading it from the start in pages of
up to 1,000.

Contenders: librdkafka used directly (the ceiling), evgate's GET with
cursors (C{?cursor=&limit=1000}), evgate's GET in group mode
(C{X-Client-Id}: a consumer group whose position the gateway commits),
and the Strimzi bridge's consumer API (create, subscribe, then
C{GET /consumers/{group}/instances/{name}/records}, which is group mode
too).  Records/s counts from the first page that carried records (the
steady state); the time to that first page is reported beside it, and
the server's CPU per record, steadier than records/s on a shared
machine.  With C{--profile}, py-spy records evgate during the first
seconds of each of its readers (C{bench/results/profiles/poll-*.txt}).
"""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from evbench import peers
from evbench.common import (
    KAFKA,
    RESULTS,
    CpuMeter,
    Settings,
    deleteTopics,
    finishProfile,
    kafkaTopic,
    kafkaUp,
    ratio,
    say,
    startProfile,
    summariseProfile,
    table,
)
from evbench.publish import BODY, profileText

PAGE = 1000
BRIDGE_JSON = "application/vnd.kafka.json.v2+json"
BRIDGE_V2 = "application/vnd.kafka.v2+json"


def fill(topic: str, count: int) -> None:
    """
    Write C{count} records to C{topic} with librdkafka and wait for them.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 20})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, BODY, key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} records were not written to {topic}")


class Reading:
    """
    Counts what one reader received, and when.
    """

    def __init__(self, wanted: int, limit: float) -> None:
        self.wanted = wanted
        self.limit = limit
        self.records = 0
        self.requests = 0
        self.began = time.monotonic()
        self.first: Optional[float] = None
        self.cpu0 = time.process_time()

    def got(self, n: int) -> None:
        self.requests += 1
        if n and self.first is None:
            self.first = time.monotonic()
            self.firstCount = n
        self.records += n

    def going(self) -> bool:
        return self.records < self.wanted and time.monotonic() - self.began < self.limit

    def result(self) -> Dict[str, Any]:
        end = time.monotonic()
        steady = None
        if self.first is not None and self.records > self.firstCount:
            steady = (self.records - self.firstCount) / max(1e-6, end - self.first)
        return {"records": self.records, "wanted": self.wanted, "requests": self.requests,
                "seconds": end - self.began,
                "first_page_seconds": (self.first - self.began) if self.first is not None else None,
                "records_per_s": steady, "client_cpu_s": time.process_time() - self.cpu0,
                "complete": self.records >= self.wanted}


def direct(topic: str, wanted: int, limit: float) -> Dict[str, Any]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": f"evbench-direct-{time.time()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    reading = Reading(wanted, limit)
    try:
        while reading.going():
            batch = consumer.consume(PAGE, 1.0)
            reading.got(sum(1 for m in batch if m.error() is None))
    finally:
        consumer.close()
    return reading.result()


def evgateCursor(port: int, wanted: int, limit: float) -> Dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    reading = Reading(wanted, limit)
    cursor = None
    while reading.going():
        query = f"/kafka?limit={PAGE}&timeout=1000" + (f"&cursor={cursor}" if cursor else "")
        conn.request("GET", query, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"evgate GET answered {response.status}: {body[:300]!r}")
        page = json.loads(body)
        cursor = page["pagination"]["nextCursor"]
        reading.got(len(page["items"]))
    conn.close()
    return reading.result()


def evgateGroup(port: int, wanted: int, limit: float) -> Dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    reading = Reading(wanted, limit)
    client = f"evbench-{int(time.time())}"
    while reading.going():
        conn.request("GET", f"/kafka?limit={PAGE}&timeout=1000",
                     headers={"Accept": "application/json", "X-Client-Id": client})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"evgate group GET answered {response.status}: {body[:300]!r}")
        reading.got(len(json.loads(body)["items"]))
    conn.close()
    return reading.result()


def bridge(port: int, topic: str, wanted: int, limit: float) -> Dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    group = f"evbench-{int(time.time())}"

    def call(method: str, path: str, document: Any = None, accept: Optional[str] = None) -> Tuple[int, bytes]:
        headers = {"Content-Type": BRIDGE_V2} if document is not None else {}
        if accept:
            headers["Accept"] = accept
        conn.request(method, path, json.dumps(document).encode() if document is not None else None, headers)
        response = conn.getresponse()
        return response.status, response.read()

    reading = Reading(wanted, limit)
    status, body = call("POST", f"/consumers/{group}", {
        "name": "reader", "format": "json", "auto.offset.reset": "earliest", "enable.auto.commit": True,
        "consumer.request.timeout.ms": 60000})
    if status != 200:
        raise RuntimeError(f"the bridge refused the consumer: {status} {body[:300]!r}")
    base = f"/consumers/{group}/instances/reader"
    status, body = call("POST", base + "/subscription", {"topics": [topic]})
    if status not in (200, 204):
        raise RuntimeError(f"the bridge refused the subscription: {status} {body[:300]!r}")
    try:
        while reading.going():
            status, body = call("GET", base + f"/records?timeout=1000&max_bytes={64 * 1024 * 1024}",
                                accept=BRIDGE_JSON)
            if status != 200:
                raise RuntimeError(f"the bridge answered {status}: {body[:300]!r}")
            reading.got(len(json.loads(body)))
    finally:
        call("DELETE", base)
        conn.close()
    return reading.result()


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    if not kafkaUp():
        return {"rows": []}, "### poll\n\nthe dev Kafka broker did not answer.\n"
    wanted = int(settings.extra.get("records") or (50_000 if settings.quick else 200_000))
    limit = max(30.0, settings.duration * 4)
    topic = kafkaTopic("poll")
    say(f"poll: writing {wanted:,} records to {topic}")
    fill(topic, wanted)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = [f"{wanted:,} records of {len(BODY)} bytes in one partition; each reader stops after "
                        f"{limit:g} s"]

    profiles: Dict[str, Any] = {}

    def measure(name: str, service: Any, read: Callable[[], Dict[str, Any]], profile: Optional[str] = None) -> None:
        say(f"poll: {name}")
        meter = CpuMeter(service.pids if service is not None else (lambda: [])).start()
        # The first seconds of the read, its steady state after the first page.
        spy = startProfile(service, min(settings.duration, 10),
                           os.path.join(RESULTS, "profiles", f"poll-{profile}.txt")) if profile else None
        try:
            result = read()
        except Exception as e:
            notes.append(f"{name}: failed: {e}")
            say(f"  failed: {e}")
            return
        finally:
            finishProfile(spy)
        meter.stop()
        result.update(contender=name, serverCpu=meter.percent if service is not None else None,
                      machineCpu=meter.machine)
        if service is not None and result["records"]:
            # Steadier than records/s on a shared machine.
            result["serverCpuPerRecordUs"] = meter.percent / 100 * result["seconds"] * 1e6 / result["records"]
        if profile and os.path.exists(os.path.join(RESULTS, "profiles", f"poll-{profile}.txt")):
            profiles[name] = summariseProfile(os.path.join(RESULTS, "profiles", f"poll-{profile}.txt"))
        rows.append(result)
        say(f"  {result['records']:,} records, {result['records_per_s'] or 0:,.0f}/s steady, "
            f"first page after {result['first_page_seconds'] or 0:.2f} s")

    try:
        if settings.wants("rdkafka"):
            measure("librdkafka direct (consume loop)", None, lambda: direct(topic, wanted, limit))
        if settings.wants("evgate"):
            ini = peers.evgateIni(topic=topic, entrypoints="http-get", start="earliest")
            with peers.evgate(ini) as gw:
                if settings.wants("evgate-cursor"):
                    measure("evgate GET, cursors", gw, lambda: evgateCursor(gw.port, wanted, limit),
                            "evgate-cursor" if settings.profile else None)
                if settings.wants("evgate-group"):
                    measure("evgate GET, group mode (X-Client-Id)", gw, lambda: evgateGroup(gw.port, wanted, limit),
                            "evgate-group" if settings.profile else None)
        if settings.wants("strimzi"):
            try:
                service = peers.strimziBridge(maxPoll=PAGE)
            except (peers.Unavailable, RuntimeError) as e:
                notes.append(f"Strimzi bridge: {e}")
            else:
                with service:
                    measure(f"strimzi bridge {service.version} consumer API", service,  # type: ignore[attr-defined]
                            lambda: bridge(service.port, topic, wanted, limit))
    finally:
        deleteTopics([topic])
    text = render(rows, notes)
    if profiles:
        text += profileText(profiles)
    return {"rows": rows, "notes": notes, "records": wanted, "page": PAGE, "profiles": profiles}, text


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str]) -> str:
    ceiling = next((r for r in rows if r["contender"].startswith("librdkafka")), None)
    bridgeRow = next((r for r in rows if r["contender"].startswith("strimzi")), None)
    lines = [[r["contender"], r["records_per_s"],
              ratio(r["records_per_s"], ceiling["records_per_s"]) if ceiling else None,
              ratio(r["records_per_s"], bridgeRow["records_per_s"]) if bridgeRow else None,
              r["first_page_seconds"], r["requests"], f"{r['records']:,}/{r['wanted']:,}",
              r["serverCpu"], r.get("serverCpuPerRecordUs"), 100 * r["client_cpu_s"] / max(r["seconds"], 1e-6),
              r["machineCpu"]] for r in rows]
    text = table(f"poll: one reader, pages of up to {PAGE}",
                 ["contender", "records/s", "x librdkafka", "x strimzi", "first page s", "requests", "read",
                  "server CPU %", "server CPU us/record", "client CPU %", "machine CPU %"], lines)
    return text + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
