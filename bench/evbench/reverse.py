"""
The bare Twisted proxy the HTTP proxy is compared with: twisted.web's own
C{ReverseProxyResource} in front of one upstream, nothing else (no plans,
no pooling: it opens one HTTP/1.0 connection per request, as it does).

Run: C{python -m evbench.reverse PORT UPSTREAM_PORT}.
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web.proxy import ReverseProxyResource  # noqa: E402
from twisted.web.server import Site  # noqa: E402


class QuietSite(Site):
    """
    A site with no access log (evgate writes none in the bench either).
    """

    def log(self, request: object) -> None:
        pass


def main() -> None:
    port, upstream = int(sys.argv[1]), int(sys.argv[2])
    site = QuietSite(ReverseProxyResource("127.0.0.1", upstream, b""))
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
