"""
Replay of a webhook subscription on Kafka: moving its consumer group's
committed offsets.

A Kafka subscription's position is its consumer group's committed offsets
(L{evgate.webhook.kafka}), shared by every node delivering it.  Kafka lets
a client that is not a member commit offsets only while the group has no
members, so a replay:

 1. pauses the subscription (the store's C{paused}, which every node reads
    at its next sync and stops its deliverer for; a stopped deliverer's
    feed leaves the group at once);
 2. waits, up to a bound, until the group has no members, asking the
    broker (C{AdminClient.describe_consumer_groups}); members that remain
    (a node that does not sync, a node of another configuration) make the
    replay fail with L{GroupStillActive}, and the subscription is left as
    it was;
 3. finds the offsets: for a time, the first offset of each partition at
    or after it (C{Consumer.offsets_for_times}; the head where none is);
    for a cursor, its offsets (the low watermark for a partition it does
    not name), each kept within the partition's watermarks;
 4. commits them as the group's, with a consumer of the group that never
    joins it (a commit the broker refuses if a member joined meanwhile);
 5. writes the new position to the store (which seeds the group should
    Kafka forget it) and resumes, unless the subscription was paused.

Steps 2 to 4 are blocking confluent-kafka calls, each on a thread of its
own (L{evgate.threads.deferToOwnThread}).  Delivery is at-least-once:
every message from the new position on is delivered again, including
those delivered before.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from evgate.connectors.kafka import consumerSettings
from evgate.errors import EndpointUnavailable
from evgate.threads import deferToOwnThread

# How long a replay waits for the group to have no members, in seconds,
# beyond the store sync interval (every node stops its deliverer within one
# sync; leaving the group takes a moment more).
MEMBERS_GRACE = 15.0

# Between two looks at the group's members.
MEMBERS_POLL = 0.5


class GroupStillActive(EndpointUnavailable):
    """
    The subscription's consumer group still has members: its offsets
    cannot be moved now.
    """

    slug = "group-still-active"
    title = "The consumer group still has members"


def _admin(connector: Any) -> Any:
    from confluent_kafka.admin import AdminClient  # librdkafka is loaded when first needed

    config: Dict[str, Any] = dict(connector.options["librdkafka"])
    config["logger"] = connector.librdkafkaLog
    config["error_cb"] = connector.onClientError
    return AdminClient(config)


def groupMembers(connector: Any, groupId: str) -> Deferred:
    """
    The members of consumer group C{groupId}, as C{"client-id@host"}
    texts (an empty list for a group without members or unknown to the
    broker), asked on a thread of its own.
    """
    timeout = connector.options["request-timeout"]

    def work() -> list:
        admin = _admin(connector)
        futures = admin.describe_consumer_groups([groupId], request_timeout=timeout)
        description = futures[groupId].result(timeout=timeout + 1)
        return [f"{m.client_id}@{m.host}" for m in description.members or ()]

    return deferToOwnThread(connector.reactor, work, f"evgate-kafka-members-{groupId}", connector.startThread)


def waitForNoMembers(connector: Any, groupId: str, seconds: float, reactor: Any,
                     poll: float = MEMBERS_POLL) -> Deferred:
    """
    Fire once consumer group C{groupId} has no members; fail with
    L{GroupStillActive} (naming them) if it still has some after
    C{seconds}.
    """
    deadline = reactor.seconds() + seconds

    def look(_: Any = None) -> Deferred:
        d = groupMembers(connector, groupId)
        d.addCallback(judge)
        return d

    def judge(members: list) -> Any:
        if not members:
            return None
        if reactor.seconds() >= deadline:
            raise GroupStillActive(
                f"consumer group {groupId} still has {len(members)} member(s) after {seconds:g} s "
                f"({', '.join(sorted(members)[:5])}): a node that delivers the subscription did not stop; "
                "its position was not moved (try again, or stop that node)")
        return deferLater(reactor, poll, lambda: None).addCallback(look)

    return look()


def commitGroupOffsets(connector: Any, topic: str, groupId: str, at: Optional[int] = None,
                       offsets: Optional[Mapping[int, int]] = None) -> Deferred:
    """
    Commit the offsets of consumer group C{groupId} on C{topic}: those of
    the first message of each partition at or after C{at} (milliseconds),
    or C{offsets} (partition to next offset; the low watermark for a
    partition it does not name).  Offsets are kept within each partition's
    watermarks.  On a thread of its own, with a consumer that never joins
    the group.

    @return: a Deferred of the offsets committed (partition to offset).
    """
    timeout = connector.options["request-timeout"]
    clients = connector.clients

    def work() -> Dict[int, int]:
        config: Dict[str, Any] = consumerSettings(connector.options["librdkafka"], groupId, "earliest")
        config["logger"] = connector.librdkafkaLog
        config["error_cb"] = connector.onClientError
        consumer = clients.consumer(config)
        try:
            metadata = consumer.list_topics(topic, timeout=timeout)
            described = metadata.topics.get(topic)
            if described is None or described.error is not None or not described.partitions:
                raise EndpointUnavailable(f"topic {topic} has no partitions the broker knows of")
            partitions = sorted(described.partitions)
            marks = {p: consumer.get_watermark_offsets(clients.topicPartition(topic, p), timeout=timeout)
                     for p in partitions}
            wanted: Dict[int, int] = {}
            if at is not None:
                found = consumer.offsets_for_times([clients.topicPartition(topic, p, at) for p in partitions],
                                                   timeout=timeout)
                for tp in found:
                    # -1: no message at or after that time: the head.
                    wanted[tp.partition] = tp.offset if tp.offset >= 0 else marks[tp.partition][1]
            else:
                given = offsets or {}
                for p in partitions:
                    wanted[p] = given.get(p, marks[p][0])
            for p, offset in wanted.items():
                low, high = marks[p]
                wanted[p] = min(max(offset, low), high)
            consumer.commit(offsets=[clients.topicPartition(topic, p, o) for p, o in sorted(wanted.items())],
                            asynchronous=False)
            return wanted
        finally:
            consumer.close()

    return deferToOwnThread(connector.reactor, work, f"evgate-kafka-replay-{groupId}", connector.startThread)
