"""
The pages of a GET: one answer of a long poll (or of a group poll),
rendered in the negotiated media type (JSON, plain text or XML) and
written out.  Kept apart from the polling itself (L{evgate.entrypoints.
http_get}), which decides what a page holds.
"""

from __future__ import annotations

import base64
import json
import re
from typing import List, Optional
from xml.sax.saxutils import escape, quoteattr

from twisted.web.server import Request

from evgate.message import contentForJSON, headerText
from evgate.replay import Event

__all__ = ["jsonItemText", "renderPage", "writePage"]

# A CR in element text is a character reference: XML parsers turn a bare
# CR (and CR LF) into LF (XML 1.0, 2.11).
_XML_TEXT = {"\r": "&#13;"}

# Characters XML 1.0 cannot carry, even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_json = json.JSONEncoder(separators=(",", ":")).encode


def jsonItemText(event: Event, tag: bytes) -> str:
    """
    One item of a JSON page, as compact JSON text: C{id}, C{key},
    C{headers}, C{content}, C{metadata} (topic, partition, offset,
    timestamp and the endpoint's own) and C{encoding} when the content is
    base64.  Written directly: a page holds up to a thousand items, and
    building each as dictionaries for the generic encoder took twice as
    long.  The text is what C{json.dumps} gives for those members.
    """
    return _jsonItems([event], tag)[0]


def _jsonItems(events: List[Event], tag: bytes) -> List[str]:
    """
    The JSON text of each of C{events} (see L{jsonItemText}), in one loop
    over the page: what items share (the topic's part of the metadata)
    is encoded once per page.
    """
    cacheKey = ("json-item", tag)
    items: List[str] = []
    append = items.append
    lastTopic: Optional[str] = None
    topicPart = ""
    for event in events:
        frames = event.frames
        cached: Optional[str] = frames.get(cacheKey)
        if cached is not None:
            # Encoded once per message and API, for every page that holds it.
            append(cached)
            continue
        content, key, headers, topic, partition, offset, timestamp, extra, error, jsonContent = event.message
        if topic is not lastTopic:
            lastTopic = topic
            topicPart = ',"metadata":{"topic":' + _quote(topic) + ',"partition":'
        encoding = None
        if jsonContent:
            # Decoded by the API's codec (evgate.schemas): compact JSON
            # text, shown as the value it is.
            text = content.decode("utf-8")
        else:
            try:
                text = _quote(content.decode("utf-8"))
            except UnicodeDecodeError:
                raw, encoding = contentForJSON(content)
                text = _quote(raw)
        item = '{"id":"%s","key":%s,"headers":%s,"content":%s%s%d,"offset":%d,"timestamp":%d%s}%s%s}' % (
            event.token(tag),
            "null" if key is None else _quote(key),
            headerText(headers) if headers else "{}",
            text,
            topicPart, partition, offset, timestamp,
            "," + _json(dict(extra))[1:-1] if extra else "",
            ',"encoding":' + _quote(encoding) if encoding is not None else "",
            # A delivery step failed on it (evgate.pipeline): as read, marked.
            ',"error":' + _json(error.asJSON()) if error is not None else "",
        )
        frames[cacheKey] = item
        append(item)
    return items


def renderPage(media: str, events: List[Event], tag: bytes, nextCursor: str, limit: int,
               gap: Optional[str]) -> bytes:
    """
    The body of one page in the negotiated C{media} type.
    """
    if media == "application/json":
        tail: dict = {"pagination": {"nextCursor": nextCursor, "limit": limit}}
        if gap is not None:
            tail["gap"] = gap
        return ('{"items":[' + ",".join(_jsonItems(events, tag)) + "]," + _json(tail)[1:]).encode("utf-8")
    if media == "text/plain":
        return _textPage(events, tag, nextCursor, gap)
    return _xmlPage(events, tag, nextCursor, limit, gap)


def writePage(request: Request, media: str, body: bytes) -> None:
    """
    Answer C{request} with a rendered page (L{renderPage}) of type C{media}
    and finish it.  A page is never cached: the same URL reads on.
    """
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", (media + "; charset=utf-8").encode("ascii"))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


def _textPage(events: List[Event], tag: bytes, nextCursor: str, gap: Optional[str]) -> bytes:
    # A header block per message, then exactly content-length bytes of
    # content and a blank line: readable by eye, parseable by a program.
    out = [f"next-cursor: {nextCursor}\n".encode()]
    if gap is not None:
        out.append(f"gap: {gap}\n".encode())
    out.append(f"count: {len(events)}\n\n".encode())
    for event in events:
        m = event.message
        lines = [f"id: {event.token(tag)}"]
        if m.key is not None:
            lines.append(f"key: {_oneLine(m.key)}")
        for name, value in m.headers:
            lines.append(f"header: {name}: {_oneLine(value)}")
        lines.append(f"topic: {m.topic}")
        lines.append(f"partition: {m.partition}")
        lines.append(f"offset: {m.offset}")
        lines.append(f"timestamp: {m.timestamp}")
        if m.error is not None:
            lines.append(f"error: {_json(m.error.asJSON())}")
        lines.append(f"content-length: {len(m.content)}")
        out.append(("\n".join(lines) + "\n\n").encode("utf-8"))
        out.append(m.content)
        out.append(b"\n\n")
    return b"".join(out)


def _oneLine(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _xmlPage(events: List[Event], tag: bytes, nextCursor: str, limit: int, gap: Optional[str]) -> bytes:
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n',
           f"<messages nextCursor={quoteattr(nextCursor)} limit=\"{limit}\""]
    if gap is not None:
        out.append(f" gap={quoteattr(gap)}")
    out.append(">")
    for event in events:
        m = event.message
        out.append(f"<message id={quoteattr(event.token(tag))}")
        if m.key is not None and not _NOT_XML.search(m.key):
            out.append(f" key={quoteattr(m.key)}")
        out.append(">")
        for name, value in m.headers:
            if not _NOT_XML.search(value):
                out.append(f"<header name={quoteattr(name)}>{escape(value, _XML_TEXT)}</header>")
        try:
            text = m.content.decode("utf-8")
            if _NOT_XML.search(text):
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "not XML")
            out.append(f"<content>{escape(text, _XML_TEXT)}</content>")
        except UnicodeDecodeError:
            out.append(f"<content encoding=\"base64\">{base64.b64encode(m.content).decode()}</content>")
        out.append(f"<metadata topic={quoteattr(m.topic)} partition=\"{m.partition}\" "
                   f"offset=\"{m.offset}\" timestamp=\"{m.timestamp}\"/>")
        if m.error is not None:
            error = m.error.asJSON()
            out.append(f"<error type={quoteattr(error['type'])} step={quoteattr(m.error.step)}>"
                       f"{escape(m.error.detail, _XML_TEXT)}</error>")
        out.append("</message>")
    out.append("</messages>\n")
    return "".join(out).encode("utf-8")
