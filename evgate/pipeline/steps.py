"""
The transform steps of headers, keys and content (docs/transforms.md).

Every class here is one kind of step and provides both
L{evgate.interfaces.IPublishStep} and L{evgate.interfaces.IDeliveryStep}
(except where a side makes no sense: claims exist on publish only).  A
step works on the named tuples L{evgate.message.Draft} and
L{evgate.message.Message} alike through C{_replace}, which both have.

On delivery a step raises L{evgate.pipeline.StepError} (the message is then
marked); on publish the same failure becomes a
L{evgate.errors.TransformRefused} (400) naming the step.

Content is parsed with L{evgate.jsonlimits.loads} (bounded depth and size)
once per message however many steps read it: the last parse is kept for
the same bytes object, which the steps of one message pass along.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Tuple, TypeVar

import jmespath
from jmespath.exceptions import JMESPathError
from zope.interface import implementer

from evgate.errors import TransformRefused
from evgate.interfaces import IDeliveryStep, IPublishStep
from evgate.jsonlimits import JsonLimitError, loads
from evgate.pipeline import StepError, checkStepClass

Record = TypeVar("Record", bound=Any)

# Content above this many bytes is not parsed by a step (the gateway's
# max-message-bytes is the default: see evgate.pipeline.syntax).
DEFAULT_MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64

_SIMPLE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class _ParsedContent:
    """
    The JSON value of the last content parsed, by the identity of its bytes
    (steps of one message pass the same bytes object along).
    """

    content: Optional[bytes] = None
    value: Any = None


_last = _ParsedContent()


def contentValue(content: bytes, maxBytes: int) -> Any:
    """
    The JSON value of C{content}, within limits.

    @raise StepError: if it is not JSON, or too deep or too large.
    """
    if content is _last.content:
        return _last.value
    try:
        value = loads(content, maxDepth=MAX_DEPTH, maxBytes=maxBytes)
    except JsonLimitError as e:
        raise StepError(f"the content cannot be transformed: {e}") from None
    except ValueError as e:
        raise StepError(f"the content is not JSON: {str(e)[:120]}") from None
    _last.content = content
    _last.value = value
    return value


def pointerOf(path: str) -> Optional[str]:
    """
    The JSON Pointer of a simple dotted path (C{a.b} -> C{/a/b}), else
    L{None}.
    """
    if not _SIMPLE_PATH.match(path):
        return None
    return "/" + "/".join(path.split("."))


def asHeaderText(value: Any) -> str:
    """
    A JSON value as a header value: strings as they are, anything else as
    compact JSON.
    """
    if isinstance(value, str):
        return value
    return str(_compact(value))


def refuse(step: Any, error: StepError) -> TransformRefused:
    """
    The publish-side form of a step's failure.
    """
    extra: dict = {"step": step.text, "line": step.line}
    if error.pointer is not None:
        extra["pointer"] = error.pointer
    return TransformRefused(f"step {step.text!r} (line {step.line}): {error.detail}", extra=extra)


class _Step:
    """
    What every step has: its text and line, and one function that applies
    to a Draft or a Message.
    """

    def __init__(self, text: str, line: int) -> None:
        self.text = text
        self.line = line

    def apply(self, record: Record, claims: Any) -> Record:
        raise NotImplementedError

    def onPublish(self, draft: Any, call: Any) -> Any:
        try:
            return self.apply(draft, call.consumer.claims if call is not None else {})
        except StepError as e:
            raise refuse(self, e) from None

    def onDeliver(self, message: Any) -> Any:
        return self.apply(message, None)


def _sameName(a: str, b: str) -> bool:
    return a.lower() == b.lower()


class ContentPath:
    """
    A value taken from the content: C{content.<JMESPath>} (a dotted path
    such as C{content.order.id} is the common case).
    """

    def __init__(self, path: str, maxBytes: int) -> None:
        self.path = path
        self.compiled = jmespath.compile(path)
        self.pointer = pointerOf(path)
        self.maxBytes = maxBytes

    def read(self, content: bytes) -> Any:
        """
        The value at the path.

        @raise StepError: if the content is not JSON or holds nothing
            there.
        """
        value = self.compiled.search(contentValue(content, self.maxBytes))
        if value is None:
            raise StepError(f"the content has no value at {self.path}", self.pointer or "")
        return value


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class HeaderSet(_Step):
    """
    C{header set NAME VALUE}: the header NAME is VALUE (replacing every
    header of that name, whatever its case).
    """

    def __init__(self, text: str, line: int, name: str, value: str) -> None:
        super().__init__(text, line)
        self.name = name
        self.value = value

    def apply(self, record: Record, claims: Any) -> Record:
        name = self.name
        headers = tuple(h for h in record.headers if not _sameName(h[0], name)) + ((name, self.value),)
        return record._replace(headers=headers)  # type: ignore[no-any-return]


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class HeaderRemove(_Step):
    """
    C{header remove NAME}: no header NAME (whatever its case).
    """

    def __init__(self, text: str, line: int, name: str) -> None:
        super().__init__(text, line)
        self.name = name

    def apply(self, record: Record, claims: Any) -> Record:
        name = self.name
        if not any(_sameName(h[0], name) for h in record.headers):
            return record
        return record._replace(  # type: ignore[no-any-return]
            headers=tuple(h for h in record.headers if not _sameName(h[0], name)))


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class HeaderRename(_Step):
    """
    C{header rename OLD NEW}: every header OLD is called NEW, in place.
    """

    def __init__(self, text: str, line: int, old: str, new: str) -> None:
        super().__init__(text, line)
        self.old = old
        self.new = new

    def apply(self, record: Record, claims: Any) -> Record:
        old, new = self.old, self.new
        if not any(_sameName(h[0], old) for h in record.headers):
            return record
        return record._replace(  # type: ignore[no-any-return]
            headers=tuple((new, v) if _sameName(n, old) else (n, v) for n, v in record.headers))


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class HeaderCopy(_Step):
    """
    C{header copy content.PATH NAME} / C{header copy claims.CLAIM NAME}
    (publish only): the header NAME is set to a value of the content or of
    the caller's claims.
    """

    def __init__(self, text: str, line: int, source: Callable[[Any, Any], Any], name: str) -> None:
        super().__init__(text, line)
        self.source = source
        self.name = name

    def apply(self, record: Record, claims: Any) -> Record:
        value = asHeaderText(self.source(record, claims))
        name = self.name
        headers = tuple(h for h in record.headers if not _sameName(h[0], name)) + ((name, value),)
        return record._replace(headers=headers)  # type: ignore[no-any-return]


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class KeyFrom(_Step):
    """
    C{key from content.PATH} / C{key from header.NAME} /
    C{key from claims.CLAIM} (publish only): the record key.
    """

    def __init__(self, text: str, line: int, source: Callable[[Any, Any], Any]) -> None:
        super().__init__(text, line)
        self.source = source

    def apply(self, record: Record, claims: Any) -> Record:
        return record._replace(key=asHeaderText(self.source(record, claims)))  # type: ignore[no-any-return]


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class ContentJmespath(_Step):
    """
    C{content jmespath EXPRESSION}: the content becomes the JSON value of
    the JMESPath EXPRESSION over it (compiled once, with the API).
    """

    def __init__(self, text: str, line: int, expression: str, maxBytes: int) -> None:
        super().__init__(text, line)
        self.expression = expression
        self.compiled = jmespath.compile(expression)
        self.maxBytes = maxBytes

    def apply(self, record: Record, claims: Any) -> Record:
        value = contentValue(record.content, self.maxBytes)
        try:
            result = self.compiled.search(value)
        except JMESPathError as e:
            raise StepError(f"the expression failed: {e}") from None
        return record._replace(content=_compact(result).encode("utf-8"))  # type: ignore[no-any-return]


def contentSource(path: str, maxBytes: int) -> Callable[[Any, Any], Any]:
    """
    A step's source C{content.PATH}.
    """
    reader = ContentPath(path, maxBytes)
    return lambda record, claims: reader.read(record.content)


def headerSource(name: str) -> Callable[[Any, Any], Any]:
    """
    A step's source C{header.NAME}: the last header of that name.
    """
    def read(record: Any, claims: Any) -> Any:
        for n, v in reversed(record.headers):
            if _sameName(n, name):
                return v
        raise StepError(f"the message has no header {name}")
    return read


def claimSource(path: str) -> Callable[[Any, Any], Any]:
    """
    A step's source C{claims.CLAIM} (a JMESPath over the caller's claims).
    """
    compiled = jmespath.compile(path)

    def read(record: Any, claims: Any) -> Any:
        if claims is None:
            raise StepError("claims exist on publish only")
        value = compiled.search(dict(claims))
        if value is None:
            raise StepError(f"the caller's credentials have no claim {path}")
        return value
    return read


__all__: Tuple[str, ...] = (
    "ContentJmespath", "HeaderCopy", "HeaderRemove", "HeaderRename", "HeaderSet", "KeyFrom",
    "contentSource", "headerSource", "claimSource",
)
