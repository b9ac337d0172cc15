"""
An upstream HTTP server for the proxy's integration tests, run as its own
process: C{python tests/proxy_upstream.py PORTFILE}.  It writes its port
to PORTFILE once it listens.

 - any path: a JSON echo of the method, URI, headers, body length and
   SHA-256 of the body;
 - C{/download?bytes=N[&length=1]}: N bytes (0x61), chunked or with a
   Content-Length, written as the client takes them (a pull producer);
 - C{/slow-head?seconds=S}: the response head after S seconds;
 - C{/stall-body}: a head and 5 bytes, then nothing;
 - C{/status?code=N}: an empty response with status N;
 - C{/events}: an event stream, one event every 0.2 s, flushed at once;
 - C{/ws}: a WebSocket echo server (autobahn);
 - C{/health}: an empty answer with the health status, 200 until
   C{/set-health?code=N} sets it (neither counts as a request);
 - C{/drip?chunks=N&seconds=S}: N lines, one every S seconds, with a
   Content-Length (a slow answer whose end is known);
 - C{/refuse}: a 403 whose body is chunked (written in two parts), as a
   server refusing a WebSocket upgrade may answer;
 - C{/count}: how many requests the server has seen, as JSON
   C{{"requests": N, "health": N}} (not counted itself).

Every JSON echo names the server's port (C{"port"}), so that tests with
several upstreams see which one answered.
"""

import hashlib
import json
import sys

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.interfaces import IPullProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer


@implementer(IPullProducer)
class Bytes:
    """Writes C{left} bytes to a request as the transport asks for them."""

    def __init__(self, request, left):
        self.request = request
        self.left = left

    def resumeProducing(self):
        chunk = min(self.left, 65536)
        self.left -= chunk
        self.request.write(b"a" * chunk)
        if self.left == 0:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self):
        self.left = 0


class Echo(WebSocketServerProtocol):
    """Sends every message back."""

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class Upstream(Resource):
    """The routes of the module docstring."""

    isLeaf = True

    def __init__(self, ws):
        super().__init__()
        self.ws = ws
        self.port = 0
        self.requests = 0
        self.healthChecks = 0
        self.healthCode = 200

    def render(self, request):
        path = request.path
        args = request.args
        if path == b"/health":
            self.healthChecks += 1
            request.setResponseCode(self.healthCode)
            return b""
        if path == b"/set-health":
            self.healthCode = int(args[b"code"][0])
            return b""
        if path == b"/count":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"requests": self.requests, "health": self.healthChecks}).encode()
        self.requests += 1
        if path == b"/ws":
            return self.ws.render(request)
        if path == b"/download":
            size = int(args[b"bytes"][0])
            if args.get(b"length"):
                request.setHeader(b"Content-Length", b"%d" % size)
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.registerProducer(Bytes(request, size), False)
            return NOT_DONE_YET
        if path == b"/slow-head":
            def answer():
                if not request._disconnected:
                    request.write(b"late")
                    request.finish()
            reactor.callLater(float(args[b"seconds"][0]), answer)
            return NOT_DONE_YET
        if path == b"/stall-body":
            request.setHeader(b"Content-Length", b"100")
            request.write(b"first")
            return NOT_DONE_YET
        if path == b"/drip":
            chunks = int(args[b"chunks"][0])
            seconds = float(args[b"seconds"][0])
            lines = [b"line %d\n" % i for i in range(chunks)]
            request.setHeader(b"Content-Length", b"%d" % sum(len(line) for line in lines))

            def drip():
                if request._disconnected or request.finished:
                    return
                request.write(lines.pop(0))
                if lines:
                    reactor.callLater(seconds, drip)
                else:
                    request.finish()
            drip()
            return NOT_DONE_YET
        if path == b"/refuse":
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/plain")
            request.write(b"refused: ")
            reactor.callLater(0.05, lambda: (request.write(b"no upgrade here\n"), request.finish()))
            return NOT_DONE_YET
        if path == b"/status":
            request.setResponseCode(int(args[b"code"][0]))
            return b""
        if path == b"/events":
            request.setHeader(b"Content-Type", b"text/event-stream")
            count = [0]

            def tick():
                if request._disconnected or request.finished:
                    return
                count[0] += 1
                request.write(b"data: %d\n\n" % count[0])
                if count[0] < 5:
                    reactor.callLater(0.2, tick)
                else:
                    request.finish()
            tick()
            return NOT_DONE_YET
        digest = hashlib.sha256()
        length = 0
        request.content.seek(0)
        while True:
            chunk = request.content.read(1 << 20)
            if not chunk:
                break
            length += len(chunk)
            digest.update(chunk)
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode().lower()] = [v.decode("latin-1") for v in values]
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Upstream", b"echo")
        request.setHeader(b"Keep-Alive", b"timeout=5")
        request.setHeader(b"Connection", b"X-Private")
        request.setHeader(b"X-Private", b"hop")
        return json.dumps({"port": self.port, "method": request.method.decode(), "uri": request.uri.decode("latin-1"),
                           "headers": headers, "length": length,
                           "sha256": digest.hexdigest()}).encode()


def main(portFile):
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    upstream = Upstream(WebSocketResource(factory))
    port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
    upstream.port = port.getHost().port
    with open(portFile, "w") as f:
        f.write(str(port.getHost().port))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
