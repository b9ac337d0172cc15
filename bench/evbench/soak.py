"""
The soak: a bounded run of mixed, churning traffic through one gateway on
a private Kafka broker that is restarted half-way, watching the gateway's
memory and open files and checking that no acknowledged message is lost.

At the same time, for C{--minutes} minutes:

 - publishers POST numbered payloads at a steady rate; a C{202} answer
   (with the message's partition and offset) makes a message acknowledged;
 - SSE and WebSocket (C{evgate.json}) readers connect, read for a while,
   leave, and resume with their last id; HTTP GET pagers follow
   C{nextCursor}, pausing now and then;
 - slow SSE readers (a small socket buffer, a few KiB/s) and stalled ones
   (which stop reading for longer than the gateway waits) are cut by the
   gateway and resume with their last id;
 - two webhook subscriptions, created from C{earliest} through the admin
   API, go to a local receiver: one answers 500 for a while, the other
   stops answering (the gateway's timeout) for a while;
 - the broker is restarted (C{scripts/dev-services restart kafka} on its
   own state directory and ports, never the shared dev broker).

Every few seconds the gateway's RSS and open file descriptors are read
from C{/proc}.  When the time is up, publishing stops and every reader
drains (at full speed) until it has what it should have, or a deadline
passes.

What a reader should have: every acknowledged message after its first
cursor.  Cursors are opaque, so "after" is judged from what the reader
saw: a message counts when its POST was sent after the reader held its
first cursor, or when its offset is at or after the lowest offset the
reader received in that partition.  A webhook subscription should have
every acknowledged message.  A message it should have and never got is
lost (the run fails); one it got more than once is a duplicate
(at-least-once allows it; reported).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from evbench.common import ROOT, Settings, _running, evgateService, fmt, freePort, http, kafkaTopic, say, scratch, table

TOKEN = "evbench-soak-admin-token-0123456789"
PAD = "x" * 60
PUBLISH_CONNECTIONS = 4
WARMUP_FRACTION = 0.2           # RSS before this part of the run is not judged
JOIN_FRACTION = 0.15            # readers join during this first part of the run
RSS_TARGET = 1.10               # max/min RSS after the warm-up
SAMPLE_EVERY = 3.0              # seconds between /proc samples
SLOW_BYTES_PER_S = 4096         # what a slow reader reads
SMALL_RCVBUF = 16384            # slow and stalled readers' socket buffer
STALL_SECONDS = 45.0            # longer than the gateway's 10 s of patience
DRAIN_SECONDS = 120.0           # at most, after the publishers stop

# How many readers of each kind (their numbers stay the same; they churn).
READERS = {"sse": 16, "ws": 12, "get": 8, "sse-slow": 3, "sse-stalled": 3}

# Fractions of the run.
BROKER_RESTART_AT = 0.45
WEBHOOK_FAILING = {"/hook-500": (0.20, 0.35, "fail"), "/hook-timeout": (0.55, 0.65, "hang")}


GATEWAY_INI = """
[gateway]
listen = tcp:port={{port}}:interface=127.0.0.1:backlog=1024
subscriber-queue = 500
admin = tcp:port={admin}:interface=127.0.0.1
admin-token = {token}
webhook-allow-private = true
webhook-allow-http = true
store = sqlite:{store}

[endpoint:kafka]
type = kafka
bootstrap.servers = {kafka}

[api:soak]
path = /soak
endpoint = kafka
topic = {topic}
entrypoints = http-post http-get sse websocket webhook
start = latest
heartbeat = 5
webhook.timeout = 3
webhook.retry.initial-delay = 1
webhook.retry.max-delay = 4
webhook.retry.max-attempts = 100
"""


# ---------------------------------------------------------------- the private broker


class PrivateKafka:
    """
    A Kafka broker of the soak's own, run by C{scripts/dev-services} with
    its own state directory and free ports, so that restarting it touches
    nobody else's broker.  It registers with L{evbench.common}'s running
    services, so it is stopped at exit and on SIGTERM too.
    """

    name = "private-kafka"

    def __init__(self) -> None:
        self.state = scratch("soak-kafka")
        self.port = freePort()
        self.controller = freePort()
        self.script = os.path.join(ROOT, "scripts", "dev-services")
        self.log = os.path.join(self.state, "dev-services.log")
        # Every listener on a port of its own, the secured ones too: their
        # defaults are the shared dev broker's.
        self.env = dict(os.environ, EVGATE_STATE=self.state, EVGATE_KAFKA_PORT=str(self.port),
                        EVGATE_KAFKA_CONTROLLER_PORT=str(self.controller),
                        EVGATE_KAFKA_SASL_PORT=str(freePort()), EVGATE_KAFKA_SSL_PORT=str(freePort()),
                        EVGATE_KAFKA_TIMEOUT="240")
        self.started = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self, command: str) -> List[str]:
        return [self.script, command, "kafka"]

    def start(self) -> "PrivateKafka":
        say(f"starting a private Kafka on port {self.port} (state in {self.state})")
        self.started = True
        _running.append(self)  # type: ignore[arg-type]
        if self._run("up") != 0:
            self.stop()
            raise RuntimeError(f"the private Kafka did not start; see {self.log} and {self.state}/kafka/kafka.log")
        return self

    def _run(self, command: str) -> int:
        with open(self.log, "ab") as out:
            return subprocess.run(self.argv(command), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL).returncode

    def stop(self) -> None:
        if self in _running:  # type: ignore[comparison-overlap]
            _running.remove(self)  # type: ignore[arg-type]
        if not self.started:
            return
        self.started = False
        say("stopping the private Kafka")
        if self._run("down") != 0:
            say(f"stopping the private Kafka failed; see {self.log}")

    def pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.state, "kafka", "kafka.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------- HTTP on asyncio streams


async def readHead(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, str]]:
    """
    A response's status and headers (names lower-cased).
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def readChunks(reader: asyncio.StreamReader, headers: Dict[str, str]) -> Any:
    """
    The body's pieces as they come (chunked, sized, or to the end).
    """
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        size = int(headers["content-length"])
        if size:
            yield await reader.readexactly(size)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def readBody(reader: asyncio.StreamReader, headers: Dict[str, str]) -> bytes:
    return b"".join([piece async for piece in readChunks(reader, headers)])


def request(method: str, target: str, port: int, headers: Dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def connect(port: int, rcvbuf: Optional[int] = None,
                  limit: int = 2**16) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    A connection to 127.0.0.1:C{port}; with C{rcvbuf}, a small receive
    buffer set before connecting, so that TCP pushes back early.
    """
    sock = socket.socket()
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 10)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=limit)


def seqOf(content: str) -> Optional[int]:
    at = content.find('"seq":')
    if at < 0:
        return None
    return int(content[at + 6:content.index(",", at)])


def close(writer: Optional[asyncio.StreamWriter]) -> None:
    """
    Close a connection the way a client that leaves does (a FIN after
    what it still had to send).
    """
    if writer is not None:
        try:
            writer.close()
        except Exception:
            pass


# ---------------------------------------------------------------- the truth


@dataclass
class Acked:
    partition: int
    offset: int
    sentAt: float


@dataclass
class Ledger:
    """
    What the publishers sent and what the gateway acknowledged.
    """

    acked: Dict[int, Acked] = field(default_factory=dict)
    sent: int = 0
    statuses: Dict[str, int] = field(default_factory=dict)
    noAnswer: int = 0
    nextSeq: int = 0

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


class Clock:
    """
    Where the run is: the load phase's start and length, and whether the
    readers are draining.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.began = time.monotonic()
        self.draining = False
        self.stopping = False

    def fraction(self) -> float:
        return (time.monotonic() - self.began) / self.seconds

    def publishing(self) -> bool:
        return self.fraction() < 1.0


# ---------------------------------------------------------------- readers


class Reader:
    """
    One consumer that comes and goes: what it received, by C{seq}, and the
    cursor it resumes with.
    """

    def __init__(self, kind: str, index: int, port: int, clock: Clock, ledger: Ledger) -> None:
        self.kind = kind
        self.name = f"{kind}-{index}"
        self.port = port
        self.clock = clock
        self.ledger = ledger
        self.cursor: Optional[str] = None
        self.firstAt: Optional[float] = None          # monotonic time of the first cursor
        self.lowest: Dict[int, int] = {}              # partition: lowest offset received
        self.received: Dict[int, int] = {}            # seq: times
        self.sessions = 0
        self.ends: Dict[str, int] = {}
        self.gaps = 0
        self.pending: Optional[Set[int]] = None       # while draining: what it still lacks
        self.lastAt: Optional[float] = None           # monotonic time of the last message

    def end(self, why: str) -> None:
        self.ends[why] = self.ends.get(why, 0) + 1

    def position(self, cursor: str) -> None:
        self.cursor = cursor
        if self.firstAt is None:
            self.firstAt = time.monotonic()

    def got(self, content: str, partition: int, offset: int, cursor: str) -> None:
        seq = seqOf(content)
        self.position(cursor)
        if seq is None:
            return
        self.received[seq] = self.received.get(seq, 0) + 1
        self.lastAt = time.monotonic()
        if offset < self.lowest.get(partition, offset + 1):
            self.lowest[partition] = offset
        if self.pending is not None:
            self.pending.discard(seq)

    def expected(self) -> Set[int]:
        """
        The acknowledged messages after this reader's first cursor, as far
        as what it received shows.
        """
        if self.firstAt is None:
            return set()
        first = self.firstAt
        lowest = self.lowest
        return {seq for seq, a in self.ledger.acked.items()
                if a.sentAt > first or a.offset >= lowest.get(a.partition, 1 << 62)}

    def complete(self) -> bool:
        return self.pending is not None and not self.pending

    async def run(self, startDelay: float) -> None:
        await asyncio.sleep(startDelay)
        while not self.clock.stopping and not self.complete():
            self.sessions += 1
            stay = self.stay()
            try:
                if self.clock.draining:
                    stay = 3600.0
                await asyncio.wait_for(self.session(), stay)
            except asyncio.TimeoutError:
                self.end("left")
            except Exception as e:  # noqa: BLE001 - any failure ends a session; it is counted
                self.end(type(e).__name__)
            if self.clock.stopping or self.complete():
                break
            await asyncio.sleep(random.uniform(0.5, 3.0) if not self.clock.draining else 0.5)

    def stay(self) -> float:
        return random.uniform(5.0, 40.0)

    async def session(self) -> None:
        raise NotImplementedError


class SseReader(Reader):
    """
    C{GET /soak?format=json} as an event stream, resuming with
    C{Last-Event-ID}.  C{pace} makes it a slow reader or a stalled one.
    """

    def __init__(self, *args: Any, pace: str = "normal") -> None:
        super().__init__(*args)
        self.pace = pace

    def stay(self) -> float:
        if self.pace == "stalled":
            return STALL_SECONDS + 30.0
        if self.pace == "slow":
            return 90.0
        return super().stay()

    async def session(self) -> None:
        slow = self.pace != "normal" and not self.clock.draining
        writer = None
        try:
            reader, writer = await connect(self.port, SMALL_RCVBUF if slow else None, 8192 if slow else 2**16)
            headers = {"Accept": "text/event-stream"}
            if self.cursor:
                headers["Last-Event-ID"] = self.cursor
            writer.write(request("GET", "/soak?format=json", self.port, headers))
            status, head = await readHead(reader)
            if status != 200:
                await asyncio.wait_for(readBody(reader, head), 10)
                self.end(f"HTTP {status}")
                return
            began = time.monotonic()
            stalled = False
            buffer = b""
            async for piece in readChunks(reader, head):
                buffer += piece
                end = buffer.rfind(b"\n\n")
                if end >= 0:
                    blocks, buffer = buffer[:end], buffer[end + 2:]
                    for block in blocks.split(b"\n\n"):
                        self.block(block)
                if not slow or self.clock.draining:
                    continue
                if self.pace == "slow":
                    await asyncio.sleep(len(piece) / SLOW_BYTES_PER_S)
                elif not stalled and time.monotonic() - began > 3.0:
                    stalled = True
                    until = time.monotonic() + STALL_SECONDS
                    while time.monotonic() < until and not self.clock.draining:
                        await asyncio.sleep(0.5)
            self.end("ended by the gateway")
        finally:
            close(writer)

    def block(self, block: bytes) -> None:
        cursor = event = None
        data = []
        for line in block.decode("utf-8").split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                cursor = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if event == "message" and cursor:
            envelope = json.loads("\n".join(data))
            meta = envelope["metadata"]
            self.got(envelope["content"], meta["partition"], meta["offset"], cursor)
        elif event == "error":
            problem = json.loads("\n".join(data))
            self.end("error " + problem.get("type", "?").rsplit("/", 1)[-1])
            if problem.get("cursor"):
                self.position(problem["cursor"])
        elif event == "gap":
            self.gaps += 1
            if cursor:
                self.position(cursor)
        elif cursor:
            self.position(cursor)


class WsReader(Reader):
    """
    A WebSocket with the C{evgate.json} subprotocol, resuming with
    C{?cursor=}; frames done by hand on the stream (pings answered).
    """

    async def session(self) -> None:
        writer = None
        try:
            reader, writer = await connect(self.port)
            target = "/soak" + (f"?cursor={self.cursor}" if self.cursor else "")
            writer.write(request("GET", target, self.port, {
                "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "c29hay1zb2FrLXNvYWstMQ==", "Sec-WebSocket-Protocol": "evgate.json"}))
            status, head = await readHead(reader)
            if status != 101:
                await asyncio.wait_for(readBody(reader, head), 10)
                self.end(f"HTTP {status}")
                return
            message = b""
            try:
                while True:
                    b0, b1 = await reader.readexactly(2)
                    length = b1 & 0x7F
                    if length == 126:
                        length = int.from_bytes(await reader.readexactly(2), "big")
                    elif length == 127:
                        length = int.from_bytes(await reader.readexactly(8), "big")
                    payload = await reader.readexactly(length)
                    opcode = b0 & 0x0F
                    if opcode in (0, 1, 2):
                        message += payload
                        if b0 & 0x80:
                            self.frame(json.loads(message))
                            message = b""
                    elif opcode == 9:
                        writer.write(frame(0xA, payload))
                    elif opcode == 8:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                        self.end(f"close {code}")
                        writer.write(frame(0x8, payload[:2]))
                        return
            except asyncio.CancelledError:
                # Leaving: a clean close, as a well-behaved client does.
                writer.write(frame(0x8, (1000).to_bytes(2, "big")))
                raise
            except asyncio.IncompleteReadError:
                self.end("dropped by the gateway")
        finally:
            close(writer)

    def frame(self, doc: Dict[str, Any]) -> None:
        if "id" in doc:
            meta = doc["metadata"]
            self.got(doc["content"], meta["partition"], meta["offset"], doc["id"])
        elif "subscribed" in doc:
            self.position(doc["subscribed"]["cursor"])
        elif "gap" in doc:
            self.gaps += 1
            self.position(doc["gap"]["cursor"])


def frame(opcode: int, payload: bytes) -> bytes:
    # Client frames are masked; a zero mask leaves the payload as it is.
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class GetReader(Reader):
    """
    HTTP GET long polls following C{nextCursor} on one keep-alive
    connection per session.
    """

    def stay(self) -> float:
        return random.uniform(10.0, 60.0)

    async def session(self) -> None:
        writer = None
        try:
            reader, writer = await connect(self.port)
            while True:
                target = "/soak?limit=200&timeout=2000" + (f"&cursor={self.cursor}" if self.cursor else "")
                writer.write(request("GET", target, self.port, {"Accept": "application/json"}))
                status, head = await readHead(reader)
                body = await readBody(reader, head)
                if status != 200:
                    self.end(f"HTTP {status}")
                    if head.get("connection", "").lower() == "close":
                        return
                    await asyncio.sleep(1.0)
                    continue
                page = json.loads(body)
                for item in page["items"]:
                    meta = item["metadata"]
                    self.got(item["content"], meta["partition"], meta["offset"], item["id"])
                if page.get("gap"):
                    self.gaps += 1
                self.position(page["pagination"]["nextCursor"])
                if self.complete():
                    return
        finally:
            close(writer)


# ---------------------------------------------------------------- publishers


async def publisher(port: int, rate: float, clock: Clock, ledger: Ledger) -> None:
    """
    POSTs numbered payloads at C{rate}/s on one keep-alive connection,
    catching up at most a second after a slow answer.
    """
    interval = 1.0 / rate
    slot = time.monotonic() + random.uniform(0, interval)
    reader = writer = None
    while clock.publishing():
        slot += interval
        now = time.monotonic()
        if slot > now:
            await asyncio.sleep(slot - now)
        elif slot < now - 1.0:
            slot = now
        seq = ledger.nextSeq
        ledger.nextSeq += 1
        body = f'{{"seq":{seq},"ts":{time.time():.6f},"pad":"{PAD}"}}'.encode()
        sentAt = time.monotonic()
        ledger.sent += 1
        try:
            if writer is None:
                reader, writer = await connect(port)
            assert reader is not None
            writer.write(request("POST", "/soak", port, {"Content-Type": "application/json"}, body))
            status, head = await asyncio.wait_for(readHead(reader), 20)
            answer = await asyncio.wait_for(readBody(reader, head), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            ledger.noAnswer += 1
            close(writer)
            reader = writer = None
            continue
        ledger.count(str(status))
        if status == 202:
            position = json.loads(answer)
            ledger.acked[seq] = Acked(position["partition"], position["offset"], sentAt)
        if head.get("connection", "").lower() == "close":
            close(writer)
            reader = writer = None
    close(writer)


# ---------------------------------------------------------------- webhook receiver


class WebhookReceiver:
    """
    The callbacks of the webhook subscriptions, one path each: C{200} and
    counted, or (in its failing window) C{500}, or no answer at all.
    """

    def __init__(self, clock: Clock, ledger: Ledger) -> None:
        self.clock = clock
        self.ledger = ledger
        self.received: Dict[str, Dict[int, int]] = {p: {} for p in WEBHOOK_FAILING}
        self.refused: Dict[str, int] = {p: 0 for p in WEBHOOK_FAILING}
        self.hung: Dict[str, int] = {p: 0 for p in WEBHOOK_FAILING}
        self.port = freePort()

    def mode(self, path: str) -> str:
        begin, end, how = WEBHOOK_FAILING[path]
        return how if begin <= self.clock.fraction() < end and not self.clock.draining else "ok"

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self.serve, "127.0.0.1", self.port)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                path = line.split(b" ")[1].decode()
                headers: Dict[str, str] = {}
                while True:
                    h = await reader.readuntil(b"\r\n")
                    if h == b"\r\n":
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await readBody(reader, headers)
                mode = self.mode(path) if path in self.received else "ok"
                if mode == "hang":
                    self.hung[path] += 1
                    # No answer: the gateway gives up after webhook.timeout
                    # and closes the connection.
                    await asyncio.wait_for(reader.read(), 30)
                    return
                if mode == "fail":
                    self.refused[path] += 1
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                    continue
                seq = seqOf(body.decode("utf-8", "replace"))
                if seq is not None and path in self.received:
                    counts = self.received[path]
                    counts[seq] = counts.get(seq, 0) + 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                IndexError, ValueError):
            pass
        except asyncio.CancelledError:
            pass        # the run is over: the server closes with connections open
        finally:
            close(writer)

    def lacking(self, path: str) -> int:
        got = self.received[path]
        return sum(1 for seq in self.ledger.acked if seq not in got)


def subscribe(adminPort: int, callback: str) -> Dict[str, Any]:
    status, body = http("POST", f"http://127.0.0.1:{adminPort}/apis/soak/subscriptions",
                        json.dumps({"callbackUrl": callback, "start": "earliest"}).encode(),
                        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    if status != 201:
        raise RuntimeError(f"creating a webhook subscription answered {status}: {body[:300]!r}")
    return json.loads(body)


def subscriptionState(adminPort: int, ident: str) -> Dict[str, Any]:
    status, body = http("GET", f"http://127.0.0.1:{adminPort}/apis/soak/subscriptions/{ident}",
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return json.loads(body) if status == 200 else {"status": f"HTTP {status}"}


# ---------------------------------------------------------------- /proc


def sample(pid: int) -> Tuple[int, int, float]:
    """
    RSS (bytes), open file descriptors and CPU seconds of C{pid}.
    """
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, fds, cpu


# ---------------------------------------------------------------- the run


class Soak:
    """
    Everything that runs at once, on one asyncio loop.
    """

    def __init__(self, gatewayPort: int, adminPort: int, gatewayPid: int, kafka: PrivateKafka,
                 minutes: float, rate: float) -> None:
        self.port = gatewayPort
        self.adminPort = adminPort
        self.pid = gatewayPid
        self.kafka = kafka
        self.rate = rate
        self.clock = Clock(minutes * 60.0)
        self.ledger = Ledger()
        self.samples: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.readers: List[Reader] = []
        self.receiver = WebhookReceiver(self.clock, self.ledger)
        self.subscriptions: Dict[str, str] = {}
        self.probe: Dict[str, Any] = {}

    def note(self, what: str, **extra: Any) -> None:
        at = round(time.monotonic() - self.clock.began, 1)
        self.events.append(dict(extra, at=at, what=what))
        say(f"soak +{at:.0f}s: {what}")

    async def sampler(self) -> None:
        lastCpu = None
        while not self.clock.stopping:
            try:
                rss, fds, cpu = sample(self.pid)
            except OSError:
                self.note("the gateway process is gone")
                return
            now = time.monotonic() - self.clock.began
            busy = None
            if lastCpu is not None:
                busy = 100.0 * (cpu - lastCpu[1]) / max(1e-6, now - lastCpu[0])
            lastCpu = (now, cpu)
            self.samples.append({"t": round(now, 1), "rss": rss, "fds": fds, "cpu": busy,
                                 "phase": "drain" if self.clock.draining else "load",
                                 "acked": len(self.ledger.acked), "load1": os.getloadavg()[0]})
            await asyncio.sleep(SAMPLE_EVERY)

    async def restartBroker(self) -> None:
        await asyncio.sleep(max(0.0, BROKER_RESTART_AT * self.clock.seconds - (time.monotonic() - self.clock.began)))
        self.note("restarting the broker")
        began = time.monotonic()
        with open(self.kafka.log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(*self.kafka.argv("restart"), env=self.kafka.env,
                                                        stdout=out, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL)
            code = await proc.wait()
        self.note(f"broker restarted (exit {code}) in {time.monotonic() - began:.1f}s",
                  seconds=round(time.monotonic() - began, 1), exit=code)

    async def progress(self) -> None:
        while not self.clock.stopping:
            await asyncio.sleep(15.0)
            streams = sum(r.sessions for r in self.readers)
            phase = "draining" if self.clock.draining else f"{100 * min(1.0, self.clock.fraction()):.0f}%"
            last = self.samples[-1] if self.samples else {}
            now = time.monotonic()
            idle = sum(1 for r in self.readers if r.lastAt is not None and now - r.lastAt > 15.0)
            say(f"soak {phase}: sent {self.ledger.sent:,}, acked {len(self.ledger.acked):,}, "
                f"statuses {self.ledger.statuses}, no answer {self.ledger.noAnswer}, sessions {streams:,}, "
                f"readers with nothing for 15 s {idle}, "
                f"rss {last.get('rss', 0) / 2**20:.1f} MiB, fds {last.get('fds', '?')}, "
                f"webhooks lack {[self.receiver.lacking(p) for p in WEBHOOK_FAILING]}")

    async def run(self) -> None:
        server = await self.receiver.start()
        for path in WEBHOOK_FAILING:
            sub = subscribe(self.adminPort, f"http://127.0.0.1:{self.receiver.port}{path}")
            self.subscriptions[path] = sub["id"]
        self.note(f"webhook subscriptions {sorted(self.subscriptions.values())}")
        self.clock.began = time.monotonic()
        background = [asyncio.ensure_future(c) for c in (self.sampler(), self.progress(), self.restartBroker())]
        publishers = [asyncio.ensure_future(publisher(self.port, self.rate / PUBLISH_CONNECTIONS, self.clock,
                                                      self.ledger)) for _ in range(PUBLISH_CONNECTIONS)]
        tasks = []
        for kind, count in READERS.items():
            for i in range(count):
                if kind == "ws":
                    reader: Reader = WsReader(kind, i, self.port, self.clock, self.ledger)
                elif kind == "get":
                    reader = GetReader(kind, i, self.port, self.clock, self.ledger)
                else:
                    pace = kind.partition("-")[2] or "normal"
                    reader = SseReader(kind, i, self.port, self.clock, self.ledger, pace=pace)
                self.readers.append(reader)
                # Readers join within the warm-up, so that RSS is judged
                # with all of them there (their number stays the same).
                tasks.append(asyncio.ensure_future(reader.run(random.uniform(0, JOIN_FRACTION * self.clock.seconds))))
        try:
            await asyncio.gather(*publishers)
            self.note(f"publishing stopped: {len(self.ledger.acked):,} acknowledged of {self.ledger.sent:,}")
            if not background[2].done():
                self.note("waiting for the broker restart to finish")
                await background[2]
            await self.drain(tasks)
            self.probe = await self.freshReader()
        finally:
            self.clock.stopping = True
            for task in tasks + background:
                task.cancel()
            await asyncio.gather(*tasks, *background, return_exceptions=True)
            server.close()

    async def freshReader(self) -> Dict[str, Any]:
        """
        After the drain: does a new reader see a new message?  A GET
        without a cursor (the end of the topic), one POST, then a GET
        from that cursor.  It tells a stuck read path from a harness
        fault when readers lack messages.
        """
        loop = asyncio.get_running_loop()

        def probe() -> Dict[str, Any]:
            base = f"http://127.0.0.1:{self.port}/soak"
            status, body = http("GET", base + "?limit=1&timeout=0", timeout=30)
            if status != 200:
                return {"first_get": status}
            cursor = json.loads(body)["pagination"]["nextCursor"]
            posted, answer = http("POST", base, b'{"probe":1}', {"Content-Type": "application/json"})
            began = time.monotonic()
            status, body = http("GET", base + f"?cursor={cursor}&limit=10&timeout=10000", timeout=30)
            items = json.loads(body)["items"] if status == 200 else []
            return {"post": posted, "post_answer": answer.decode("utf-8", "replace"), "get": status,
                    "items": len(items), "waited_s": round(time.monotonic() - began, 1)}

        try:
            result = await loop.run_in_executor(None, probe)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            result = {"error": repr(e)}
        self.note(f"a new reader after the drain: {result}")
        return result

    async def drain(self, tasks: Sequence["asyncio.Future[None]"]) -> None:
        """
        Let every reader and webhook catch up with everything it should
        have, at full speed, for at most L{DRAIN_SECONDS}.
        """
        self.clock.draining = True
        for reader in self.readers:
            reader.pending = reader.expected() - set(reader.received)
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            readers = sum(1 for r in self.readers if r.firstAt is not None and not r.complete())
            hooks = sum(self.receiver.lacking(p) for p in WEBHOOK_FAILING)
            if not readers and not hooks:
                self.note("drained: every reader and webhook has what it should")
                return
            await asyncio.sleep(1.0)
        self.note("drain deadline passed")


# ---------------------------------------------------------------- results


def judge(soak: Soak) -> Dict[str, Any]:
    kinds: Dict[str, Dict[str, Any]] = {}
    for reader in soak.readers:
        expected = reader.expected()
        lost = sorted(expected - set(reader.received))
        row = kinds.setdefault(reader.kind, {"readers": 0, "never_connected": 0, "sessions": 0, "expected": 0,
                                             "received": 0, "lost": 0, "duplicates": 0, "unacknowledged": 0,
                                             "gaps": 0, "ends": {}, "lost_sample": []})
        row["readers"] += 1
        row["never_connected"] += reader.firstAt is None
        row["sessions"] += reader.sessions
        row["expected"] += len(expected)
        row["received"] += sum(1 for s in reader.received if s in expected)
        row["lost"] += len(lost)
        row["duplicates"] += sum(n - 1 for n in reader.received.values())
        row["unacknowledged"] += sum(1 for s in reader.received if s not in soak.ledger.acked)
        row["gaps"] += reader.gaps
        for why, n in reader.ends.items():
            row["ends"][why] = row["ends"].get(why, 0) + n
        if lost:
            lastAt = None if reader.lastAt is None else round(reader.lastAt - soak.clock.began, 1)
            row["lost_sample"].append({"reader": reader.name, "lost": len(lost), "last_message_at_s": lastAt,
                                       "first": lost[:10],
                                       "offsets": [(soak.ledger.acked[s].partition, soak.ledger.acked[s].offset)
                                                   for s in lost[:10]]})
    acked = set(soak.ledger.acked)
    for path in WEBHOOK_FAILING:
        got = soak.receiver.received[path]
        lost = sorted(acked - set(got))
        state = subscriptionState(soak.adminPort, soak.subscriptions[path])
        kinds[f"webhook {path}"] = {
            "readers": 1, "never_connected": 0, "sessions": None, "expected": len(acked),
            "received": sum(1 for s in got if s in acked), "lost": len(lost),
            "duplicates": sum(n - 1 for n in got.values()),
            "unacknowledged": sum(1 for s in got if s not in acked), "gaps": 0,
            "ends": {"answered 500": soak.receiver.refused[path], "not answered": soak.receiver.hung[path]},
            "lost_sample": [{"first": lost[:10]}] if lost else [], "subscription": state}
    return kinds


def memory(samples: Sequence[Dict[str, Any]], seconds: float) -> Dict[str, Any]:
    load = [s for s in samples if s["phase"] == "load"]
    judged = [s for s in load if s["t"] >= WARMUP_FRACTION * seconds] or load
    if not judged:
        return {}
    rss = [s["rss"] for s in judged]
    fds = [s["fds"] for s in judged]
    return {"rss_min": min(rss), "rss_max": max(rss), "rss_ratio": max(rss) / min(rss),
            "rss_first": rss[0], "rss_last": rss[-1], "rss_end": samples[-1]["rss"],
            "fds_min": min(fds), "fds_max": max(fds), "fds_first": fds[0], "fds_last": fds[-1],
            "fds_end": samples[-1]["fds"], "samples": len(judged)}


def run(settings: Settings) -> Tuple[Dict[str, Any], str]:
    minutes = float(settings.extra.get("minutes", 10.0))
    rate = float(settings.extra.get("rate", 100.0))
    loadBefore = os.getloadavg()
    began = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    kafka = PrivateKafka()
    gateway = None
    try:
        kafka.start()
        topic = kafkaTopic("soak", partitions=2, bootstrap=kafka.bootstrap)
        adminPort = freePort()
        store = os.path.join(scratch("soak-store"), "store.db")
        ini = GATEWAY_INI.format(admin=adminPort, token=TOKEN, store=store, kafka=kafka.bootstrap, topic=topic)
        gateway = evgateService(ini, "evgate-soak")
        gateway.start()
        say(f"soak: {minutes:g} min at {rate:g} msg/s; readers {READERS}; webhooks {list(WEBHOOK_FAILING)}")
        soak = Soak(gateway.port, adminPort, gateway.pid, kafka, minutes, rate)
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(soak.run())
        kinds = judge(soak)
        gatewayAlive = gateway.proc is not None and gateway.proc.poll() is None
    finally:
        if gateway is not None:
            gateway.stop()
        kafka.stop()
    mem = memory(soak.samples, soak.clock.seconds)
    lost = sum(k["lost"] for k in kinds.values())
    document = {
        "minutes": minutes, "rate": rate, "started": began, "readers": READERS,
        "webhooks": {p: list(w) for p, w in WEBHOOK_FAILING.items()},
        "published": {"sent": soak.ledger.sent, "acknowledged": len(soak.ledger.acked),
                      "statuses": soak.ledger.statuses, "no_answer": soak.ledger.noAnswer},
        "kinds": kinds, "memory": mem, "samples": soak.samples, "events": soak.events,
        "rss_target_ratio": RSS_TARGET, "warmup_fraction": WARMUP_FRACTION,
        "load_before": loadBefore, "load_after": os.getloadavg(), "gateway_alive_at_end": gatewayAlive,
        "lost": lost, "failed": bool(lost) or not gatewayAlive, "probe": soak.probe,
    }
    return document, render(document)


def render(doc: Dict[str, Any]) -> str:
    pub = doc["published"]
    mem = doc["memory"]
    rows = []
    for kind, k in doc["kinds"].items():
        ends = ", ".join(f"{why} {n}" for why, n in sorted(k["ends"].items()) if n) or "-"
        rows.append([kind, k["readers"], k["sessions"], k["expected"], k["received"], k["lost"], k["duplicates"],
                     k["unacknowledged"], ends])
    text = table(f"soak: {doc['minutes']:g} min, {doc['rate']:g} msg/s, broker restarted at "
                 f"{100 * BROKER_RESTART_AT:.0f}%",
                 ["consumer", "clients", "sessions", "should get", "got", "lost", "dup", "unacked got",
                  "how sessions ended"], rows)
    restart = next((e for e in doc["events"] if e["what"].startswith("broker restarted")), None)
    lines = [
        "",
        f"- published: {pub['sent']:,} sent, {pub['acknowledged']:,} acknowledged (202); "
        f"answers {pub['statuses']}; no answer {pub['no_answer']}",
        f"- broker restart: {restart['what'] if restart else 'did not happen'}",
    ]
    if mem:
        met = "met" if mem["rss_ratio"] <= RSS_TARGET else "NOT met"
        lines += [
            f"- gateway RSS after the first {100 * WARMUP_FRACTION:.0f}% (load phase, {mem['samples']} samples): "
            f"{mem['rss_min'] / 2**20:.1f}-{mem['rss_max'] / 2**20:.1f} MiB, max/min {mem['rss_ratio']:.3f} "
            f"(target <= {RSS_TARGET:.2f}: {met}); first {mem['rss_first'] / 2**20:.1f}, last "
            f"{mem['rss_last'] / 2**20:.1f}, after the drain {mem['rss_end'] / 2**20:.1f} MiB",
            f"- gateway open files: {mem['fds_min']}-{mem['fds_max']}; first {mem['fds_first']}, last "
            f"{mem['fds_last']}, after the drain {mem['fds_end']}",
        ]
    lines.append(f"- load average before/after: {fmt(doc['load_before'][0], 2)} / {fmt(doc['load_after'][0], 2)}")
    lines.append(f"- lost acknowledged messages: {doc['lost']}" + (" (FAILED)" if doc["failed"] else ""))
    for kind, k in doc["kinds"].items():
        for sample in k["lost_sample"][:1]:
            lines.append(f"  - {kind} ({len(k['lost_sample'])} clients lost some), e.g.: {json.dumps(sample)}")
    probe = doc.get("probe")
    if probe:
        lines.append(f"- a new GET reader after the drain, one message published: {json.dumps(probe)}")
    lines.append("")
    lines.append(timeline(doc["samples"]))
    return text + "\n".join(lines) + "\n"


def timeline(samples: Sequence[Dict[str, Any]], rows: int = 12) -> str:
    """
    RSS and open files over time, a dozen rows of the samples.
    """
    if not samples:
        return ""
    step = max(1, len(samples) // rows)
    picked = list(samples[::step])
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    return table("gateway over time", ["t (s)", "phase", "RSS MiB", "open files", "CPU %", "acked", "load"],
                 [[s["t"], s["phase"], s["rss"] / 2**20, s["fds"], s["cpu"], s["acked"], s["load1"]]
                  for s in picked])
