"""
Property-based tests of every parser of outside input: whatever bytes or
text a client, a broker or an operator sends, each parser either accepts
it or raises its one documented error; nothing else escapes (no
KeyError, no RecursionError, no TypeError from an unexpected shape).

The profile is deterministic (derandomized, no example database), so CI
runs the same examples every time.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from evgate import jsonlimits
from evgate.config import ConfigError, parseConfig
from evgate.entrypoints.http_post import envelopeRecords, messageHeaders, ndjsonRecords
from evgate.entrypoints.websocket import FrameTooBig, parseJsonFrame
from evgate.errors import BadRequest
from evgate.filters import FilterSyntaxError, compileFilter
from evgate.message import Cursor, CursorError, Message, cursorsAfter, cursorTag
from evgate.webhook.delivery import checkStaticHeaders
from evgate.webhook.ssrf import BadCallback, parseCallbackUrl

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

TAG = cursorTag("demo", "demo")

# The characters of an HTTP header name (RFC 9110 token).
_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Any JSON value, nesting included.
jsonValues = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)

# Text that looks like JSON often enough to get past the first character.
jsonishText = st.one_of(
    st.text(),
    jsonValues.map(json.dumps),
    st.text(alphabet='[]{}",:0123456789abcdeftrulsn\\ ', max_size=200),
)


class JsonLimitsProperties(SynchronousTestCase):
    """
    evgate.jsonlimits.loads agrees with json.loads within its limits.
    """

    @given(jsonValues)
    def test_roundTrip(self, value: Any) -> None:
        """
        A document within the limits parses to what json.loads gives.
        """
        text = json.dumps(value)
        self.assertEqual(jsonlimits.loads(text), json.loads(text))
        self.assertEqual(jsonlimits.loads(text.encode("utf-8")), json.loads(text))

    @given(jsonishText)
    def test_onlyValueError(self, text: str) -> None:
        """
        Any text parses or raises a ValueError (never RecursionError).
        """
        for data in (text, text.encode("utf-8", "surrogatepass")):
            try:
                jsonlimits.loads(data)
            except ValueError:
                pass

    @given(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=100), jsonValues)
    def test_depth(self, depth: int, limit: int, inner: Any) -> None:
        """
        A document nested deeper than the limit is JsonTooDeep; one within
        it parses; the depth is measured like the parser nests.
        """
        text = "[" * depth + json.dumps(inner) + "]" * depth
        expected = jsonlimits.depthOf(text)
        if expected > limit:
            self.assertRaises(jsonlimits.JsonTooDeep, jsonlimits.loads, text, maxDepth=limit)
        else:
            self.assertEqual(jsonlimits.loads(text, maxDepth=limit), json.loads(text))
        self.assertGreaterEqual(expected, depth)

    @given(st.text(alphabet='[]{}"\\ab', max_size=60))
    def test_stringsDoNotNest(self, inside: str) -> None:
        """
        Brackets and escapes inside a string never count as nesting.
        """
        text = json.dumps([inside])
        self.assertEqual(jsonlimits.depthOf(text), 1)


class ParserProperties(SynchronousTestCase):
    """
    The parsers of client input raise only their documented errors.
    """

    @given(st.text(max_size=200))
    def test_cursor(self, token: str) -> None:
        """
        Any text is a cursor of this stream or a CursorError.
        """
        try:
            Cursor.decode(token, TAG)
        except CursorError:
            pass

    @given(st.integers(0, 2**40), st.dictionaries(st.integers(0, 2**20),
                                                  st.one_of(st.integers(0, 2**31), st.integers(0, 2**63 - 1)),
                                                  max_size=5))
    def test_cursorRoundTrip(self, epoch: int, offsets: dict) -> None:
        """
        Any cursor (offsets of every varint width, one partition or many)
        decodes from its token to itself.
        """
        cursor = Cursor.fromMapping(offsets, epoch)
        self.assertEqual(Cursor.decode(cursor.encode(TAG), TAG), cursor)

    @given(st.integers(0, 3), st.dictionaries(st.integers(0, 3), st.integers(0, 2**40), max_size=3),
           st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**40)), max_size=8))
    def test_cursorsAfter(self, epoch: int, start: dict, records: list) -> None:
        """
        The cursor after each message is the start moved past every
        message up to it, one partition or several.
        """
        messages = [Message(b"", None, (), "t", p, o, 0) for p, o in records]
        expected = dict(start)
        got = list(cursorsAfter(Cursor.fromMapping(start, epoch), messages))
        self.assertEqual([m for m, _ in got], messages)
        for (message, cursor) in got:
            expected[message.partition] = message.offset + 1
            self.assertEqual(cursor, Cursor.fromMapping(expected, epoch))

    @given(st.binary(max_size=64))
    def test_cursorBytes(self, raw: bytes) -> None:
        """
        Any bytes, base64url-encoded as a client could, decode or raise
        CursorError.
        """
        import base64

        try:
            Cursor.decode(base64.urlsafe_b64encode(raw).decode("ascii").rstrip("="), TAG)
        except CursorError:
            pass

    @given(st.text(max_size=120))
    def test_filter(self, text: str) -> None:
        """
        Any text compiles as a filter or raises FilterSyntaxError.
        """
        try:
            compileFilter(text)
        except FilterSyntaxError:
            pass

    @given(st.text(max_size=400))
    def test_ini(self, text: str) -> None:
        """
        Any text is a configuration or a ConfigError.
        """
        try:
            parseConfig(text, "fuzz.ini")
        except ConfigError:
            pass

    @given(st.dictionaries(st.sampled_from(["listen", "max-header-bytes", "request-head-timeout", "workers",
                                            "max-connections", "keep-alive-timeout", "admin"]),
                           st.text(max_size=20), max_size=4))
    def test_iniGatewayKeys(self, keys: dict) -> None:
        """
        Any values of [gateway] keys are read or refused with ConfigError.
        """
        lines = "\n".join(f"{k} = {v}" for k, v in keys.items() if "\n" not in v and "\r" not in v)
        text = f"[gateway]\n{lines}\n[endpoint:e]\ntype = memory\n"
        try:
            parseConfig(text, "fuzz.ini")
        except ConfigError:
            pass

    @given(st.one_of(st.binary(max_size=300), jsonishText.map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.builds(lambda records: json.dumps({"records": records}).encode(),
                               st.lists(st.dictionaries(st.sampled_from(["value", "key", "headers", "x"]),
                                                        jsonValues, max_size=4), max_size=4))))
    def test_batchDocument(self, body: bytes) -> None:
        """
        Any body is a batch of records or a BadRequest.
        """
        try:
            envelopeRecords(body)
        except BadRequest:
            pass

    @given(st.binary(max_size=300))
    def test_ndjson(self, body: bytes) -> None:
        """
        Any body splits into NDJSON records of bytes without raising.
        """
        for record in ndjsonRecords(body):
            self.assertIsInstance(record, bytes)
            self.assertTrue(record.strip())

    @given(st.one_of(st.binary(max_size=300), jsonishText.map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.dictionaries(st.sampled_from(["content", "key", "headers", "encoding", "ref", "x"]),
                                     jsonValues, max_size=5).map(lambda d: json.dumps(d).encode())))
    def test_websocketFrame(self, payload: bytes) -> None:
        """
        Any evgate.json frame is a message, a BadRequest or FrameTooBig.
        """
        try:
            parseJsonFrame(payload, 100)
        except (BadRequest, FrameTooBig):
            pass

    @given(st.lists(st.tuples(st.text(alphabet=_TOKEN, max_size=20).map(str.encode),
                              st.binary(max_size=30).map(lambda v: v.translate(None, b"\r\n\x00"))),
                    max_size=6))
    def test_messageHeaders(self, raw: list) -> None:
        """
        Any request headers the channel lets through (token names, values
        of any bytes but CR, LF and NUL) become message headers of text,
        or a BadRequest.
        """
        request = _HeaderRequest()
        for name, value in raw:
            request.requestHeaders.addRawHeader(b"X-Message-Header-" + name, value)
        try:
            headers = messageHeaders(request, b"X-Message-Header-")  # type: ignore[arg-type]
        except BadRequest:
            return
        for name, value in headers:
            self.assertIsInstance(name, str)
            self.assertIsInstance(value, str)

    @given(jsonValues)
    def test_subscriptionHeaders(self, value: Any) -> None:
        """
        Any JSON as a subscription's headers is checked or a ValueError.
        """
        try:
            checkStaticHeaders(value)
        except ValueError:
            pass

    @given(st.one_of(jsonValues, st.text(max_size=80).map(lambda t: "https://" + t)))
    def test_callbackUrl(self, value: Any) -> None:
        """
        Any JSON as a subscription's callbackUrl is a URL or BadCallback.
        """
        try:
            parseCallbackUrl(value, False)
        except BadCallback:
            pass


class _HeaderRequest:
    """
    Just enough of a request for messageHeaders.
    """

    def __init__(self) -> None:
        self.requestHeaders = Headers()

    def getHeader(self, name: bytes) -> Any:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None
