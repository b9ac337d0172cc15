"""
The HTTP proxy against real upstreams: a C{twistd -n evgate} process in
front of a private nginx (static files, gzip, chunked) and of a Twisted
echo server (tests/proxy_upstream.py), driven by independent clients
(http.client, curl-like raw sockets, the C{websockets} library).
"""

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional

import jwt as pyjwt
from twisted.trial.unittest import TestCase

from .helpers import GatewayProcess, freePort, httpRequest, jsonOf, waitFor

HERE = os.path.dirname(os.path.abspath(__file__))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MB = 1024 * 1024


class UpstreamProcess:
    """
    tests/proxy_upstream.py in a subprocess.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="evgate-upstream-")
        portFile = os.path.join(self.directory, "port")
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "proxy_upstream.py"), portFile],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        waitFor(lambda: os.path.exists(portFile) and open(portFile).read(), 20, what="the upstream to listen")
        self.port = int(open(portFile).read())

    def stop(self) -> None:
        """
        End the process.
        """
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class NginxProcess:
    """
    A private nginx on a free port serving C{files} (name -> bytes), with
    gzip on for text.
    """

    def __init__(self, files: dict) -> None:
        self.directory = tempfile.mkdtemp(prefix="evgate-nginx-")
        root = os.path.join(self.directory, "www")
        os.makedirs(root)
        for name, content in files.items():
            with open(os.path.join(root, name), "wb") as f:
                f.write(content)
        self.port = freePort()
        d = self.directory
        config = f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    types {{ text/plain txt; application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        gzip on; gzip_types text/plain; gzip_min_length 10; gzip_proxied any;
    }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(config)
        self.process = subprocess.Popen([NGINX, "-c", path, "-p", d], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        waitFor(lambda: _connects(self.port), 20, what="nginx to listen")

    def stop(self) -> None:
        """
        End nginx.
        """
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def rss(pid: int) -> int:
    """
    The resident set size of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def blackhole() -> "tuple[socket.socket, List[socket.socket], int]":
    """
    A listening port whose backlog is full: a connection attempt to it
    hangs (the kernel drops the SYN), as with an unreachable host.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.2)
    return server, fillers, port


def request(port: int, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
            timeout: float = 30) -> "tuple[int, dict, bytes]":
    """
    One request with http.client: status, lower-cased headers, body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


class NginxUpstreamTests(TestCase):
    """
    Static files from nginx through the proxy: fixed-length, gzip and
    chunked bodies, HEAD and errors pass through unchanged.
    """

    timeout = 120

    def setUp(self) -> None:
        self.text = b"".join(b"line %d of a text file that compresses well\n" % i for i in range(5000))
        self.binary = os.urandom(3 * MB)
        self.nginx = NginxProcess({"small.txt": b"hello from nginx\n", "big.txt": self.text,
                                   "blob.bin": self.binary})
        self.addCleanup(self.nginx.stop)
        self.gateway = GatewayProcess(f"""
[gateway]
listen = tcp:0:interface=127.0.0.1

[endpoint:static]
type = http
targets = http://127.0.0.1:{self.nginx.port}

[api:static]
path = /static
endpoint = static
entrypoints = http-proxy
""").start()
        self.addCleanup(self.gateway.stop)

    def test_fixedLengthFile(self) -> None:
        """
        A file comes through byte for byte with nginx's Content-Length,
        Server and Last-Modified, and the prefix is stripped.
        """
        status, headers, body = request(self.gateway.port, "GET", "/static/blob.bin")
        self.assertEqual(status, 200)
        self.assertEqual(body, self.binary)
        self.assertEqual(headers["content-length"], str(len(self.binary)))
        self.assertTrue(headers["server"].startswith("nginx"))
        self.assertIn("last-modified", headers)
        self.assertIn("x-request-id", headers)

    def test_gzipChunked(self) -> None:
        """
        nginx's gzip answer (chunked, no length) reaches the client still
        compressed, re-chunked, and decompresses to the file.
        """
        import gzip

        status, headers, body = request(self.gateway.port, "GET", "/static/big.txt",
                                        headers={"Accept-Encoding": "gzip"})
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("content-encoding"), "gzip")
        self.assertEqual(headers.get("transfer-encoding"), "chunked")
        self.assertNotIn("content-length", headers)
        self.assertEqual(gzip.decompress(body), self.text)

    def test_headAndNotFound(self) -> None:
        """
        HEAD gives the length and no body; nginx's 404 is the client's
        404 (not a gateway problem).
        """
        status, headers, body = request(self.gateway.port, "HEAD", "/static/small.txt")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers["content-length"], "17")
        status, headers, body = request(self.gateway.port, "GET", "/static/missing.txt")
        self.assertEqual(status, 404)
        self.assertIn(b"nginx", body)

    def test_keepAliveReuse(self) -> None:
        """
        Many requests on one client connection are all answered (the
        upstream connections are pooled and reused).
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=10)
        for _ in range(50):
            connection.request("GET", "/static/small.txt")
            response = connection.getresponse()
            self.assertEqual(response.read(), b"hello from nginx\n")
        connection.close()


SECRET = "proxy-test-secret-of-at-least-32-bytes!!"


class EchoUpstreamTests(TestCase):
    """
    Methods, headers, bodies, plans, failover, timeouts and upgrades
    against the Twisted echo upstream.
    """

    timeout = 300

    def setUp(self) -> None:
        self.upstream = UpstreamProcess()
        self.addCleanup(self.upstream.stop)
        self.hole, self.fillers, self.holePort = blackhole()
        self.addCleanup(self.hole.close)
        for c in self.fillers:
            self.addCleanup(c.close)
        directory = tempfile.mkdtemp(prefix="evgate-proxy-")
        self.addCleanup(shutil.rmtree, directory, True)
        secretFile = os.path.join(directory, "secret")
        with open(secretFile, "w") as f:
            f.write(SECRET)
        dead = freePort()
        up = self.upstream.port
        self.gateway = GatewayProcess(f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
admin = tcp:0:interface=127.0.0.1
admin-token = proxy-admin-token

[endpoint:echo]
type = http
targets = http://127.0.0.1:{up}
response-timeout = 1s
idle-timeout = 1s

[endpoint:pair]
type = http
targets = http://127.0.0.1:{dead} http://127.0.0.1:{up}
fail-timeout = 30s

[endpoint:hole]
type = http
targets = http://127.0.0.1:{self.holePort}
connect-timeout = 1s

[endpoint:down]
type = http
targets = http://127.0.0.1:{dead}
fail-timeout = 30s

[api:echo]
path = /echo
endpoint = echo
entrypoints = http-proxy

[api:kept]
path = /kept
endpoint = echo
entrypoints = http-proxy
strip-path = false

[api:rewritten]
path = /old/api
endpoint = echo
entrypoints = http-proxy
rewrite = /v2

[api:secured]
path = /secured
endpoint = echo
entrypoints = http-proxy
plans = jwt
jwt.secret-file = {secretFile}

[api:trusting]
path = /trusting
endpoint = echo
entrypoints = http-proxy
plans = jwt
jwt.secret-file = {secretFile}
forward-credentials = true

[api:pair]
path = /pair
endpoint = pair
entrypoints = http-proxy

[api:hole]
path = /hole
endpoint = hole
entrypoints = http-proxy

[api:down]
path = /down
endpoint = down
entrypoints = http-proxy
""").start()
        self.addCleanup(self.gateway.stop)
        self.port = self.gateway.port

    def echo(self, method: str, path: str, body: Any = None, headers: Optional[dict] = None) -> Any:
        status, _, answer = request(self.port, method, path, body, headers)
        self.assertEqual(status, 200, answer)
        return jsonOf(answer)

    def test_everyMethod(self) -> None:
        """
        Every method reaches the upstream as sent, with its body.
        """
        for method in ("GET", "DELETE", "OPTIONS"):
            self.assertEqual(self.echo(method, "/echo/x")["method"], method)
        for method in ("POST", "PUT", "PATCH"):
            seen = self.echo(method, "/echo/x", b"payload", {"Content-Type": "text/plain"})
            self.assertEqual((seen["method"], seen["length"]), (method, 7))
            self.assertEqual(seen["headers"]["content-type"], ["text/plain"])

    def test_paths(self) -> None:
        """
        The prefix is stripped, kept or rewritten; the query passes as is.
        """
        self.assertEqual(self.echo("GET", "/echo/a/b?x=1&y=%20")["uri"], "/a/b?x=1&y=%20")
        self.assertEqual(self.echo("GET", "/echo")["uri"], "/")
        self.assertEqual(self.echo("GET", "/kept/a")["uri"], "/kept/a")
        self.assertEqual(self.echo("GET", "/old/api/orders?id=3")["uri"], "/v2/orders?id=3")

    def test_pathConfusion(self) -> None:
        """
        Dot segments, raw or encoded, are refused with a 400 problem;
        near-miss prefixes are unknown paths.
        """
        for path in ("/echo/../admin", "/echo/a/%2e%2e/%2E%2E/x", "/echo/a%2f..%2fb/..%5c..", "/echo/./x"):
            status, headers, body = request(self.port, "GET", path)
            self.assertEqual(status, 400, path)
            self.assertEqual(jsonOf(body)["type"], "https://evgate.dev/problems/bad-proxy-path")
        for path in ("/echox", "//echo/x", "/echo%2Fx", "/ECHO/x"):
            status, _, body = request(self.port, "GET", path)
            self.assertEqual(status, 404, path)

    def test_headers(self) -> None:
        """
        Hop-by-hop headers (and those named in Connection) are removed both
        ways; Forwarded, X-Forwarded-*, Via and a request id are added,
        and the client's request id is kept.
        """
        seen = self.echo("GET", "/echo/h", headers={
            "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
            "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-End-To-End": "yes",
            "X-Forwarded-For": "10.0.0.1", "Host": "api.example.com", "X-Request-Id": "client-id-1"})
        headers = seen["headers"]
        for name in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-authorization"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers["x-end-to-end"], ["yes"])
        self.assertEqual(headers["x-forwarded-for"], ["10.0.0.1, 127.0.0.1"])
        self.assertEqual(headers["x-forwarded-proto"], ["http"])
        self.assertEqual(headers["x-forwarded-host"], ["api.example.com"])
        self.assertEqual(headers["forwarded"], ["for=127.0.0.1;proto=http;host=api.example.com"])
        self.assertEqual(headers["via"], ["1.1 evgate"])
        self.assertEqual(headers["x-request-id"], ["client-id-1"])
        self.assertEqual(headers["host"], [f"127.0.0.1:{self.upstream.port}"])
        status, responseHeaders, _ = request(self.port, "GET", "/echo/h")
        self.assertNotIn("keep-alive", responseHeaders)
        self.assertEqual(responseHeaders["x-upstream"], "echo")
        self.assertEqual(len(responseHeaders["x-request-id"]), 32)

    def test_credentials(self) -> None:
        """
        The plan runs first (401 problem without a token); a valid token
        is not forwarded, unless forward-credentials is on.
        """
        status, headers, body = request(self.port, "GET", "/secured/x")
        self.assertEqual(status, 401)
        self.assertEqual(headers["content-type"], "application/problem+json")
        token = pyjwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
        seen = self.echo("GET", f"/secured/x?access_token={token}&keep=1",
                         headers={"Authorization": f"Bearer {token}"})
        self.assertNotIn("authorization", seen["headers"])
        self.assertEqual(seen["uri"], "/x?keep=1")
        seen = self.echo("GET", "/trusting/x", headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(seen["headers"]["authorization"], [f"Bearer {token}"])

    def test_refusedUploadIsNotRead(self) -> None:
        """
        A large upload refused by its plan is answered at once with a 401
        and the connection closed, without the body going anywhere.
        """
        s = socket.create_connection(("127.0.0.1", self.port), 10)
        s.sendall(b"PUT /secured/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"a" * 1000)
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        s.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 401"), answer[:100])
        self.assertIn(b"Connection: close", answer)

    def test_largeBodiesStreamBothWays(self) -> None:
        """
        200 MB up (fixed length and chunked) and 200 MB down (chunked and
        fixed length) pass through while the gateway's RSS grows by far
        less than the body.
        """
        pid = self.gateway.process.pid
        before = rss(pid)
        size = 200 * MB
        block = b"z" * MB
        digest = hashlib.sha256(block * 200).hexdigest()

        def blocks() -> Any:
            for _ in range(200):
                yield block

        seen = self.echo("PUT", "/echo/upload", blocks(), {"Content-Length": str(size)})
        self.assertEqual((seen["length"], seen["sha256"]), (size, digest))
        # No length: http.client sends the generator chunked.
        seen = self.echo("POST", "/echo/upload", blocks())
        self.assertEqual((seen["length"], seen["sha256"]), (size, digest))
        for query in ("", "&length=1"):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            connection.request("GET", f"/echo/download?bytes={size}{query}")
            response = connection.getresponse()
            total = 0
            while True:
                chunk = response.read(MB)
                if not chunk:
                    break
                total += len(chunk)
            connection.close()
            self.assertEqual(total, size)
        growth = rss(pid) - before
        self.assertLess(growth, 40 * MB, f"the gateway grew by {growth // MB} MB")

    def test_slowClientSlowsTheUpstream(self) -> None:
        """
        A client that stops reading a 200 MB download holds the upstream
        back: the gateway does not read the rest into memory meanwhile.
        """
        pid = self.gateway.process.pid
        before = rss(pid)
        s = socket.create_connection(("127.0.0.1", self.port), 30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /echo/download?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (200 * MB))
        received = len(s.recv(65536))
        time.sleep(3)
        growth = rss(pid) - before
        self.assertLess(growth, 20 * MB, f"the gateway grew by {growth // MB} MB while the client slept")
        while received < 200 * MB:
            data = s.recv(MB)
            if not data:
                break
            received += len(data)
        s.close()
        self.assertGreater(received, 200 * MB)

    def test_failover(self) -> None:
        """
        With the first target refusing connections, requests go to the
        second; the failed one is then out of service (its metric says so).
        """
        for _ in range(4):
            self.assertEqual(self.echo("GET", "/pair/x")["uri"], "/x")
        status, _, body = httpRequest("GET", self.gateway.adminUrl("/metrics"),
                                      headers={"Authorization": "Bearer proxy-admin-token"})
        text = body.decode()
        self.assertIn(f'evgate_proxy_target_in_service{{endpoint="pair",target="http://127.0.0.1:'
                      f'{self.upstream.port}"}} 1.0', text)
        self.assertIn('stage="connect"', text)
        self.assertIn('evgate_proxy_responses_total{api="pair"', text)

    def test_noTargetInService(self) -> None:
        """
        A refused connection is a 502 naming the connect stage; once the
        only target is out of service, a 503 with Retry-After.
        """
        status, headers, body = request(self.port, "GET", "/down/x")
        self.assertEqual(status, 502)
        problem = jsonOf(body)
        self.assertEqual((problem["type"], problem["stage"]),
                         ("https://evgate.dev/problems/upstream-failed", "connect"))
        status, headers, body = request(self.port, "GET", "/down/x")
        self.assertEqual(status, 503)
        self.assertEqual(jsonOf(body)["stage"], "select")
        self.assertIn("retry-after", headers)

    def test_connectTimeout(self) -> None:
        """
        A target that never accepts is a 504 at the connect stage after
        connect-timeout.
        """
        started = time.monotonic()
        status, _, body = request(self.port, "GET", "/hole/x")
        self.assertEqual(status, 504)
        self.assertEqual(jsonOf(body)["stage"], "connect")
        self.assertLess(time.monotonic() - started, 5)

    def test_responseHeadTimeout(self) -> None:
        """
        An upstream slower than response-timeout is a 504 at the
        response-head stage, not a hang.
        """
        status, _, body = request(self.port, "GET", "/echo/slow-head?seconds=5")
        self.assertEqual(status, 504)
        problem = jsonOf(body)
        self.assertEqual((problem["type"], problem["stage"]),
                         ("https://evgate.dev/problems/upstream-timeout", "response-head"))

    def test_idleBodyTimeout(self) -> None:
        """
        An upstream that stops sending its body for idle-timeout gets the
        client's connection cut (the response had begun): the client sees
        a short body, never a hang.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        started = time.monotonic()
        connection.request("GET", "/echo/stall-body")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertRaises(http.client.IncompleteRead, response.read)
        self.assertLess(time.monotonic() - started, 5)
        connection.close()

    def test_eventStreamIsNotBuffered(self) -> None:
        """
        An upstream event stream reaches the client event by event.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        started = time.monotonic()
        connection.request("GET", "/echo/events")
        response = connection.getresponse()
        self.assertEqual(response.getheader("content-type"), "text/event-stream")
        first = response.readline()
        self.assertEqual(first, b"data: 1\n")
        self.assertLess(time.monotonic() - started, 0.6)
        rest = response.read()
        self.assertIn(b"data: 5", rest)
        connection.close()

    def test_webSocket(self) -> None:
        """
        A WebSocket upgrade is passed through: the websockets library's
        client talks to the upstream's echo server through the gateway.
        """
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{self.port}/echo/ws", open_timeout=10) as ws:
            for message in ("hello", "x" * 100000):
                ws.send(message)
                self.assertEqual(ws.recv(10), message)
            ws.send(b"\x00\x01binary")
            self.assertEqual(ws.recv(10), b"\x00\x01binary")

    def test_adminShowsProxyApis(self) -> None:
        """
        /apis lists proxy APIs; their AsyncAPI route is a 404 problem that
        says why.
        """
        auth = {"Authorization": "Bearer proxy-admin-token"}
        status, _, body = httpRequest("GET", self.gateway.adminUrl("/apis"), headers=auth)
        self.assertEqual(status, 200)
        self.assertIn("echo", json.dumps(jsonOf(body)))
        status, _, body = httpRequest("GET", self.gateway.adminUrl("/apis/echo/asyncapi"), headers=auth)
        self.assertEqual(status, 404)
        self.assertEqual(jsonOf(body)["type"], "https://evgate.dev/problems/not-an-event-api")
