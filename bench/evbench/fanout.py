"""
Scenario 3, fan-out: one publisher at 10 events/s, N SSE (or WebSocket)
subscribers on one topic.  Deliveries/s, end-to-end latency (publish
timestamp in the payload to receipt), lost and duplicated messages.

Contenders: the bare twisted.web write loop (no hub, no cursors), evgate
on its memory and Kafka endpoints, Pushpin (GRIP origin + HTTP publish
API), and evgate's WebSocket at one size.

Large messages (contender C{evgate-big}): 1,000 SSE subscribers of 1 MiB
messages published at 1/s; the server's peak RSS growth over the run,
sampled every 20 ms, against the message size times the messages it holds
by design: the content of every message published (the memory endpoint
retains them all, so that a paused stream never reads past its retention),
the SSE frames of the replay window (L{BIG_WINDOW} messages) and the one
being delivered.  A gateway that copied a message per subscriber would
grow by a subscriber count of messages; one that shares the framed bytes
grows by about the messages it holds.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from evbench import peers
from evbench.common import (
    BENCH,
    PYTHON,
    RESULTS,
    ROOT,
    CpuMeter,
    Settings,
    brokerPids,
    deleteTopics,
    finishProfile,
    kafkaTopic,
    kafkaUp,
    raiseFileLimit,
    ratio,
    rssBytes,
    say,
    startProfile,
    summariseProfile,
    table,
    waitQuiet,
    writeResults,
)
from evbench.streams import BUCKETS_PER_SECOND, MAX_BUCKET

RATE = 10.0                 # events per second from the one publisher
PER_WORKER = 5000           # subscribers per client process
PAD = "x" * 60              # payloads of about 100 bytes
PRIMERS = 5                 # unnumbered messages before the measured ones
PUSHPIN_RAMP = 300.0        # new connections per second for Pushpin (the others: 1,000)
WORKERS = 2                 # evgate processes in the "workers" row: one per core here
BIG_BYTES = 2**20           # the large-message row: payloads of 1 MiB,
BIG_RATE = 1.0              # published at 1/s,
BIG_COUNT = 12              # 12 of them,
BIG_SUBSCRIBERS = 1000      # to 1,000 SSE subscribers (--sizes does not change it);
BIG_WINDOW = 2              # replay window of the large-message row


class Publisher:
    """
    One keep-alive HTTP connection that POSTs numbered, timestamped
    payloads on a fixed schedule.
    """

    def __init__(self, port: int, path: str, wrap: Optional[str] = None, size: int = 0,
                 rate: float = RATE) -> None:
        self.port = port
        self.path = path
        self.wrap = wrap
        # Payloads padded to C{size} bytes (0: about 100 bytes).
        self.pad = "x" * max(0, size - 50) if size else PAD
        self.rate = rate
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.failures = 0
        self.statuses: Dict[int, int] = {}

    def body(self, seq: int) -> bytes:
        if seq < 0:
            payload = f'{{"prime":{-seq},"pad":"{PAD}"}}'
        else:
            payload = f'{{"seq":{seq},"ts":{time.time():.6f},"pad":"{self.pad}"}}'
        if self.wrap == "pushpin":
            return json.dumps({"items": [{"channel": "bench", "formats": {
                "http-stream": {"content": f"event: message\ndata: {payload}\n\n"}}}]}).encode()
        return payload.encode()

    def send(self, seq: int) -> None:
        body = self.body(seq)
        try:
            self.conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            if response.status >= 300:
                self.failures += 1
        except (OSError, http.client.HTTPException):
            self.failures += 1
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def run(self, count: int) -> Tuple[float, float]:
        """
        Publish C{count} messages at C{rate}/s; (first, last) send times.
        """
        # A few unnumbered messages first (the harness ignores them): a
        # contender that subscribes its streams to the topic or channel
        # lazily (Pushpin does, after the origin's answer) is judged on the
        # steady state, not on its start.
        for prime in range(1, PRIMERS + 1):
            self.send(-prime)
            time.sleep(1.0 / RATE)
        time.sleep(1.0)
        start = time.monotonic()
        first = last = 0.0
        for seq in range(count):
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            if seq == 0:
                first = now
            last = now
            self.send(seq)
        return first, last

    def close(self) -> None:
        self.conn.close()


class Clients:
    """
    The stream client harness in one or more worker processes.
    """

    def __init__(self, port: int, path: str, mode: str, count: int, rate: float = 1000.0,
                 big: bool = False) -> None:
        self.workers: List[subprocess.Popen] = []
        env = dict(os.environ, PYTHONPATH=BENCH + os.pathsep + ROOT)
        left = count
        n = max(1, -(-count // PER_WORKER))
        for i in range(n):
            share = left // (n - i)
            left -= share
            argv = [PYTHON, "-m", "evbench.streams", "--port", str(port), "--path", path, "--mode", mode,
                    "--count", str(share), "--rate", str(rate / n)] + (["--big"] if big else [])
            self.workers.append(subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 text=True, bufsize=1))

    def pids(self) -> List[int]:
        return [w.pid for w in self.workers]

    def _read(self, worker: subprocess.Popen, prefix: str, timeout: float) -> Dict[str, Any]:
        assert worker.stdout is not None
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([worker.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError(f"a client worker exited ({worker.poll()}) while waiting for {prefix}")
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1:])
        raise RuntimeError(f"a client worker did not answer {prefix} within {timeout:g}s")

    def ready(self, timeout: float) -> Dict[str, Any]:
        """
        Wait until every worker opened its connections.
        """
        total = {"subscribers": 0, "failed": 0, "statuses": {}}
        for worker in self.workers:
            got = self._read(worker, "READY", timeout)
            total["subscribers"] += got["subscribers"]
            total["failed"] += got["failed"]
            for k, v in got["statuses"].items():
                total["statuses"][k] = total["statuses"].get(k, 0) + v
        return total

    def send(self, line: str) -> None:
        for worker in self.workers:
            assert worker.stdin is not None
            worker.stdin.write(line + "\n")
            worker.stdin.flush()

    def end(self, lastSeq: int, drain: float) -> List[Dict[str, Any]]:
        self.send(f"END {lastSeq} {drain:g}")
        return [self._read(w, "STATS", drain + 60) for w in self.workers]

    def close(self) -> None:
        try:
            self.send("CLOSE")
        except OSError:
            pass
        for worker in self.workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def percentile(hist: Dict[int, int], total: int, q: float) -> Optional[float]:
    """
    The C{q} quantile, in milliseconds, of a histogram of 0.1 ms buckets.
    """
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            if bucket >= MAX_BUCKET:
                return None
            return (bucket + 1) * 1000.0 / BUCKETS_PER_SECOND
    return None


def merge(stats: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    hist: Dict[int, int] = {}
    out: Dict[str, Any] = {"subscribers": 0, "failed": 0, "closed": 0, "received": 0, "duplicates": 0,
                           "lost": 0, "gaps": 0, "late": 0, "subscribers_short": 0, "last_receipt": 0.0,
                           "client_rss_kib": 0}
    for s in stats:
        for key in ("subscribers", "failed", "closed", "received", "duplicates", "lost", "gaps", "late",
                    "subscribers_short"):
            out[key] += s[key]
        out["last_receipt"] = max(out["last_receipt"], s["last_receipt"])
        out["client_rss_kib"] += s["max_rss_kib"]
        for bucket, n in s["hist"].items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + n
    total = sum(hist.values())
    out["p50"] = percentile(hist, total, 0.50)
    out["p99"] = percentile(hist, total, 0.99)
    out["max"] = percentile(hist, total, 1.0)
    return out


def measure(name: str, port: int, path: str, mode: str, subscribers: int, settings: Settings,
            serverPids: Any, publishPort: int, publishPath: str, wrap: Optional[str] = None,
            spyOn: Optional[Any] = None, ramp: float = 1000.0) -> Dict[str, Any]:
    """
    One contender at one size: connect, publish for the duration, drain,
    count.
    """
    count = max(2, int(settings.duration * RATE))
    drain = 20.0 if settings.quick else 60.0
    waitQuiet()
    say(f"fan-out {name}: {subscribers} {mode} subscribers")
    clients = Clients(port, path, mode, subscribers, rate=ramp)
    publisher = Publisher(publishPort, publishPath, wrap)
    try:
        began = time.monotonic()
        ready = clients.ready(timeout=120)
        connectSeconds = time.monotonic() - began
        time.sleep(2.0)
        server = CpuMeter(serverPids).start()
        load = CpuMeter(clients.pids).start()
        broker = CpuMeter(brokerPids).start()
        profile = None
        if spyOn is not None:
            profile = os.path.join(RESULTS, "profiles", f"fanout-{name.replace(' ', '-')}-{subscribers}.txt")
        spy = startProfile(spyOn, settings.duration, profile) if profile else None
        first, last = publisher.run(count)
        stats = clients.end(count - 1, drain)
        server.stop()
        load.stop()
        broker.stop()
        finishProfile(spy)
    finally:
        publisher.close()
        clients.close()
    merged = merge(stats)
    window = max(merged["last_receipt"], last) - first + 1.0 / RATE
    merged.update(
        contender=name, mode=mode, wanted=subscribers, connected=ready["subscribers"],
        connect_failed=ready["failed"], connect_statuses=ready["statuses"], connect_seconds=connectSeconds,
        published=count, publish_failures=publisher.failures, expected=count * ready["subscribers"],
        deliveries_per_s=merged["received"] / window if window > 0 else 0.0,
        ideal_per_s=RATE * ready["subscribers"], server_cpu=server.percent, client_cpu=load.percent,
        broker_cpu=broker.percent, broker_restarted=broker.changed, machine_cpu=server.machine, profile=profile,
        other_cpu=max(0.0, server.machine * (os.cpu_count() or 1) - server.percent - load.percent - broker.percent),
    )
    say(f"  {merged['deliveries_per_s']:,.0f}/s p50 {merged['p50']} ms p99 {merged['p99']} ms "
        f"lost {merged['gaps']} not arrived {merged['late']} dup {merged['duplicates']} server {server.percent:.0f}% "
        f"clients {load.percent:.0f}%")
    return merged


class PeakRss:
    """
    The highest RSS of a process, sampled every 20 ms on a thread.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rssBytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rssBytes(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measureBig(server: Any, settings: Settings, spyOn: Optional[Any] = None) -> Dict[str, Any]:
    """
    The large-message row: L{BIG_SUBSCRIBERS} SSE subscribers of
    L{BIG_COUNT} messages of L{BIG_BYTES} at L{BIG_RATE}/s on the memory
    API; deliveries, latency, and the server's peak RSS growth.
    """
    drain = 30.0
    subscribers = BIG_SUBSCRIBERS
    waitQuiet()
    say(f"fan-out evgate big: {subscribers} sse subscribers, {BIG_COUNT} messages of {BIG_BYTES} bytes")
    clients = Clients(server.port, "/mem", "sse", subscribers, big=True)
    publisher = Publisher(server.port, "/mem", size=BIG_BYTES, rate=BIG_RATE)
    try:
        ready = clients.ready(timeout=120)
        time.sleep(2.0)
        before = rssBytes(server.pid)
        peak = PeakRss(server.pid)
        cpu = CpuMeter(server.pids).start()
        load = CpuMeter(clients.pids).start()
        profile = None
        if spyOn is not None:
            profile = os.path.join(RESULTS, "profiles", f"fanout-evgate-big-{subscribers}.txt")
        spy = startProfile(spyOn, BIG_COUNT / BIG_RATE, profile) if profile else None
        first, last = publisher.run(BIG_COUNT)
        stats = clients.end(BIG_COUNT - 1, drain)
        highest = peak.stop()
        cpu.stop()
        load.stop()
        finishProfile(spy)
    finally:
        publisher.close()
        clients.close()
    merged = merge(stats)
    window = max(merged["last_receipt"], last) - first + 1.0 / BIG_RATE
    growth = max(0, highest - before)
    held = BIG_COUNT + BIG_WINDOW + 1
    merged.update(
        contender="evgate memory, 1 MiB messages", mode="sse", wanted=subscribers,
        connected=ready["subscribers"], connect_failed=ready["failed"], published=BIG_COUNT,
        publish_failures=publisher.failures, message_bytes=BIG_BYTES, held_messages=held,
        rss_before_mib=before / 2**20, rss_growth_mib=growth / 2**20,
        copies_per_held_message=growth / (BIG_BYTES * held),
        copies_per_subscriber=growth / (BIG_BYTES * max(1, ready["subscribers"])),
        deliveries_per_s=merged["received"] / window if window > 0 else 0.0,
        expected=BIG_COUNT * ready["subscribers"], server_cpu=cpu.percent, client_cpu=load.percent,
        profile=profile,
    )
    say(f"  peak RSS growth {growth / 2**20:.1f} MiB ({merged['copies_per_held_message']:.2f} x "
        f"{held} messages held, {merged['copies_per_subscriber']:.4f} per subscriber), received "
        f"{merged['received']}/{merged['expected']}, lost {merged['gaps']} not arrived {merged['late']}")
    return merged


def renderBig(rows: Sequence[Dict[str, Any]]) -> str:
    """
    The table of the large-message row.
    """
    lines = [[r["contender"], r["connected"], r["published"], r["received"], r["expected"],
              r["gaps"] + r["late"], r["p50"], r["p99"], r["rss_before_mib"], r["rss_growth_mib"],
              r["held_messages"], r["copies_per_held_message"], r["copies_per_subscriber"],
              r["server_cpu"], r["client_cpu"]] for r in rows]
    return table(f"large messages: {BIG_COUNT} messages of {BIG_BYTES // 2**10} KiB at {BIG_RATE:g}/s",
                 ["contender", "subs", "published", "deliveries", "expected", "lost", "p50 ms", "p99 ms",
                  "RSS before MiB", "peak RSS growth MiB", "messages held", "copies per held message",
                  "copies per subscriber", "server CPU %", "clients CPU %"], lines)


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    """
    Every contender at every size, and the table.
    """
    limit = raiseFileLimit()
    sizes = settings.extra.get("sizes") or ([1000, 5000] if settings.quick else [1000, 5000, 10000])
    wsSizes = settings.extra.get("ws_sizes") or [5000]
    rows: List[Dict[str, Any]] = []
    notes: List[str] = [f"open files limit {limit}"]
    topics: List[str] = []
    kafka = kafkaUp()
    if not kafka:
        notes.append("Kafka at the dev broker did not answer: evgate Kafka skipped")
    profileSize = max(sizes) if settings.profile else None

    def guard(label: str, f: Any) -> None:
        try:
            f()
        except peers.Unavailable as e:
            notes.append(f"{label}: {e}")
            say(f"{label} unavailable: {e}")
        except Exception as e:  # one contender failing must not lose the others' numbers
            notes.append(f"{label}: failed: {e}")
            say(f"{label} failed: {e}")

    for size in sizes:
        if settings.wants("bare"):
            def bareRun(size: int = size) -> None:
                with peers.bare() as server:
                    rows.append(measure("bare twisted.web", server.port, "/stream", "sse", size, settings,
                                        server.pids, server.port, "/publish"))
            guard("bare twisted.web", bareRun)
        if settings.wants("evgate-memory"):
            def memRun(size: int = size) -> None:
                ini = peers.evgateIni(entrypoints="http-post sse websocket", heartbeat=300)
                with peers.evgate(ini) as server:
                    rows.append(measure("evgate memory", server.port, "/mem", "sse", size, settings,
                                        server.pids, server.port, "/mem",
                                        spyOn=server if size == profileSize else None))
            guard("evgate memory", memRun)
        if kafka and settings.wants("evgate-kafka"):
            def kafkaRun(size: int = size) -> None:
                topic = kafkaTopic("fanout")
                topics.append(topic)
                ini = peers.evgateIni(topic=topic, entrypoints="http-post sse websocket", heartbeat=300)
                with peers.evgate(ini) as server:
                    rows.append(measure("evgate kafka", server.port, "/kafka", "sse", size, settings,
                                        server.pids, server.port, "/kafka",
                                        spyOn=server if size == profileSize else None))
            guard("evgate kafka", kafkaRun)
        if kafka and settings.wants("evgate-workers"):
            def workersRun(size: int = size) -> None:
                topic = kafkaTopic("fanout")
                topics.append(topic)
                ini = peers.evgateKafkaIni(topic, "http-post sse websocket", WORKERS)
                with peers.evgate(ini) as server:
                    rows.append(measure(f"evgate kafka, {WORKERS} workers", server.port, "/kafka", "sse", size,
                                        settings, server.pids, server.port, "/kafka"))
            guard("evgate kafka workers", workersRun)
        if settings.wants("pushpin"):
            def pushpinRun(size: int = size) -> None:
                pushpin = peers.Pushpin()
                try:
                    pushpin.start()
                    # Pushpin answers some opening requests 500/502 when
                    # they come at 1,000/s; it gets a gentler ramp, since
                    # the scenario measures fan-out, not connection rate.
                    row = measure(f"pushpin {pushpin.version}", pushpin.port, "/stream", "sse", size, settings,
                                  pushpin.pids, pushpin.publishPort, "/publish/", wrap="pushpin", ramp=PUSHPIN_RAMP)
                    row["pushpin_config"] = pushpin.config()
                    rows.append(row)
                finally:
                    pushpin.stop()
            guard("pushpin", pushpinRun)
    big: List[Dict[str, Any]] = []
    if settings.wants("evgate-big"):
        def bigRun() -> None:
            # Streams may fall the whole run behind (a busy machine) without
            # being cut: their queues hold the shared frames, not copies.
            extra = (f"max-message-bytes = {2 * BIG_BYTES}\n"
                     f"subscriber-queue-bytes = {(BIG_COUNT + 4) * BIG_BYTES}\n")
            ini = peers.evgateIni(entrypoints="http-post sse", heartbeat=300, window=BIG_WINDOW,
                                  retention=BIG_COUNT + PRIMERS + 1).replace("[gateway]\n", "[gateway]\n" + extra, 1)
            with peers.evgate(ini) as server:
                big.append(measureBig(server, settings, spyOn=server if settings.profile else None))
        guard("evgate big messages", bigRun)
    for size in wsSizes:
        if settings.wants("evgate-ws"):
            def wsRun(size: int = size) -> None:
                ini = peers.evgateIni(entrypoints="http-post sse websocket", heartbeat=300)
                with peers.evgate(ini) as server:
                    rows.append(measure("evgate memory websocket", server.port, "/mem", "ws", size, settings,
                                        server.pids, server.port, "/mem"))
            guard("evgate websocket", wsRun)
    deleteTopics(topics)

    text = render(rows, notes, settings) if rows else ""
    if big:
        text += ("\n" if text else "") + renderBig(big)
    profiles = {}
    for row in rows + big:
        if row.get("profile"):
            profiles[row["contender"] + f" {row['wanted']}"] = summariseProfile(row["profile"])
    if profiles:
        text += "\nProfiles (py-spy, self time, top functions):\n"
        for label, top in profiles.items():
            text += f"\n{label}:\n" + "".join(f"  {s:5.1f}% self {t:5.1f}% total  {name}\n"
                                             for name, s, t in top)
    return {"rows": rows, "big": big, "notes": notes, "rate": RATE, "duration": settings.duration,
            "profiles": profiles}, text


def render(rows: Sequence[Dict[str, Any]], notes: Sequence[str], settings: Settings) -> str:
    bare = {r["wanted"]: r for r in rows if r["contender"] == "bare twisted.web"}
    lines = []
    for r in rows:
        ref = bare.get(r["wanted"])
        lines.append([
            r["contender"], r["mode"], r["connected"], r["deliveries_per_s"],
            ratio(r["deliveries_per_s"], ref["deliveries_per_s"]) if ref else None,
            r["p50"], r["p99"], ratio(r["p99"], ref["p99"]) if ref else None,
            r["gaps"], r["late"], r["duplicates"], r["closed"] + r["connect_failed"],
            r["server_cpu"], r["client_cpu"], r.get("broker_cpu"), r.get("other_cpu"),
        ])
    for r in rows:
        if r.get("broker_restarted"):
            notes = [*notes, f"{r['contender']} at {r['wanted']}: the Kafka broker was restarted by another "
                             "process during the measurement; the row is disturbed"]
    text = table(f"fan-out: 1 publisher at {RATE:g}/s for {settings.duration:g} s",
                 ["contender", "proto", "subs", "deliv/s", "x bare", "p50 ms", "p99 ms", "p99 x bare",
                  "lost (gaps)", "not arrived", "dup", "failed/dropped conns", "server CPU %", "clients CPU %", "broker CPU %", "other CPU %"], lines)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def main(settings: Settings) -> int:
    document, text = run(settings)
    print(text)
    path = writeResults("fanout", document, text)
    say(f"wrote {path}")
    return 0
