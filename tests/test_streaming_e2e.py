"""
End-to-end tests of the streaming entrypoints against a real
C{twistd -n evgate} subprocess on the memory endpoint, driven by clients
the project does not write: headless Chromium's EventSource, the
C{websockets} package, and raw sockets.

The clients run on threads of their own (asyncio loops in threads, a page
server, Chromium in a subprocess); the tests themselves block on them, so
they are synchronous and leave trial's reactor alone.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from .helpers import GatewayProcess, LocalHttpServer, demoIni, waitFor
from .wire import dechunk, splitHead, sseEvents

BROWSER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browser")
CHROMIUM = "/usr/bin/chromium"

def gatewayIni(queue: int = 1000, maxBytes: int = 1048576, extra: str = "") -> str:
    """
    The INI of a test gateway with one API, /demo.
    """
    return str(demoIni("http-post http-get sse websocket", listen="tcp:0:interface=127.0.0.1", subscriber_queue=queue,
                       max_message_bytes=maxBytes, api={"heartbeat": 5})
               .memory(retention=10000).extra(extra))


def runAsync(coroutine: Callable[[], Any], timeout: float = 60.0) -> Any:
    """
    Run C{coroutine()} to completion on an asyncio loop in a thread of its
    own and return its result (or raise its exception).
    """
    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(asyncio.wait_for(coroutine(), timeout))
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 10)
    if thread.is_alive():
        raise AssertionError(f"asyncio client still running after {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Publisher:
    """
    Publishes with HTTP POST over one keep-alive connection.
    """

    def __init__(self, port: int, path: str = "/demo") -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.path = path

    def publish(self, content: bytes, headers: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """
        Publish C{content}; return the acknowledgement.
        """
        self.connection.request("POST", self.path, body=content, headers=headers or {})
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 202:
            raise AssertionError(f"publish answered {response.status}: {body!r}")
        return json.loads(body)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.connection.close()


class E2ETestCase(SynchronousTestCase):
    """
    One gateway subprocess per test.
    """

    def startGateway(self, ini: str) -> GatewayProcess:
        """
        Start a gateway; it is stopped when the test ends.
        """
        gateway = GatewayProcess(ini).start()
        self.addCleanup(gateway.stop)
        return gateway


class _PageServer(LocalHttpServer):
    """
    Serves tests/browser and collects what pages POST back.
    """

    def __init__(self) -> None:
        self.posts: Dict[str, List[Any]] = {}
        pages = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=BROWSER_DIR, **kwargs)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                pages.posts.setdefault(self.path, []).append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    @property
    def origin(self) -> str:
        return self.urlOf("")


class BrowserTests(E2ETestCase):
    """
    A browser's EventSource against the gateway.
    """

    def setUp(self) -> None:
        if not os.access(CHROMIUM, os.X_OK):
            # make test installs it (scripts/install-system-deps); a missing
            # browser is a broken rig, not a reason to pass.
            self.fail(f"{CHROMIUM} is not installed: run scripts/install-system-deps")
        self.pages = _PageServer()
        self.addCleanup(self.pages.stop)

    def openPage(self, url: str) -> subprocess.Popen:
        """
        Open C{url} in a fresh headless Chromium; it is killed when the test
        ends.
        """
        profile = tempfile.mkdtemp(prefix="evgate-chromium-")
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             # Keeps headless Chromium running until the test is done with it.
             "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )

        def close() -> None:
            browser.kill()
            browser.wait(20)
            shutil.rmtree(profile, ignore_errors=True)

        self.addCleanup(close)
        return browser

    def test_eventSourceResumes(self) -> None:
        """
        An EventSource on another origin (allowed by cors-origins) receives
        every message exactly once, in order, although the gateway ends its
        stream every second (sse.max-duration): the browser reconnects by
        itself with Last-Event-ID and the gateway resumes right after it.
        """
        count = 30
        gateway = self.startGateway(gatewayIni(extra=(
            f"cors-origins = {self.pages.origin}\nsse.max-duration = 1\nsse.retry = 100\n")))
        stream = gateway.url("/demo")
        self.openPage(f"{self.pages.origin}/eventsource.html?count={count}&stream={quote(stream)}")
        waitFor(lambda: self.pages.posts.get("/ready"), 60, what="the page's EventSource to open")
        publisher = Publisher(gateway.port)
        self.addCleanup(publisher.close)
        for i in range(count):
            publisher.publish(f"message {i}".encode())
            time.sleep(0.1)
        (report,) = waitFor(lambda: self.pages.posts.get("/report"), 60, what="the page's report")
        self.assertEqual(report["reason"], "complete")
        self.assertEqual(report["received"], [f"message {i}" for i in range(count)])
        self.assertEqual(len(set(report["ids"])), count)
        self.assertGreaterEqual(report["opens"], 3, "the stream was reopened by the browser")


class WebSocketTests(E2ETestCase):
    """
    The websockets package against the gateway.
    """

    def test_rawAndJson(self) -> None:
        """
        A raw client and an evgate.json client each publish and both receive
        every message: raw as text or binary frames, evgate.json as
        envelopes with ids, publishes acknowledged.
        """
        gateway = self.startGateway(gatewayIni())
        url = f"ws://127.0.0.1:{gateway.port}/demo"

        async def scenario() -> Tuple[List[Any], List[Any]]:
            import websockets

            async with websockets.connect(url) as raw, \
                    websockets.connect(url, subprotocols=["evgate.json"]) as js:
                assert js.subprotocol == "evgate.json"
                subscribed = json.loads(await js.recv())
                # One publish at a time, so that the topic's order is known.
                rawGot = []
                await raw.send("text from raw")
                rawGot.append(await raw.recv())
                await raw.send(b"\x00\xffbinary")
                rawGot.append(await raw.recv())
                await js.send(json.dumps({"key": "k1", "headers": {"h": "v"}, "content": "from json",
                                          "ref": "r1"}))
                rawGot.append(await raw.recv())
                jsGot = [subscribed] + [json.loads(await js.recv()) for _ in range(4)]
                return rawGot, jsGot

        rawGot, jsGot = runAsync(scenario, 30)
        self.assertEqual(rawGot, ["text from raw", b"\x00\xffbinary", "from json"])
        self.assertIn("subscribed", jsGot[0])
        acks = [d for d in jsGot if "ack" in d]
        self.assertEqual(acks, [{"ack": {"topic": "demo", "partition": 0, "offset": 2}, "ref": "r1"}])
        messages = [d for d in jsGot if "id" in d]
        self.assertEqual([(m["content"], m.get("encoding")) for m in messages],
                         [("text from raw", None), ("AP9iaW5hcnk=", "base64"), ("from json", None)])
        self.assertEqual((messages[2]["key"], messages[2]["headers"]), ("k1", {"h": "v"}))

        resumeUrl = f"{url}?cursor={messages[0]['id']}"

        async def resume() -> List[Any]:
            import websockets

            async with websockets.connect(resumeUrl, subprotocols=["evgate.json"]) as js:
                return [json.loads(await js.recv()) for _ in range(3)]

        resumed = runAsync(resume, 30)
        self.assertEqual([d.get("content") for d in resumed[1:]], ["AP9iaW5hcnk=", "from json"])

    def test_limitsAndShutdown(self) -> None:
        """
        A frame over max-message-bytes is closed with 1009, a publish to a
        subscribe-only API is refused, and stopping the gateway closes
        WebSockets with 1013 and ends event streams cleanly.
        """
        gateway = self.startGateway(gatewayIni(maxBytes=1000, extra=(
            "\n[api:readonly]\npath = /readonly\nendpoint = local\ntopic = demo\n"
            "entrypoints = websocket\nwebsocket.publish = false\n")))
        base = f"ws://127.0.0.1:{gateway.port}"

        async def limits() -> Tuple[Any, Any, Any]:
            import websockets

            async with websockets.connect(base + "/demo", max_size=None) as raw:
                await raw.send(b"x" * 1001)
                try:
                    await raw.recv()
                except websockets.ConnectionClosed as e:
                    tooBig = e.rcvd.code if e.rcvd else None
            async with websockets.connect(base + "/readonly", subprotocols=["evgate.json"]) as js:
                await js.recv()
                await js.send(json.dumps({"content": "x"}))
                refused = json.loads(await js.recv())
            async with websockets.connect(base + "/readonly") as raw:
                await raw.send("x")
                try:
                    await raw.recv()
                except websockets.ConnectionClosed as e:
                    policy = e.rcvd.code if e.rcvd else None
            return tooBig, refused, policy

        tooBig, refused, policy = runAsync(limits, 30)
        self.assertEqual(tooBig, 1009)
        self.assertEqual(refused["error"]["type"], "https://evgate.dev/problems/forbidden")
        self.assertEqual(policy, 1008)

        sse = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
        self.addCleanup(sse.close)
        sse.sendall(b"GET /demo HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        ready = threading.Event()
        closed: Dict[str, Any] = {}

        async def held() -> None:
            import websockets

            async with websockets.connect(base + "/demo") as ws:
                ready.set()
                try:
                    await ws.recv()
                except websockets.ConnectionClosed as e:
                    closed["code"] = e.rcvd.code if e.rcvd else None
                    closed["reason"] = e.rcvd.reason if e.rcvd else None

        thread = threading.Thread(target=lambda: runAsync(held, 30), daemon=True)
        thread.start()
        self.assertTrue(ready.wait(30))
        # The event stream is open once its first event (retry and id) came.
        prelude = _readUntil(sse, b"retry:")
        # twistd re-raises the signal it stopped on, hence -15.
        self.assertIn(gateway.stop(), (0, -15))
        thread.join(30)
        self.assertEqual(closed.get("code"), 1013, closed)
        data = prelude + _readAll(sse)
        status, headers, rest = splitHead(data)
        body, ended = dechunk(rest)
        self.assertTrue(ended, "the event stream was completed, not cut")
        self.assertIn("the gateway is stopping", sseEvents(body)[-1]["comments"][0])


def _readUntil(sock: socket.socket, needle: bytes, within: float = 30.0) -> bytes:
    """
    What C{sock} receives up to and including C{needle} (and whatever came
    with it), which must come within C{within} seconds.
    """
    data = b""
    deadline = time.monotonic() + within
    while needle not in data:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} did not come within {within:g} s; got {data[-200:]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before {needle!r}; got {data[-200:]!r}")
        data += chunk
    return data


def _readAll(sock: socket.socket, within: float = 60.0) -> bytes:
    """
    Everything C{sock} receives until the gateway closes it, which must
    happen within C{within} seconds (heartbeats would keep a stream that
    is never closed going for ever).
    """
    chunks = []
    deadline = time.monotonic() + within
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway did not close the connection within {within:g} s; "
                                 f"last bytes: {b''.join(chunks)[-200:]!r}")
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class FanOutTests(E2ETestCase):
    """
    Many subscribers on one topic.
    """

    def test_thousandSubscribers(self) -> None:
        """
        1,000 concurrent SSE subscribers of one topic each receive every
        message, in order.
        """
        subscribers, count = 1000, 20
        gateway = self.startGateway(gatewayIni())
        port = gateway.port

        async def scenario() -> List[List[str]]:
            semaphore = asyncio.Semaphore(100)
            connections: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

            async def connect() -> None:
                async with semaphore:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /demo HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
                    # The preamble (retry and id, one chunk) arrives once
                    # the stream is attached to the hub; chunks follow.
                    await reader.readuntil(b"\n\n\r\n")
                    connections.append((reader, writer))

            await asyncio.gather(*(connect() for _ in range(subscribers)))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _publishMany, port, count)

            async def collect(reader: asyncio.StreamReader) -> List[str]:
                buffer = b""
                while buffer.count(b"event: message") < count:
                    data = await reader.read(65536)
                    if not data:
                        break
                    buffer += data
                body, ended = dechunk(buffer)
                return [e["data"] for e in sseEvents(body) if "data" in e]

            results = await asyncio.gather(*(collect(reader) for reader, writer in connections))
            for _reader, writer in connections:
                writer.close()
            return results

        started = time.monotonic()
        results = runAsync(scenario, 120)
        elapsed = time.monotonic() - started
        expected = [f"m{i}" for i in range(count)]
        self.assertEqual(len(results), subscribers)
        wrong = [r for r in results if r != expected]
        self.assertEqual(wrong, [], f"{len(wrong)} subscribers missed or repeated messages")
        self.assertLess(elapsed, 110)


def _publishMany(port: int, count: int) -> None:
    publisher = Publisher(port)
    try:
        for i in range(count):
            publisher.publish(f"m{i}".encode())
    finally:
        publisher.close()


class SlowClientTests(E2ETestCase):
    """
    A client that stops reading is cut; the others go on.
    """

    def test_slowReaderCut(self) -> None:
        """
        With a small subscriber-queue, a client that never reads (with a
        small receive buffer) is cut with an error event naming the last id
        it received, its stream a gapless prefix; a reading client receives
        every message.
        """
        count, size = 300, 8192
        gateway = self.startGateway(gatewayIni(queue=20))
        request = b"GET /demo HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"

        slow = socket.socket()
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(30)
        slow.connect(("127.0.0.1", gateway.port))
        slow.sendall(request)
        # Both streams are open once their first event came; from then on
        # the slow client reads nothing until the end.
        slowPrelude = _readUntil(slow, b"retry:")

        reader = socket.create_connection(("127.0.0.1", gateway.port), timeout=60)
        self.addCleanup(reader.close)
        reader.sendall(request)
        received: List[bytes] = [_readUntil(reader, b"retry:")]
        done = threading.Event()

        def read() -> None:
            total = b"".join(received)
            while total.count(b"event: message") < count:
                data = reader.recv(262144)
                if not data:
                    break
                total += data
                received.append(data)
            done.set()

        threading.Thread(target=read, daemon=True).start()
        publisher = Publisher(gateway.port)
        self.addCleanup(publisher.close)
        for i in range(count):
            publisher.publish(b"%05d" % i + b"x" * (size - 5))
        self.assertTrue(done.wait(60), "the reading client received every message")
        status, headers, rest = splitHead(b"".join(received))
        body, ended = dechunk(rest)
        readerEvents = [e for e in sseEvents(body) if "data" in e]
        self.assertEqual([e["data"][:5] for e in readerEvents], ["%05d" % i for i in range(count)])

        status, headers, rest = splitHead(slowPrelude + _readAll(slow))
        body, ended = dechunk(rest)
        self.assertTrue(ended, "the slow client's stream was ended by the gateway")
        events = [e for e in sseEvents(body) if "data" in e]
        error = events[-1]
        self.assertEqual(error["event"], "error")
        messages = events[:-1]
        self.assertLess(len(messages), count)
        self.assertEqual([e["data"][:5] for e in messages], ["%05d" % i for i in range(len(messages))])
        cursor = json.loads(error["data"])["cursor"]
        expected = messages[-1]["id"] if messages else sseEvents(body)[0]["id"]
        self.assertEqual(cursor, expected)
