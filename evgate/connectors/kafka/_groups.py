"""
Group mode: a member of a consumer group reading one topic, polled by HTTP
GET's group mode and webhook deliveries.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.python.failure import Failure

from evgate.connectors.kafka._client import toMessage
from evgate.connectors.kafka._consumer import ConsumerThread
from evgate.connectors.kafka._options import _kafkaReason, consumerSettings
from evgate.errors import EndpointUnavailable, Problem
from evgate.message import Cursor, Message

if TYPE_CHECKING:
    from evgate.connectors.kafka._connector import KafkaConnector

# Seconds the owner thread waits for the group coordinator to confirm a
# commit, polling meanwhile.  A synchronous commit would wait as long as
# librdkafka defers it: while the group has no coordinator (a broker that
# restarts), up to session.timeout.ms (45 s by default), with the thread
# neither reading nor answering polls.  An unconfirmed commit is reported
# as failed and the group reads on: a later commit (absolute offsets)
# covers it, and at worst the group reads those messages again.
COMMIT_WAIT = 0.5

# How long one poll of the wait for a commit blocks: librdkafka serves the
# commit's callback inside poll but does not return from poll for it.
COMMIT_POLL = 0.01

# Seconds between the idle polls of a reader whose buffer is full (its
# deliverer does not take: a webhook receiver that is down).  Each poll
# takes a record, so polling every turn grew the buffer by five records a
# second for as long as the receiver was down; this still serves the
# group's rebalances within a few seconds.
FULL_POLL_INTERVAL = 5.0


class TakeRequest:
    """
    One group-mode poll, shared by the reactor and the owner thread: the
    reactor may abandon it (its own deadline passed), and the thread then
    keeps what it read.
    """

    _ids = itertools.count(1)

    def __init__(self, limit: int, timeout: float) -> None:
        self.id = next(self._ids)
        self.limit = limit
        self.timeout = timeout
        self.abandoned = False


class GroupBatch:
    """
    What a group-mode poll read: C{messages}, the cursor C{first} that
    resumes at the first of them and the cursor C{cursor} that resumes
    after them (both over the partitions this reader owns).

    The caller must end it with L{commit} (the messages reached the client:
    the group's position moves past them) or L{putBack} (they did not: the
    next poll of the group returns them again).  Until then the group's
    other polls wait.
    """

    def __init__(self, reader: Optional["GroupReader"], messages: List[Message], first: Cursor,
                 cursor: Cursor) -> None:
        self.reader = reader
        self.messages = messages
        self.first = first
        self.cursor = cursor
        self.ended = False

    def commit(self) -> Deferred:
        """
        Commit the group's position past C{messages} (on the reader's
        thread, synchronously there).  The Deferred fires once the commit
        has ended; a refusal is logged, and the group reads those messages
        again, as at-least-once allows.
        """
        if self.ended or self.reader is None:
            self.ended = True
            d: Deferred = Deferred()
            d.callback(None)
            return d
        self.ended = True
        offsets: Dict[int, int] = {}
        for message in self.messages:
            offsets[message.partition] = max(offsets.get(message.partition, 0), message.offset + 1)
        return self.reader.commit(offsets)

    def putBack(self) -> None:
        """
        Give the messages back: the group's next poll returns them first.
        """
        if self.ended or self.reader is None:
            self.ended = True
            return
        self.ended = True
        self.reader.putBack(self.messages)

    def takeNext(self, limit: int, timeout: float) -> Deferred:
        """
        End this batch without a commit and, in the same poll turn, take up
        to C{limit} more messages (a Deferred of the next L{GroupBatch}).

        For a caller that keeps delivering these messages while it reads
        the next ones, and commits how far it got itself, as it goes
        (L{GroupReader.commitPositions}): webhook deliveries, whose window
        would otherwise drain at every batch boundary.  A take that fails
        releases the turn.
        """
        self.ended = True
        reader = self.reader
        if reader is None or reader.stopped:
            return fail(EndpointUnavailable("the consumer group reader has closed"))

        def released(failure: Failure) -> Failure:
            reader.release()
            return failure

        return reader.take(limit, timeout).addErrback(released)


class GroupReader(ConsumerThread):
    """
    A member of one consumer group reading one topic, for HTTP GET's group
    mode (the webhook entrypoint can reuse it: same thread model, group
    membership and commits).

    Between polls the thread keeps polling (so that the group's rebalances
    go on) into a buffer of about C{batch-size} records; when the buffer is
    full it takes one record per turn at most.  A poll takes from the
    buffer first.
    A rebalance that takes partitions away drops their buffered records:
    their new owner reads them from the committed position.
    """

    kind = "group"

    def __init__(self, connector: "KafkaConnector", topic: str, group: str, start: str) -> None:
        super().__init__(connector, topic, consumerSettings(connector.options["librdkafka"], group, start))
        self.group = group
        self.lock = DeferredLock()
        self.idleCall: Any = None
        self.lastCursor = Cursor()
        # reactor-side pending polls and commits
        self.requests: Dict[int, Tuple[Deferred, Any]] = {}
        self.commits: Dict[int, Deferred] = {}
        self._commitIds = itertools.count(1)
        # owner-thread state
        self.buffer: List[Message] = []
        self.assigned: Set[int] = set()
        self.fetchPaused = False
        self.pendingTake: Optional[TakeRequest] = None
        self.takeDeadline = 0.0
        self.fullPollAt = 0.0
        # Commits sent and not confirmed yet: commit id, offsets, whether
        # the reactor was answered already (COMMIT_WAIT passed), and when
        # it is answered as failed.
        self.config["on_commit"] = self.onCommit
        self.commitsInFlight: List[Tuple[int, Dict[int, int], bool, float]] = []

    # the reactor side

    def take(self, limit: int, timeout: float) -> Deferred:
        """
        Up to C{limit} messages, waiting up to C{timeout} seconds for the
        first; a Deferred of a L{GroupBatch}.  The caller holds L{lock}.
        """
        request = TakeRequest(limit, timeout)
        d: Deferred = Deferred()
        # The thread answers within its deadline unless it is stuck on a
        # broker request; then the poll fails rather than hang.
        guard = self.connector.reactor.callLater(timeout + self.requestTimeout + 1.0, self.abandon, request)
        self.requests[request.id] = (d, guard)
        self.send("take", request)
        return d

    def abandon(self, request: TakeRequest) -> None:
        """
        The thread did not answer C{request} in time.
        """
        request.abandoned = True
        entry = self.requests.pop(request.id, None)
        if entry is not None:
            entry[0].errback(EndpointUnavailable(
                f"Kafka did not answer the poll of consumer group {self.group} in time",
                retryAfter=self.connector.retryAfter))

    def taken(self, requestId: int, messages: List[Message], first: Cursor, cursor: Cursor) -> None:
        """
        On the reactor: the thread's answer to a take.
        """
        entry = self.requests.pop(requestId, None)
        if entry is None:
            # Abandoned meanwhile: nobody will see these; read them again.
            if messages:
                self.send("putBack", messages)
            return
        d, guard = entry
        if guard.active():
            guard.cancel()
        self.lastCursor = cursor
        d.callback(GroupBatch(self, messages, first, cursor))

    def tookFailed(self, requestId: int, failure: Failure) -> None:
        """
        On the reactor: the thread could not read for a take.
        """
        entry = self.requests.pop(requestId, None)
        if entry is not None:
            if entry[1].active():
                entry[1].cancel()
            entry[0].errback(failure)

    def commit(self, offsets: Mapping[int, int]) -> Deferred:
        """
        Commit C{offsets} (partition to next offset) on the thread, and
        release the poll lock at once: the group's next take goes to the
        thread behind the commit, so it cannot overtake it, and does not
        wait for the coordinator's answer (a broker round trip per page).
        The Deferred fires once the commit has ended; a refusal is logged.
        """
        d: Deferred = Deferred()
        if not offsets:
            self.release()
            d.callback(None)
            return d
        commitId = next(self._commitIds)
        self.commits[commitId] = d
        self.send("commit", commitId, dict(offsets))
        d.addErrback(self._commitFailed)
        self.release()
        return d

    def commitPositions(self, offsets: Mapping[int, int]) -> Deferred:
        """
        Commit C{offsets} (partition to next offset) of the partitions this
        member still owns, without ending the poll turn: the positions of a
        caller that commits as its deliveries settle (see
        L{GroupBatch.takeNext}).  A partition taken away by a rebalance is
        left to its new owner, whose position a late commit from here would
        move back.  The Deferred fires once the commit has ended (a refusal
        is logged).
        """
        d: Deferred = Deferred()
        commitId = next(self._commitIds)
        self.commits[commitId] = d
        self.send("commit", commitId, dict(offsets), True)
        d.addErrback(self._commitFailed)
        return d

    def committed(self, commitId: int, error: Optional[str]) -> None:
        """
        On the reactor: a commit finished, with C{error} if it failed.
        """
        d = self.commits.pop(commitId, None)
        if d is None:
            return
        if error is None:
            d.callback(None)
        else:
            d.errback(EndpointUnavailable(f"committing the position of consumer group {self.group} failed: "
                                          f"{error}", retryAfter=self.connector.retryAfter))

    def _commitFailed(self, failure: Failure) -> None:
        self.log.warn("Kafka endpoint {endpoint}: {reason}; the group reads those messages again",
                      endpoint=self.connector.name, reason=failure.getErrorMessage())

    def putBack(self, messages: List[Message]) -> None:
        """
        Return C{messages} to the front of the buffer, and release the poll
        lock.
        """
        if messages:
            self.send("putBack", messages)
        self.release()

    def release(self) -> None:
        """
        The poll that held the lock has ended; idle time starts.
        """
        if self.lock.locked:
            self.lock.release()
        self.touch()

    def touch(self) -> None:
        """
        (Re)start the idle timer.
        """
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        if self.stopped:
            return
        self.idleCall = self.connector.reactor.callLater(
            self.connector.options["group-idle-timeout"], self.idle)

    def idle(self) -> None:
        """
        Nobody polled for C{group-idle-timeout}: leave the group.
        """
        self.idleCall = None
        if self.lock.locked or self.lock.waiting:
            self.touch()
            return
        self.close()

    def close(self) -> None:
        """
        Leave the group and end the thread.  Idempotent.
        """
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        self.connector.groupClosing(self)
        for requestId in list(self.requests):
            self.tookFailed(requestId, Failure(EndpointUnavailable(
                "the consumer group reader is closing", retryAfter=self.connector.retryAfter)))
        self.stop()

    # the owner thread

    def open(self) -> None:
        super().open()
        self.consumer.subscribe([self.topic], on_assign=self.onAssign, on_revoke=self.onRevoke,
                                on_lost=self.onRevoke)

    def onAssign(self, consumer: Any, partitions: Sequence[Any]) -> None:
        """
        Rebalance (on this thread, inside poll): partitions are ours now.
        """
        self.assigned.update(tp.partition for tp in partitions)
        self.connector.observeBroker(True)

    def onRevoke(self, consumer: Any, partitions: Sequence[Any]) -> None:
        """
        Rebalance: partitions are taken away; their buffered records are
        dropped (the new owner reads them from the committed position).
        """
        gone = {tp.partition for tp in partitions}
        self.assigned -= gone
        self.buffer = [m for m in self.buffer if m.partition not in gone]

    def step(self) -> None:
        request = self.pendingTake
        if request is not None:
            self.serveTake(request)
            return
        if self.commitsInFlight:
            # Commits sent while a take waited: their answers come with
            # polls, now that nothing else is asked of the thread.
            self.awaitCommits()
            if self.commitsInFlight and not self.commands.empty():
                return
        # Nobody waits for records now (librdkafka fetches them meanwhile):
        # take what is there, serving rebalances, then sleep on the command
        # queue, so that the next take or commit starts at once rather than
        # after a blocking poll.  A full buffer still polls, for the group's
        # sake, but only every FULL_POLL_INTERVAL, taking one record each
        # time; the partitions are never paused, which would drop what
        # librdkafka prefetched and cost the next take a fetch
        # (fetch.wait.max.ms, 500 ms by default).
        if len(self.buffer) < self.batchSize or self.now() >= self.fullPollAt:
            self.pollInto(0.0)
            if len(self.buffer) >= self.batchSize:
                self.fullPollAt = self.now() + FULL_POLL_INTERVAL
        self.runCommands(self.pollTimeout)

    def pollInto(self, timeout: float, upTo: int = 0) -> None:
        """
        Poll once (serving rebalances), waiting at most C{timeout} for a
        record, then take what else is there at once, up to the buffer's
        bound (or C{upTo}, for a take that wants more); buffer the records.
        """
        record = self.consumer.poll(timeout)
        if record is None:
            return
        records = [record]
        room = max(self.batchSize, upTo) - len(self.buffer) - 1
        if room > 0:
            records.extend(self.consumer.consume(room, 0))
        for record in records:
            error = record.error()
            if error is None:
                self.buffer.append(toMessage(record, self.topic))
            else:
                self.recordError(record, error)
        if len(self.buffer):
            self.connector.observeBroker(True)

    def refused(self, error: Any) -> Problem:
        return EndpointUnavailable(f"Kafka refuses consumer group {self.group} on topic {self.topic}: "
                                   f"{error.str()}", retryAfter=self.connector.retryAfter)

    def warnRecordError(self, error: Any) -> None:
        self.callOnReactor(self.log.warn, "Kafka endpoint {endpoint}: group {group}: {error}",
                           endpoint=self.connector.name, group=self.group, error=error.str())

    def do_take(self, request: TakeRequest) -> None:
        """
        Command: take up to C{request.limit} messages, as soon as there is
        one or at the request's timeout.  The take stays pending over the
        following steps, which poll for it (and still serve commands).
        """
        if self.pendingTake is not None:
            # Only one take at a time reaches a reader (the poll lock); an
            # earlier one was abandoned by the reactor.
            self.pendingTake.abandoned = True
        self.pendingTake = request
        self.takeDeadline = self.now() + request.timeout
        if len(self.buffer) < request.limit:
            # What librdkafka already has fills the page up to its limit.
            try:
                self.pollInto(0.0, request.limit)
            except Exception:
                self.pendingTake = None
                self.callOnReactor(self.tookFailed, request.id, Failure())
                return
        if not self.buffer and request.limit > 0:
            self.serveTake(request, 0.0)
        else:
            self.answerTake(request)

    def serveTake(self, request: TakeRequest, wait: Optional[float] = None) -> None:
        """
        Poll for the pending take; answer it once there is a message or its
        time is up.
        """
        if request.abandoned:
            self.pendingTake = None
            return
        left = self.takeDeadline - self.now()
        try:
            self.pollInto(max(0.0, min(self.pollTimeout if wait is None else wait, left)))
        except Exception:
            self.pendingTake = None
            self.callOnReactor(self.tookFailed, request.id, Failure())
            return
        if self.buffer or left <= 0 or self.stopRequested.is_set():
            self.answerTake(request)

    def answerTake(self, request: TakeRequest) -> None:
        """
        Hand the pending take its messages.
        """
        self.pendingTake = None
        taken, self.buffer = self.buffer[:request.limit], self.buffer[request.limit:]
        if request.abandoned:
            self.buffer[:0] = taken
            return
        after = self.positions()
        first = dict(after.offsets)
        for message in reversed(taken):
            first[message.partition] = message.offset
        self.callOnReactor(self.taken, request.id, taken, Cursor.fromMapping(first), after)

    def positions(self) -> Cursor:
        """
        Per partition this member owns, the offset of the next message not
        yet returned to a client (where the position is known).
        """
        nextOffsets: Dict[int, int] = {}
        assigned = self.assigned
        unseen = len(assigned)
        for message in self.buffer:
            partition = message.partition
            if partition not in nextOffsets:
                nextOffsets[partition] = message.offset
                if partition in assigned:
                    unseen -= 1
                    if not unseen:
                        # The buffer holds only partitions this member owns
                        # (a revoke drops the others): the rest changes nothing.
                        break
        missing = [p for p in sorted(self.assigned) if p not in nextOffsets]
        if missing:
            for tp in self.consumer.position([self.tp(p) for p in missing]):
                if tp.offset >= 0:
                    nextOffsets[tp.partition] = tp.offset
        return Cursor.fromMapping(nextOffsets)

    def do_commit(self, commitId: int, offsets: Mapping[int, int], owned: bool = False) -> None:
        """
        Command: commit C{offsets} (C{owned}: only those of partitions
        assigned to this member now), and wait up to L{COMMIT_WAIT} seconds
        for the coordinator to confirm it, polling meanwhile (records are
        buffered, rebalances served), unless another command is waiting
        (the group's next take): then the confirmation comes with the
        polls that serve it.
        """
        if owned:
            offsets = {p: o for p, o in offsets.items() if p in self.assigned}
            if not offsets:
                self.callOnReactor(self.committed, commitId, None)
                return
        try:
            self.consumer.commit(offsets=[self.tp(p, o) for p, o in sorted(offsets.items())],
                                 asynchronous=True)
        except Exception as e:
            self.callOnReactor(self.committed, commitId, _kafkaReason(e))
            return
        deadline = self.now() + min(COMMIT_WAIT, self.requestTimeout)
        self.commitsInFlight.append((commitId, dict(offsets), False, deadline))
        self.awaitCommits()

    def awaitCommits(self) -> None:
        """
        Poll for the confirmations of the commits in flight while no
        command waits, and answer as failed those not confirmed by their
        deadline (L{COMMIT_WAIT} after they were sent); their late answers
        are taken without being reported again.
        """
        while (self.commands.empty() and not self.stopRequested.is_set()
               and any(not answered and self.now() < deadline
                       for _, _, answered, deadline in self.commitsInFlight)):
            try:
                self.pollInto(COMMIT_POLL)
            except Exception:
                break
        now = self.now()
        late = [i for i, _, answered, deadline in self.commitsInFlight if not answered and now >= deadline]
        if late:
            self.commitsInFlight = [(i, o, answered or i in late, deadline)
                                    for i, o, answered, deadline in self.commitsInFlight]
            for commitId in late:
                self.callOnReactor(self.committed, commitId,
                                   f"the group coordinator did not confirm it within {COMMIT_WAIT:g} s")

    def waitingFor(self, commitId: int) -> bool:
        """
        Whether the reactor still waits for the outcome of commit
        C{commitId}.
        """
        return any(i == commitId and not answered for i, _, answered, _ in self.commitsInFlight)

    def onCommit(self, error: Any, partitions: Optional[Sequence[Any]]) -> None:
        """
        librdkafka's C{on_commit}, on this thread (inside poll): the outcome
        of a commit sent by L{do_commit}.
        """
        got = {tp.partition: tp.offset for tp in partitions or () if tp.topic == self.topic}
        entry = next((c for c in self.commitsInFlight if c[1] == got),
                     self.commitsInFlight[0] if self.commitsInFlight else None)
        if entry is None:
            return
        self.commitsInFlight.remove(entry)
        commitId, _, answered, _ = entry
        reason: Optional[str] = None
        if error is not None:
            reason = error.str()
        else:
            failed = [tp.error for tp in partitions or () if tp.error is not None]
            if failed:
                reason = failed[0].str()
        # One that was answered already was reported (and logged) as failed.
        if not answered:
            self.callOnReactor(self.committed, commitId, reason)

    def do_putBack(self, messages: List[Message]) -> None:
        """
        Command: put C{messages} back at the front of the buffer (those of
        partitions still ours).
        """
        self.buffer[:0] = [m for m in messages if m.partition in self.assigned]

