"""
Integration tests of the MQTT 5 endpoint against Mosquitto.

A real C{twistd -n evgate} subprocess talks to the Mosquitto started by
C{scripts/dev-services up mosquitto} (127.0.0.1:$EVGATE_MQTT_PORT), and the
Mosquitto command-line clients (C{mosquitto_pub} / C{mosquitto_sub}, MQTT
5) check the other side independently.  The shared-subscription test runs
two connectors in this process, as two gateway nodes would.

These tests fail, never skip, when the broker cannot be reached.  The tests
that stop or restart Mosquitto bring it back up in a cleanup, even when they
fail.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from evgate.config import SectionReader
from evgate.connectors.mqtt import MqttConnector, parseOptions
from evgate.interfaces import IUpstreamSink

from .helpers import MQTT_HOST, MQTT_PORT, ROOT, GatewayIni, GatewayProcess, httpRequest, jsonOf, waitFor

DEV_SERVICES = os.path.join(ROOT, "scripts", "dev-services")
STREAMING = [name for name in ("sse", "websocket")
             if os.path.exists(os.path.join(ROOT, "evgate", "entrypoints", f"{name}.py"))]

def devServices(*args: str) -> "subprocess.CompletedProcess[str]":
    """
    Run C{scripts/dev-services} with C{args}.
    """
    return subprocess.run([DEV_SERVICES, *args], capture_output=True, text=True, timeout=90)


def brokerProblem() -> Optional[str]:
    """
    Why Mosquitto cannot take a QoS 1 publish now, or L{None} if it can.
    """
    try:
        done = subprocess.run(
            ["mosquitto_pub", "-V", "mqttv5", "-h", MQTT_HOST, "-p", str(MQTT_PORT), "-q", "1",
             "-t", "evgate/test/probe", "-m", "ping"],
            capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "mosquitto_pub is not installed (scripts/install-system-deps)"
    except subprocess.TimeoutExpired:
        return "mosquitto_pub timed out"
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip() or f"mosquitto_pub exited {done.returncode}"
    return None


def requireBroker() -> None:
    """
    Fail loudly (integration tests do not skip) when Mosquitto is not up.
    """
    problem = brokerProblem()
    if problem is not None:
        raise AssertionError(
            f"Mosquitto is not reachable on {MQTT_HOST}:{MQTT_PORT} ({problem}). Start it with "
            "`scripts/dev-services up mosquitto`; the MQTT integration tests need a real broker.")


def ensureBrokerUp() -> None:
    """
    Bring Mosquitto back (a cleanup of the tests that stop it).
    """
    done = devServices("up", "mosquitto")
    if done.returncode != 0:
        raise AssertionError(f"could not bring Mosquitto back up: {done.stdout}{done.stderr}")


def mosquittoPub(topic: str, *messages: str, properties: Tuple[Tuple[str, ...], ...] = ()) -> None:
    """
    Publish C{messages} to C{topic} with QoS 1 with the Mosquitto client;
    C{properties} are C{-D publish ...} arguments.
    """
    args = ["mosquitto_pub", "-V", "mqttv5", "-h", MQTT_HOST, "-p", str(MQTT_PORT), "-q", "1", "-t", topic]
    for prop in properties:
        args += ["-D", "publish", *prop]
    if len(messages) == 1:
        done = subprocess.run(args + ["-m", messages[0]], capture_output=True, text=True, timeout=20)
    else:
        done = subprocess.run(args + ["-l"], input="\n".join(messages) + "\n", capture_output=True,
                              text=True, timeout=20)
    if done.returncode != 0:
        raise AssertionError(f"mosquitto_pub failed: {done.stderr}")


class MosquittoSub:
    """
    C{mosquitto_sub} (MQTT 5) in a subprocess, printing each message as
    C{MSG>topic|qos|retain|content type|user properties|payload}.
    """

    # (@ is mosquitto_sub's date escape, hence another marker.)
    FORMAT = "MSG>%t|%q|%r|%C|%P|%p"

    def __init__(self, topic: str, count: int) -> None:
        self.lines: List[str] = []
        self.process = subprocess.Popen(
            # stdbuf: the debug lines (SUBACK) are buffered otherwise.
            ["stdbuf", "-oL", "mosquitto_sub", "-V", "mqttv5", "-h", MQTT_HOST, "-p", str(MQTT_PORT),
             "-q", "1", "-t", topic, "-C", str(count), "-d", "-F", self.FORMAT],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def waitSubscribed(self) -> None:
        """
        Wait until the broker acknowledged the subscription.
        """
        waitFor(lambda: any("SUBACK" in line for line in self.lines), 10, what="mosquitto_sub's SUBACK")

    def messages(self) -> List[List[str]]:
        """
        The messages printed so far, split into their fields.
        """
        return [line[4:].split("|", 5) for line in self.lines if line.startswith("MSG>")]

    def stop(self) -> None:
        """
        End the subprocess.
        """
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class SilentBroker:
    """
    A TCP server that speaks just enough MQTT 5 to accept a connection
    (CONNACK, PINGRESP) and never acknowledges a PUBLISH.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.publishes = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                first = reader.read(1)
                if not first:
                    return
                length, shift = 0, 0
                while True:
                    byte = reader.read(1)[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                reader.read(length)
                kind = first[0] >> 4
                if kind == 1:
                    conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties
                elif kind == 12:
                    conn.sendall(b"\xd0\x00")  # PINGRESP
                elif kind == 3:
                    self.publishes += 1
                elif kind == 14:
                    return
        except (OSError, IndexError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        """
        Stop listening.
        """
        self.closed = True
        self.listener.close()


class SseReader:
    """
    An C{text/event-stream} response read line by line with a deadline.
    """

    def __init__(self, port: int, path: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.connection.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        self.lines: List[str] = []

    def readUntil(self, done: Callable[[List[str]], bool], timeout: float = 15.0) -> List[str]:
        """
        Read lines until C{done(lines)}, or fail after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while not done(self.lines):
            if time.monotonic() > deadline:
                raise AssertionError(f"SSE stream: timed out; got {self.lines!r}")
            line = self.response.fp.readline()
            if not line:
                raise AssertionError(f"SSE stream ended; got {self.lines!r}")
            self.lines.append(line.decode("utf-8").rstrip("\r\n"))
        return self.lines

    def close(self) -> None:
        """
        Drop the connection.
        """
        self.connection.close()


class GatewayMixin:
    """
    A gateway subprocess on the MQTT endpoint, for one test.
    """

    def setUp(self) -> None:
        requireBroker()
        self.prefix = f"evgate-test/{uuid.uuid4().hex[:12]}"

    def startGateway(self, port: int = MQTT_PORT, window: int = 10000, publishTimeout: float = 5,
                     streaming: str = "", waitConnected: bool = True) -> GatewayProcess:
        """
        Start C{twistd -n evgate} on an INI for this test's topics.
        """
        ini = (GatewayIni(publish_timeout=publishTimeout, replay_window=window)
               .mqtt(port=port, keepalive=5, reconnect_min=0.2, reconnect_max=1)
               .api("sensors", endpoint="mqtt", topic=f"{self.prefix}/+/temperature",
                    publish_topic=f"{self.prefix}/{{key}}/temperature",
                    entrypoints=f"http-post http-get {streaming}".strip(), qos=1))
        gateway = GatewayProcess(ini, name="mqtt").start()
        self.addCleanup(self._stopGateway, gateway)  # type: ignore[attr-defined]
        if waitConnected:
            self.waitConnected(gateway, 1)
        return gateway

    def _stopGateway(self, gateway: GatewayProcess) -> None:
        gateway.stop()

    def waitConnected(self, gateway: GatewayProcess, times: int, timeout: float = 20) -> None:
        """
        Wait until the gateway logged its C{times}-th connection to the
        broker.
        """
        waitFor(lambda: gateway.output().count("MQTT endpoint mqtt: connected") >= times, timeout,
                what=f"connection {times} to the broker:\n{gateway.output()}")

    def liveCursor(self, gateway: GatewayProcess) -> str:
        """
        A cursor at the live head; the answer comes once the broker granted
        the subscription, so later messages are in the gateway's window.
        """
        status, _, body = httpRequest("GET", gateway.url("/sensors?limit=0"))
        self.assertEqual(status, 200, body)  # type: ignore[attr-defined]
        return jsonOf(body)["pagination"]["nextCursor"]

    def poll(self, gateway: GatewayProcess, cursor: str, timeout: int = 5000) -> Dict[str, Any]:
        """
        One long poll from C{cursor}.
        """
        status, _, body = httpRequest("GET", gateway.url(f"/sensors?cursor={cursor}&timeout={timeout}"),
                                      timeout=timeout / 1000 + 15)
        self.assertEqual(status, 200, body)  # type: ignore[attr-defined]
        return jsonOf(body)


class PublishTests(GatewayMixin, SynchronousTestCase):
    """
    HTTP POST through the gateway reaches MQTT subscribers, and is accepted
    only after the broker's acknowledgement.
    """

    def test_postReachesMosquittoSub(self) -> None:
        """
        A POST is a QoS 1 MQTT 5 message on the topic the key picks: the
        content is the payload, headers are user properties, Content-Type is
        the content type; the 202 names the concrete topic.  A POST without
        a key cannot pick a topic: 400, and nothing is published.
        """
        gateway = self.startGateway()
        sub = MosquittoSub(f"{self.prefix}/+/temperature", 1)
        self.addCleanup(sub.stop)
        sub.waitSubscribed()
        status, headers, body = httpRequest(
            "POST", gateway.url("/sensors?key=kitchen"), b"21.5",
            {"Content-Type": "text/plain", "X-Message-Header-unit": "C", "X-Message-Header-sensor": "k1"})
        self.assertEqual(status, 202, body)
        self.assertEqual(jsonOf(body)["topic"], f"{self.prefix}/kitchen/temperature")
        status, headers, body = httpRequest("POST", gateway.url("/sensors"), b"no key")
        self.assertEqual(status, 400, body)
        self.assertEqual(headers["content-type"], "application/problem+json")
        waitFor(sub.messages, 10, what=f"mosquitto_sub to print the message: {sub.lines}")
        [[topic, qos, retain, contentType, userProperties, payload]] = sub.messages()
        self.assertEqual((topic, qos, retain, contentType, payload),
                         (f"{self.prefix}/kitchen/temperature", "1", "0", "text/plain", "21.5"))
        self.assertEqual(sorted(userProperties.split(" ")), ["sensor:k1", "unit:C"])

    def test_acceptedOnlyAfterPuback(self) -> None:
        """
        Against a broker that takes the PUBLISH but never sends PUBACK, the
        POST is not accepted: a 504 after publish-timeout, not a 202.
        """
        broker = SilentBroker()
        self.addCleanup(broker.close)
        gateway = self.startGateway(port=broker.port, publishTimeout=1.5)
        started = time.monotonic()
        status, headers, body = httpRequest("POST", gateway.url("/sensors?key=a"), b"x")
        self.assertEqual(status, 504, body)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertGreaterEqual(time.monotonic() - started, 1.4)
        self.assertEqual(broker.publishes, 1)

    def test_brokerDown(self) -> None:
        """
        With Mosquitto stopped a POST gets a 503 problem (or a 504 while the
        loss is not noticed yet), never a 202; once it is back, POSTs are
        accepted again without restarting the gateway.
        """
        gateway = self.startGateway(publishTimeout=2)
        status, _, body = httpRequest("POST", gateway.url("/sensors?key=a"), b"before")
        self.assertEqual(status, 202, body)
        self.addCleanup(ensureBrokerUp)
        done = devServices("down", "mosquitto")
        self.assertEqual(done.returncode, 0, done.stderr)
        waitFor(lambda: "lost the connection" in gateway.output(), 15, what="the gateway to notice")
        status, headers, body = httpRequest("POST", gateway.url("/sensors?key=a"), b"while down")
        self.assertIn(status, (503, 504), body)
        self.assertEqual(headers["content-type"], "application/problem+json")
        problem = jsonOf(body)
        self.assertEqual(problem["status"], status)
        if status == 503:
            self.assertIn("not connected", problem["detail"])
            self.assertIn("retry-after", headers)
        ensureBrokerUp()
        waitFor(lambda: httpRequest("POST", gateway.url("/sensors?key=a"), b"after")[0] == 202, 20,
                interval=0.2, what="a POST to be accepted after the broker came back")


class SubscribeTests(GatewayMixin, SynchronousTestCase):
    """
    Messages published with mosquitto_pub reach HTTP GET, SSE and WebSocket
    clients of the gateway; cursors and gaps.
    """

    def test_mosquittoPubReachesClients(self) -> None:
        """
        Messages on concrete topics under a wildcard API reach a long poll,
        an SSE stream and a WebSocket: user properties are headers, the
        concrete topic, QoS, retain, content type, expiry and response
        topic are metadata.
        """
        gateway = self.startGateway(streaming=" ".join(STREAMING))
        cursor = self.liveCursor(gateway)
        sse = ws = None
        if "sse" in STREAMING:
            sse = SseReader(gateway.port, f"/sensors?cursor={cursor}")
            self.addCleanup(sse.close)
            sse.readUntil(lambda lines: any(line.startswith("id:") for line in lines))
        if "websocket" in STREAMING:
            from websockets.sync.client import connect

            ws = connect(f"ws://127.0.0.1:{gateway.port}/sensors?cursor={cursor}", subprotocols=["evgate.json"],
                         open_timeout=10)
            self.addCleanup(ws.close)
            self.assertIn("subscribed", json.loads(ws.recv(timeout=10)))
        mosquittoPub(f"{self.prefix}/kitchen/temperature", "21.5",
                     properties=(("user-property", "unit", "C"), ("content-type", "text/plain"),
                                 ("response-topic", "replies/1"), ("message-expiry-interval", "600")))
        mosquittoPub(f"{self.prefix}/hall/temperature", "19.0")

        page = self.poll(gateway, cursor)
        items = page["items"]
        if len(items) < 2:
            items += self.poll(gateway, page["pagination"]["nextCursor"])["items"]
        kitchen, hall = items
        self.assertEqual(kitchen["content"], "21.5")
        self.assertEqual(kitchen["headers"], {"unit": "C", "content-type": "text/plain"})
        meta = kitchen["metadata"]
        self.assertEqual((meta["topic"], meta["partition"], meta["qos"], meta["retain"], meta["contentType"],
                          meta["responseTopic"]),
                         (f"{self.prefix}/kitchen/temperature", 0, 1, False, "text/plain", "replies/1"))
        self.assertTrue(0 < meta["messageExpiry"] <= 600)
        self.assertEqual((hall["content"], hall["metadata"]["topic"]), ("19.0", f"{self.prefix}/hall/temperature"))
        self.assertEqual(hall["metadata"]["offset"], meta["offset"] + 1)
        self.assertNotIn("gap", page)

        if sse is not None:
            def data(lines: List[str]) -> List[str]:
                return [line[len("data: "):] for line in lines if line.startswith("data: ")]

            self.assertEqual(data(sse.readUntil(lambda lines: len(data(lines)) >= 2)), ["21.5", "19.0"])
        if ws is not None:
            frames = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
            self.assertEqual([(f["content"], f["metadata"]["topic"]) for f in frames],
                             [("21.5", f"{self.prefix}/kitchen/temperature"),
                              ("19.0", f"{self.prefix}/hall/temperature")])
            self.assertEqual(frames[0]["headers"]["unit"], "C")

    def test_subscriberSurvivesRestart(self) -> None:
        """
        A long poll waiting while Mosquitto restarts stays attached; the
        gateway reconnects, subscribes again, and the first message after
        the restart reaches it, with the gap of the lost broker session.
        """
        gateway = self.startGateway()
        cursor = self.liveCursor(gateway)
        result: List[Any] = []

        def longPoll() -> None:
            try:
                result.append(self.poll(gateway, cursor, timeout=25000))
            except BaseException as e:
                result.append(e)

        poller = threading.Thread(target=longPoll, daemon=True)
        poller.start()
        self.addCleanup(ensureBrokerUp)
        done = devServices("restart", "mosquitto")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.waitConnected(gateway, 2)

        sent = []

        def publishedAndReceived() -> bool:
            if not result:
                payload = f"after-restart-{len(sent)}"
                sent.append(payload)
                mosquittoPub(f"{self.prefix}/porch/temperature", payload)
            return bool(result)

        waitFor(publishedAndReceived, 30, interval=0.3, what="a message published after the restart")
        poller.join(5)
        [page] = result
        if isinstance(page, BaseException):
            raise page
        self.assertTrue(page["items"], page)
        self.assertIn(page["items"][0]["content"], sent)
        self.assertIn("session", page["gap"])

    def test_cursorOutsideWindow(self) -> None:
        """
        A cursor older than the replay window, or from another run of the
        gateway, resumes at the live head and the client is told (the C{gap}
        field of a GET page, SSE's C{event: gap}): MQTT has nothing to
        replay.
        """
        gateway = self.startGateway(window=2, streaming=" ".join(STREAMING))
        old = self.liveCursor(gateway)
        mosquittoPub(f"{self.prefix}/a/temperature", "1", "2", "3", "4")

        def gapPage() -> Optional[Dict[str, Any]]:
            page = self.poll(gateway, old, timeout=300)
            return page if "gap" in page else None

        page = waitFor(gapPage, 20, what="the window to move past the old cursor")
        self.assertIn("replay window", page["gap"])
        self.assertNotEqual(page["pagination"]["nextCursor"], old)
        if "sse" in STREAMING:
            sse = SseReader(gateway.port, f"/sensors?cursor={old}")
            self.addCleanup(sse.close)
            lines = sse.readUntil(lambda lines: "event: gap" in lines and lines[-1].startswith("data:"))
            self.assertIn("replay window", json.loads(lines[-1][len("data:"):])["detail"])

        fresh = self.liveCursor(gateway)
        gateway.stop()
        gateway = self.startGateway()
        page = self.poll(gateway, fresh, timeout=300)
        self.assertIn("another run", page["gap"])
        self.assertEqual(page["items"], [])


@implementer(IUpstreamSink)
class CollectingSink:
    """
    An upstream sink that collects contents and fires when started.
    """

    def __init__(self) -> None:
        self.contents: List[bytes] = []
        self.whenStarted: Deferred = Deferred()
        self.gaps: List[str] = []

    def started(self, cursor: Any) -> None:
        self.whenStarted.callback(cursor)

    def deliver(self, messages: Any) -> None:
        self.contents.extend(m.content for m in messages)

    def gap(self, cursor: Any, reason: str) -> None:
        self.gaps.append(reason)

    def failed(self, reason: Any) -> None:
        self.gaps.append(f"failed: {reason}")


class ShareGroupTests(TestCase):
    """
    Shared subscriptions (C{$share/<group>/<filter>}) spread the messages of
    a group over its subscribers, across gateway nodes.
    """

    timeout = 60

    def setUp(self) -> None:
        requireBroker()

    def connector(self, name: str) -> MqttConnector:
        """
        A started connector on the dev broker, stopped at cleanup.
        """
        options = parseOptions(SectionReader("test.ini", f"endpoint:{name}",
                                             {"port": str(MQTT_PORT), "reconnect-min": "0.2"}))
        connector = MqttConnector(name, options, globalReactor)
        connector.startService()
        self.addCleanup(connector.stopService)
        return connector

    @inlineCallbacks
    def test_oneDeliveryPerGroup(self) -> Any:
        """
        Two nodes subscribed in one share group get each message once
        between them (both get some); a subscriber outside the group gets
        every message.
        """
        topic = f"evgate-test/{uuid.uuid4().hex[:12]}/jobs"
        nodes = [self.connector("node1"), self.connector("node2")]
        grouped = [CollectingSink(), CollectingSink()]
        everything = CollectingSink()
        subscriptions = [node.subscribe(topic, "latest", sink, group="workers")
                         for node, sink in zip(nodes, grouped, strict=True)]
        subscriptions.append(nodes[0].subscribe(topic, "latest", everything))
        for subscription in subscriptions:
            self.addCleanup(subscription.close)
        for sink in grouped + [everything]:
            yield sink.whenStarted
        payloads = [f"job-{n}" for n in range(10)]
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("mosquitto_pub") or "mosquitto_pub",
            ["-V", "mqttv5", "-h", MQTT_HOST, "-p", str(MQTT_PORT), "-q", "1", "-t", topic, "-l"],
            env=os.environ, reactor=globalReactor, stdinBytes=("\n".join(payloads) + "\n").encode())
        self.assertEqual(code, 0, err)
        deadline = time.monotonic() + 15
        while (len(everything.contents) < 10 or sum(len(s.contents) for s in grouped) < 10) \
                and time.monotonic() < deadline:
            yield deferLater(globalReactor, 0.05, lambda: None)
        expected = [p.encode() for p in payloads]
        self.assertEqual(everything.contents, expected)
        first, second = (s.contents for s in grouped)
        self.assertEqual(sorted(first + second), sorted(expected))
        self.assertFalse(set(first) & set(second))
        self.assertTrue(first and second, (first, second))
        self.assertEqual([s.gaps for s in grouped + [everything]], [[], [], []])
