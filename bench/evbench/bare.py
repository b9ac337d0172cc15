"""
The ceiling of one Twisted process: a bare twisted.web site with nothing
of evgate in it.

 - C{POST /publish}: writes the body as one SSE event to every open stream
   (a plain loop of C{request.write}: no hub, no cursors, no queues) and
   answers 202;
 - any other C{POST}: answers 202 at once (the publish ceiling);
 - C{GET}: an SSE stream (C{text/event-stream}) that stays open.

Run: C{python -m evbench.bare PORT [noform]}.  Like evgate, it writes no
access log.
"""

from __future__ import annotations

import sys
from typing import Any, Set

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Request, Site  # noqa: E402


class BareResource(Resource):
    """
    Every path: streams on GET, publishing on POST.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.streams: Set[Request] = set()

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.write(b": ok\n\n")
        self.streams.add(request)
        request.notifyFinish().addBoth(lambda _: self.streams.discard(request))
        return NOT_DONE_YET

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        if request.path == b"/publish":
            frame = b"data: " + body + b"\n\n"
            for stream in self.streams:
                stream.write(frame)
        request.setResponseCode(202)
        request.setHeader(b"Content-Type", b"application/json")
        return b"{}"


class QuietSite(Site):
    """
    No access log, as evgate by default.
    """

    def log(self, request: Request) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    # "noform": twisted.web's own switch that skips parsing a POST body as
    # a form (an email.message parse of the Content-Type on every POST).
    site = QuietSite(BareResource(), parsePOSTFormSubmission="noform" not in sys.argv[2:])
    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
