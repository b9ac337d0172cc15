"""
Tests for L{evgate.message}: cursors and envelopes.
"""

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from evgate.message import (
    Cursor,
    CursorError,
    Message,
    Position,
    cursorsAfter,
    cursorTag,
    envelope,
    headerObject,
    headerPairs,
)

TAG = cursorTag("demo", "demo")


class CursorTests(SynchronousTestCase):
    """
    Cursors round-trip through their token and refuse anything else.
    """

    def test_roundTrip(self) -> None:
        """
        A decoded token equals the cursor it was made from, for one and for
        many partitions, large offsets and a non-zero epoch.
        """
        for cursor in [
            Cursor(0, ((0, 0),)),
            Cursor(7, ((0, 5), (1, 2**40), (17, 3))),
            Cursor(2**31 - 1, ()),
        ]:
            self.assertEqual(Cursor.decode(cursor.encode(TAG), TAG), cursor)

    def test_urlSafe(self) -> None:
        """
        Tokens use only URL-safe characters and no padding.
        """
        token = Cursor(5, tuple((p, 2**33 + p) for p in range(20))).encode(TAG)
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")

    def test_foreign(self) -> None:
        """
        A cursor made for another API or topic is refused.
        """
        token = Cursor(0, ((0, 1),)).encode(cursorTag("other", "demo"))
        error = self.assertRaises(CursorError, Cursor.decode, token, TAG)
        self.assertIn("another API", str(error))

    def test_malformed(self) -> None:
        """
        Garbage, truncation, trailing bytes, bad versions and empty tokens
        are refused with L{CursorError}.
        """
        good = Cursor(0, ((0, 1), (1, 300))).encode(TAG)
        for token in ["", "!!!!", "abc", good[:-2], good + "AA", "A" * 5000,
                      "Ag" + good[2:]]:
            self.assertRaises(CursorError, Cursor.decode, token, TAG)

    def test_advanceAndDominate(self) -> None:
        """
        L{Cursor.advance} moves one partition; L{Cursor.dominates} compares
        all; L{Cursor.merged} takes the maximum per partition.
        """
        a = Cursor(0, ((0, 5), (1, 5)))
        b = a.advance(1, 9)
        self.assertEqual(b.asDict(), {0: 5, 1: 9})
        self.assertTrue(b.dominates(a))
        self.assertFalse(a.dominates(b))
        c = Cursor(0, ((0, 7),))
        self.assertEqual(b.merged(c).asDict(), {0: 7, 1: 9})

    def test_cursorsAfter(self) -> None:
        """
        Each message is paired with the cursor right after it.
        """
        messages = [Message(b"x", None, (), "t", p, o, 0) for p, o in [(0, 3), (1, 8), (0, 4)]]
        cursors = [c.asDict() for _, c in cursorsAfter(Cursor(0, ((0, 3), (1, 8))), messages)]
        self.assertEqual(cursors, [{0: 4, 1: 8}, {0: 4, 1: 9}, {0: 5, 1: 9}])


class EnvelopeTests(SynchronousTestCase):
    """
    The JSON envelope carries text as text and anything else as base64.
    """

    def test_text(self) -> None:
        """
        UTF-8 content is carried as a string without an encoding field.
        """
        env = envelope(Message("héllo".encode(), "k", (("a", "b"),), "t", 0, 1, 2))
        self.assertEqual(env["content"], "héllo")
        self.assertNotIn("encoding", env)
        self.assertEqual(env["headers"], {"a": "b"})
        self.assertEqual(env["metadata"], {"topic": "t", "partition": 0, "offset": 1, "timestamp": 2})

    def test_binary(self) -> None:
        """
        Content that is not UTF-8 is base64 with C{"encoding": "base64"}.
        """
        env = envelope(Message(b"\xff\x00", None, (), "t", 0, 1, 2))
        self.assertEqual(env, {"key": None, "headers": {}, "content": "/wA=", "encoding": "base64",
                               "metadata": {"topic": "t", "partition": 0, "offset": 1, "timestamp": 2}})


class HeaderPairsTests(SynchronousTestCase):
    """
    L{headerPairs}: a publisher's JSON C{headers} member as message headers,
    the inverse of L{headerObject}.
    """

    def test_strings(self) -> None:
        """
        A name with a string is one header; no member (or null) is none.
        """
        self.assertEqual(headerPairs({"a": "1", "b": ""}), (("a", "1"), ("b", "")))
        self.assertEqual(headerPairs(None), ())
        self.assertEqual(headerPairs({}), ())

    def test_arrayRepeats(self) -> None:
        """
        A name with an array of strings is that name repeated, once per
        value, in the array's order.
        """
        self.assertEqual(headerPairs({"dup": ["1", "2", "1"], "one": "x"}),
                         (("dup", "1"), ("dup", "2"), ("dup", "1"), ("one", "x")))

    def test_roundTrip(self) -> None:
        """
        What a reader gets (L{headerObject}) published again gives the same
        values of every name, in their order.
        """
        headers = (("dup", "1"), ("dup", "2"), ("dup", "2"), ("one", "x"))
        self.assertEqual(headerPairs(headerObject(headers)), headers)

    def test_refused(self) -> None:
        """
        Anything but an object of names to strings or arrays of strings is
        refused with the place named; so is text that cannot be UTF-8 (a
        lone surrogate, which JSON can spell).
        """
        for bad in (["a"], "a", {"a": 1}, {"a": ["1", 2]}, {"a": [["1"]]}, {"": "x"},
                    {"a": "\ud800"}, {"a": ["\udfff"]}, {"\ud800": "x"}):
            with self.assertRaises(ValueError) as raised:
                headerPairs(bad, "records[3].headers")
            self.assertIn("records[3].headers", str(raised.exception))


class PositionTests(SynchronousTestCase):
    """
    L{Position.encoded} writes the same document as encoding
    L{Position.asJSON}, for any topic name.
    """

    @given(st.text(), st.integers(min_value=0, max_value=2**31), st.integers(min_value=0, max_value=2**63))
    def test_encodedIsAsJSON(self, topic: str, partition: int, offset: int) -> None:
        position = Position(topic, partition, offset)
        self.assertEqual(json.loads(position.encoded()), position.asJSON())
