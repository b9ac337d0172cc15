"""
Crossing between the reactor thread and the threads of blocking libraries
(confluent-kafka, paho-mqtt).

The rule is the one of docs/architecture.md: a library thread touches
Twisted only through C{reactor.callFromThread}, and the reactor thread never
waits on a library.  This module is the one place that rule is written down
as code:

 - L{callOnReactor}: one call hopped to the reactor, dropped quietly once
   the reactor has stopped (a daemon thread left behind at exit must not
   die on C{ReactorNotRunning}, nor print a traceback on its way out).

 - L{ReactorBatches}: many results of a library thread coalesced into one
   C{callFromThread} per batch, so that a burst of delivery reports or
   messages wakes the reactor once rather than once per item.

 - L{OwnerThread}: a thread that owns one blocking client, with the
   command queue through which the reactor talks to it and the Deferred
   that fires on the reactor when it has ended (L{ThreadExit}).

 - L{deferToOwnThread}: one blocking job on a daemon thread of its own,
   answered on the reactor.

Threads are daemons everywhere: a thread stuck on a broker that is gone must
not keep the process from exiting.  Who starts them is a parameter
(C{startThread}) so that unit tests can take the thread's function and run it
themselves, one turn at a time.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, List, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

#: Starts C{target} on a new thread named C{name}.
StartThread = Callable[[Callable[[], None], str], None]


def startDaemonThread(target: Callable[[], None], name: str) -> None:
    """
    Run C{target} on a new daemon thread: a thread stuck on a broker that is
    gone must not keep the process from exiting.
    """
    threading.Thread(target=target, name=name, daemon=True).start()


def callOnReactor(reactor: Any, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """
    Run C{f(*args, **kwargs)} on the reactor thread; callable from any
    thread.  Once the reactor has stopped the call is dropped without a
    word: the thread calling is one left behind at exit, and nothing on the
    reactor side waits for it any more.
    """
    try:
        reactor.callFromThread(f, *args, **kwargs)
    except Exception:  # ReactorNotRunning, or a waker already closed at exit
        pass


class ReactorBatches(Generic[T]):
    """
    Items produced on library threads, handed to the reactor in batches.

    L{add} collects an item without waking the reactor; L{flush} makes sure
    one hop to the reactor is on its way for what was collected (if one is
    already on its way, the items simply join it); L{put} is both.  On the
    reactor, C{handle} gets the items in the order they were added, at most
    C{perTurn} per reactor turn (the rest wait for the next turn, so that a
    burst cannot starve the reactor's other work).

    A library that calls back many times inside one blocking call (librdkafka's
    C{poll()} serving delivery reports) uses L{add} for each and L{flush}
    after the call; one that calls back once per event (paho) uses L{put}.
    Either way a burst costs one C{callFromThread}, whose own cost (a lock
    and a write to the reactor's waker) is what this saves.

    @ivar handOverAt: with this many items collected, L{add} flushes by
        itself, so that a long burst reaches the reactor while the library
        thread is still producing it.
    """

    def __init__(self, reactor: Any, handle: Callable[[List[T]], None], perTurn: Optional[int] = None,
                 handOverAt: Optional[int] = None) -> None:
        self.reactor = reactor
        self.handle = handle
        self.perTurn = perTurn
        self.handOverAt = handOverAt
        self._lock = threading.Lock()
        self._items: List[T] = []
        self._scheduled = False
        self._reactorGone = False

    def __len__(self) -> int:
        """
        How many items wait for the reactor.
        """
        return len(self._items)

    def add(self, item: T) -> None:
        """
        Collect C{item} (on a library thread) without waking the reactor,
        unless L{handOverAt} items are waiting.
        """
        with self._lock:
            if self._reactorGone:
                return
            self._items.append(item)
            full = self.handOverAt is not None and len(self._items) >= self.handOverAt
        if full:
            self.flush()

    def put(self, item: T) -> None:
        """
        Collect C{item} and make sure the reactor will handle it.
        """
        with self._lock:
            if self._reactorGone:
                return
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._hop()

    def flush(self) -> None:
        """
        Make sure the reactor will handle what was collected (on a library
        thread).
        """
        with self._lock:
            if not self._items or self._scheduled or self._reactorGone:
                return
            self._scheduled = True
        self._hop()

    def _hop(self) -> None:
        try:
            self.reactor.callFromThread(self.drain)
        except Exception:
            # The reactor stopped: nobody will drain; keep nothing either,
            # or a thread left behind at exit would fill memory.
            with self._lock:
                self._reactorGone = True
                self._items = []

    def drain(self) -> None:
        """
        On the reactor thread: hand the waiting items to C{handle}, at most
        C{perTurn} of them; the rest go in a later reactor turn.
        """
        with self._lock:
            if self.perTurn is None:
                items, self._items = self._items, []
            else:
                items = self._items[:self.perTurn]
                del self._items[:self.perTurn]
            more = bool(self._items)
            if not more:
                self._scheduled = False
        try:
            if items:
                self.handle(items)
        finally:
            if more:
                self.reactor.callLater(0, self.drain)


class ThreadExit:
    """
    The reactor-side record of a thread's end: Deferreds that fire, on the
    reactor, once it has ended.
    """

    def __init__(self) -> None:
        self.exited = False
        self._waiters: List[Deferred] = []

    def when(self) -> Deferred:
        """
        A Deferred that fires with L{None} once the thread has ended (at once
        if it has).
        """
        d: Deferred = Deferred()
        if self.exited:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def fire(self) -> None:
        """
        On the reactor: the thread has ended.
        """
        self.exited = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class OwnerThread:
    """
    A thread that owns one blocking client: nothing else touches the client.

    The reactor side calls L{start}, L{send} and L{requestStop}, and waits
    with L{whenExited}.  The thread runs L{run} (a subclass's), serves the
    commands the reactor sent with L{runCommands} -- a command
    C{("name", args)} runs C{self.do_name(*args)} on the thread -- and
    reaches the reactor only through L{callOnReactor}.  When it ends it
    calls L{ended}, which fires L{whenExited} on the reactor.

    @ivar commands: the reactor's commands, in the order sent.
    @ivar stopRequested: set by the reactor when the thread should end.
    @ivar exits: the thread's end, on the reactor side.
    """

    def __init__(self, reactor: Any, startThread: StartThread = startDaemonThread) -> None:
        self.reactor = reactor
        self.startThread = startThread
        self.commands: "queue.SimpleQueue[Tuple[str, tuple]]" = queue.SimpleQueue()
        self.stopRequested = threading.Event()
        self.exits = ThreadExit()

    # the reactor side

    def threadName(self) -> str:
        """
        The name of the thread, for debuggers and thread dumps.
        """
        return f"evgate-{type(self).__name__}"

    def start(self) -> None:
        """
        Start the owner thread.
        """
        self.startThread(self.run, self.threadName())

    def send(self, command: str, *args: Any) -> None:
        """
        Queue C{command} for the owner thread.
        """
        self.commands.put((command, args))

    def requestStop(self) -> None:
        """
        Ask the owner thread to end (it looks at L{stopRequested} between
        turns).
        """
        self.stopRequested.set()

    def whenExited(self) -> Deferred:
        """
        A Deferred that fires on the reactor thread once the owner thread
        has ended.
        """
        return self.exits.when()

    # the owner thread

    def run(self) -> None:
        """
        The owner thread's whole life; subclasses write it, and call
        L{ended} last.
        """
        raise NotImplementedError

    def runCommands(self, wait: float = 0.0) -> None:
        """
        Run the queued commands, waiting up to C{wait} seconds for the first
        one: how an owner thread sleeps, so that a command (a stop above
        all) wakes it at once.
        """
        try:
            if wait > 0:
                command, args = self.commands.get(timeout=wait)
            else:
                command, args = self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            getattr(self, "do_" + command)(*args)
            try:
                command, args = self.commands.get_nowait()
            except queue.Empty:
                return

    def callOnReactor(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Run C{f} on the reactor thread (see L{callOnReactor}).
        """
        callOnReactor(self.reactor, f, *args, **kwargs)

    def ended(self) -> None:
        """
        On the owner thread, last: tell the reactor the thread has ended.
        """
        self.callOnReactor(self.exits.fire)


def deferToOwnThread(reactor: Any, work: Callable[[], T], name: str,
                     startThread: StartThread = startDaemonThread) -> "Deferred[T]":
    """
    Run the blocking C{work} on a new thread named C{name}.  Unlike
    C{deferToThread}, this does not take a thread of the reactor's shared
    pool, which a job stuck on a broker that is gone would hold for good.

    @return: a Deferred that fires on the reactor with C{work}'s result, or
        fails with what it raised.
    """
    d: Deferred = Deferred()

    def onThread() -> None:
        try:
            result = work()
        except BaseException:
            callOnReactor(reactor, d.errback, Failure())
        else:
            callOnReactor(reactor, d.callback, result)

    startThread(onThread, name)
    return d
