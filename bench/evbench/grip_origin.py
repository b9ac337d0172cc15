"""
The origin behind Pushpin in the fan-out scenario: it answers every GET
with a GRIP hold (C{Grip-Hold: stream}, C{Grip-Channel: <channel>}), so
that Pushpin keeps the client's SSE stream open and delivers what is
published to the channel through its publish API.

Run: C{python -m evbench.grip_origin PORT CHANNEL}.
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Request, Site  # noqa: E402


class HoldResource(Resource):
    """
    Every GET becomes a held stream on one channel.
    """

    isLeaf = True

    def __init__(self, channel: bytes) -> None:
        super().__init__()
        self.channel = channel

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Grip-Hold", b"stream")
        request.setHeader(b"Grip-Channel", self.channel)
        return b": ok\n\n"


class QuietSite(Site):
    def log(self, request: Request) -> None:
        pass


def main() -> None:
    reactor.listenTCP(int(sys.argv[1]), QuietSite(HoldResource(sys.argv[2].encode())), backlog=4096,
                      interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
