"""
Tests for filter expressions (evgate.filters): compiling, evaluating over
messages and claims, the bounds on cost, and the work done once per
message.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from evgate import filters
from evgate.config import ConfigError
from evgate.errors import BadFilter
from evgate.filters import MAX_LENGTH, FilterSyntaxError, SubscriptionFilter, compileFilter, filterFor
from evgate.hub import Event
from evgate.message import Cursor, Draft, Message

from .helpers import memoryGateway

_offsets = iter(range(1_000_000))


def event(content: bytes = b"", key: Optional[str] = None, headers: Sequence[Tuple[str, str]] = (),
          extra: Optional[Dict[str, Any]] = None) -> Event:
    """
    A hub event for a message with these fields.
    """
    offset = next(_offsets)
    message = Message(content=content, key=key, headers=tuple(headers), topic="orders", partition=0,
                      offset=offset, timestamp=1700000000000, extra=extra or {})
    return Event(message, Cursor.fromMapping({0: offset + 1}))


def matches(expression: str, e: Event, claims: Optional[Dict[str, Any]] = None) -> bool:
    """
    Whether C{e} passes a client filter C{expression}.
    """
    return SubscriptionFilter(None, compileFilter(expression), claims or {})(e)


class CompileTests(SynchronousTestCase):
    """
    Expressions that cannot be filters are refused with their position.
    """

    def assertRefused(self, text: str, line: int, column: int, reason: str) -> None:
        with self.assertRaises(FilterSyntaxError) as caught:
            compileFilter(text)
        error = caught.exception
        self.assertEqual((error.line, error.column), (line, column), str(error))
        self.assertIn(reason, error.reason)

    def test_syntaxErrors(self) -> None:
        """
        Syntax errors name the line and column where the parser stopped.
        """
        self.assertRefused('key == "eu" &&', 1, 14, "ends too early")
        self.assertRefused('key == "eu"\n  && content.amount >> 100', 2, 22, "unexpected '>'")
        self.assertRefused("key == @", 1, 8, "unexpected character '@'")
        self.assertRefused("key = 1", 1, 5, "unexpected character '='")

    def test_unknownNames(self) -> None:
        """
        Names other than key, headers, content, metadata and claims, and
        unknown functions, are refused at compile time rather than failing
        on every message.
        """
        self.assertRefused("topic == 'a'", 1, 1, "unknown name 'topic'")
        self.assertRefused("key == 'a' || sneaky(1)", 1, 15, "unknown function 'sneaky'")

    def test_unboundedCost(self) -> None:
        """
        Functions whose cost grows with the data (comprehension macros and
        backtracking regular expressions) are refused.
        """
        self.assertRefused("content.items.exists(i, i.sku == 'a')", 1, 15, "exists() is not available")
        self.assertRefused("content.items.map(i, i * 2) == []", 1, 15, "map() is not available")
        self.assertRefused("content.text.matches('(a+)+$')", 1, 14, "matches() is not available")
        self.assertRefused("matches(key, 'a')", 1, 1, "matches() is not available")

    def test_bounds(self) -> None:
        """
        Expressions longer than MAX_LENGTH, nested too deeply, or with too
        many concatenations are refused.
        """
        with self.assertRaises(FilterSyntaxError) as caught:
            compileFilter("key == 'a' || " * 100 + "true")
        self.assertIn(f"longer than {MAX_LENGTH}", str(caught.exception))
        with self.assertRaises(FilterSyntaxError) as caught:
            compileFilter("(" * 60 + "true" + ")" * 60)
        self.assertIn("nested too deeply", str(caught.exception))
        with self.assertRaises(FilterSyntaxError) as caught:
            compileFilter(" + ".join(["content"] * 10) + " == ''")
        self.assertIn("'+' operators", str(caught.exception))

    def test_compiledOnce(self) -> None:
        """
        The same text compiles to the same program, shared by every
        subscription that uses it.
        """
        self.assertIs(compileFilter("key == 'once'"), compileFilter("key == 'once'"))

    def test_badFilterProblem(self) -> None:
        """
        A client's bad filter parameter is a BadFilter problem (400) with
        the line and column in the document.
        """
        request = DummyRequest([b""])
        request.args = {b"filter": [b"key ==\n"]}
        gateway = memoryGateway()
        call = _call(gateway)
        with self.assertRaises(BadFilter) as caught:
            filterFor(request, call)
        document = caught.exception.asJSON()
        self.assertEqual(document["status"], 400)
        self.assertEqual((document["line"], document["column"]), (1, 6))
        self.assertIn("line 1, column 6", document["detail"])

    def test_operatorFilterConfig(self) -> None:
        """
        A bad operator filter stops the configuration with the file,
        section, key and position.
        """
        with self.assertRaises(ConfigError) as caught:
            memoryGateway(extra="filter = key == \n")
        self.assertIn("test.ini [api:demo] filter: not a valid filter expression: line 1, column 6",
                      str(caught.exception))


def _call(gateway: Any, claims: Optional[Dict[str, Any]] = None) -> Any:
    from evgate.gateway import ApiCall, Consumer

    return ApiCall(gateway.apis[0], Consumer(id="c", plan="test", claims=claims or {}))


class EvaluateTests(SynchronousTestCase):
    """
    What an expression sees of a message.
    """

    def test_key(self) -> None:
        """
        key is the record key, null when there is none.
        """
        self.assertTrue(matches('key == "eu"', event(key="eu")))
        self.assertFalse(matches('key == "eu"', event(key="us")))
        self.assertTrue(matches("key == null", event()))

    def test_headers(self) -> None:
        """
        headers is a map of the message headers.
        """
        e = event(headers=[("tenant", "a"), ("kind", "order")])
        self.assertTrue(matches('headers.tenant == "a" && headers["kind"] == "order"', e))
        self.assertTrue(matches('"tenant" in headers && !has(headers.missing)', e))

    def test_jsonContent(self) -> None:
        """
        JSON content is an object to look into, with numbers compared as
        numbers.
        """
        e = event(b'{"amount": 150, "price": 9.5, "tags": ["x", "y"], "customer": {"country": "FR"}}',
                  key="eu")
        self.assertTrue(matches('key == "eu" && content.amount > 100', e))
        self.assertTrue(matches("content.price > 9", e))
        self.assertTrue(matches('"y" in content.tags && content.customer.country == "FR"', e))
        self.assertTrue(matches("size(content.tags) == 2", e))

    def test_textContent(self) -> None:
        """
        Content that is not JSON is its text.
        """
        e = event(b"hello world")
        self.assertTrue(matches('content.startsWith("hello") && content.contains("wor")', e))
        self.assertTrue(matches("size(content) == 11", e))

    def test_binaryContent(self) -> None:
        """
        Content that is not UTF-8 is bytes.
        """
        self.assertTrue(matches("size(content) == 2 && content == b'\\xff\\x00'", event(b"\xff\x00")))

    def test_metadata(self) -> None:
        """
        metadata holds the topic, partition, offset, timestamp and the
        endpoint's extras.
        """
        e = event(extra={"qos": 1})
        self.assertTrue(matches('metadata.topic == "orders" && metadata.partition == 0 '
                                '&& metadata.timestamp > 0 && metadata.qos == 1', e))

    def test_claims(self) -> None:
        """
        claims are the caller's, for rules such as one tenant per caller.
        """
        e = event(headers=[("tenant", "a")])
        self.assertTrue(matches("headers.tenant == claims.tenant", e, {"tenant": "a"}))
        self.assertFalse(matches("headers.tenant == claims.tenant", event(headers=[("tenant", "a")]),
                                 {"tenant": "b"}))

    def test_errorsDoNotMatch(self) -> None:
        """
        An evaluation error (missing header, field of a string, type
        mismatch) or a result that is not a boolean counts as no match and
        raises nothing.
        """
        self.assertFalse(matches('headers.tenant == "a"', event()))
        self.assertFalse(matches("content.amount > 100", event(b"plain text")))
        self.assertFalse(matches("content.amount > 100", event(b'{"amount": "lots"}')))
        self.assertFalse(matches("content.amount", event(b'{"amount": 1}')))
        self.assertFalse(matches("1 / content.zero == 1", event(b'{"zero": 0}')))

    def test_operatorThenClient(self) -> None:
        """
        A subscription filter passes a message only if both the operator's
        and the client's expressions do.
        """
        both = SubscriptionFilter(compileFilter('key == "eu"'), compileFilter("content.amount > 100"), {})
        self.assertTrue(both(event(b'{"amount": 150}', key="eu")))
        self.assertFalse(both(event(b'{"amount": 150}', key="us")))
        self.assertFalse(both(event(b'{"amount": 50}', key="eu")))


class OncePerMessageTests(SynchronousTestCase):
    """
    Work is done once per message, not once per subscriber.
    """

    def test_contentParsedOnce(self) -> None:
        """
        Content is parsed once per message however many subscriptions with
        different filters read it, and not at all when no filter reads it.
        """
        parsed = []
        original = filters._contentValue

        def counting(content: bytes) -> Any:
            parsed.append(content)
            return original(content)

        self.patch(filters, "_contentValue", counting)
        e = event(b'{"amount": 5}')
        for expression in ("content.amount > 1", "content.amount > 2", "content.amount > 3"):
            self.assertTrue(matches(expression, e))
        self.assertEqual(len(parsed), 1)
        self.assertTrue(matches('key == null', event(b'{"amount": 5}')))
        self.assertEqual(len(parsed), 1)

    def test_resultShared(self) -> None:
        """
        Subscriptions with the same expression share one evaluation per
        message; those whose expression reads claims share it only with
        equal claims.
        """
        evaluations = []
        program = compileFilter('headers.tenant == claims.tenant || key == "shared-result"')
        original = program.evaluate

        def counting(context: Any) -> Any:
            evaluations.append(context)
            return original(context)

        self.patch(program, "evaluate", counting)
        e = event(headers=[("tenant", "a")])
        verdicts = [SubscriptionFilter(None, program, {"tenant": tenant})(e)
                    for tenant in ("a", "a", "b", "a", "b")]
        self.assertEqual(verdicts, [True, True, False, True, False])
        self.assertEqual(len(evaluations), 2)


class HttpGetFilterTests(SynchronousTestCase):
    """
    The long-poll GET takes the same filter parameter.
    """

    def test_longPoll(self) -> None:
        """
        A long poll with a filter answers with the matching messages, and
        a poll that only finds dropped ones answers none with a nextCursor
        past them.
        """
        clock = Clock()
        gateway = memoryGateway(start="earliest", clock=clock)
        connector = gateway.connectors["local"]
        for key in ("us", "eu", "us"):
            connector.publish("demo", Draft(content=key.encode(), key=key))
        treq = StubTreq(gateway.resource)
        tag = gateway.apis[0].tag

        def poll(query: str) -> Any:
            d = treq.get("http://gateway.test/demo?timeout=0&filter=key%20%3D%3D%20%22eu%22" + query)
            for _ in range(5):
                clock.advance(0)
                treq.flush()
            response = self.successResultOf(d)
            return json.loads(self.successResultOf(response.content()))

        first = poll("")
        self.assertEqual([item["content"] for item in first["items"]], ["eu"])
        second = poll("&cursor=" + first["pagination"]["nextCursor"])
        self.assertEqual(second["items"], [])
        self.assertEqual(Cursor.decode(second["pagination"]["nextCursor"], tag).asDict(), {0: 3})
