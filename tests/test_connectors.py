"""
Tests of the connectors package's public face: L{buildConnector} and the
capabilities of the in-memory connector.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from evgate.connectors import buildConnector
from evgate.connectors.memory import MemoryConnector
from evgate.ini import EndpointConfig
from evgate.interfaces import IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog, ISharedSubscriptions
from evgate.message import Draft


class MemoryCapabilityTests(SynchronousTestCase):
    """
    The interfaces the in-memory connector declares, and those it does not.
    """

    def setUp(self) -> None:
        self.connector = MemoryConnector("mem", 100, Clock(), epoch=3)

    def test_capabilities(self) -> None:
        """
        It provides L{IConnector}, L{IHeadOffsets} and L{IRetainedLog},
        class and instance alike.
        """
        for interface in (IConnector, IHeadOffsets, IRetainedLog):
            verifyClass(interface, MemoryConnector)
            verifyObject(interface, self.connector)

    def test_notCapabilities(self) -> None:
        """
        It has neither consumer groups nor share groups.
        """
        self.assertFalse(IConsumerGroups.providedBy(self.connector))
        self.assertFalse(ISharedSubscriptions.providedBy(self.connector))

    def test_headOffsets(self) -> None:
        """
        C{headOffsets} is the next offset of the topic's one partition.
        """
        self.assertEqual(self.connector.headOffsets("t"), {0: 0})
        self.successResultOf(self.connector.publish("t", Draft(b"x")))
        self.assertEqual(self.connector.headOffsets("t"), {0: 1})


class BuildConnectorTests(SynchronousTestCase):
    """
    L{buildConnector} picks the connector by endpoint type.
    """

    def test_memory(self) -> None:
        """
        A memory endpoint gets a L{MemoryConnector} with its retention.
        """
        connector = buildConnector(EndpointConfig("mem", "memory", {"retention": 5}), Clock())
        self.assertIsInstance(connector, MemoryConnector)
        self.assertEqual(connector.retention, 5)

    def test_unknown(self) -> None:
        """
        An unknown type is refused.
        """
        self.assertRaises(ValueError, buildConnector, EndpointConfig("x", "nope", {}), Clock())
