"""
The secured listeners of the real-broker rig (C{scripts/dev-services up}),
checked with clients that are not evgate's: confluent-kafka and kcat for
Kafka, mosquitto_pub/mosquitto_sub for MQTT, redis-cli for Redis.

Each listener must accept the rig's own credentials and refuse a wrong
password, a server certificate from a CA the client does not trust, and (on
Kafka's SSL listener) a client certificate that is missing, expired or from an
untrusted CA. Values come from C{scripts/dev-services env} through
L{tests.rig}. These tests fail, never skip, when the rig is not up.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid
from typing import Any, Dict, List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.rig import DEV_SERVICES, RigEnvironment, parseEnvironment, rigEnvironment

HOST = "127.0.0.1"


def run(command: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> "subprocess.CompletedProcess[str]":
    """
    Run an independent client; its stdout and stderr together in C{stdout}.
    """
    return subprocess.run(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kwargs)


def kafkaRefusal(config: Dict[str, Any], timeout: float = 20.0) -> Any:
    """
    The first error librdkafka reports when it asks for the cluster's
    metadata with C{config} (a C{KafkaError}); fail if broker 1 is listed
    instead (the listener accepted the client) or nothing happens within
    C{timeout} seconds.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    errors: List[Any] = []
    # log_level 0: the expected failures reach error_cb; no need to print them
    settings: Dict[str, Any] = dict(config)
    settings.update(error_cb=errors.append, log_level=0)
    admin = AdminClient(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if 1 in admin.list_topics(timeout=1).brokers:
                raise AssertionError(f"{config['bootstrap.servers']} accepted this client")
        except KafkaException:
            pass  # only "no metadata": the reason comes through error_cb
        admin.poll(0.2)
        # a timeout only says no answer yet; any other error is the refusal
        # (compared by code: a KafkaError does not compare with other types)
        real = [e for e in errors if e.code() != KafkaError._TIMED_OUT]
        if real:
            return real[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no metadata and no error from {config['bootstrap.servers']} within {timeout}s")


def kafkaProduce(config: Dict[str, Any], topic: str, value: bytes) -> None:
    """
    Produce C{value} to C{topic} with C{config} and wait for the broker's ack.
    """
    from confluent_kafka import Producer

    reports: List[Any] = []
    producer = Producer(dict(config, **{"acks": "all", "message.timeout.ms": 30000}))
    producer.produce(topic, value, on_delivery=lambda err, msg: reports.append(err))
    left = producer.flush(40)
    if left or reports != [None]:
        raise AssertionError(f"produce to {topic} via {config['bootstrap.servers']} failed: {reports!r}")


class RigCase(SynchronousTestCase):
    """
    Reads the rig's values once per test and checks the rig is up.
    """

    rig: RigEnvironment

    def setUp(self) -> None:
        self.rig = rigEnvironment()
        for name in ("EVGATE_TLS_CA_FILE", "EVGATE_KAFKA_SCRAM_PASSWORD_FILE"):
            if not os.path.exists(self.rig[name]):
                self.fail(f"{self.rig[name]} is missing: run scripts/dev-services up")

    def kcatReads(self, topic: str, value: str) -> None:
        """
        kcat on the open PLAINTEXT listener finds C{value} in C{topic}: the
        message really reached the broker.
        """
        done = run(["kcat", "-C", "-b", self.rig["EVGATE_KAFKA_BOOTSTRAP"], "-t", topic, "-o", "beginning",
                    "-e", "-q", "-m", "20"], timeout=40)
        self.assertIn(value, done.stdout.splitlines(), done.stdout)


class EnvironmentTests(RigCase):
    """
    C{dev-services env} describes the rig completely and safely.
    """

    def test_evalGivesTheSameValues(self) -> None:
        """
        What a shell gets from C{eval "$(dev-services env)"} is what
        L{rigEnvironment} parsed, and every variable is exported.
        """
        names = sorted(self.rig)
        script = 'eval "$("$0" env)" && env -0'
        done = subprocess.run(["bash", "-c", script, DEV_SERVICES], capture_output=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        exported = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
        self.assertEqual({n: exported.get(n) for n in names}, dict(self.rig))

    def test_portsFollowTheEnvironment(self) -> None:
        """
        A port set in the environment is the one C{env} reports, so tests
        reach the listeners C{up} opened.
        """
        environ = dict(os.environ, EVGATE_KAFKA_SASL_PORT="39094", EVGATE_MQTT_TLS_PORT="38883")
        other = rigEnvironment(environ)
        self.assertEqual(other["EVGATE_KAFKA_SASL_BOOTSTRAP"], f"{HOST}:39094")
        self.assertEqual(other["EVGATE_MQTT_TLS_PORT"], "38883")

    def test_filesExistAndSecretsArePrivate(self) -> None:
        """
        Every file C{env} names exists; password files and private keys are
        readable by their owner only.
        """
        for name, value in self.rig.items():
            if name.endswith(("_FILE", "_CERT", "_KEY")):
                self.assertTrue(os.path.isfile(value), f"{name}={value} is not a file")
            if name.endswith(("_PASSWORD_FILE", "_KEY")):
                self.assertEqual(stat.S_IMODE(os.stat(value).st_mode), 0o600, name)
                if name.endswith("_PASSWORD_FILE"):
                    self.assertGreaterEqual(len(self.rig.secret(name)), 16, name)

    def test_badCertificatesAreBadForTheRightReason(self) -> None:
        """
        The expired client certificate is signed by the rig's CA but
        expired; the untrusted one does not chain to the rig's CA.
        """
        ca = self.rig["EVGATE_TLS_CA_FILE"]
        good = run(["openssl", "verify", "-CAfile", ca, self.rig["EVGATE_TLS_CLIENT_CERT"]])
        self.assertEqual(good.returncode, 0, good.stdout)
        expired = run(["openssl", "verify", "-CAfile", ca, self.rig["EVGATE_TLS_EXPIRED_CERT"]])
        self.assertIn("certificate has expired", expired.stdout)
        untrusted = run(["openssl", "verify", "-CAfile", ca, self.rig["EVGATE_TLS_UNTRUSTED_CERT"]])
        self.assertNotEqual(untrusted.returncode, 0)
        self.assertIn("unable to get local issuer certificate", untrusted.stdout)

    def test_parseEnvironment(self) -> None:
        """
        Quoted values, comments and the export line are read as a shell would.
        """
        text = "# a comment\nEVGATE_A='x y'\nEVGATE_B='it'\\''s'\nexport EVGATE_A EVGATE_B\n"
        self.assertEqual(parseEnvironment(text), {"EVGATE_A": "x y", "EVGATE_B": "it's"})


class KafkaSecuredTests(RigCase):
    """
    Kafka's SASL_SSL listener (SCRAM-SHA-512, PLAIN) and its SSL listener
    with required client certificates.
    """

    def test_scramProduces(self) -> None:
        """
        The SCRAM-SHA-512 user produces over SASL_SSL, and the message is in
        the broker (read back on the open listener with kcat).
        """
        topic, value = f"rig-scram-{uuid.uuid4().hex}", uuid.uuid4().hex
        kafkaProduce(self.rig.kafkaSasl("SCRAM-SHA-512"), topic, value.encode())
        self.kcatReads(topic, value)

    def test_plainProduces(self) -> None:
        """
        The PLAIN user produces over SASL_SSL.
        """
        topic, value = f"rig-plain-{uuid.uuid4().hex}", uuid.uuid4().hex
        kafkaProduce(self.rig.kafkaSasl("PLAIN"), topic, value.encode())
        self.kcatReads(topic, value)

    def test_plainWithKcat(self) -> None:
        """
        kcat (Debian's librdkafka) lists the broker through SASL_SSL with
        PLAIN, using only what C{env} gives.
        """
        config = self.rig.kafkaSasl("PLAIN")
        args = [f"-X{k}={v}" for k, v in config.items() if k != "bootstrap.servers"]
        done = run(["kcat", "-L", "-m", "10", "-b", config["bootstrap.servers"], *args])
        self.assertIn(f"broker 1 at {self.rig['EVGATE_KAFKA_SASL_BOOTSTRAP']}", done.stdout)

    def test_wrongScramPasswordRefused(self) -> None:
        """
        SCRAM-SHA-512 with a wrong password is an authentication failure.
        """
        from confluent_kafka import KafkaError
        refusal = kafkaRefusal(self.rig.kafkaSasl("SCRAM-SHA-512", password="not-the-password"))
        self.assertEqual(refusal.code(), KafkaError._AUTHENTICATION, refusal.str())

    def test_wrongPlainPasswordRefused(self) -> None:
        """
        PLAIN with a wrong password is an authentication failure.
        """
        from confluent_kafka import KafkaError
        refusal = kafkaRefusal(self.rig.kafkaSasl("PLAIN", password="not-the-password"))
        self.assertEqual(refusal.code(), KafkaError._AUTHENTICATION, refusal.str())

    def test_unknownServerCaRefused(self) -> None:
        """
        A client that trusts another CA refuses the broker's certificate.
        """
        from confluent_kafka import KafkaError
        refusal = kafkaRefusal(self.rig.kafkaSasl(caFile=self.rig["EVGATE_TLS_UNTRUSTED_CA_FILE"]))
        self.assertIn(refusal.code(), {KafkaError._SSL, KafkaError._TRANSPORT}, refusal.str())
        self.assertIn("certificate verify failed", refusal.str())

    def test_clientCertificateProduces(self) -> None:
        """
        The rig's client certificate gets through the SSL listener.
        """
        topic, value = f"rig-ssl-{uuid.uuid4().hex}", uuid.uuid4().hex
        kafkaProduce(self.rig.kafkaSsl(), topic, value.encode())
        self.kcatReads(topic, value)

    def assertSslRefused(self, cert: str) -> None:
        """
        The SSL listener refuses a client with certificate C{cert}.
        """
        from confluent_kafka import KafkaError
        refusal = kafkaRefusal(self.rig.kafkaSsl(cert))
        # the broker ends the handshake with a TLS alert (bad certificate)
        self.assertIn(refusal.code(), {KafkaError._SSL, KafkaError._TRANSPORT}, refusal.str())
        self.assertIn("alert", refusal.str())

    def test_noClientCertificateRefused(self) -> None:
        """
        Without a client certificate the SSL listener ends the handshake.
        """
        self.assertSslRefused("")

    def test_expiredClientCertificateRefused(self) -> None:
        """
        An expired client certificate from the rig's own CA is refused.
        """
        self.assertSslRefused("EVGATE_TLS_EXPIRED")

    def test_untrustedClientCertificateRefused(self) -> None:
        """
        A client certificate from another CA is refused.
        """
        self.assertSslRefused("EVGATE_TLS_UNTRUSTED")


class MosquittoSecuredTests(RigCase):
    """
    Mosquitto's TLS listener: password file and ACL, beside the anonymous one.
    """

    def mqtt(self, tool: str, *args: str, password: Any = True, caFile: str = "",
             timeout: float = 20.0) -> "subprocess.CompletedProcess[str]":
        """
        Run C{mosquitto_pub} or C{mosquitto_sub} against the TLS listener as
        the rig's user (C{password=None}: anonymous; a string: that password).
        """
        command = [tool, "-V", "mqttv5", "-h", HOST, "-p", self.rig["EVGATE_MQTT_TLS_PORT"],
                   "--cafile", caFile or self.rig["EVGATE_TLS_CA_FILE"], "-i", f"rig-test-{uuid.uuid4().hex[:12]}"]
        if password is not None:
            secret = self.rig.secret("EVGATE_MQTT_PASSWORD_FILE") if password is True else password
            command += ["-u", self.rig["EVGATE_MQTT_USER"], "-P", secret]
        return run([*command, *args], timeout=timeout)

    def test_userPublishesAndSubscribes(self) -> None:
        """
        The user publishes a retained message under its prefix and reads it
        back on the TLS listener (retained, so no race with the subscriber).
        """
        prefix = self.rig["EVGATE_MQTT_TOPICS"].rstrip("#")
        topic, value = f"{prefix}{uuid.uuid4().hex}", uuid.uuid4().hex
        done = self.mqtt("mosquitto_pub", "-t", topic, "-m", value, "-q", "1", "-r")
        self.assertEqual(done.returncode, 0, done.stdout)
        self.addCleanup(self.mqtt, "mosquitto_pub", "-t", topic, "-n", "-q", "1", "-r")
        got = self.mqtt("mosquitto_sub", "-t", topic, "-C", "1", "-W", "10")
        self.assertEqual((got.returncode, got.stdout.strip()), (0, value))

    def test_wrongPasswordRefused(self) -> None:
        """
        A wrong password is refused at CONNECT.
        """
        done = self.mqtt("mosquitto_pub", "-t", "evgate/secure/x", "-m", "x", password="not-the-password")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("Not authorized", done.stdout)

    def test_anonymousRefused(self) -> None:
        """
        The TLS listener has no anonymous access, though the open one has.
        """
        done = self.mqtt("mosquitto_pub", "-t", "evgate/secure/x", "-m", "x", password=None)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("Not authorized", done.stdout)

    def test_unknownServerCaRefused(self) -> None:
        """
        A client that trusts another CA refuses the broker's certificate.
        """
        done = self.mqtt("mosquitto_pub", "-t", "evgate/secure/x", "-m", "x",
                         caFile=self.rig["EVGATE_TLS_UNTRUSTED_CA_FILE"])
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("TLS error", done.stdout)

    def test_aclDeniesOtherTopics(self) -> None:
        """
        Outside its prefix the user may not publish (PUBACK 135, Not
        authorized) nor read: subscribed to a retained message outside the
        prefix and then to one inside it, in one SUBSCRIBE, it gets the inside
        one first (retained messages come in the order of the filters).
        """
        published = self.mqtt("mosquitto_pub", "-t", "rig/not-evgate", "-m", "x", "-q", "1")
        self.assertIn("Not authorized", published.stdout)

        prefix = self.rig["EVGATE_MQTT_TOPICS"].rstrip("#")
        outside, inside = f"rig/not-evgate/{uuid.uuid4().hex}", f"{prefix}{uuid.uuid4().hex}"
        openPublish = ["mosquitto_pub", "-V", "mqttv5", "-h", HOST, "-p", self.rig["EVGATE_MQTT_PORT"], "-q", "1", "-r"]
        for topic in (outside, inside):
            done = run([*openPublish, "-t", topic, "-m", topic])
            self.assertEqual(done.returncode, 0, done.stdout)
            self.addCleanup(run, [*openPublish, "-t", topic, "-n"])
        got = self.mqtt("mosquitto_sub", "-t", outside, "-t", inside, "-C", "1", "-W", "10")
        self.assertEqual((got.returncode, got.stdout.strip()), (0, inside))

    def test_openListenerStaysAnonymous(self) -> None:
        """
        The plaintext listener still takes anonymous clients.
        """
        done = run(["mosquitto_pub", "-V", "mqttv5", "-h", HOST, "-p", self.rig["EVGATE_MQTT_PORT"],
                    "-t", "rig/open", "-m", "x", "-q", "1"])
        self.assertEqual(done.returncode, 0, done.stdout)


class RedisSecuredTests(RigCase):
    """
    The second, TLS-only Redis with a password, beside the open one.
    """

    def redis(self, *args: str, user: str = "", password: Any = True, caFile: str = "",
              tls: bool = True) -> "subprocess.CompletedProcess[str]":
        """
        C{redis-cli} against the TLS Redis; the password goes in the
        environment (C{REDISCLI_AUTH}), not the command line.
        """
        command = ["redis-cli", "-h", HOST, "-p", self.rig["EVGATE_REDIS_TLS_PORT"]]
        if tls:
            command += ["--tls", "--cacert", caFile or self.rig["EVGATE_TLS_CA_FILE"]]
        if user:
            command += ["--user", user]
        environ = dict(os.environ)
        environ.pop("REDISCLI_AUTH", None)
        if password is not None:
            environ["REDISCLI_AUTH"] = (self.rig.secret("EVGATE_REDIS_PASSWORD_FILE")
                                        if password is True else password)
        return run([*command, *args], env=environ, timeout=15)

    def test_userAndDefaultPasswordAccepted(self) -> None:
        """
        Both C{AUTH <user> <password>} and C{AUTH <password>} (clients
        without user names) work, and commands run.
        """
        key = f"rig:{uuid.uuid4().hex}"
        self.assertEqual(self.redis("set", key, "1", "EX", "60", user=self.rig["EVGATE_REDIS_USER"]).stdout.strip(),
                         "OK")
        self.assertEqual(self.redis("get", key).stdout.strip(), "1")

    def test_wrongPasswordRefused(self) -> None:
        """
        A wrong password is WRONGPASS.
        """
        done = self.redis("ping", user=self.rig["EVGATE_REDIS_USER"], password="not-the-password")
        self.assertIn("WRONGPASS", done.stdout)

    def test_noPasswordRefused(self) -> None:
        """
        Without a password, commands are refused with NOAUTH.
        """
        done = self.redis("ping", password=None)
        self.assertIn("NOAUTH", done.stdout)

    def test_unknownServerCaRefused(self) -> None:
        """
        A client that trusts another CA refuses the server's certificate.
        """
        done = self.redis("ping", caFile=self.rig["EVGATE_TLS_UNTRUSTED_CA_FILE"])
        self.assertNotIn("PONG", done.stdout)
        self.assertIn("certificate verify failed", done.stdout)

    def test_plaintextRefused(self) -> None:
        """
        The secured port speaks TLS only: a plaintext PING gets no PONG.
        """
        done = self.redis("ping", tls=False)
        self.assertNotIn("PONG", done.stdout)

    def test_openRedisHasNoPassword(self) -> None:
        """
        The open Redis the rest of the suite uses still needs no password.
        """
        done = run(["redis-cli", "-h", HOST, "-p", self.rig["EVGATE_REDIS_PORT"], "ping"],
                   env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"})
        self.assertEqual(done.stdout.strip(), "PONG")
