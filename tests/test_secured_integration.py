"""
Integration tests against the rig's secured listeners (scripts/dev-services:
Kafka SASL_SSL with SCRAM-SHA-512 and PLAIN, Kafka SSL with client
certificates, Mosquitto over TLS with a password, Redis over TLS with a
password), with everything read from C{scripts/dev-services env}
(tests/rig.py), so they run on the default ports and on an isolated rig
alike.

One gateway process per broker configuration, each entrypoint exercised
briefly, and an independent client (kcat, mosquitto_sub, redis-cli) with
the same credentials on the other side.  kcat reads the SASL_SSL listener
as the PLAIN user: Debian's kcat (its librdkafka) fails SCRAM-SHA-512
against Kafka 4 where confluent-kafka's does not, which the rig's own
probe works around the same way.  One more gateway holds every
wrong configuration at once: each endpoint must be reported by /ready with
its reason, logged once, and answer 503 at once.

These tests fail, never skip, when the rig's secured listeners are down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from typing import Any, Dict, List, Optional

from twisted.trial.unittest import SynchronousTestCase

from .helpers import GatewayProcess, httpRequest, jsonOf, waitFor
from .rig import RigEnvironment, rigEnvironment
from .test_mqtt_integration import SseReader
from .test_webhook_integration import Receiver

TOKEN = "secured-admin-token-" + uuid.uuid4().hex


def kcatArgs(settings: Dict[str, str]) -> List[str]:
    """
    kcat's C{-b}/C{-X} arguments for librdkafka C{settings}.
    """
    args = ["-b", settings["bootstrap.servers"]]
    for key, value in settings.items():
        if key != "bootstrap.servers":
            args += ["-X", f"{key}={value}"]
    return args


def kcatRead(settings: Dict[str, str], topic: str, count: int) -> List[Dict[str, Any]]:
    """
    The first C{count} records of C{topic}, read by kcat through the
    secured listener of C{settings}.
    """
    done = subprocess.run(["kcat", "-C", "-t", topic, "-o", "beginning", "-c", str(count), "-e", "-J", "-q",
                           *kcatArgs(settings)], capture_output=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"kcat failed: {done.stderr.decode(errors='replace')}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def requireSecuredRig(rig: RigEnvironment) -> None:
    """
    Fail (not skip) with a hint when the secured listeners are down.
    """
    done = subprocess.run(["kcat", "-L", "-m", "5", *kcatArgs(rig.kafkaSasl("PLAIN"))], capture_output=True,
                          timeout=30)
    if b"broker 1 at" not in done.stdout:
        raise AssertionError("the rig's Kafka SASL_SSL listener does not answer; run scripts/dev-services up "
                             f"(kcat: {done.stderr.decode(errors='replace')[-300:]})")


def privateCopy(path: str, directory: str, name: str) -> str:
    """
    A copy of C{path} in C{directory}, readable by its owner only (the
    way systemd hands credentials over).
    """
    target = os.path.join(directory, name)
    shutil.copyfile(path, target)
    os.chmod(target, 0o400)
    return target


def topicName(kind: str) -> str:
    return f"evgate-secured-{kind}-{uuid.uuid4().hex[:8]}"


def websocketRoundTrip(url: str, text: str) -> str:
    """
    Publish C{text} on a WebSocket and return the first message it gets.
    """
    async def scenario() -> str:
        import websockets

        async with websockets.connect(url) as ws:
            await ws.send(text)
            received = await asyncio.wait_for(ws.recv(), 30)
            return received if isinstance(received, str) else received.decode()

    return asyncio.run(scenario())


class SecuredCase(SynchronousTestCase):
    """
    The rig's values, and gateways stopped at cleanup.
    """

    def setUp(self) -> None:
        self.rig = rigEnvironment()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def startGateway(self, ini: str, env: Optional[Dict[str, str]] = None) -> GatewayProcess:
        gateway = GatewayProcess(ini)
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            gateway.start(60)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.addCleanup(gateway.stop)
        return gateway


SCRAM_INI = """
[gateway]
listen = tcp:0:interface=127.0.0.1
admin = tcp:0
admin-token = {token}
store = kafka:secure/{storeTopic}
webhook-allow-private = true
webhook-allow-http = true
limits-store = rediss://{redisUser}@127.0.0.1:{redisPort}/0
limits-store-password-file = credential:redis-password
limits-store-ca-file = {ca}
limits-prefix = {limitsPrefix}
limits-timeout = 1

[endpoint:secure]
type = kafka
bootstrap.servers = {bootstrap}
security.protocol = SASL_SSL
ssl.ca.location = {ca}
sasl.mechanism = SCRAM-SHA-512
sasl.username = {user}
sasl.password-file = credential:kafka-password
linger.ms = 1
poll-timeout = 0.05

[api:orders]
path = /orders
endpoint = secure
topic = {topic}
start = earliest
entrypoints = http-post http-get sse websocket webhook
rate-limit = 1000/s
"""


class KafkaScramTests(SecuredCase):
    """
    A Kafka endpoint on SASL_SSL with SCRAM-SHA-512, its password a systemd
    credential; the shared store on the same endpoint and the limits store
    on the TLS Redis with a password.
    """

    def test_everyEntrypoint(self) -> None:
        """
        Publish, GET, SSE, WebSocket and a webhook (its subscription kept in
        the Kafka store) all work through the SASL_SSL listener; kcat on the
        same listener sees the records and redis-cli the counters.
        """
        rig = self.rig
        requireSecuredRig(rig)
        credentials = os.path.join(self.directory, "credentials")
        os.makedirs(credentials)
        privateCopy(rig["EVGATE_KAFKA_SCRAM_PASSWORD_FILE"], credentials, "kafka-password")
        privateCopy(rig["EVGATE_REDIS_PASSWORD_FILE"], credentials, "redis-password")
        topic, prefix = topicName("scram"), f"evgate:secured:{uuid.uuid4().hex[:8]}:"
        gateway = self.startGateway(SCRAM_INI.format(
            token=TOKEN, storeTopic=topicName("store"), redisUser=rig["EVGATE_REDIS_USER"],
            redisPort=rig["EVGATE_REDIS_TLS_PORT"], ca=rig["EVGATE_TLS_CA_FILE"], limitsPrefix=prefix,
            bootstrap=rig["EVGATE_KAFKA_SASL_BOOTSTRAP"], user=rig["EVGATE_KAFKA_SCRAM_USER"], topic=topic),
            env={"CREDENTIALS_DIRECTORY": credentials})
        waitFor(lambda: httpRequest("GET", gateway.adminUrl("/ready"))[0] == 200, 60, what="/ready")

        status, _, body = httpRequest("POST", gateway.url("/orders?key=k1"), b"over scram")
        self.assertEqual(status, 202, body)
        [record] = kcatRead(rig.kafkaSasl("PLAIN"), topic, 1)
        self.assertEqual((record["key"], record["payload"]), ("k1", "over scram"))

        status, _, body = httpRequest("GET", gateway.url("/orders?timeout=5000"))
        self.assertEqual(status, 200, body)
        self.assertIn("over scram", body.decode())

        sse = SseReader(gateway.port, "/orders")
        self.addCleanup(sse.close)
        sse.readUntil(lambda lines: any("over scram" in line for line in lines))

        # start = earliest: the first message a new WebSocket gets is the
        # first of the topic.
        received = websocketRoundTrip(f"ws://127.0.0.1:{gateway.port}/orders", "over websocket")
        self.assertEqual(received, "over scram")
        self.assertEqual([r["payload"] for r in kcatRead(rig.kafkaSasl("PLAIN"), topic, 2)],
                         ["over scram", "over websocket"])

        receiver = Receiver()
        self.addCleanup(receiver.stop)
        status, _, created = httpRequest(
            "POST", gateway.adminUrl("/apis/orders/subscriptions"),
            json.dumps({"callbackUrl": receiver.url, "start": "earliest"}).encode(),
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        self.assertEqual(status, 201, created)
        waitFor(lambda: any(r.body == b"over scram" for r in receiver.requests), 60, what="the webhook delivery")

        keys = subprocess.run(
            ["redis-cli", "--tls", "--cacert", rig["EVGATE_TLS_CA_FILE"], "-h", "127.0.0.1",
             "-p", rig["EVGATE_REDIS_TLS_PORT"], "--user", rig["EVGATE_REDIS_USER"], "--no-auth-warning",
             "-a", rig.secret("EVGATE_REDIS_PASSWORD_FILE"), "--scan", "--pattern", prefix + "*"],
            capture_output=True, timeout=30)
        self.assertTrue(keys.stdout.strip(), keys.stderr)
        status, _, body = httpRequest("GET", gateway.adminUrl("/ready"))
        self.assertNotIn("limitsStore", jsonOf(body))


OTHER_KAFKA_INI = """
[gateway]
listen = tcp:0:interface=127.0.0.1

[endpoint:plain]
type = kafka
bootstrap.servers = {saslBootstrap}
security.protocol = SASL_SSL
ssl.ca.location = {ca}
sasl.mechanism = PLAIN
sasl.username = {plainUser}
sasl.password-file = {plainPasswordFile}
linger.ms = 1

[endpoint:mtls]
type = kafka
bootstrap.servers = {sslBootstrap}
security.protocol = SSL
ssl.ca.location = {ca}
ssl.certificate.location = {cert}
ssl.key.location = {key}
linger.ms = 1
poll-timeout = 0.05

[api:plain]
path = /plain
endpoint = plain
topic = {plainTopic}
entrypoints = http-post

[api:mtls]
path = /mtls
endpoint = mtls
topic = {mtlsTopic}
start = earliest
entrypoints = http-post http-get
"""


class KafkaPlainAndCertificateTests(SecuredCase):
    """
    Kafka SASL_SSL with PLAIN, and Kafka SSL with a client certificate.
    """

    def test_publishAndRead(self) -> None:
        """
        A publish through each listener reaches Kafka (kcat with the same
        credentials reads it); a GET reads through the certificate one.
        """
        rig = self.rig
        requireSecuredRig(rig)
        plainTopic, mtlsTopic = topicName("plain"), topicName("mtls")
        gateway = self.startGateway(OTHER_KAFKA_INI.format(
            saslBootstrap=rig["EVGATE_KAFKA_SASL_BOOTSTRAP"], ca=rig["EVGATE_TLS_CA_FILE"],
            plainUser=rig["EVGATE_KAFKA_PLAIN_USER"], plainPasswordFile=rig["EVGATE_KAFKA_PLAIN_PASSWORD_FILE"],
            sslBootstrap=rig["EVGATE_KAFKA_SSL_BOOTSTRAP"], cert=rig["EVGATE_TLS_CLIENT_CERT"],
            key=rig["EVGATE_TLS_CLIENT_KEY"], plainTopic=plainTopic, mtlsTopic=mtlsTopic))
        for path, topic, settings in (("/plain", plainTopic, rig.kafkaSasl("PLAIN")),
                                      ("/mtls", mtlsTopic, rig.kafkaSsl())):
            status, _, body = httpRequest("POST", gateway.url(path), f"via {path}".encode())
            self.assertEqual(status, 202, body)
            [record] = kcatRead(settings, topic, 1)
            self.assertEqual(record["payload"], f"via {path}")
        status, _, body = httpRequest("GET", gateway.url("/mtls?timeout=5000"))
        self.assertEqual(status, 200, body)
        self.assertIn("via /mtls", body.decode())


MQTT_INI = """
[gateway]
listen = tcp:0:interface=127.0.0.1

[endpoint:mqtt]
type = mqtt5
host = 127.0.0.1
port = {port}
tls = true
tls-ca = {ca}
username = {user}
password-file = {passwordFile}

[api:sensors]
path = /sensors
endpoint = mqtt
topic = {topic}
entrypoints = http-post sse
"""


class MqttTlsTests(SecuredCase):
    """
    An MQTT endpoint over TLS with a user and a password file.
    """

    def test_publishAndStream(self) -> None:
        """
        A publish reaches the broker (mosquitto_sub over TLS with the same
        user sees it) and an SSE client of the same API gets it.
        """
        rig = self.rig
        topic = "evgate/secure/" + uuid.uuid4().hex[:8]
        gateway = self.startGateway(MQTT_INI.format(
            port=rig["EVGATE_MQTT_TLS_PORT"], ca=rig["EVGATE_TLS_CA_FILE"], user=rig["EVGATE_MQTT_USER"],
            passwordFile=rig["EVGATE_MQTT_PASSWORD_FILE"], topic=topic))
        sub = subprocess.Popen(
            ["mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", rig["EVGATE_MQTT_TLS_PORT"],
             "--cafile", rig["EVGATE_TLS_CA_FILE"], "-u", rig["EVGATE_MQTT_USER"],
             "-P", rig.secret("EVGATE_MQTT_PASSWORD_FILE"), "-t", topic, "-C", "1", "-W", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: sub.poll() is None and sub.kill())
        sse = SseReader(gateway.port, "/sensors")
        self.addCleanup(sse.close)
        # Both subscribers need a moment to be subscribed at the broker.
        time.sleep(1.0)
        status, _, body = httpRequest("POST", gateway.url("/sensors"), b"over mqtt tls")
        self.assertEqual(status, 202, body)
        out, err = sub.communicate(timeout=30)
        self.assertEqual(out.strip(), b"over mqtt tls", err)
        sse.readUntil(lambda lines: any("over mqtt tls" in line for line in lines))


def failuresIni(rig: RigEnvironment, directory: str) -> str:
    """
    One endpoint per wrong configuration, each with an API.
    """
    wrong = os.path.join(directory, "wrong.password")
    with open(wrong, "w") as f:
        f.write("not-the-password\n")
    os.chmod(wrong, 0o600)
    ca, untrustedCa = rig["EVGATE_TLS_CA_FILE"], rig["EVGATE_TLS_UNTRUSTED_CA_FILE"]
    sasl = rig["EVGATE_KAFKA_SASL_BOOTSTRAP"]
    ssl = rig["EVGATE_KAFKA_SSL_BOOTSTRAP"]
    endpoints = {
        "scram-wrong": f"bootstrap.servers = {sasl}\nsecurity.protocol = SASL_SSL\nssl.ca.location = {ca}\n"
                       f"sasl.mechanism = SCRAM-SHA-512\nsasl.username = {rig['EVGATE_KAFKA_SCRAM_USER']}\n"
                       f"sasl.password-file = {wrong}\n",
        "plain-wrong": f"bootstrap.servers = {sasl}\nsecurity.protocol = SASL_SSL\nssl.ca.location = {ca}\n"
                       f"sasl.mechanism = PLAIN\nsasl.username = {rig['EVGATE_KAFKA_PLAIN_USER']}\n"
                       f"sasl.password-file = {wrong}\n",
        "unknown-ca": f"bootstrap.servers = {sasl}\nsecurity.protocol = SASL_SSL\n"
                      f"ssl.ca.location = {untrustedCa}\nsasl.mechanism = PLAIN\n"
                      f"sasl.username = {rig['EVGATE_KAFKA_PLAIN_USER']}\n"
                      f"sasl.password-file = {rig['EVGATE_KAFKA_PLAIN_PASSWORD_FILE']}\n",
        "expired-cert": f"bootstrap.servers = {ssl}\nsecurity.protocol = SSL\nssl.ca.location = {ca}\n"
                        f"ssl.certificate.location = {rig['EVGATE_TLS_EXPIRED_CERT']}\n"
                        f"ssl.key.location = {rig['EVGATE_TLS_EXPIRED_KEY']}\n",
        "untrusted-cert": f"bootstrap.servers = {ssl}\nsecurity.protocol = SSL\nssl.ca.location = {ca}\n"
                          f"ssl.certificate.location = {rig['EVGATE_TLS_UNTRUSTED_CERT']}\n"
                          f"ssl.key.location = {rig['EVGATE_TLS_UNTRUSTED_KEY']}\n",
    }
    parts = [f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
admin = tcp:0
admin-token = {TOKEN}
limits-store = rediss://{rig['EVGATE_REDIS_USER']}@127.0.0.1:{rig['EVGATE_REDIS_TLS_PORT']}/0
limits-store-password-file = {wrong}
limits-store-ca-file = {ca}
"""]
    for name, body in endpoints.items():
        parts.append(f"[endpoint:{name}]\ntype = kafka\n{body}\n"
                     f"[api:{name}]\npath = /{name}\nendpoint = {name}\ntopic = evgate-secured-refused\n"
                     "entrypoints = http-post http-get\nrate-limit = 1000/s\n")
    parts.append(f"""
[endpoint:mqtt-wrong]
type = mqtt5
host = 127.0.0.1
port = {rig['EVGATE_MQTT_TLS_PORT']}
tls = true
tls-ca = {ca}
username = {rig['EVGATE_MQTT_USER']}
password-file = {wrong}
reconnect-min = 0.2
reconnect-max = 1

[api:mqtt-wrong]
path = /mqtt-wrong
endpoint = mqtt-wrong
topic = evgate/secure/refused
entrypoints = http-post
""")
    return "\n".join(parts)


EXPECTED = {
    "scram-wrong": "authentication failed",
    "plain-wrong": "authentication failed",
    "unknown-ca": "the broker's certificate is not trusted",
    "expired-cert": "refused the client certificate",
    "untrusted-cert": "refused the client certificate",
    "mqtt-wrong": "authentication failed",
}


class RefusalTests(SecuredCase):
    """
    Every way a secured broker refuses the gateway, in one gateway.
    """

    def test_refusals(self) -> None:
        """
        Wrong SCRAM and PLAIN passwords, an unknown CA, an expired and an
        untrusted client certificate, a wrong MQTT password: /ready names
        each endpoint with its reason, each is logged once (not once per
        retry), and a publish is a 503 endpoint-unavailable within a
        second, long before librdkafka's message timeout.  A wrong Redis
        password shows as limitsStore and the node counts locally.
        """
        rig = self.rig
        requireSecuredRig(rig)
        gateway = self.startGateway(failuresIni(rig, self.directory))

        def reasons() -> Any:
            status, _, body = httpRequest("GET", gateway.adminUrl("/ready"))
            document = jsonOf(body)
            found = document.get("endpoints", {})
            if status == 503 and all(EXPECTED[n] in (found.get(n) or "") for n in EXPECTED):
                return document
            return None

        document = waitFor(reasons, 60, interval=0.5, what="/ready to give every reason")
        self.assertEqual(sorted(document["notConnected"]), sorted(EXPECTED))
        for name in EXPECTED:
            started = time.monotonic()
            status, headers, body = httpRequest("POST", gateway.url(f"/{name}"), b"refused")
            took = time.monotonic() - started
            self.assertEqual(status, 503, (name, body))
            self.assertEqual(jsonOf(body)["type"].rsplit("/", 1)[-1], "endpoint-unavailable")
            self.assertIn(EXPECTED[name], jsonOf(body)["detail"])
            self.assertLess(took, 2.0, name)
        status, _, body = httpRequest("GET", gateway.url("/scram-wrong?timeout=1000"))
        self.assertEqual(status, 503, body)

        # Retries go on (librdkafka every couple of seconds, paho with
        # back-off); the log still has one line per endpoint.
        time.sleep(6)
        output = gateway.output()
        for name in ("scram-wrong", "plain-wrong", "unknown-ca", "expired-cert", "untrusted-cert"):
            lines = [line for line in output.splitlines()
                     if f"Kafka endpoint {name}: the broker refuses the gateway" in line]
            self.assertEqual(len(lines), 1, (name, lines))
        lines = [line for line in output.splitlines() if "MQTT endpoint mqtt-wrong" in line
                 and "authentication failed" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertFalse([line for line in output.splitlines() if "SASL authentication error" in line
                          and "refuses the gateway" not in line])
        status, _, body = httpRequest("GET", gateway.adminUrl("/ready"))
        redis = [line for line in output.splitlines() if "limits store" in line]
        self.assertEqual(len(redis), 1, redis)
        self.assertIn("authentication failed", redis[0])
        self.assertIn("authentication failed", jsonOf(body).get("limitsStore", ""))


class RedisPasswordRotationTests(SecuredCase):
    """
    The limits store on the rig's TLS Redis, started with a wrong password.
    """

    def test_fixedPasswordFileTakenWithoutRestart(self) -> None:
        """
        A gateway whose limits-store-password-file is wrong counts on the
        node and says why in /ready; once the file holds the right
        password, the next connection attempt (every few seconds) reads it
        again and the node counts in Redis, without a restart or reload.
        """
        rig = self.rig
        passwordFile = os.path.join(self.directory, "redis-password")
        with open(passwordFile, "w", encoding="utf-8") as f:
            f.write("not-the-password\n")
        os.chmod(passwordFile, 0o600)
        gateway = self.startGateway(f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
admin = tcp:0
admin-token = {TOKEN}
limits-store = rediss://{rig['EVGATE_REDIS_USER']}@127.0.0.1:{rig['EVGATE_REDIS_TLS_PORT']}/0
limits-store-password-file = {passwordFile}
limits-store-ca-file = {rig['EVGATE_TLS_CA_FILE']}
limits-prefix = evgate-test:{uuid.uuid4().hex[:12]}:

[endpoint:local]
type = memory

[api:demo]
path = /demo
endpoint = local
topic = demo
entrypoints = http-post
rate-limit = 1000/s
""")

        def limitsStore() -> str:
            httpRequest("POST", gateway.url("/demo"), b"counted")
            _, _, body = httpRequest("GET", gateway.adminUrl("/ready"))
            return str(jsonOf(body).get("limitsStore") or "")

        waitFor(lambda: "authentication failed" in limitsStore(), 30, interval=0.5,
                what="/ready to say Redis refused the password")
        with open(passwordFile, "w", encoding="utf-8") as f:
            f.write(rig.secret("EVGATE_REDIS_PASSWORD_FILE") + "\n")
        started = time.monotonic()
        waitFor(lambda: limitsStore() == "", 30, interval=0.5, what="the limits store to be used again")
        self.assertLess(time.monotonic() - started, 20)
        output = gateway.output()
        self.assertEqual(len([line for line in output.splitlines() if "authentication failed" in line]), 1, output)
        self.assertIn("counting in Redis again", output)
