"""
evgate's log output: the access log's one line per request and per ended
stream, and JSON lines for log shippers.

C{[gateway]} keys:

 - C{access-log} (false): one line per request and per ended stream, with
   the API, entrypoint, status, duration, bytes in and out, messages and
   consumer.  It is a twisted.logger event whose fields carry those values
   (namespace C{evgate.access}), so with C{log-format = json} every field is
   a JSON key, not text to parse.  The data plane pays for it only when it
   is on: the line is built after the response is finished, from what the
   request already holds.
 - C{log-format} (C{text}): C{json} writes every log event (evgate's,
   Twisted's) as one JSON object per line on standard output instead of
   twistd's text lines; see L{JsonLinesObserver}.  It takes effect at
   start (changing it needs a restart).

How C{log-format = json} reaches twistd: twistd builds the service (which
reads the INI) before it starts logging, and uses a log observer that the
application offers as its C{ILogObserver} component unless C{--logger} was
given on the command line.  L{offerLogObserver} sets that component when
the service is added to the application, so C{twistd -n evgate -c
evgate.ini} logs JSON with no other option.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Dict, Mapping, Optional

from twisted.logger import ILogObserver, Logger, formatEvent
from zope.interface import implementer

from evgate.ini import SectionReader, gatewayKeys

LOG_FORMATS = ("text", "json")

# The access log's own namespace, for log shippers to pick its lines out
# (a module-level Logger: a class attribute would take the class's name).
accessLog = Logger(namespace="evgate.access")

# Status of a request whose client left before it was answered (nginx's
# convention): no response was sent.
CLIENT_GONE = 499


@gatewayKeys
def parseLogKeys(section: SectionReader) -> Mapping[str, Any]:
    """
    C{log-format}, as C{options["logFormat"]}.
    """
    return {"logFormat": section.getChoice("log-format", LOG_FORMATS, "text")}


class RequestLog:
    """
    The access log of one gateway node, and the request counts of its
    metrics: L{ended} is called once per request or stream.

    @ivar enabled: whether lines are written (C{access-log}); the counts
        are kept either way.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def requestEnded(self, request: Any, lost: bool = False) -> None:
        """
        A data-plane request was finished, or its connection was lost
        (C{lost}) before that: count it, and log it when enabled.
        """
        tally = getattr(request, "evgateTally", None)
        if tally is None:
            site = getattr(request, "site", None)
            metrics = getattr(site, "metrics", None)
            tally = metrics.unrouted() if metrics is not None else None
        status = request.code
        if lost and not request.startedWriting:
            status = CLIENT_GONE
        if tally is not None:
            tally.answered(status)
        if not self.enabled:
            return
        site = getattr(request, "site", None)
        reactor = getattr(site, "reactor", None)
        started = getattr(request, "evgateStarted", None)
        duration = reactor.seconds() - started if reactor is not None and started is not None else 0.0
        stream = getattr(request, "evgateStream", None)
        peer = request.getClientAddress()
        self.line(
            api=tally.api if tally is not None else "-",
            entrypoint=tally.entrypoint if tally is not None else "-",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            status=status,
            duration=duration,
            bytesIn=int(request.getHeader(b"content-length") or 0) if not stream else 0,
            bytesOut=request.sentLength,
            messages=stream.sent if stream is not None else getattr(request, "evgateMessages", None),
            consumer=getattr(request, "evgateConsumer", None) or "-",
            peer=getattr(peer, "host", "-"),
        )

    def streamEnded(self, tally: Any, subscriber: Any, status: int, duration: float, bytesOut: int,
                    method: str = "GET", peer: str = "-") -> None:
        """
        A stream that is not an HTTP response (a WebSocket) ended: count it
        with C{status} and log it when enabled.
        """
        tally.answered(status)
        if not self.enabled:
            return
        self.line(api=tally.api, entrypoint=tally.entrypoint, method=method, path=subscriber.api.config.path,
                  status=status, duration=duration, bytesIn=getattr(subscriber, "received", 0), bytesOut=bytesOut,
                  messages=subscriber.sent, consumer=subscriber.call.consumer.id, peer=peer)

    def line(self, **fields: Any) -> None:
        """
        Write one access line with C{fields}.

        The text is made here with one f-string and handed to the event as
        its only format field (C{_accessLine}, which the JSON observer
        leaves out, since its C{message} holds it): formatting the eleven
        fields through twisted.logger's format string took half of what
        an access line cost (about 40 of 80 µs), per request.
        """
        if fields.get("messages") is None:
            fields["messages"] = "-"
        text = (f"{fields['peer']} {fields['method']} {fields['path']} {fields['status']} api={fields['api']} "
                f"entrypoint={fields['entrypoint']} consumer={fields['consumer']} "
                f"duration={fields['duration']:.3f}s in={fields['bytesIn']} out={fields['bytesOut']} "
                f"messages={fields['messages']}")
        accessLog.info("{_accessLine}", _accessLine=text, **fields)


# What events of twisted.python.log carry besides their text: the text is
# in "message" already, the failure in "traceback".
_LEGACY_KEYS = frozenset({"format", "isError", "why", "failure", "time", "message"})


@implementer(ILogObserver)
class JsonLinesObserver:
    """
    Writes each log event as one JSON object on one line: C{time} (ISO
    8601, UTC), C{level}, C{namespace}, C{message} (the formatted text),
    C{traceback} for failures, and every field of the event that is not
    twisted.logger's own (C{log_*}) as a key of its own.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        record: Dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(dict(event)),
        }
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:  # a broken failure must not break logging
                record["traceback"] = repr(failure)
        for key, value in event.items():
            if key.startswith(("log_", "_")) or key in record or key in _LEGACY_KEYS:
                continue
            record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else _text(value)
        self.out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.out.flush()


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return repr(value)


def observerFor(options: Mapping[str, Any], out: Optional[IO[str]] = None) -> Optional[JsonLinesObserver]:
    """
    The log observer C{log-format} asks for, or L{None} for twistd's own
    text output.
    """
    if options.get("logFormat") == "json":
        return JsonLinesObserver(out if out is not None else sys.stdout)
    return None


def offerLogObserver(options: Mapping[str, Any], parent: Any) -> None:
    """
    Offer the observer of C{log-format} to twistd's application C{parent}
    (see the module docstring); nothing for C{text}, or when C{parent} is
    not an application.
    """
    observer = observerFor(options)
    if observer is not None and hasattr(parent, "setComponent"):
        parent.setComponent(ILogObserver, observer)
