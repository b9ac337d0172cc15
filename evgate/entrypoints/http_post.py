"""
HTTP POST: one request publishes one message.

The body is the content; the key comes from the C{key} query parameter or
the key header; each C{X-Message-Header-<name>} request header becomes the
message header C{<name>} and the request's Content-Type the header
C{content-type}.  No other request header reaches the message, credentials
least of all.  The answer, C{202} with the position, is sent only after the
endpoint acknowledged.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate.errors import BadRequest, EndpointTimeout, Problem
from evgate.gateway import ApiCall, finishWithFailure, jsonBody, queryArgs, writeProblem
from evgate.interfaces import IEntrypoint
from evgate.message import Draft, Position
from evgate.metrics import tallyFor

_MAX_KEY = 4096


def messageHeaders(request: Request, prefix: bytes) -> Tuple[Tuple[str, str], ...]:
    """
    The message headers carried by C{request}: the prefixed request headers,
    without their prefix and lower-cased, and the Content-Type.

    @raise BadRequest: for a header that is not valid UTF-8 or has an empty
        name.
    """
    lowered = prefix.lower()
    headers: List[Tuple[str, str]] = []
    for name, values in request.requestHeaders.getAllRawHeaders():
        lname = name.lower()
        if lname.startswith(lowered):
            short = lname[len(lowered):]
            if not short:
                raise BadRequest(f"header {name.decode('latin-1')} names no message header")
            for value in values:
                try:
                    headers.append((short.decode("ascii"), value.decode("utf-8")))
                except UnicodeDecodeError:
                    raise BadRequest(f"header {name.decode('latin-1')} is not UTF-8") from None
    contentType = request.getHeader(b"content-type")
    if contentType is not None:
        headers.append(("content-type", contentType.decode("latin-1")))
    return tuple(headers)


def messageKey(request: Request, keyHeader: bytes) -> Any:
    """
    The message key of C{request}: the C{key} query parameter, else the key
    header, else L{None}.
    """
    raw = None
    values = queryArgs(request).get(b"key")
    if values:
        raw = values[0]
    else:
        raw = request.getHeader(keyHeader)
    if raw is None:
        return None
    if len(raw) > _MAX_KEY:
        raise BadRequest(f"the message key is longer than {_MAX_KEY} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the message key is not UTF-8") from None


@implementer(IEntrypoint)
class HttpPostEntrypoint:
    """
    C{http-post}: publish the request body.
    """

    name = "http-post"
    methods = (b"POST",)
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        gateway = api.gateway
        self.prefix = gateway.headerPrefix.encode("ascii")
        self.keyHeader = gateway.keyHeader.encode("ascii")
        self.timeout = gateway.publishTimeout
        self.tally = tallyFor(api, self.name)

    def accepts(self, request: Request) -> bool:
        return request.method == b"POST"

    def draft(self, request: Request) -> Draft:
        """
        The message C{request} asks to publish.

        @raise BadRequest: if the request is not a valid message.
        """
        content = request.content.read() if request.content is not None else b""
        if not content:
            raise BadRequest("the request body is empty: it is the message content")
        return Draft(content=content, key=messageKey(request, self.keyHeader),
                     headers=messageHeaders(request, self.prefix))

    def render(self, request: Request, call: ApiCall) -> Any:
        try:
            draft = self.draft(request)
        except Problem as problem:
            return writeProblem(request, problem)
        api = call.api
        reactor = api.gateway.reactor
        started = reactor.seconds()
        d = api.connector.publish(api.config.topic, draft, self.timeout)
        if not d.called:
            d.addTimeout(self.timeout, reactor, onTimeoutCancel=_timedOut(self.timeout))
        d.addCallback(self._acknowledged, request, len(draft.content), started)
        d.addErrback(lambda f: finishWithFailure(request, f, "publishing"))
        return NOT_DONE_YET

    def _acknowledged(self, position: Position, request: Request, size: int, started: float) -> None:
        # Published whether or not the client is still there to hear it.
        self.tally.published(size, self.api.gateway.reactor.seconds() - started)
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(jsonBody(request, 202, position.asJSON()))
        request.finish()


def _timedOut(seconds: float) -> Any:
    def onTimeout(result: Any, timeout: float) -> Any:
        raise EndpointTimeout(f"the endpoint did not acknowledge within {seconds:g} s; "
                              "the message may or may not have been stored")
    return onTimeout
