"""
The webhook receiver of the webhook scenario: answers every C{POST} with
200 and counts, per path (one path per subscription), the messages it
received by their C{seq}: new ones, duplicates (at-least-once allows them;
they are reported), gaps, and per C{key} (when the body has one) messages
that came before an older one of their key (C{reordered}).  C{GET /stats}
returns the counts as JSON.

A path that starts with C{/slow} answers 10 ms later (without blocking
others), like a receiver that does some work per request.

Run: C{python -m evbench.receiver PORT}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Request, Site  # noqa: E402

# How long a /slow path takes to answer.
SLOW = 0.010


class Counts(Resource):
    """
    Every path: POST counts, GET /stats tells.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: Dict[str, Dict[str, Any]] = {}

    def render_POST(self, request: Request) -> Any:
        body = request.content.read()
        now = time.time()
        path = request.path.decode("latin-1")
        counts = self.paths.get(path)
        if counts is None:
            counts = self.paths[path] = {"received": 0, "duplicates": 0, "gaps": 0, "last": -1,
                                         "first_at": now, "last_at": now, "seen": set(), "reordered": 0,
                                         "lastPerKey": {}}
        at = body.find(b'"seq":')
        if at >= 0:
            seq = int(body[at + 6:body.find(b",", at)])
            if seq in counts["seen"]:
                counts["duplicates"] += 1
            else:
                counts["seen"].add(seq)
                if seq != counts["last"] + 1:
                    counts["gaps"] += 1
                counts["last"] = max(counts["last"], seq)
                counts["received"] += 1
                counts["last_at"] = now
            keyAt = body.find(b'"key":"')
            if keyAt >= 0:
                key = body[keyAt + 7:body.find(b'"', keyAt + 7)]
                if seq < counts["lastPerKey"].get(key, -1):
                    counts["reordered"] += 1
                else:
                    counts["lastPerKey"][key] = seq
        request.setResponseCode(200)
        if path.startswith("/slow"):
            reactor.callLater(SLOW, request.finish)
            return NOT_DONE_YET
        return b""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({path: {k: v for k, v in c.items() if k not in ("seen", "lastPerKey")}
                           for path, c in self.paths.items()}).encode()


class QuietSite(Site):
    def log(self, request: Request) -> None:
        pass


def main() -> None:
    reactor.listenTCP(int(sys.argv[1]), QuietSite(Counts()), backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
