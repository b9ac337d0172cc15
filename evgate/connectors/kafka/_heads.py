"""
Where each partition of a topic ends, as the Kafka connector's readers last
saw it: the connector's answer to L{evgate.interfaces.IHeadOffsets} without
asking a broker on the reactor.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional


class KnownHeads:
    """
    The next offset (high watermark) of every partition of the topics the
    connector reads, kept on the reactor thread from what the readers'
    threads report.

    Two kinds of report: a broker's answer (L{fetched}, a reader resolving
    where it starts) is the truth at that moment and replaces what was
    known, so a topic deleted and created again shows its new, lower heads;
    what a reader sees while reading (L{seen}: records it read, librdkafka's
    cached watermarks) only ever moves a head forward, because reports from
    several readers of one topic may arrive in any order.
    """

    def __init__(self) -> None:
        self._topics: Dict[str, Dict[int, int]] = {}

    def fetched(self, topic: str, heads: Mapping[int, int]) -> None:
        """
        A broker said where the partitions in C{heads} end.
        """
        if heads:
            self._topics.setdefault(topic, {}).update(heads)

    def seen(self, topic: str, heads: Mapping[int, int]) -> None:
        """
        A reader saw the partitions in C{heads} reach at least so far.
        """
        if not heads:
            return
        known = self._topics.setdefault(topic, {})
        for partition, offset in heads.items():
            if known.get(partition, -1) < offset:
                known[partition] = offset

    def forget(self, topic: str) -> None:
        """
        No reader of C{topic} is left to keep its heads fresh.
        """
        self._topics.pop(topic, None)

    def of(self, topic: str) -> Optional[Mapping[int, int]]:
        """
        A copy of the heads known of C{topic}, or L{None} when no reader
        has reported any.
        """
        known = self._topics.get(topic)
        return dict(known) if known else None
