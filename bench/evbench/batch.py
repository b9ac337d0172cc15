"""
Scenario 2, batch publish: many records per request, in records/s, against
librdkafka used directly (the ceiling).

evgate takes an NDJSON body as a batch (one record per line), posted by wrk
with the same number of records per request and connections as the Strimzi
bridge's C{records} array, and a larger batch beside it.  Its single-record
POST and its WebSocket publish stream are shown for scale.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Dict, List, Sequence, Tuple

from evbench import peers
from evbench.common import (
    BENCH,
    KAFKA,
    PYTHON,
    RESULTS,
    ROOT,
    CpuMeter,
    Settings,
    deleteTopics,
    kafkaTopic,
    kafkaUp,
    measureWrk,
    ratio,
    say,
    table,
)
from evbench.publish import BODY, BRIDGE_TYPE, JVM_WARMUP, WORKERS, bridgeBody

BATCH = 100                 # records per request, bridge and evgate alike
BIG_BATCH = 1000            # a larger evgate batch
BATCH_CONNECTIONS = 10      # wrk connections for the batch requests
WS_CONNECTIONS = 8
WS_WINDOW = 64


def producer(kind: str, seconds: float, service: Any = None, **options: Any) -> Dict[str, Any]:
    """
    Run one of L{evbench.producers} for C{seconds} and return its result,
    with its CPU and the server's.
    """
    argv = [PYTHON, "-m", "evbench.producers", kind, "--seconds", str(seconds), "--value", BODY.decode()]
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    env = dict(os.environ, PYTHONPATH=BENCH + os.pathsep + ROOT)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = CpuMeter(service.pids if service is not None else (lambda: [])).start()
    out, _ = proc.communicate(timeout=seconds + 180)
    server.stop()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"producer {kind} failed:\n{out[-2000:]}")
    result = json.loads(line[7:])
    result.update(rps=result["records"] / result["seconds"], loadCpu=100 * result["cpu_seconds"] / result["seconds"],
                  serverCpu=server.percent if service is not None else None, machineCpu=server.machine)
    return result


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    if not kafkaUp():
        return {"rows": [], "notes": ["the dev Kafka broker did not answer"]}, "### batch\n\nKafka is down.\n"
    topics: List[str] = []

    def add(name: str, records: float, p99: Any, server: Any, load: Any, machine: Any, extra: Dict[str, Any]) -> None:
        rows.append(dict(extra, contender=name, records_per_s=records, p99=p99, serverCpu=server, loadCpu=load,
                         machineCpu=machine))
        say(f"  {name}: {records:,.0f} records/s")

    if settings.wants("rdkafka"):
        topic = kafkaTopic("batch-direct")
        topics.append(topic)
        say("batch: librdkafka direct")
        producer("rdkafka", min(settings.warmup, 3.0), topic=topic, bootstrap=KAFKA)
        r = producer("rdkafka", settings.duration, topic=topic, bootstrap=KAFKA)
        add("librdkafka direct (confluent-kafka loop)", r["rps"], None, None, r["loadCpu"], r["machineCpu"], r)
    if settings.wants("evgate"):
        topic = kafkaTopic("batch-evgate")
        topics.append(topic)
        with peers.evgate(peers.evgateIni(topic=topic, entrypoints="http-post websocket", heartbeat=300)) as gw:
            for size in (BATCH, BIG_BATCH):
                say(f"batch: evgate NDJSON POST, {size} records per request")
                r = measureWrk(gw, f"http://127.0.0.1:{gw.port}/kafka", settings, ndjsonBody(size),
                               "application/x-ndjson", connections=BATCH_CONNECTIONS,
                               profileTo=os.path.join(RESULTS, "profiles", f"batch-evgate-{size}.txt")
                               if settings.profile else None)
                add(f"evgate NDJSON POST, {size} records/request, {BATCH_CONNECTIONS} conns", r["rps"] * size,
                    r["p99"], r["serverCpu"], r["wrkCpu"], r["machineCpu"], r)
            say("batch: evgate single-record POST")
            r = measureWrk(gw, f"http://127.0.0.1:{gw.port}/kafka", settings, BODY, "application/json")
            add(f"evgate POST, 1 record/request, {settings.connections} conns", r["rps"], r["p99"], r["serverCpu"],
                r["wrkCpu"], r["machineCpu"], r)
            say("batch: evgate WebSocket publish")
            # Every WebSocket also subscribes; a filter that passes nothing
            # keeps the publishers from receiving their own records.
            ws = dict(port=gw.port, path="/kafka?filter=false", connections=WS_CONNECTIONS, window=WS_WINDOW)
            producer("websocket", min(settings.warmup, 3.0), gw, **ws)
            r = producer("websocket", settings.duration, gw, **ws)
            add(f"evgate WebSocket publish, {WS_CONNECTIONS} conns x {WS_WINDOW} in flight", r["rps"], None,
                r["serverCpu"], r["loadCpu"], r["machineCpu"], r)
    if settings.wants("evgate-workers"):
        topic = kafkaTopic("batch-workers")
        topics.append(topic)
        with peers.evgate(peers.evgateKafkaIni(topic, "http-post", WORKERS)) as gw:
            say(f"batch: evgate NDJSON POST, {BIG_BATCH} records per request, {WORKERS} workers")
            r = measureWrk(gw, f"http://127.0.0.1:{gw.port}/kafka", settings, ndjsonBody(BIG_BATCH),
                           "application/x-ndjson", connections=BATCH_CONNECTIONS)
            add(f"evgate NDJSON POST, {BIG_BATCH} records/request, {BATCH_CONNECTIONS} conns, {WORKERS} workers",
                r["rps"] * BIG_BATCH, r["p99"], r["serverCpu"], r["wrkCpu"], r["machineCpu"], r)
    if settings.wants("strimzi"):
        try:
            bridge = peers.strimziBridge()
        except peers.Unavailable as e:
            notes.append(f"Strimzi bridge: {e}")
        else:
            topic = kafkaTopic("batch-bridge")
            topics.append(topic)
            with bridge:
                say(f"batch: Strimzi bridge, {BATCH} records per POST")
                warm = Settings(**{**settings.__dict__, "warmup": max(settings.warmup, JVM_WARMUP)})
                r = measureWrk(bridge, f"http://127.0.0.1:{bridge.port}/topics/{topic}", warm, bridgeBody(BATCH),
                               BRIDGE_TYPE, connections=BATCH_CONNECTIONS)
                add(f"strimzi bridge {bridge.version}, {BATCH} records/request, {BATCH_CONNECTIONS} conns",  # type: ignore[attr-defined]
                    r["rps"] * BATCH, r["p99"], r["serverCpu"], r["wrkCpu"], r["machineCpu"], r)
    deleteTopics(topics)
    return {"rows": rows, "notes": notes, "batch": BATCH}, render(rows, notes, settings)


def ndjsonBody(records: int) -> bytes:
    """
    An NDJSON batch of C{records} copies of the publish scenario's body.
    """
    return b"\n".join([BODY.strip()] * records) + b"\n"


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str], settings: Settings) -> str:
    ceiling = next((r for r in rows if r["contender"].startswith("librdkafka")), None)
    lines = [[r["contender"], r["records_per_s"], ratio(r["records_per_s"], ceiling["records_per_s"]) if ceiling else None,
              r["p99"], r["serverCpu"],
              # Steadier than records/s on a shared machine.
              r["serverCpu"] / 100 * 1e6 / r["records_per_s"] if r["serverCpu"] and r["records_per_s"] else None,
              r["loadCpu"], r["machineCpu"]] for r in rows]
    text = table(f"batch publish to Kafka, {settings.duration:g} s each",
                 ["contender", "records/s", "x librdkafka", "request p99 ms", "server CPU %", "server CPU us/record",
                  "load gen CPU %", "machine CPU %"], lines)
    return text + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
