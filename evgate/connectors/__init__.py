"""
Connectors: one module per endpoint type, each an L{evgate.interfaces.IConnector}.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from evgate.config import EndpointConfig
from evgate.connectors.kafka import KafkaConnector
from evgate.connectors.memory import MemoryConnector
from evgate.connectors.mqtt import MqttConnector
from evgate.errors import Problem
from evgate.interfaces import IConnector
from evgate.registry import Registry


def buildConnector(endpoint: EndpointConfig, reactor: Any) -> IConnector:
    """
    The connector of one C{[endpoint:NAME]} section, made by the class
    registered for its C{type} in L{CONNECTORS}.
    """
    return CONNECTORS.factory(endpoint.type)(endpoint, reactor)


def publishEach(connector: Any, topic: str, drafts: Sequence[Any], timeout: float) -> Deferred:
    """
    L{evgate.interfaces.IConnector.publishMany} for a connector without a
    batch path of its own: one C{publish} per draft, all in flight at once.
    """

    def answer(d: Deferred) -> Deferred:
        return d.addErrback(_problemOf)

    return gatherResults([answer(connector.publish(topic, draft, timeout)) for draft in drafts])


def _problemOf(failure: Failure) -> Any:
    if failure.check(Problem):
        return failure.value
    return failure


# The endpoint types, by the name of the type key.
CONNECTORS: Registry[IConnector] = Registry(IConnector, "endpoint type")
CONNECTORS.register("memory", MemoryConnector,
                    lambda endpoint, reactor: MemoryConnector(endpoint.name, endpoint.options["retention"], reactor))
CONNECTORS.register("kafka", KafkaConnector,
                    lambda endpoint, reactor: KafkaConnector(endpoint.name, endpoint.options, reactor))
CONNECTORS.register("mqtt5", MqttConnector,
                    lambda endpoint, reactor: MqttConnector(endpoint.name, endpoint.options, reactor))
