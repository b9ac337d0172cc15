"""
The garbage collector of a gateway process.

CPython's cyclic collector runs whenever the objects allocated since its
last run, less those freed, pass a threshold (700 by default), and every
so often it runs over the whole heap.  A gateway process holds a large
heap from the moment it starts (Twisted, klein, autobahn, the parsed
configuration: about 90,000 objects) that lives as long as the process
and never becomes garbage.  Under load (a batch of 1,000 records keeps
its records, their delivery callbacks and their positions alive until
the broker acknowledges them) the full collections came several times a
second and each walked that whole heap again: a third of a core went to
the collector while batches were published.

So, at start-up (L{tuneCollector}):

 - once the reactor runs, the start-up heap is collected one last time
   and frozen (C{gc.freeze}): the collector no longer walks it, while
   objects made later are collected as always;
 - the young generation is collected after L{YOUNG_THRESHOLD}
   allocations rather than 700, so that a batch in flight is not walked
   (and promoted to the older generations) a dozen times over.

Objects are still freed as soon as their reference count drops to zero;
only garbage in reference cycles waits for the collector, a little longer.
"""

from __future__ import annotations

import gc
from typing import Any

#: Net allocations of tracked objects before the young generation is
#: collected (CPython's default is 700; 3.13 raised it to 2,000).
YOUNG_THRESHOLD = 10000


def freezeStartupHeap() -> None:
    """
    Collect what start-up left behind, then move every object that
    remains out of the collector's sight.
    """
    gc.collect()
    gc.freeze()


def tuneCollector(reactor: Any) -> None:
    """
    Set this process's collector for serving (see the module's
    docstring): call it once at start-up, before the reactor runs.
    """
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    reactor.callWhenRunning(freezeStartupHeap)
