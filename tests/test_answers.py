"""
Tests for L{evgate.answers}: problem answers, and knowing that a client
left through public Twisted APIs only.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from evgate.answers import clientLeft, finishWithProblem, watchDeparture
from evgate.errors import Problem
from evgate.site import GatewayRequest


class DepartureTests(SynchronousTestCase):
    """
    L{watchDeparture} and L{clientLeft}.
    """

    def test_leftAfterConnectionLost(self) -> None:
        """
        A watched request whose client leaves (notifyFinish fails, as
        DummyRequest.processingFailed makes it) is seen as left, and a
        problem for it is not written.
        """
        request = DummyRequest([b""])
        watchDeparture(request)
        self.assertFalse(clientLeft(request))
        request.processingFailed(Failure(ConnectionLost()))
        self.assertTrue(clientLeft(request))
        finishWithProblem(request, Problem("too late"))
        self.assertEqual(request.written, [])

    def test_finishedIsLeft(self) -> None:
        """
        A finished request needs no answer either.
        """
        request = DummyRequest([b""])
        watchDeparture(request)
        request.finish()
        self.assertTrue(clientLeft(request))

    def test_gatewayRequestNeedsNoDeferred(self) -> None:
        """
        A GatewayRequest notes its client's departure itself: watching it
        adds no notifyFinish Deferred.
        """
        request = GatewayRequest(DummyChannel())
        watchDeparture(request)
        self.assertEqual(request.notifications, [])
        self.assertFalse(clientLeft(request))
        request.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(clientLeft(request))
