"""
Scenario schemas: what decoding costs a reader.  Two topics of the same
size hold the same record, one as JSON text, one as Avro in the Confluent
wire format (written by confluent-kafka's AvroSerializer, its schema in
the dev registry); one gateway serves them as a raw API (C{/json}) and an
API with C{value-format = registry} (C{/avro}).  One client reads each
from the start with GET pages of up to 1,000, the two interleaved over
the rounds, and the steady records/s are compared.  Both pages carry the
same JSON value per item: the Avro one decoded, the raw one as a string
of JSON text.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Dict, List, Sequence, Tuple

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
from evbench.poll import PAGE, Reading
from evbench.publish import RECORD

REGISTRY = os.environ.get("EVGATE_SCHEMA_REGISTRY_URL", "http://127.0.0.1:8085/apis/ccompat/v7")

SCHEMA = json.dumps({"type": "record", "name": "BenchRecord", "namespace": "evbench", "fields": [
    {"name": "id", "type": "long"}, {"name": "customer", "type": "string"},
    {"name": "amount", "type": "double"}, {"name": "note", "type": "string"}]})

INI = """
[gateway]
listen = tcp:{{port}}:interface=127.0.0.1
max-poll-limit = {page}

[endpoint:kafka]
type = kafka
bootstrap.servers = {kafka}
schema-registry = {registry}

[api:json]
path = /json
endpoint = kafka
topic = {json}
entrypoints = http-get
start = earliest

[api:avro]
path = /avro
endpoint = kafka
topic = {avro}
entrypoints = http-get
start = earliest
value-format = registry
"""


def fill(topic: str, values: Sequence[bytes], count: int) -> None:
    """
    Write C{count} records to C{topic}, cycling through C{values}.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 20})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, values[i % len(values)], key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"records were not all written to {topic}")


def readAll(port: int, path: str, wanted: int, limit: float) -> Dict[str, Any]:
    """
    Read C{path} from its start with cursors until C{wanted} records came.
    """
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    reading = Reading(wanted, limit)
    cursor = None
    while reading.going():
        query = f"{path}?limit={PAGE}&timeout=1000" + (f"&cursor={cursor}" if cursor else "")
        conn.request("GET", query, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
        page = json.loads(body)
        cursor = page["pagination"]["nextCursor"]
        items = page["items"]
        if items and "error" in items[0]:
            raise RuntimeError(f"GET {path}: a record did not decode: {items[0]['error']}")
        reading.got(len(items))
    conn.close()
    return reading.result()


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    if not kafkaUp():
        return {"rows": []}, "### schemas\n\nthe dev Kafka broker did not answer.\n"
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    wanted = int(settings.extra.get("records") or (50_000 if settings.quick else 200_000))
    rounds = settings.rounds
    limit = max(30.0, settings.duration * 4)
    jsonTopic, avroTopic = kafkaTopic("schemas-json"), kafkaTopic("schemas-avro")
    serialize = AvroSerializer(SchemaRegistryClient({"url": REGISTRY}), SCHEMA)
    avroValue = serialize(RECORD, SerializationContext(avroTopic, MessageField.VALUE))
    jsonValue = json.dumps(RECORD, separators=(",", ":")).encode()
    say(f"schemas: writing {wanted:,} records to {jsonTopic} (JSON, {len(jsonValue)} bytes) and "
        f"{avroTopic} (Avro, {len(avroValue)} bytes)")
    fill(jsonTopic, [jsonValue], wanted)
    fill(avroTopic, [avroValue], wanted)
    notes = [f"{wanted:,} records per topic, one partition; JSON {len(jsonValue)} bytes, Avro {len(avroValue)} "
             f"bytes (wire format); {rounds} round(s) per contender, interleaved, median reported; "
             "every GET starts from the beginning (the hub's replay window does not hold the topic, "
             "so each read is a private read of Kafka, decoded on the way)"]
    results: Dict[str, List[Dict[str, Any]]] = {"raw JSON (/json)": [], "Avro, value-format = registry (/avro)": []}
    profile = os.path.join(RESULTS, "profiles", "schemas-avro.txt")
    ini = INI.format(page=PAGE, kafka=KAFKA, registry=REGISTRY, json=jsonTopic, avro=avroTopic)
    try:
        with peers.evgate(ini) as gw:
            for round in range(rounds):
                for name, path in (("raw JSON (/json)", "/json"), ("Avro, value-format = registry (/avro)", "/avro")):
                    say(f"schemas: round {round + 1}, {name}")
                    spy = None
                    if settings.profile and round == min(1, rounds - 1) and path == "/avro":
                        # The second Avro read (the first fetches the schema),
                        # sampled for as long as it may take.
                        spy = startProfile(gw, settings.duration, profile)
                    meter = CpuMeter(gw.pids).start()
                    result = readAll(gw.port, path, wanted, limit)
                    meter.stop()
                    finishProfile(spy)
                    result["serverCpu"] = meter.percent
                    results[name].append(result)
                    say(f"  {result['records']:,} records, {result['records_per_s'] or 0:,.0f}/s steady")
                    time.sleep(1)
    finally:
        deleteTopics([jsonTopic, avroTopic])
    rows = []
    for name, runs in results.items():
        rates = [r["records_per_s"] for r in runs if r["records_per_s"]]
        rows.append({"contender": name, "records_per_s": statistics.median(rates) if rates else None,
                     "runs": runs, "serverCpu": statistics.median([r["serverCpu"] for r in runs]) if runs else None})
    out = {"rows": rows, "notes": notes, "records": wanted, "page": PAGE}
    text = render(rows, notes)
    if settings.profile:
        top = summariseProfile(profile)
        out["profile"] = top
        text += "\n" + table("py-spy of evgate during the second Avro read", ["function", "self %", "total %"],
                             [list(t) for t in top]) + "\n"
    return out, text


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str]) -> str:
    base = rows[0]["records_per_s"] if rows else None
    lines = [[r["contender"], r["records_per_s"], ratio(r["records_per_s"], base), r["serverCpu"]] for r in rows]
    text = table(f"schemas: GET pages of up to {PAGE}, raw JSON against Avro decoded to JSON",
                 ["API", "records/s", "x raw JSON", "server CPU %"], lines)
    return text + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
