"""
HTTP POST: one request publishes one message, or a batch of them.

The body is the content; the key comes from the C{key} query parameter or
the key header; each C{X-Message-Header-<name>} request header becomes the
message header C{<name>} and the request's Content-Type the header
C{content-type}.  No other request header reaches the message, credentials
least of all.  The answer, C{202} with the position, is sent only after the
endpoint acknowledged.

A body of one of the L{BATCH_TYPES} is a batch (docs/http.md): NDJSON
publishes each line as one message, sharing the request's key and headers;
the evgate batch document carries a value, key and headers per record.
The answer comes once every record has its acknowledgement and says, per
record, where it was stored or why it was not.
"""

from __future__ import annotations

import copy
import itertools
import json
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate import jsonlimits
from evgate.answers import clientLeft, finishWithFailure, finishWithProblem, writeProblem
from evgate.errors import BadRequest, Problem
from evgate.gateway import ApiCall, answerJSON, queryArgs
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IEntrypoint
from evgate.message import Draft, Position, headerPairs
from evgate.metrics import tallyFor
from evgate.security.limits import chargeMore

_MAX_KEY = 4096


NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-seq")
ENVELOPE_TYPE = "application/vnd.evgate.batch+json"
BATCH_TYPES = NDJSON_TYPES + (ENVELOPE_TYPE,)
DEFAULT_BATCH_RECORDS = 10000
_JSON_HEADER = ("content-type", "application/json")
_content = operator.itemgetter(0)  # a Draft's content


@apiOptionParser
def parseBatchOption(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{batch-max-records} key: the most records one batch POST may
    carry; C{0} turns batches off (every body is then one message).
    """
    return {"batchMaxRecords": section.getInt("batch-max-records", DEFAULT_BATCH_RECORDS, minimum=0,
                                              maximum=1000000)}


def mediaType(request: Request) -> str:
    """
    The media type of C{request}'s body, lower-cased, without parameters.
    """
    value = request.getHeader(b"content-type")
    if value is None:
        return ""
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def ndjsonRecords(content: bytes) -> List[bytes]:
    """
    The records of an NDJSON (or JSON Lines, or RFC 7464 JSON text
    sequence) body: its lines, without their line ends or a leading RS,
    blank lines skipped.  The lines are not parsed: each is published as
    it is.
    """
    lines = content.splitlines()
    if b"\x1e" in content:
        lines = [line.lstrip(b"\x1e") for line in lines]
    return [line for line in lines if line and not line.isspace()]


def envelopeRecords(content: bytes) -> List[Tuple[bytes, Optional[str], Tuple[Tuple[str, str], ...]]]:
    """
    The records of an C{application/vnd.evgate.batch+json} body:
    C{{"records": [{"value": <JSON>, "key": <string>, "headers": {<name>: <string or array of strings>}}]}}.
    Each value is published as its compact JSON text.

    @raise BadRequest: naming the first record that is not valid.
    """
    try:
        document = jsonlimits.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the batch is not valid JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("records"), list):
        raise BadRequest('a batch document is an object with a "records" array')
    records = []
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    for index, record in enumerate(document["records"]):
        where = f"records[{index}]"
        if not isinstance(record, dict) or "value" not in record:
            raise BadRequest(f'{where} is not an object with a "value"')
        unknown = set(record) - {"value", "key", "headers"}
        if unknown:
            raise BadRequest(f"{where} has unknown members: {', '.join(sorted(unknown))}")
        key = record.get("key")
        if key is not None and not isinstance(key, str):
            raise BadRequest(f"{where}.key is not a string")
        if key is not None and len(key.encode("utf-8")) > _MAX_KEY:
            raise BadRequest(f"{where}.key is longer than {_MAX_KEY} bytes")
        try:
            # A name repeats as an array of its values, as readers see it.
            headers = headerPairs(record.get("headers"), f"{where}.headers")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        try:
            value = dumps(record["value"]).encode("utf-8")
        except ValueError as e:
            raise BadRequest(f"{where}.value cannot be published as JSON: {e}") from None
        records.append((value, key, tuple((n.lower(), v) for n, v in headers) + (_JSON_HEADER,)))
    return records


def messageHeaders(request: Request, prefix: bytes, kept: Tuple[bytes, ...] = ()) -> Tuple[Tuple[str, str], ...]:
    """
    The message headers carried by C{request}: the prefixed request headers,
    without their prefix and lower-cased, the headers whose names start
    with one of C{kept} (lower-cased, whole: CloudEvents' C{ce-} headers
    for an API whose publish steps read them), and the Content-Type.

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
        elif kept and lname.startswith(kept):
            for value in values:
                try:
                    headers.append((lname.decode("ascii"), value.decode("utf-8")))
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
        settings = api.node.settings
        self.prefix = settings.headerPrefix.encode("ascii")
        self.keyHeader = settings.keyHeader.encode("ascii")
        self.timeout = settings.publishTimeout
        self.tally = tallyFor(api, self.name)

    def stop(self) -> None:
        """
        Nothing to end: a request in progress finishes on its own.
        """

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
                     headers=messageHeaders(request, self.prefix, self.api.pipeline.requestHeaders))

    def drafts(self, request: Request, kind: str) -> List[Draft]:
        """
        The messages of the batch C{request}, whose body is of media type
        C{kind}.

        @raise BadRequest: if the batch is empty, too long, or not valid.
        """
        content = request.content.read() if request.content is not None else b""
        limit = self.api.config.options.get("batchMaxRecords", DEFAULT_BATCH_RECORDS)
        if kind == ENVELOPE_TYPE:
            drafts = [Draft(content=value, key=key, headers=headers)
                      for value, key, headers in envelopeRecords(content)]
        else:
            lines = ndjsonRecords(content)
            key = messageKey(request, self.keyHeader)
            headers = tuple(h for h in messageHeaders(request, self.prefix) if h[0] != "content-type")
            headers += (_JSON_HEADER,)
            # Made as the tuples they are, without a Python call per line.
            drafts = list(map(tuple.__new__, itertools.repeat(Draft), zip(lines, itertools.repeat(key),
                                                                         itertools.repeat(headers))))
        if not drafts:
            raise BadRequest("the batch holds no records")
        if len(drafts) > limit:
            raise BadRequest(f"the batch holds {len(drafts)} records; this API takes at most {limit} per request",
                             extra={"maxRecords": limit})
        return drafts

    def render(self, request: Request, call: ApiCall) -> Any:
        kind = mediaType(request)
        if kind in BATCH_TYPES and self.api.config.options.get("batchMaxRecords", DEFAULT_BATCH_RECORDS):
            return self.renderBatch(request, call, kind)
        try:
            draft = self.draft(request)
        except Problem as problem:
            return writeProblem(request, problem)
        api = call.api
        reactor = api.node.reactor
        started = reactor.seconds()
        # The connector owns the publish timeout (IConnector.publish): it
        # fails with EndpointTimeout, which finishWithFailure answers as 504.
        pipeline = api.pipeline
        if pipeline.publishSteps:
            # The API's publish steps (evgate.pipeline) first: a step that
            # refuses the message answers 400 and nothing is published.
            d: Deferred = pipeline.publish(draft, call)
            d.addCallback(lambda ready: api.connector.publish(api.config.topic, ready, self.timeout))
        else:
            d = api.connector.publish(api.config.topic, draft, self.timeout)
        d.addCallback(self._acknowledged, request, len(draft.content), started)
        d.addErrback(lambda f: finishWithFailure(request, f, "publishing"))
        return NOT_DONE_YET

    def _acknowledged(self, position: Position, request: Request, size: int, started: float) -> None:
        # Published whether or not the client is still there to hear it.
        self.tally.published(size, self.api.node.reactor.seconds() - started)
        if clientLeft(request):
            return
        answerJSON(request, 202, position.encoded())


    def renderBatch(self, request: Request, call: ApiCall, kind: str) -> Any:
        try:
            drafts = self.drafts(request, kind)
        except Problem as problem:
            return writeProblem(request, problem)
        # A batch counts one request per record against the rate limits and
        # quotas: the plan chain counted the first.
        admitted = maybeDeferred(chargeMore, call.api, request, call.consumer, len(drafts) - 1)
        admitted.addCallback(lambda _: self.publishBatch(request, call, drafts))
        admitted.addErrback(lambda f: finishWithFailure(request, f, "publishing a batch"))
        return NOT_DONE_YET

    def publishBatch(self, request: Request, call: ApiCall, drafts: List[Draft]) -> Deferred:
        api = call.api
        reactor = api.node.reactor
        started = reactor.seconds()
        pipeline = api.pipeline
        if pipeline.publishSteps:
            d = pipeline.publishMany(drafts, call)

            def publish(ready: List[Draft]) -> Deferred:
                published = api.connector.publishMany(api.config.topic, ready, self.timeout)
                return published.addCallback(self._batchAcknowledged, request, ready, started)

            return d.addCallback(publish)
        d = api.connector.publishMany(api.config.topic, drafts, self.timeout)
        return d.addCallback(self._batchAcknowledged, request, drafts, started)

    def _batchAcknowledged(self, results: Sequence[Any], request: Request, drafts: Sequence[Draft],
                           started: float) -> None:
        if all(map(isinstance, results, itertools.repeat(Position))):
            self.tally.publishedMany(len(results), sum(map(len, map(_content, drafts))),
                                     self.api.node.reactor.seconds() - started)
            if clientLeft(request):
                return
            answerJSON(request, 202, b'{"published":%d,"positions":[%s]}' % (len(results), positionsJSON(results)))
            return
        positions: List[Optional[Dict[str, Any]]] = []
        failed: List[Dict[str, Any]] = []
        first: Optional[Problem] = None
        size = 0
        for index, result in enumerate(results):
            if isinstance(result, Position):
                positions.append(result.asJSON())
                size += len(drafts[index].content)
            else:
                positions.append(None)
                if first is None:
                    first = result if isinstance(result, Problem) else Problem(str(result))
                failed.append({"index": index, "status": getattr(result, "status", 500),
                               "detail": getattr(result, "detail", str(result))})
        published = len(results) - len(failed)
        if published:
            self.tally.publishedMany(published, size, self.api.node.reactor.seconds() - started)
        if clientLeft(request) or first is None:
            return
        # At least one record failed: the status is the first failure's, and
        # the document says which records to send again.
        problem = copy.copy(first)
        problem.detail = (f"{len(failed)} of {len(results)} records were not published; "
                          f"the first failure: {first.detail}")
        problem.extra = dict(first.extra, published=published, failed=failed, positions=positions)
        finishWithProblem(request, problem)


def positionsJSON(positions: Sequence[Position]) -> bytes:
    """
    The JSON array members of C{positions} (as L{Position.asJSON} gives
    each), written directly: a batch's answer lists thousands, and the
    generic encoder took a tenth of the batch's time.
    """
    encoded: Dict[str, bytes] = {}
    parts = []
    for topic, partition, offset in positions:
        name = encoded.get(topic)
        if name is None:
            name = encoded[topic] = json.dumps(topic).encode("utf-8")
        parts.append(b'{"topic":%s,"partition":%d,"offset":%d}' % (name, partition, offset))
    return b",".join(parts)

