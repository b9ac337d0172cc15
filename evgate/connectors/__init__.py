"""
Connectors: one package or module per endpoint type, each an
L{evgate.interfaces.IConnector}, registered by the name of its C{type} key
in L{CONNECTORS}.
"""

from __future__ import annotations

from typing import Any

from evgate.connectors._publish import publishEach
from evgate.connectors.kafka import KafkaConnector
from evgate.connectors.memory import MemoryConnector
from evgate.connectors.mqtt import MqttConnector
from evgate.ini import EndpointConfig
from evgate.interfaces import IConnector
from evgate.proxy.endpoint import HttpEndpoint
from evgate.registry import Registry

__all__ = ["CONNECTORS", "buildConnector", "publishEach"]


def buildConnector(endpoint: EndpointConfig, reactor: Any) -> IConnector:
    """
    The connector of one C{[endpoint:NAME]} section, made by the class
    registered for its C{type} in L{CONNECTORS}.

    @raise ValueError: for a type nothing is registered as (the
        configuration refuses it first, naming the key).
    """
    if endpoint.type not in CONNECTORS:
        raise ValueError(f"unknown endpoint type {endpoint.type!r}")
    return CONNECTORS.factory(endpoint.type)(endpoint, reactor)


# The endpoint types, by the name of the type key.
CONNECTORS: Registry[IConnector] = Registry(IConnector, "endpoint type")
CONNECTORS.register("memory", MemoryConnector,
                    lambda endpoint, reactor: MemoryConnector(endpoint.name, endpoint.options["retention"], reactor))
CONNECTORS.register("kafka", KafkaConnector,
                    lambda endpoint, reactor: KafkaConnector(endpoint.name, endpoint.options, reactor))
CONNECTORS.register("mqtt5", MqttConnector,
                    lambda endpoint, reactor: MqttConnector(endpoint.name, endpoint.options, reactor))
CONNECTORS.register("http", HttpEndpoint,
                    lambda endpoint, reactor: HttpEndpoint(endpoint.name, endpoint.options, reactor))
