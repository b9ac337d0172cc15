"""
Connectors: one module per endpoint type, each an L{evgate.interfaces.IConnector}.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from evgate.config import EndpointConfig
from evgate.errors import Problem


def buildConnector(endpoint: EndpointConfig, reactor: Any) -> Any:
    """
    The connector of one C{[endpoint:NAME]} section.  Broker libraries are
    imported here, only for the types the configuration uses.
    """
    if endpoint.type == "memory":
        from evgate.connectors.memory import MemoryConnector

        return MemoryConnector(endpoint.name, endpoint.options["retention"], reactor)
    if endpoint.type == "kafka":
        from evgate.connectors.kafka import KafkaConnector

        return KafkaConnector(endpoint.name, endpoint.options, reactor)
    if endpoint.type == "mqtt5":
        from evgate.connectors.mqtt import MqttConnector

        return MqttConnector(endpoint.name, endpoint.options, reactor)
    if endpoint.type == "http":
        from evgate.proxy.endpoint import HttpEndpoint

        return HttpEndpoint(endpoint.name, endpoint.options, reactor)
    raise ValueError(f"unknown endpoint type {endpoint.type!r}")


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
