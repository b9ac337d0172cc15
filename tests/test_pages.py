"""
Property-based tests of the JSON pages of a GET (L{evgate.entrypoints.
pages}): the text written directly is, item by item, what the generic
encoder writes for the same members, whatever the messages hold.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from evgate.entrypoints.pages import jsonItemText, renderPage
from evgate.hub import Event
from evgate.message import Cursor, Message, cursorTag

from . import test_properties  # noqa: F401  (the deterministic hypothesis profile)

TAG = cursorTag("pages", "pages")

_texts = st.text(max_size=20)
_extra = st.dictionaries(st.sampled_from(["qos", "retain", "tombstone", "keyEncoding"]),
                         st.one_of(st.booleans(), st.integers(0, 2), _texts), max_size=2)
messages = st.builds(
    Message,
    content=st.one_of(st.binary(max_size=40), _texts.map(lambda t: t.encode("utf-8", "surrogatepass"))),
    key=st.one_of(st.none(), _texts),
    headers=st.lists(st.tuples(st.sampled_from(["a", "b", "c\u00e9"]), _texts), max_size=4).map(tuple),
    topic=st.sampled_from(["t", "orders", "t/\u00e9"]),
    partition=st.integers(0, 300),
    offset=st.integers(0, 2 ** 40),
    timestamp=st.integers(0, 2 ** 45),
    extra=_extra,
    error=st.none(),
    jsonContent=st.just(False),
)


def expectedItem(event: Event) -> Dict[str, Any]:
    """
    The members of C{event}'s item, as the generic encoder is given them.
    """
    message = event.message
    headers: Dict[str, Any] = {}
    for name, value in message.headers:
        have = headers.get(name)
        headers[name] = value if have is None else (have + [value] if isinstance(have, list) else [have, value])
    item: Dict[str, Any] = {"id": event.token(TAG), "key": message.key, "headers": headers}
    try:
        item["content"] = message.content.decode("utf-8")
        encoding = None
    except UnicodeDecodeError:
        item["content"] = base64.b64encode(message.content).decode("ascii")
        encoding = "base64"
    item["metadata"] = dict({"topic": message.topic, "partition": message.partition, "offset": message.offset,
                             "timestamp": message.timestamp}, **message.extra)
    if encoding is not None:
        item["encoding"] = encoding
    return item


def events(page: List[Message]) -> List[Event]:
    """
    Events of C{page}, each with the cursor after it.
    """
    return [Event(m, Cursor(0, ((m.partition, m.offset + 1),))) for m in page]


class PageProperties(SynchronousTestCase):
    """
    What a page says is what the generic encoder would have written.
    """

    @given(messages)
    def test_itemText(self, message: Message) -> None:
        """
        One item is exactly C{json.dumps} of its members, compact.
        """
        (event,) = events([message])
        self.assertEqual(jsonItemText(event, TAG), json.dumps(expectedItem(event), separators=(",", ":")))

    @given(st.lists(messages, max_size=6))
    def test_page(self, page: List[Message]) -> None:
        """
        A page of mixed messages (topics, encodings, metadata) is the
        items in order, each the same text as alone, and the pagination.
        """
        rendered = events(page)
        body = renderPage("application/json", rendered, TAG, "next", 1000, None)
        document = json.loads(body)
        self.assertEqual(document["items"], [expectedItem(e) for e in rendered])
        self.assertEqual(document["pagination"], {"nextCursor": "next", "limit": 1000})
        alone = [jsonItemText(e, TAG) for e in events(page)]
        self.assertEqual(body, ('{"items":[' + ",".join(alone) + '],"pagination":{"nextCursor":"next","limit":1000}}')
                         .encode("utf-8"))
