"""
What connectors without a batch path of their own share for
L{evgate.interfaces.IConnector.publishMany}.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from evgate.errors import Problem


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
