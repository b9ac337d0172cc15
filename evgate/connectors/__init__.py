"""
Connectors: one module per endpoint type, each an L{evgate.interfaces.IConnector}.
"""

from __future__ import annotations

from typing import Any

from evgate.config import EndpointConfig


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
    raise ValueError(f"unknown endpoint type {endpoint.type!r}")
