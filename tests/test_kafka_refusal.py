"""
Unit tests of a Kafka endpoint whose broker refuses the gateway
(authentication or TLS failed), and of secrets in the Kafka section: on
fakes, see tests/test_secured_integration.py for the real brokers.
"""

from __future__ import annotations

import os
from typing import Any, List

from confluent_kafka import KafkaError
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from evgate.config import ConfigError
from evgate.connectors.kafka import LibrdkafkaLog, parseOptions
from evgate.connectors.kafka._client import refusalOf
from evgate.connectors.kafka._connector import REFUSAL_RELOG
from evgate.errors import EndpointUnavailable
from evgate.message import Draft

from .test_kafka_bridge import TOPIC, ConnectorTestCase, kafkaError, section
from .test_security_tls import selfSigned

SCRAM_REFUSED = ("sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: Authentication failed during "
                 "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 330ms in "
                 "state AUTH_REQ)")
UNTRUSTED_BROKER = ("sasl_ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
                    "certificate verify failed: broker certificate could not be verified")
CERTIFICATE_REFUSED = ("ssl://127.0.0.1:9095/bootstrap: Receive failed: error:0A000416:SSL routines::ssl/tls "
                       "alert certificate unknown: SSL alert number 46 (after 14ms in state APIVERSION_QUERY)")


class RefusalReasonTests(SynchronousTestCase):
    """
    L{refusalOf} tells a broker that refuses the gateway from one that is
    down, and says what to check.
    """

    def test_reasons(self) -> None:
        """
        Authentication, an untrusted broker certificate and a refused client
        certificate are refusals, without librdkafka's timing; a broker that
        is down is not.
        """
        auth = refusalOf(KafkaError._AUTHENTICATION, SCRAM_REFUSED)
        assert auth is not None
        self.assertTrue(auth.startswith("authentication failed: "))
        self.assertIn("sasl.password-file", auth)
        self.assertNotIn("after 330ms", auth)
        tls = refusalOf(KafkaError._SSL, UNTRUSTED_BROKER)
        assert tls is not None
        self.assertIn("the broker's certificate is not trusted", tls)
        self.assertIn("ssl.ca.location", tls)
        cert = refusalOf(KafkaError._TRANSPORT, CERTIFICATE_REFUSED)
        assert cert is not None
        self.assertIn("refused the client certificate", cert)
        self.assertIsNone(refusalOf(KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1:9092 failed: "
                                                           "Connection refused"))
        self.assertIsNone(refusalOf(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))


class RefusedConnectorTests(ConnectorTestCase):
    """
    A connector whose broker refuses it: one log line, /ready's reason,
    and 503s at once.
    """

    def setUp(self) -> None:
        super().setUp()
        self.logged: List[Any] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def refusals(self) -> List[Any]:
        return [e for e in self.logged if "refuses the gateway" in e.get("log_format", "")]

    def refuse(self, text: str = SCRAM_REFUSED, code: int = KafkaError._AUTHENTICATION) -> None:
        self.connector.onClientError(kafkaError(code, text))
        self.connector.onClientError(kafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        self.reactor.runFromThread()

    def test_waitingPublishFailsAtOnce(self) -> None:
        """
        A publish waiting for its delivery report is answered 503 as soon
        as the refusal is known, not after message.timeout.ms; a later one
        is refused without being produced.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.assertNoResult(d)
        self.refuse()
        problem = self.failureResultOf(d, EndpointUnavailable).value
        self.assertIn("authentication failed", problem.detail)
        produced = len(self.producer.produced)
        later = self.connector.publish(TOPIC, Draft(b"y"), 10)
        self.assertIn("refuses the gateway", self.failureResultOf(later, EndpointUnavailable).value.detail)
        self.assertEqual(len(self.producer.produced), produced)
        results = self.successResultOf(self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b")], 10))
        self.assertEqual([type(r) for r in results], [EndpointUnavailable, EndpointUnavailable])

    def test_reasonForReady(self) -> None:
        """
        The refusal is the endpoint's C{notConnectedReason}, and a later
        "all brokers down" does not replace it.
        """
        self.refuse()
        self.assertFalse(self.connector.connected)
        reason = self.connector.notConnectedReason
        assert reason is not None
        self.assertTrue(reason.startswith("authentication failed: "), reason)

    def test_oneLogLine(self) -> None:
        """
        The refusal is logged once however often librdkafka retries, again
        after REFUSAL_RELOG seconds with the count of repeats, and at once
        when the reason changes.
        """
        for _ in range(5):
            self.refuse()
            self.connector._refusalSeen = (None, 0.0)
        self.assertEqual(len(self.refusals()), 1)
        self.assertFalse([e for e in self.logged if "broker unreachable" in e.get("log_format", "")])
        self.reactor.advance(REFUSAL_RELOG)
        self.refuse()
        self.assertEqual(len(self.refusals()), 2)
        self.assertIn("again 4 times", self.refusals()[-1]["repeats"])
        self.refuse(CERTIFICATE_REFUSED, KafkaError._TRANSPORT)
        self.assertEqual(len(self.refusals()), 3)

    def test_newSubscriptionFails(self) -> None:
        """
        A subscription asked for while the broker refuses fails with the
        reason (a 503 for the client) instead of waiting.
        """
        self.refuse()
        self.subscribe()
        self.reactor.advance(0)
        kinds = self.sink.kinds()
        self.assertEqual(kinds, ["failed"])
        self.assertIn("authentication failed", self.sink.events[0][1].value.detail)

    def test_acceptedAgain(self) -> None:
        """
        Once a broker is seen up (statistics, a delivery), the refusal is
        over and publishes go to the producer again.
        """
        self.refuse()
        self.connector._setConnected(True)
        self.assertIsNone(self.connector.refusal)
        self.assertIsNone(self.connector.notConnectedReason)
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.assertNoResult(d)

    def test_librdkafkaLinesDropped(self) -> None:
        """
        librdkafka's own FAIL lines about a refusal are not logged (the
        connector's one line says it); its other lines still are.
        """
        log = LibrdkafkaLog(self.connector)
        log.log(3, "FAIL [rdkafka#producer-1] [thrd:x]: " + SCRAM_REFUSED)
        log.log(3, "FAIL [rdkafka#producer-1] [thrd:x]: Connect to ipv4#127.0.0.1:9092 failed")
        self.reactor.runFromThread()
        lines = [e["line"] for e in self.logged if "line" in e]
        self.assertEqual(len(lines), 1)
        self.assertIn("Connect to", lines[0])


class SecretPropertyTests(SynchronousTestCase):
    """
    C{<librdkafka property>-file} keys and systemd credentials in a Kafka
    section.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def parse(self, **values: str) -> Any:
        reader = section(dict({"bootstrap.servers": "127.0.0.1:9094"}, **values))
        reader.get("type")
        return parseOptions(reader)

    def secret(self, name: str, content: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, 0o600)
        return path

    def test_passwordFile(self) -> None:
        """
        C{sasl.password-file} sets librdkafka's C{sasl.password} to the
        file's content (without its newline); the key itself is not passed
        on.
        """
        path = self.secret("pw", "s3cret\n")
        options = self.parse(**{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                "sasl.username": "u", "sasl.password-file": path})
        self.assertEqual(options["librdkafka"]["sasl.password"], "s3cret")
        self.assertNotIn("sasl.password-file", options["librdkafka"])

    def test_bothForms(self) -> None:
        """
        A property set inline and from a file is an error naming the file
        key.
        """
        path = self.secret("pw", "s3cret")
        e = self.assertRaises(ConfigError, self.parse, **{"sasl.password": "x", "sasl.password-file": path})
        self.assertEqual(e.key, "sasl.password-file")

    def test_unknownProperty(self) -> None:
        """
        A C{-file} key for a property librdkafka does not know is refused by
        librdkafka's check, naming the property.
        """
        path = self.secret("pw", "v")
        e = self.assertRaises(ConfigError, self.parse, **{"no.such.property-file": path})
        self.assertIn("no.such.property", str(e))

    def test_credentialLocation(self) -> None:
        """
        A C{*.location} property may name a systemd credential.
        """
        self.patch(os, "environ", dict(os.environ, CREDENTIALS_DIRECTORY=self.directory))
        selfSigned(self.directory)
        os.rename(os.path.join(self.directory, "gateway.pem"), os.path.join(self.directory, "ca.pem"))
        options = self.parse(**{"security.protocol": "SSL", "ssl.ca.location": "credential:ca.pem"})
        self.assertEqual(options["librdkafka"]["ssl.ca.location"], os.path.join(self.directory, "ca.pem"))
