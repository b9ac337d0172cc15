"""
Connectors: one package or module per endpoint type, each an
L{evgate.interfaces.IConnector}.
"""

from __future__ import annotations

from typing import Any

from evgate.connectors._publish import publishEach
from evgate.connectors.kafka import KafkaConnector
from evgate.connectors.memory import MemoryConnector
from evgate.connectors.mqtt import MqttConnector
from evgate.ini import EndpointConfig

__all__ = ["buildConnector", "publishEach"]


def buildConnector(endpoint: EndpointConfig, reactor: Any) -> Any:
    """
    The connector of one C{[endpoint:NAME]} section.
    """
    if endpoint.type == "memory":
        return MemoryConnector(endpoint.name, endpoint.options["retention"], reactor)
    if endpoint.type == "kafka":
        return KafkaConnector(endpoint.name, endpoint.options, reactor)
    if endpoint.type == "mqtt5":
        return MqttConnector(endpoint.name, endpoint.options, reactor)
    raise ValueError(f"unknown endpoint type {endpoint.type!r}")
