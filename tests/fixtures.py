"""
What tests need from their surroundings, said once: gateway INI files built
by what they contain (L{GatewayIni}), the addresses of the development
services, and HTTP servers on 127.0.0.1 that stand in for webhook
receivers and other remote parties (L{LocalHttpServer},
L{WebhookReceiver}).

L{tests.helpers} re-exports all of it; test modules import from there.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Type

# The development services (scripts/dev-services up); the tests fail, never
# skip, when one is missing.
KAFKA = f"127.0.0.1:{os.environ.get('EVGATE_KAFKA_PORT', '9092')}"
MQTT_HOST = os.environ.get("EVGATE_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("EVGATE_MQTT_PORT", "1883"))
REDIS_HOST = os.environ.get("EVGATE_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("EVGATE_REDIS_PORT", "6379"))
REDIS = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"

# Kafka client settings for tests that stop, kill and restart gateways: a
# killed node's partitions move to the others after the session timeout
# (librdkafka's default is 45 s), and publishes are not held back.
QUICK_KAFKA: Dict[str, Any] = {
    "linger.ms": 1,
    "poll-timeout": 0.05,
    "request-timeout": 3,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}


def _value(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _keys(settings: Optional[Mapping[str, Any]], keys: Mapping[str, Any]) -> Dict[str, str]:
    """
    The INI keys of a section: C{settings} as they are spelt (for dotted
    names such as C{bootstrap.servers}), then C{keys} with underscores
    read as dashes (C{admin_token} is C{admin-token}); a mapping value
    gives prefixed keys (C{webhook={"timeout": 5}} is C{webhook.timeout});
    L{None} leaves a key out.
    """
    rendered: Dict[str, str] = {}
    named = [(k.replace("_", "-"), v) for k, v in keys.items()]
    for key, value in [*(settings or {}).items(), *named]:
        if isinstance(value, Mapping):
            for inner, innerValue in value.items():
                if innerValue is not None:
                    rendered[f"{key}.{inner}"] = _value(innerValue)
        elif value is not None:
            rendered[key] = _value(value)
    return rendered


class GatewayIni:
    """
    The text of a gateway configuration, built by what it holds:

        GatewayIni().admin(TOKEN).kafka(quick=True)
            .api("orders", endpoint="kafka", topic=topic, entrypoints="http-post webhook")

    C{[gateway]} comes first with C{listen = tcp:0} unless told otherwise;
    endpoints, APIs and other sections follow in the order they were
    added, then any L{extra} text.  C{str()} renders it.
    """

    def __init__(self, listen: Optional[str] = "tcp:0", **keys: Any) -> None:
        self.sections: Dict[str, Dict[str, str]] = {"gateway": {}}
        self.tail: List[str] = []
        self.raw: Dict[str, str] = {}
        self.gateway(listen=listen, **keys)

    def section(self, header: str, settings: Optional[Mapping[str, Any]] = None, **keys: Any) -> "GatewayIni":
        """
        Add keys to the section C{header} (C{"api:orders"}), creating it.
        """
        self.sections.setdefault(header, {}).update(_keys(settings, keys))
        return self

    def gateway(self, settings: Optional[Mapping[str, Any]] = None, **keys: Any) -> "GatewayIni":
        """
        Add keys to C{[gateway]}.
        """
        return self.section("gateway", settings, **keys)

    def admin(self, token: str, listen: str = "tcp:0") -> "GatewayIni":
        """
        An admin listener on C{listen} behind C{token}.
        """
        return self.gateway(admin=listen, admin_token=token)

    def loopbackWebhooks(self) -> "GatewayIni":
        """
        Let webhooks deliver to plain-HTTP receivers on 127.0.0.1 (the
        test receivers), which the gateway refuses by default.
        """
        return self.gateway(webhook_allow_private=True, webhook_allow_http=True)

    def endpoint(self, name: str, type: str, settings: Optional[Mapping[str, Any]] = None,
                 **keys: Any) -> "GatewayIni":
        """
        C{[endpoint:name]} of C{type}.
        """
        return self.section(f"endpoint:{name}", {"type": type, **(settings or {})}, **keys)

    def memory(self, name: str = "local", **keys: Any) -> "GatewayIni":
        """
        A memory endpoint.
        """
        return self.endpoint(name, "memory", **keys)

    def kafka(self, name: str = "kafka", settings: Optional[Mapping[str, Any]] = None,
              bootstrap: str = KAFKA, quick: bool = False, **keys: Any) -> "GatewayIni":
        """
        A Kafka endpoint on the development broker; C{quick} adds
        L{QUICK_KAFKA} for tests that kill and restart gateways.
        """
        merged = {"bootstrap.servers": bootstrap, **(QUICK_KAFKA if quick else {}), **(settings or {})}
        return self.endpoint(name, "kafka", merged, **keys)

    def mqtt(self, name: str = "mqtt", host: str = MQTT_HOST, port: int = MQTT_PORT,
             type: str = "mqtt5", **keys: Any) -> "GatewayIni":
        """
        An MQTT endpoint on the development broker.
        """
        return self.endpoint(name, type, host=host, port=port, **keys)

    def api(self, name: str, endpoint: str = "local", topic: Optional[str] = None,
            entrypoints: str = "http-post", path: Optional[str] = None,
            settings: Optional[Mapping[str, Any]] = None, **keys: Any) -> "GatewayIni":
        """
        C{[api:name]} on C{endpoint}, at C{/name} and on the topic C{name}
        unless told otherwise.
        """
        first = {"path": path or f"/{name}", "endpoint": endpoint, "topic": topic if topic is not None else name,
                 "entrypoints": entrypoints}
        return self.section(f"api:{name}", {**first, **(settings or {})}, **keys)

    def lines(self, header: str, text: str) -> "GatewayIni":
        """
        Lines added as they are to the section C{header}, after its keys
        (for tests that hand over INI text of their own).
        """
        self.sections.setdefault(header, {})
        self.raw[header] = self.raw.get(header, "") + text
        return self

    def extra(self, text: str) -> "GatewayIni":
        """
        Text added at the end as it is.
        """
        self.tail.append(text)
        return self

    def __str__(self) -> str:
        parts = []
        for header, keys in self.sections.items():
            raw = self.raw.get(header, "")
            if header == "gateway" and not keys and not raw.strip():
                continue
            if raw and not raw.endswith("\n"):
                raw += "\n"
            parts.append(f"[{header}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + raw)
        return "\n".join(parts) + "".join(self.tail)

    text = __str__


def demoIni(entrypoints: str = "http-post", api: Optional[Mapping[str, Any]] = None,
            **gateway: Any) -> GatewayIni:
    """
    The smallest gateway: one API, /demo, on a memory endpoint called
    C{local}, with C{api}'s keys; C{gateway} are the C{[gateway]} keys
    (C{listen=None} leaves C{listen} out).
    """
    return GatewayIni(**gateway).memory().api("demo", entrypoints=entrypoints, settings=api)


class LocalHttpServer:
    """
    A standard library HTTP server on 127.0.0.1 serving C{handler} on its
    own threads, for a remote party the gateway talks to.  Connections
    the gateway drops on purpose (killed nodes, given-up requests) end in
    errors here that are expected, so they are not printed.

    @param tls: serve HTTPS with this server context.
    """

    def __init__(self, handler: Type[BaseHTTPRequestHandler], tls: Optional[ssl.SSLContext] = None) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.scheme = "https" if tls is not None else "http"
        if tls is not None:
            # The handshake runs in accept(), on the serving thread; a client
            # that refuses the certificate makes accept() fail, which the
            # server shrugs off.
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        """
        The port served.
        """
        return self.server.server_address[1]

    def urlOf(self, path: str) -> str:
        """
        An URL on this server.
        """
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        """
        Stop serving.
        """
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class Delivery:
    """
    One request a L{WebhookReceiver} got, and the status it answered.
    """

    def __init__(self, body: bytes, headers: Dict[str, str], status: int) -> None:
        self.body = body
        self.headers = headers
        self.status = status


class WebhookReceiver(LocalHttpServer):
    """
    A webhook receiver on 127.0.0.1: records every POST and answers with
    what C{decide(body, attempt)} says (200 by default), after C{delay}
    seconds.

    @param protocol: the HTTP version the receiver answers with;
        C{"HTTP/1.0"} (the standard library's default) closes the
        connection after every answer.
    @param closeAfterAnswer: close the connection after every answer
        without saying so (no C{Connection: close}), as a receiver that
        drops idle keep-alive connections at once does.
    @param tls: serve HTTPS with this server context.
    """

    def __init__(self, decide: Optional[Callable[[bytes, int], int]] = None, delay: float = 0.0,
                 protocol: str = "HTTP/1.1", closeAfterAnswer: bool = False,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.decide = decide or (lambda body, attempt: 200)
        self.delay = delay
        self.requests: List[Delivery] = []
        self.lock = threading.Lock()
        self.connections = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = protocol

            def setup(self) -> None:
                with receiver.lock:
                    receiver.connections += 1
                super().setup()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    attempt = 1 + sum(1 for r in receiver.requests if r.body == body)
                    status = receiver.decide(body, attempt)
                    receiver.requests.append(Delivery(body, headers, status))
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if closeAfterAnswer:
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, tls)

    @property
    def url(self) -> str:
        """
        The receiver's callback URL.
        """
        return self.urlOf("/hook")

    def delivered(self) -> List[bytes]:
        """
        The bodies answered 2xx, in the order they arrived.
        """
        with self.lock:
            return [r.body for r in self.requests if 200 <= r.status < 300]

    def all(self) -> List[Delivery]:
        """
        Every request so far.
        """
        with self.lock:
            return list(self.requests)
