"""
Tests of evgate.pipeline: the step syntax, each step, the pipeline's
placement between the hub and an API's subscribers, the error marker in
every reader format, and CloudEvents checked with the official SDK.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from evgate.config import parseConfig
from evgate.errors import TransformRefused
from evgate.hub import Event, Hub
from evgate.ini import ConfigError
from evgate.interfaces import IDeliveryStep, IPreparingDeliveryStep, IPublishStep
from evgate.message import Cursor, Draft, Message, MessageError, envelope
from evgate.pipeline import NO_PIPELINE, Pipeline, StepError
from evgate.pipeline import cloudevents as ce
from evgate.pipeline.syntax import DELIVER, PUBLISH, parseStep, parseSteps
from evgate.security.consumer import Consumer
from evgate.service import GatewayService
from evgate.webhook.delivery import DeadLetters, Deliverer, DeliveryContext
from evgate.webhook.retry import RetryPolicy

from .test_websocket import WebSocketTestCase
from .wire import OP_TEXT, WireConnection


def message(content: bytes, headers: Tuple[Tuple[str, str], ...] = (), key: Optional[str] = None,
            offset: int = 0) -> Message:
    """
    A message read from topic C{t}.
    """
    return Message(content, key, headers, "t", 0, offset, 1700000000000)


class _Call:
    def __init__(self, claims: Dict[str, Any]) -> None:
        self.consumer = Consumer("someone", "jwt", claims)


def one(text: str, side: str = DELIVER) -> Any:
    """
    The step of one line.
    """
    return parseStep(text, 1, side)


class SyntaxTests(SynchronousTestCase):
    """
    The step syntax of publish-steps and deliver-steps.
    """

    def test_everyStepParses(self) -> None:
        """
        Every documented step parses into an object providing the
        interfaces of its side.
        """
        for text in ["content jmespath {id: id}", "header set x-a some value", "header remove x-a",
                     "header rename x-a x-b", "header copy content.a.b x-a", "key from content.id",
                     "key from header.x-id", "cloudevents to-binary", "cloudevents to-binary http",
                     "cloudevents to-structured", "cloudevents from-binary", "cloudevents from-structured",
                     "cloudevents make type=t source=/s"]:
            verifyObject(IDeliveryStep, one(text))
            verifyObject(IPublishStep, one(text, PUBLISH))
        verifyObject(IPublishStep, one("header copy claims.sub x-user", PUBLISH))
        verifyObject(IPublishStep, one("key from claims.sub", PUBLISH))

    def test_errorsNameFileSectionKeyAndLine(self) -> None:
        """
        A mistake is a ConfigError naming the file, section, key and the
        line of the step.
        """
        text = """
[endpoint:m]
type = memory
[api:a]
path = /a
endpoint = m
topic = t
entrypoints = http-get
deliver-steps =
    header set x-a b
    content jmespath {id: id
"""
        e = self.assertRaises(ConfigError, parseConfig, text, "gw.ini")
        self.assertEqual((e.path, e.section, e.key), ("gw.ini", "api:a", "deliver-steps"))
        self.assertIn("line 2", e.message)
        self.assertIn("JMESPath", e.message)

    def test_claimsOnPublishOnly(self) -> None:
        """
        Claims are only known on publish.
        """
        e = self.assertRaises(ConfigError, parseSteps, "header copy claims.sub x", DELIVER)
        self.assertIn("publish only", e.message)

    def test_mistakes(self) -> None:
        """
        Each kind of mistake is refused with a message.
        """
        for text in ["nothing", "header", "header set x", "header remove", "header remove a b",
                     "header rename a", "header copy a b", "header copy content.a", "key to content.a",
                     "key from a", "content", "content jq .a", "content jmespath", "cloudevents",
                     "cloudevents to-binary amqp", "cloudevents make type=t", "cloudevents make id=1",
                     "cloudevents to-structured x"]:
            self.assertRaises(ConfigError, parseSteps, text, PUBLISH)

    def test_blankAndComments(self) -> None:
        """
        Blank lines and comments are skipped, and count as lines.
        """
        steps = parseSteps("# first\n\nheader remove a\n", DELIVER)
        self.assertEqual([(s.text, s.line) for s in steps], [("header remove a", 3)])

    def test_webhookCloudEventsKey(self) -> None:
        """
        webhook.cloudevents takes binary or structured, on webhook APIs.
        """
        base = ("[gateway]\nstore = sqlite::memory:\n[endpoint:m]\ntype = memory\n[api:a]\npath = /a\n"
                "endpoint = m\ntopic = t\n")
        config = parseConfig(base + "entrypoints = webhook\nwebhook.cloudevents = binary\n")
        self.assertEqual(config.apis["a"].options["webhookCloudEvents"], "binary")
        self.assertRaises(ConfigError, parseConfig, base + "entrypoints = webhook\nwebhook.cloudevents = x\n")
        self.assertRaises(ConfigError, parseConfig, base + "entrypoints = sse\nwebhook.cloudevents = binary\n")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200), st.sampled_from([PUBLISH, DELIVER]))
    def test_onlyConfigErrorEscapes(self, text: str, side: str) -> None:
        """
        Whatever the text, parsing gives steps or a ConfigError.
        """
        try:
            parseSteps(text, side)
        except ConfigError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(["content", "header", "key", "cloudevents", "jmespath", "set", "remove",
                                     "rename", "copy", "from", "to-binary", "make", "content.a", "claims.b",
                                     "header.c", "type=x", "source=y", "{a: b}", "[", "`1`", "x-a"]),
                    max_size=6), st.sampled_from([PUBLISH, DELIVER]))
    def test_wordSoup(self, words: List[str], side: str) -> None:
        """
        Near-valid steps give steps or a ConfigError.
        """
        try:
            parseSteps(" ".join(words), side)
        except ConfigError:
            pass


class StepTests(SynchronousTestCase):
    """
    What each step does to a message and to a draft.
    """

    def test_headerSetRemoveRename(self) -> None:
        """
        set replaces every header of its name (any case), remove drops
        them, rename renames them in place.
        """
        m = message(b"{}", (("X-A", "1"), ("b", "2"), ("x-a", "3")))
        self.assertEqual(one("header set x-a new value").onDeliver(m).headers, (("b", "2"), ("x-a", "new value")))
        self.assertEqual(one("header remove X-a").onDeliver(m).headers, (("b", "2"),))
        self.assertEqual(one("header rename b c").onDeliver(m).headers, (("X-A", "1"), ("c", "2"), ("x-a", "3")))
        self.assertIs(one("header remove nope").onDeliver(m), m)

    def test_headerCopyFromContent(self) -> None:
        """
        A value of the content becomes a header: strings as they are,
        other values as JSON.
        """
        m = message(b'{"a": {"b": "x", "n": 3, "o": {"p": 1}}}')
        self.assertEqual(one("header copy content.a.b h").onDeliver(m).headers, (("h", "x"),))
        self.assertEqual(one("header copy content.a.n h").onDeliver(m).headers, (("h", "3"),))
        self.assertEqual(one("header copy content.a.o h").onDeliver(m).headers, (("h", '{"p":1}'),))

    def test_missingValue(self) -> None:
        """
        A path with nothing there fails with its JSON Pointer.
        """
        e = self.assertRaises(StepError, one("header copy content.a.b h").onDeliver, message(b'{"a": {}}'))
        self.assertEqual(e.pointer, "/a/b")
        e = self.assertRaises(StepError, one("key from content.id").onDeliver, message(b"not json"))
        self.assertIn("not JSON", e.detail)

    def test_claimsOnPublish(self) -> None:
        """
        A claim of the caller becomes a header or the key on publish.
        """
        draft = Draft(b"{}")
        call = _Call({"sub": "alice", "org": {"id": 7}})
        self.assertEqual(one("header copy claims.sub x-user", PUBLISH).onPublish(draft, call).headers,
                         (("x-user", "alice"),))
        self.assertEqual(one("key from claims.org.id", PUBLISH).onPublish(draft, call).key, "7")

    def test_publishRefusalNamesStepAndPointer(self) -> None:
        """
        On publish a failure is a 400 naming the step, its line and the
        JSON Pointer.
        """
        step = parseSteps("header remove a\nkey from content.order.id", PUBLISH)[1]
        e = self.assertRaises(TransformRefused, step.onPublish, Draft(b'{"order": {}}'), _Call({}))
        self.assertEqual(e.status, 400)
        self.assertEqual(e.extra, {"step": "key from content.order.id", "line": 2, "pointer": "/order/id"})

    def test_keyFrom(self) -> None:
        """
        The key comes from the content or a header.
        """
        m = message(b'{"orderId": 42}', (("x-id", "h"),))
        self.assertEqual(one("key from content.orderId").onDeliver(m).key, "42")
        self.assertEqual(one("key from header.X-ID").onDeliver(m).key, "h")

    def test_jmespath(self) -> None:
        """
        The content becomes the expression's value, as compact JSON.
        """
        m = message(b'{"id": 1, "total": 9.5, "secret": "s", "lines": [{"sku": "a"}, {"sku": "b"}]}')
        out = one("content jmespath {id: id, total: total, skus: lines[].sku}").onDeliver(m)
        self.assertEqual(json.loads(out.content), {"id": 1, "total": 9.5, "skus": ["a", "b"]})
        self.assertEqual(out.offset, m.offset)

    def test_jmespathBounded(self) -> None:
        """
        Content nested deeper than the limit is not parsed: the step fails.
        """
        deep = b"[" * 200 + b"]" * 200
        e = self.assertRaises(StepError, one("content jmespath @").onDeliver, message(deep))
        self.assertIn("deeper", e.detail)


class PipelineTests(SynchronousTestCase):
    """
    The pipeline object: order, marking, caching and publish.
    """

    def test_noStepsNoPipeline(self) -> None:
        """
        An API without steps has the shared empty pipeline, with no view
        for the hub: its reads and publishes pay nothing.
        """
        config = parseConfig("[endpoint:m]\ntype = memory\n[api:a]\npath = /a\nendpoint = m\ntopic = t\n"
                             "entrypoints = http-get\n")
        gateway = GatewayService(config, Clock())
        self.assertIs(gateway.apis[0].pipeline, NO_PIPELINE)
        self.assertIsNone(NO_PIPELINE.hubView)
        self.assertEqual(NO_PIPELINE.publishSteps, ())

    def test_failureMarks(self) -> None:
        """
        A failing step marks the message with its error; the content is as
        it was read (not half transformed).
        """
        pipeline = Pipeline((), parseSteps("header set a b\nkey from content.id", DELIVER))
        m = message(b'{"other": 1}')
        out = pipeline.deliver(m)
        self.assertEqual(out.content, m.content)
        self.assertEqual(out.headers, ())
        self.assertEqual(out.error, MessageError("transform-failed", "key from content.id", 2,
                                                 "the content has no value at id", "/id"))
        self.assertEqual(envelope(out)["error"]["pointer"], "/id")

    def test_unexpectedErrorsMark(self) -> None:
        """
        A step that fails in an unexpected way marks too (and is logged).
        """
        @implementer(IDeliveryStep)
        class Broken:
            text = "broken"
            line = 1

            def onDeliver(self, message: Message) -> Message:
                raise ZeroDivisionError("oops")

        out = Pipeline((), [Broken()]).deliver(message(b"x"))
        assert out.error is not None
        self.assertIn("ZeroDivisionError", out.error.detail)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_eventsCachedPerPipeline(self) -> None:
        """
        The derived event of a shared event is made once per pipeline and
        the same batch gets the same list back.
        """
        a = Pipeline((), parseSteps("header set v a", DELIVER))
        b = Pipeline((), parseSteps("header set v b", DELIVER))
        batch = [Event(message(b"1"), Cursor(0, ((0, 1),)))]
        first = a.events(batch)
        self.assertIs(a.events(batch), first)
        self.assertIs(a.events(list(batch))[0], first[0])
        self.assertEqual(first[0].message.headers, (("v", "a"),))
        self.assertEqual(b.events(batch)[0].message.headers, (("v", "b"),))
        self.assertIs(first[0].cursor, batch[0].cursor)

    def test_publishChain(self) -> None:
        """
        Publish steps run in order; a refusal fails the Deferred.
        """
        pipeline = Pipeline(parseSteps("key from content.id\nheader copy claims.sub u", PUBLISH), ())
        draft = self.successResultOf(pipeline.publish(Draft(b'{"id": "k"}'), _Call({"sub": "s"})))
        self.assertEqual((draft.key, draft.headers), ("k", (("u", "s"),)))
        self.failureResultOf(pipeline.publish(Draft(b"{}"), _Call({"sub": "s"})), TransformRefused)

    def test_publishManyNamesIndex(self) -> None:
        """
        A batch fails with the first refused record's index.
        """
        pipeline = Pipeline(parseSteps("key from content.id", PUBLISH), ())
        f = self.failureResultOf(pipeline.publishMany([Draft(b'{"id": 1}'), Draft(b"{}")], None))
        self.assertEqual(f.value.extra["index"], 1)


TWO_APIS = """
[gateway]
listen = tcp:0

[endpoint:local]
type = memory

[api:full]
path = /full
endpoint = local
topic = orders
entrypoints = http-post http-get sse websocket
heartbeat = 0

[api:public]
path = /public
endpoint = local
topic = orders
entrypoints = http-post http-get sse websocket
heartbeat = 0
deliver-steps =
    content jmespath {id: id, total: total}
    header remove x-internal
"""


class PlacementTests(WebSocketTestCase):
    """
    Two APIs over one memory topic, one with a mapping that hides a field:
    every reader of each shows its own view.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = GatewayService(parseConfig(TWO_APIS, "test.ini"), self.clock)
        self.connector = self.gateway.connectors["local"]

    def publish(self, *contents: bytes, key: Optional[str] = None,  # type: ignore[override]
                headers: Sequence[Tuple[str, str]] = (("x-internal", "1"),)) -> None:
        for content in contents:
            self.connector.publish("orders", Draft(content=content, key=key, headers=tuple(headers)))
        self.turn()

    def test_eachApiItsOwnView(self) -> None:
        """
        GET, SSE and WebSocket of the full API show the whole message; those
        of the public API the mapped one, without the internal header.
        """
        streams = {name: self.openStream(f"/{name}?format=json") for name in ("full", "public")}
        sockets = {name: self.openSocket(f"/{name}", json=True) for name in ("full", "public")}
        self.publish(b'{"id": 1, "total": 5, "secret": "s"}')
        full = {"id": 1, "total": 5, "secret": "s"}
        public = {"id": 1, "total": 5}
        for name, want in (("full", full), ("public", public)):
            sse = [json.loads(e["data"]) for e in self.messages(streams[name])]
            self.assertEqual([json.loads(e["content"]) for e in sse], [want])
            ws = [d for d in self.documents(sockets[name]) if "content" in d]
            self.assertEqual([json.loads(d["content"]) for d in ws], [want])
            self.assertEqual(("x-internal" in sse[0]["headers"]), name == "full")

    def test_getPage(self) -> None:
        """
        A long poll of each API gets its own view.
        """
        polls = {}
        for name in ("full", "public"):
            connection = WireConnection(self.gateway)
            connection.get(f"/{name}?timeout=5000", {"Accept": "application/json"})
            polls[name] = connection
        self.turn()
        self.publish(b'{"id": 2, "total": 7, "secret": "s"}')
        pages = {name: json.loads(self.response(c)[2]) for name, c in polls.items()}
        self.assertEqual(json.loads(pages["full"]["items"][0]["content"])["secret"], "s")
        self.assertEqual(json.loads(pages["public"]["items"][0]["content"]), {"id": 2, "total": 7})

    def test_subscribersShareEvents(self) -> None:
        """
        The unfiltered subscribers of one API get the very same Event
        object per message, distinct from the shared one other APIs get.
        """
        seen: Dict[str, List[List[Event]]] = {"public": [], "full": []}
        subs = []
        for name in ("public", "public", "full", "full"):
            api = self.gateway.api(name)
            assert api is not None

            class Recorder:
                def __init__(self, into: List[List[Event]]) -> None:
                    self.into = into

                def started(self, cursor: Cursor) -> None:
                    pass

                def deliver(self, events: List[Event]) -> None:
                    self.into.append(events)

                def advanced(self, cursor: Cursor) -> None:
                    pass

            subs.append(api.hub.subscribe("local", "orders", "latest", Recorder(seen[name]), None,
                                          api.pipeline.hubView))
        self.turn()
        self.publish(b'{"id": 3, "total": 1}')
        (p1,), (p2,) = seen["public"][0], seen["public"][1]
        (f1,), (f2,) = seen["full"][0], seen["full"][1]
        self.assertIs(p1, p2)
        self.assertIs(seen["public"][0], seen["public"][1])
        self.assertIs(f1, f2)
        self.assertIsNot(p1, f1)
        self.assertEqual(json.loads(p1.message.content), {"id": 3, "total": 1})

    def test_failureMarkedStreamGoesOn(self) -> None:
        """
        A message the mapping cannot read is delivered raw with its error
        on every reader, and the stream goes on with the next one.
        """
        text = self.openStream("/public")
        js = self.openStream("/public?format=json")
        raw = self.openSocket("/public")
        wsjson = self.openSocket("/public", json=True)
        self.publish(b"not json", b'{"id": 4, "total": 2}')
        events = self.messages(text)
        self.assertEqual([e.get("event") for e in events], ["message-error", "message"])
        marked = json.loads(events[0]["data"])
        self.assertEqual(marked["content"], "not json")
        self.assertEqual(marked["error"]["type"], "https://evgate.dev/problems/transform-failed")
        self.assertEqual(marked["error"]["step"], "content jmespath {id: id, total: total}")
        self.assertEqual(json.loads(events[1]["data"]), {"id": 4, "total": 2})
        docs = [json.loads(e["data"]) for e in self.messages(js)]
        self.assertIn("error", docs[0])
        self.assertNotIn("error", docs[1])
        frames = [payload for opcode, payload in self.frames(raw) if opcode == OP_TEXT]
        self.assertEqual(json.loads(frames[0])["error"]["line"], 1)
        self.assertEqual(json.loads(frames[1]), {"id": 4, "total": 2})
        wsdocs = [d for d in self.documents(wsjson) if "content" in d]
        self.assertEqual(["error" in d for d in wsdocs], [True, False])

    def test_filterSeesTransformedMessage(self) -> None:
        """
        Filters judge the message as the API shows it.
        """
        stream = self.openStream("/public?format=json&filter=" + "has(content.secret)")
        other = self.openStream("/public?format=json&filter=" + "content.total%20%3E%201")
        self.publish(b'{"id": 5, "total": 2, "secret": "s"}')
        self.assertEqual(self.messages(stream), [])
        self.assertEqual(len(self.messages(other)), 1)

    def test_groupPollMarks(self) -> None:
        """
        GET JSON items carry the error member.
        """
        from evgate.entrypoints.http_get import jsonItemText

        pipeline = self.gateway.api("public").pipeline  # type: ignore[union-attr]
        event = pipeline.events([Event(message(b"nope"), Cursor(0, ((0, 1),)))])[0]
        item = json.loads(jsonItemText(event, b"tag!"))
        self.assertEqual(item["content"], "nope")
        self.assertEqual(item["error"]["title"], "Transform failed")

    def test_publishSteps(self) -> None:
        """
        POST runs the API's publish steps: a refusal is a 400 and nothing
        is published.
        """
        config = TWO_APIS + "publish-steps =\n    key from content.id\n"
        self.gateway = GatewayService(parseConfig(config, "test.ini"), self.clock)
        self.connector = self.gateway.connectors["local"]
        connection = WireConnection(self.gateway)
        body = b'{"id": "k1"}'
        connection.send(b"POST /public HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.turn()
        self.assertEqual(self.response(connection)[0], 202)
        bad = WireConnection(self.gateway)
        bad.send(b"POST /public HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}")
        self.turn()
        status, _, answer, _ = self.response(bad)
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(answer)["type"], "https://evgate.dev/problems/transform-refused")
        self.assertEqual([m.key for m in self.connector.topicLog("orders").messages], ["k1"])


@implementer(IPreparingDeliveryStep)
class Slow:
    """
    A step that must fetch something before its first message.
    """

    text = "slow"
    line = 1

    def __init__(self) -> None:
        self.pending: Optional[Deferred] = Deferred()

    def prepare(self, message: Message) -> Optional[Deferred]:
        return self.pending

    def onDeliver(self, message: Message) -> Message:
        return message._replace(key="ready")


class PreparingTests(SynchronousTestCase):
    """
    A preparing step holds its API's batches, in order, until ready.
    """

    def test_heldInOrder(self) -> None:
        """
        Batches offered while the step prepares are delivered in order
        once it is ready.
        """
        from evgate.connectors.memory import MemoryConnector

        clock = Clock()
        connector = MemoryConnector("m", 100, clock)
        hub = Hub({"m": connector}, clock)
        step = Slow()
        pipeline = Pipeline((), [step])
        got: List[str] = []

        class Sink:
            def started(self, cursor: Cursor) -> None:
                pass

            def deliver(self, events: List[Event]) -> None:
                got.extend(f"{e.message.key}:{e.message.content.decode()}" for e in events)

            def advanced(self, cursor: Cursor) -> None:
                pass

        hub.subscribe("m", "t", "latest", Sink(), None, pipeline.hubView)
        clock.advance(0)
        for content in (b"1", b"2"):
            connector.publish("t", Draft(content))
            clock.advance(0)
        self.assertEqual(got, [])
        pending, step.pending = step.pending, None
        assert pending is not None
        pending.callback(None)
        self.assertEqual(got, ["ready:1", "ready:2"])


class WebhookMarkerTests(SynchronousTestCase):
    """
    A marked message goes to the dead letters with its reason.
    """

    def test_deadLettered(self) -> None:
        """
        The deliverer does not send a marked message: it publishes it, as
        read, to the dead letters with the reason and the step.
        """
        published: List[Tuple[str, Draft]] = []

        class Connector:
            def publish(self, topic: str, draft: Draft, timeout: float) -> Deferred:
                published.append((topic, draft))
                d: Deferred = Deferred()
                d.callback(None)
                return d

        class Http:
            def request(self, *a: Any, **kw: Any) -> Deferred:
                raise AssertionError("a marked message is not sent")

        class Store:
            def update(self, *a: Any, **kw: Any) -> Deferred:
                d: Deferred = Deferred()
                d.callback({})
                return d

        clock = Clock()
        context = DeliveryContext(reactor=clock, http=Http(), store=Store(), api="public", tag=b"tag!", epoch=0,
                                  timeout=5, maxInFlight=1, dlq=DeadLetters("m", "dead", Connector(), 5))
        deliverer = Deliverer({"id": "s1", "callbackUrl": "http://x/"}, b"k" * 32, RetryPolicy(), None, context)
        marked = message(b"raw", (("a", "1"),))._replace(
            error=MessageError("transform-failed", "content jmespath a", 1, "the content is not JSON"))
        deliverer.offer([Event(marked, Cursor(0, ((0, 1),)))])
        [(topic, draft)] = published
        self.assertEqual((topic, draft.content), ("dead", b"raw"))
        headers = dict(draft.headers)
        self.assertEqual(headers["evgate-dlq-reason"], "transform-failed")
        self.assertIn("content jmespath a", headers["evgate-dlq-error"])


class CloudEventsTests(SynchronousTestCase):
    """
    The CloudEvents steps, checked against the official SDK.
    """

    def sdkEvent(self) -> CloudEvent:
        return CloudEvent({"type": "com.example.order", "source": "/orders", "id": "e-1",
                           "subject": "o-7", "datacontenttype": "application/json"}, {"id": 7, "total": 3})

    def test_structuredFromSdkToKafkaBinary(self) -> None:
        """
        A structured event made by the SDK becomes binary mode with ce_
        headers (Kafka binding), the data as content.
        """
        headers, body = to_structured(self.sdkEvent())
        draft = Draft(body, None, tuple((k.lower(), v) for k, v in headers.items()))
        out = one("cloudevents to-binary kafka", PUBLISH).onPublish(draft, _Call({}))
        h = dict(out.headers)
        self.assertEqual((h["ce_id"], h["ce_type"], h["ce_source"], h["ce_specversion"], h["ce_subject"]),
                         ("e-1", "com.example.order", "/orders", "1.0", "o-7"))
        self.assertEqual(h["content-type"], "application/json")
        self.assertEqual(json.loads(out.content), {"id": 7, "total": 3})

    def test_httpBinaryFromSdk(self) -> None:
        """
        A binary-mode HTTP request made by the SDK (ce- headers) becomes
        Kafka binary mode and, structured, is read back by the SDK.
        """
        headers, body = to_binary(self.sdkEvent())
        draft = Draft(body, None, tuple((k.lower(), v) for k, v in headers.items()))
        kafka = one("cloudevents to-binary", PUBLISH).onPublish(draft, _Call({}))
        self.assertEqual(dict(kafka.headers)["ce_id"], "e-1")
        structured = one("cloudevents to-structured").onDeliver(message(kafka.content, kafka.headers))
        event = from_http(dict(structured.headers), structured.content)
        self.assertEqual((event["id"], event["type"], event["subject"]), ("e-1", "com.example.order", "o-7"))
        self.assertEqual(event.data, {"id": 7, "total": 3})

    def test_webhookModesReadBySdk(self) -> None:
        """
        What a webhook sends in either mode is an event the SDK reads.
        """
        stored = message(b'{"id": 7}', (("ce_id", "e-2"), ("ce_source", "/s"), ("ce_type", "t"),
                                        ("ce_specversion", "1.0"), ("content-type", "application/json")))
        binary = ce.webhookCloudEvent(stored, "binary")
        event = from_http(dict(binary.headers), binary.content)
        self.assertEqual((event["id"], event.data), ("e-2", {"id": 7}))
        structured = ce.webhookCloudEvent(stored, "structured")
        event = from_http(dict(structured.headers), structured.content)
        self.assertEqual((event["source"], event.data), ("/s", {"id": 7}))

    def test_mqttBinding(self) -> None:
        """
        With the MQTT binding, attributes are user properties named as
        they are.
        """
        headers, body = to_structured(self.sdkEvent())
        draft = Draft(body, None, tuple((k.lower(), v) for k, v in headers.items()))
        out = one("cloudevents to-binary mqtt", PUBLISH).onPublish(draft, _Call({}))
        self.assertEqual(dict(out.headers)["id"], "e-1")
        back = parseStep("cloudevents to-structured", 1, DELIVER, binding="mqtt").onDeliver(
            message(out.content, out.headers))
        self.assertEqual(from_http(dict(back.headers), back.content)["id"], "e-1")

    def test_make(self) -> None:
        """
        make turns a plain message into an event the SDK reads; an event
        goes through unchanged.
        """
        step = one("cloudevents make type=com.example.t source=/x")
        out = step.onDeliver(message(b'{"a": 1}', (("content-type", "application/json"),), offset=9))
        structured = one("cloudevents to-structured").onDeliver(out)
        event = from_http(dict(structured.headers), structured.content)
        self.assertEqual((event["id"], event["type"], event.data), ("t-0-9", "com.example.t", {"a": 1}))
        self.assertIs(step.onDeliver(out), out)

    def test_notAnEvent(self) -> None:
        """
        A message that is no CloudEvent fails the step (marked on
        delivery, refused on publish).
        """
        self.assertRaises(StepError, one("cloudevents to-structured").onDeliver, message(b"x"))
        bad = Draft(b'{"specversion": "1.0", "id": "1", "source": "/s"}', None,
                    (("content-type", ce.STRUCTURED_TYPE),))
        e = self.assertRaises(TransformRefused, one("cloudevents to-binary", PUBLISH).onPublish, bad, _Call({}))
        self.assertEqual(e.extra["pointer"], "/type")


class PreparingGapTests(SynchronousTestCase):
    """
    A gap notice that arrives while batches are held waits behind them.
    """

    def test_gapBehindHeld(self) -> None:
        """
        The subscriber sees the held batches first, then the gap.
        """
        from evgate.connectors.memory import MemoryConnector

        clock = Clock()
        connector = MemoryConnector("m", 100, clock)
        hub = Hub({"m": connector}, clock)
        step = Slow()
        pipeline = Pipeline((), [step])
        got: List[str] = []

        class Sink:
            def started(self, cursor: Cursor) -> None:
                pass

            def deliver(self, events: List[Event]) -> None:
                got.extend(e.message.content.decode() for e in events)

            def advanced(self, cursor: Cursor) -> None:
                pass

            def gap(self, cursor: Cursor, reason: str) -> None:
                got.append("gap:" + reason)

        subscription = hub.subscribe("m", "t", "latest", Sink(), None, pipeline.hubView)
        clock.advance(0)
        connector.publish("t", Draft(b"1"))
        clock.advance(0)
        subscription.stream.gap(Cursor(0, ((0, 5),)), "lost")
        self.assertEqual(got, [])
        pending, step.pending = step.pending, None
        assert pending is not None
        pending.callback(None)
        self.assertEqual(got, ["1", "gap:lost"])


class WebSocketPublishStepTests(WebSocketTestCase):
    """
    WebSocket publishes go through the API's publish steps.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_websocketPublishSteps(self) -> None:
        """
        An evgate.json frame is published with the step applied; a frame
        the step refuses is answered with the problem (step and pointer)
        and nothing is published.
        """
        config = TWO_APIS + "publish-steps =\n    key from content.id\n"
        self.gateway = GatewayService(parseConfig(config, "test.ini"), self.clock)
        self.connector = self.gateway.connectors["local"]
        socket = self.openSocket("/public", json=True)
        self.sendJson(socket, {"content": '{"id": "k1", "total": 1}', "ref": "a"})
        self.turn()
        self.sendJson(socket, {"content": '{"total": 2}', "ref": "b"})
        self.turn()
        answers = [d for d in self.documents(socket) if "ack" in d or "error" in d]
        self.assertEqual([a["ref"] for a in answers], ["a", "b"])
        self.assertIn("ack", answers[0])
        self.assertEqual(answers[1]["error"]["type"], "https://evgate.dev/problems/transform-refused")
        self.assertEqual((answers[1]["error"]["step"], answers[1]["error"]["pointer"]), ("key from content.id", "/id"))
        self.assertEqual([m.key for m in self.connector.topicLog("orders").messages], ["k1"])


class WebhookCloudEventsHeaderTests(SynchronousTestCase):
    """
    In binary CloudEvents mode the deliverer sends the attributes as
    C{ce-*} HTTP headers.
    """

    def test_binaryHeaders(self) -> None:
        """
        A record with the Kafka binding's C{ce_*} headers is posted with
        C{ce-id}, C{ce-source}, C{ce-type}, C{ce-specversion}, its
        content type, and the data as the body.
        """
        sent: List[Tuple[bytes, Any]] = []

        class Http:
            def request(self, method: str, url: str, data: bytes, headers: Any, **kw: Any) -> Deferred:
                sent.append((data, headers))
                return Deferred()

        clock = Clock()
        context = DeliveryContext(reactor=clock, http=Http(), store=None, api="public", tag=b"tag!", epoch=0,
                                  timeout=5, maxInFlight=1, dlq=None, cloudEvents="binary")
        deliverer = Deliverer({"id": "s1", "callbackUrl": "http://x/"}, b"k" * 32, RetryPolicy(), None, context)
        stored = message(b'{"id": 7}', (("ce_id", "e-2"), ("ce_source", "/s"), ("ce_type", "t"),
                                        ("ce_specversion", "1.0"), ("content-type", "application/json")))
        deliverer.window.queue.append(Event(stored, Cursor(0, ((0, 1),))))
        [attempt] = deliverer.window.take()
        deliverer._send(attempt)
        [(body, headers)] = sent
        self.assertEqual(body, b'{"id": 7}')
        self.assertEqual({name: headers.getRawHeaders(name) for name in
                          (b"ce-id", b"ce-source", b"ce-type", b"ce-specversion", b"content-type")},
                         {b"ce-id": [b"e-2"], b"ce-source": [b"/s"], b"ce-type": [b"t"],
                          b"ce-specversion": [b"1.0"], b"content-type": [b"application/json"]})
