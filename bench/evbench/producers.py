"""
Load generators for the batch scenario, each run as its own process so
that its CPU is measured apart:

 - C{rdkafka}: confluent-kafka's Producer in a loop (the ceiling: what
   librdkafka does with no gateway in front), counting delivery reports;
 - C{websocket}: evgate's WebSocket publish path (subprotocol
   C{evgate.json}), several connections each keeping a window of frames
   in flight, counting acknowledgements.

Both print one line C{RESULT {...}}: records acknowledged, seconds, CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any, Dict, List, Optional


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rdkafka(args: argparse.Namespace) -> Dict[str, Any]:
    from confluent_kafka import Producer

    value = args.value.encode()
    producer = Producer({"bootstrap.servers": args.bootstrap, "queue.buffering.max.kbytes": 65536})
    done = [0, 0]

    def report(error: Any, message: Any) -> None:
        done[1 if error else 0] += 1

    producer.list_topics(args.topic, timeout=10)
    began = time.monotonic()
    c0 = cpu()
    deadline = began + args.seconds
    sent = 0
    while time.monotonic() < deadline:
        for _ in range(1000):
            try:
                producer.produce(args.topic, value, on_delivery=report)
                sent += 1
            except BufferError:
                producer.poll(0.01)
                break
        producer.poll(0)
    producer.flush(60)
    elapsed = time.monotonic() - began
    return {"records": done[0], "errors": done[1], "sent": sent, "seconds": elapsed,
            "cpu_seconds": cpu() - c0}


class WsPublisher(asyncio.Protocol):
    """
    One WebSocket connection publishing frames, C{window} of them
    unacknowledged at a time.
    """

    def __init__(self, path: str, port: int, frame: bytes, window: int, deadline: float,
                 counts: Dict[str, int]) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: evgate.json\r\n\r\n").encode()
        self.frame = frame
        self.window = window
        self.deadline = deadline
        self.counts = counts
        self.inFlight = 0
        self.head = True
        self.buf = b""
        self.transport: Any = None
        self.finished = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def _fill(self) -> None:
        if time.monotonic() >= self.deadline:
            if self.inFlight == 0 and not self.finished.done():
                self.finished.set_result(None)
            return
        n = self.window - self.inFlight
        if n > 0:
            self.transport.write(self.frame * n)
            self.inFlight += n
            self.counts["sent"] += n

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.counts["refused"] += 1
                self.transport.close()
                return
            self.head = False
            buf = buf[end + 4:]
            self._fill()
        pos, size = 0, len(buf)
        while size - pos >= 2:
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
            opcode = buf[pos] & 0x0F
            pos += head + length
            if opcode == 1:
                # Answers come in order, one per frame; anything else (the
                # "subscribed" greeting) is not one.
                if payload.startswith(b'{"ack"'):
                    self.inFlight -= 1
                    self.counts["acked"] += 1
                elif payload.startswith(b'{"error"'):
                    self.inFlight -= 1
                    self.counts["errors"] += 1
            elif opcode == 9:
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                self.transport.close()
                return
        self.buf = buf[pos:]
        self._fill()


async def websocket(args: argparse.Namespace) -> Dict[str, Any]:
    document = json.dumps({"content": args.value}).encode()
    # A masked text frame with a zero mask: the payload goes as it is.
    if len(document) < 126:
        frame = bytes((0x81, 0x80 | len(document))) + b"\0\0\0\0" + document
    else:
        frame = bytes((0x81, 0x80 | 126)) + len(document).to_bytes(2, "big") + b"\0\0\0\0" + document
    counts = {"sent": 0, "acked": 0, "errors": 0, "refused": 0}
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    c0 = cpu()
    deadline = began + args.seconds
    conns: List[WsPublisher] = []
    for _ in range(args.connections):
        conn = WsPublisher(args.path, args.port, frame, args.window, deadline, counts)
        conns.append(conn)
        await loop.create_connection(lambda c=conn: c, "127.0.0.1", args.port)
    await asyncio.wait_for(asyncio.gather(*(c.finished for c in conns)), args.seconds + 60)
    elapsed = time.monotonic() - began
    for c in conns:
        c.transport.close()
    return {"records": counts["acked"], "errors": counts["errors"], "sent": counts["sent"],
            "refused": counts["refused"], "seconds": elapsed, "cpu_seconds": cpu() - c0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("rdkafka", "websocket"))
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/kafka")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--value", required=True)
    args = parser.parse_args()
    if args.kind == "rdkafka":
        result = rdkafka(args)
    else:
        try:
            from uvloop import run
        except ImportError:
            from asyncio import run
        result = run(websocket(args))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
