"""
The stream client harness: many SSE or WebSocket subscribers in one
asyncio process, on raw sockets, counting what each receives.

Every published payload is C{{"seq":N,"ts":T,...}}: C{seq} counts from 0
on the publisher, C{ts} is the publisher's C{time.time()} just before it
sent the message.  A subscriber checks that the C{seq} it receives is the
one after the last it saw: anything else is a duplicate (not newer) or a
loss (a jump); the latency of each new message is receipt time minus
C{ts}, both read from the same machine's clock.

Run as a worker of a scenario::

    python -m evbench.streams --port P --path /mem --mode sse --count 5000

It prints C{READY {...}} once every connection got its response head (or
failed), then obeys lines on stdin:

 - C{END <last seq> <drain seconds>}: wait until every open subscriber
   received C{last seq} (at most C{drain seconds}, and no longer than 3 s
   without any message arriving), print C{STATS {...}}
   (counts, a latency histogram in 0.1 ms buckets, this process's CPU);
 - C{CLOSE}: close everything and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array
from typing import Any, Dict, List, Optional

BUCKETS_PER_SECOND = 10000          # 0.1 ms resolution
MAX_BUCKET = 60 * BUCKETS_PER_SECOND

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

# How much of the start of a large event the harness keeps: the id and
# event lines and the payload's seq and ts.
BIG_HEAD = 512


class Harness:
    """
    What all subscribers of this process share: the counters.
    """

    def __init__(self) -> None:
        self.hist = array("L", bytes(8 * (MAX_BUCKET + 1)))
        self.established = 0
        self.failed = 0
        self.closed = 0
        self.lastReceipt = 0.0
        self.firstReceipt = 0.0
        self.statuses: Dict[str, int] = {}
        self.conns: List["Subscriber"] = []


class Subscriber(asyncio.Protocol):
    """
    One SSE or WebSocket subscriber.
    """

    def __init__(self, harness: Harness, request: bytes, websocket: bool, big: bool = False) -> None:
        self.harness = harness
        self.request = request
        self.websocket = websocket
        # Large events are parsed as they stream past, keeping only the
        # head of each (where seq and ts are): the harness never holds a
        # whole message per subscriber, nor copies it read after read.
        self.big = big
        self.eventHead = b""
        self.afterNewline = False
        self.transport: Any = None
        self.head = True
        self.chunked = False
        self.raw = b""          # bytes before the body / before a complete chunk
        self.body = b""         # decoded body not yet parsed into events
        self.chunkLeft = 0      # bytes of the current chunk still to come (+2 for CRLF)
        self.last = -1
        self.received = 0
        self.dups = 0
        self.gaps = 0
        self.open = False
        self.done = asyncio.get_event_loop().create_future()

    # asyncio

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.open:
            self.harness.closed += 1
        elif self.head:
            self.harness.failed += 1
        self.open = False
        if not self.done.done():
            self.done.set_result(False)

    def data_received(self, data: bytes) -> None:
        if self.head:
            data = self._head(data)
            if not data:
                return
        if self.websocket:
            self._frames(data)
        elif self.chunked:
            self._chunks(data)
        elif self.big:
            self._bigEvents(data)
        else:
            self._events(data)

    # parsing

    def _head(self, data: bytes) -> bytes:
        raw = self.raw + data
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            self.raw = raw
            return b""
        self.raw = b""
        head = raw[:end].decode("latin-1")
        status = head.split(" ", 2)[1] if " " in head else "?"
        statuses = self.harness.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.head = False
        wanted = "101" if self.websocket else "200"
        if status != wanted:
            self.harness.failed += 1
            if not self.done.done():
                self.done.set_result(False)
            self.transport.close()
            return b""
        self.chunked = "transfer-encoding: chunked" in head.lower()
        self.open = True
        self.harness.established += 1
        if not self.done.done():
            self.done.set_result(True)
        return raw[end + 4:]

    def _chunks(self, data: bytes) -> None:
        raw = self.raw + data if self.raw else data
        pos = 0
        size = len(raw)
        out = []
        while pos < size:
            left = self.chunkLeft
            if left:
                take = min(left, size - pos)
                out.append(raw[pos:pos + take])
                pos += take
                self.chunkLeft = left - take
                continue
            line = raw.find(b"\r\n", pos)
            if line < 0:
                break
            text = raw[pos:line]
            pos = line + 2
            if not text:
                continue        # the CRLF that ends a chunk
            length = int(text.split(b";", 1)[0], 16)
            if length == 0:
                self.transport.close()
                return
            self.chunkLeft = length
        self.raw = raw[pos:] if pos < size else b""
        if out:
            if self.big:
                for piece in out:
                    self._bigEvents(piece)
            else:
                self._events(b"".join(out))

    def _bigEvents(self, data: bytes) -> None:
        # Event ends (a blank line) are found in each piece as it comes,
        # the previous piece's last newline included.
        start = 0
        if self.afterNewline and data[:1] == b"\n":
            self._bigEvent()
            start = 1
        size = len(data)
        while True:
            end = data.find(b"\n\n", start)
            stop = size if end < 0 else end
            keep = BIG_HEAD - len(self.eventHead)
            if keep > 0 and stop > start:
                self.eventHead += data[start:min(stop, start + keep)]
            if end < 0:
                break
            self._bigEvent()
            start = end + 2
        self.afterNewline = start < size and data[-1:] == b"\n"

    def _bigEvent(self) -> None:
        head, self.eventHead = self.eventHead, b""
        at = head.find(b'"seq":')
        if at < 0:
            return
        comma = head.find(b",", at)
        ts = head.find(b",", comma + 6)
        if comma > 0 and ts > 0:
            self._got(int(head[at + 6:comma]), float(head[comma + 6:ts]), time.time())

    def _events(self, data: bytes) -> None:
        body = self.body + data if self.body else data
        end = body.rfind(b"\n\n")
        if end < 0:
            self.body = body
            return
        self.body = body[end + 2:]
        now = time.time()
        start = 0
        # Each payload holds "seq":N,"ts":T, and nothing before it does.
        while True:
            at = body.find(b'"seq":', start, end)
            if at < 0:
                return
            comma = body.find(b",", at)
            ts = body.find(b",", comma + 6)
            self._got(int(body[at + 6:comma]), float(body[comma + 6:ts]), now)
            start = ts

    def _frames(self, data: bytes) -> None:
        buf = self.raw + data if self.raw else data
        pos = 0
        size = len(buf)
        now = 0.0
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            payload = buf[pos + head:pos + head + length]
            pos += head + length
            opcode = b0 & 0x0F
            if opcode in (0, 1, 2):
                at = payload.find(b'"seq":')
                if at >= 0:
                    if not now:
                        now = time.time()
                    comma = payload.find(b",", at)
                    ts = payload.find(b",", comma + 6)
                    self._got(int(payload[at + 6:comma]), float(payload[comma + 6:ts]), now)
            elif opcode == 9:
                self._send(0xA, payload)
            elif opcode == 8:
                self._send(0x8, payload[:2])
                self.transport.close()
                return
        self.raw = buf[pos:] if pos < size else b""

    def _send(self, opcode: int, payload: bytes) -> None:
        # Client frames are masked; a zero mask keeps the payload as it is.
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def _got(self, seq: int, ts: float, now: float) -> None:
        last = self.last
        if seq <= last:
            self.dups += 1
            return
        if seq != last + 1 and last >= 0:
            self.gaps += seq - last - 1
        self.last = seq
        self.received += 1
        harness = self.harness
        bucket = int((now - ts) * BUCKETS_PER_SECOND)
        harness.hist[bucket if 0 <= bucket < MAX_BUCKET else MAX_BUCKET] += 1
        harness.lastReceipt = now
        if not harness.firstReceipt:
            harness.firstReceipt = now


async def connectAll(harness: Harness, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    if args.mode == "ws":
        request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: " + WS_KEY.decode() + "\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    else:
        request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                   "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
    websocket = args.mode == "ws"
    gate = asyncio.Semaphore(args.in_flight)

    async def one() -> None:
        async with gate:
            subscriber = Subscriber(harness, request, websocket, args.big)
            harness.conns.append(subscriber)
            try:
                await loop.create_connection(lambda: subscriber, "127.0.0.1", args.port)
            except OSError:
                harness.failed += 1
                subscriber.done.set_result(False)
                return
            try:
                await asyncio.wait_for(asyncio.shield(subscriber.done), args.connect_timeout)
            except asyncio.TimeoutError:
                pass

    tasks = []
    interval = 1.0 / args.rate
    start = loop.time()
    for i in range(args.count):
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)


def stats(harness: Harness, lastSeq: int) -> Dict[str, Any]:
    expected = lastSeq + 1
    received = dups = lost = short = gaps = late = 0
    for c in harness.conns:
        if c.head:
            continue
        received += c.received
        dups += c.dups
        missing = expected - c.received
        if missing > 0:
            lost += missing
            short += 1
            # A jump over a seq is a message the server dropped; what is
            # missing after the last one received had not arrived by the
            # deadline (late, or dropped with the end of the stream).
            gaps += c.gaps
            late += missing - c.gaps
    hist = {str(i): n for i, n in enumerate(harness.hist) if n}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "subscribers": harness.established, "failed": harness.failed, "closed": harness.closed,
        "statuses": harness.statuses, "received": received, "duplicates": dups, "lost": lost,
        "gaps": gaps, "late": late,
        "subscribers_short": short, "first_receipt": harness.firstReceipt,
        "last_receipt": harness.lastReceipt, "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss_kib": usage.ru_maxrss, "hist": hist,
    }


async def main(args: argparse.Namespace) -> None:
    harness = Harness()
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    await connectAll(harness, args)
    print("READY " + json.dumps({"subscribers": harness.established, "failed": harness.failed,
                                 "statuses": harness.statuses,
                                 "seconds": round(time.monotonic() - began, 2)}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "CLOSE":
            break
        if line[0] == "END":
            lastSeq, drain = int(line[1]), float(line[2])
            # Wait for the stragglers while they still arrive: a server
            # that fell behind is measured on what it delivers, not cut
            # off; one that stopped delivering for 3 s is done.
            deadline = loop.time() + drain
            while loop.time() < deadline:
                if all(c.last >= lastSeq for c in harness.conns if c.open):
                    break
                if harness.lastReceipt and time.time() - harness.lastReceipt > 3.0:
                    break
                await asyncio.sleep(0.05)
            print("STATS " + json.dumps(stats(harness, lastSeq)), flush=True)
        elif line[0] == "PING":
            print("PONG " + json.dumps({"subscribers": harness.established, "closed": harness.closed}),
                  flush=True)
    for c in harness.conns:
        if c.transport is not None:
            c.transport.abort()
    await asyncio.sleep(0.2)


def parseArgs(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--mode", choices=("sse", "ws"), default="sse")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2000.0, help="new connections per second")
    parser.add_argument("--in-flight", type=int, default=200, help="connections being opened at once")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--big", action="store_true",
                        help="SSE events of megabytes: parse them as they stream past")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parseArgs()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        from uvloop import run
    except ImportError:
        from asyncio import run
    run(main(arguments))
