"""
Tests for how the gateway resource asks an API's plans: a plan that knows
its answer at once (L{ISynchronousPlan}, keyless) is asked without a
Deferred, any other plan through C{authenticate}; either way the answers
are the same.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from evgate.gateway import synchronousPlans
from evgate.interfaces import IPlan, ISynchronousPlan
from evgate.security.keyless import ANONYMOUS

from .helpers import memoryGateway
from .test_security_apikey import keyGateway

URL = "http://gateway.test/demo"


def post(gateway: Any, path: bytes = b"/demo", headers: Any = ()) -> DummyRequest:
    """
    A POST of a small JSON record to C{path}, rendered by C{gateway}'s
    resource; the request is returned once render has returned.
    """
    request = DummyRequest([])
    request.method = b"POST"
    request.path = request.uri = path
    request.content = _Body(b'{"n":1}')
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    for name, value in headers:
        request.requestHeaders.setRawHeaders(name, [value])
    result = gateway.resource.render(request)
    if result is not NOT_DONE_YET and not request.finished:
        request.write(result)
        request.finish()
    return request


class _Body:
    """
    A request body that can be read once, whole.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, *args: Any) -> bytes:
        data, self.data = self.data, b""
        return data


class SynchronousPlanTests(SynchronousTestCase):
    """
    Keyless answers at once; the gateway knows it from the interface, when
    the API is built.
    """

    def test_keylessProvides(self) -> None:
        """
        The keyless plan is an L{ISynchronousPlan} and still an L{IPlan}
        whose C{authenticate} answers with a Deferred.
        """
        gateway = memoryGateway()
        plan = gateway.apis[0].plans[0]
        self.assertTrue(verifyObject(ISynchronousPlan, plan))
        self.assertTrue(verifyObject(IPlan, plan))
        self.assertIs(plan.consumerOf(None), ANONYMOUS)
        self.assertIs(self.successResultOf(plan.authenticate(None)), ANONYMOUS)

    def test_builtOnce(self) -> None:
        """
        Building an API records which of its plans answer at once: keyless,
        not api-key.
        """
        gateway = keyGateway(Clock(), "keyless api-key")
        api = gateway.node.api("demo")
        self.assertEqual([p.name for p in api.synchronousPlans], ["keyless"])
        self.assertEqual(synchronousPlans(api.plans), api.synchronousPlans)
        self.assertEqual(gateway.node.api("other").synchronousPlans, {})

    def test_keylessWithoutAuthenticate(self) -> None:
        """
        A keyless request is answered through C{consumerOf}, before render
        returns: the plan's Deferred-answering C{authenticate} is not used.
        """
        gateway = memoryGateway()
        plan = gateway.apis[0].plans[0]
        self.patch(plan, "authenticate", lambda request: self.fail("authenticate was asked"))
        request = post(gateway)
        self.assertTrue(request.finished)
        self.assertEqual(request.responseCode, 202)

    def test_credentialsOnKeyless(self) -> None:
        """
        A request with credentials on a keyless API is still a 401 problem,
        answered at once.
        """
        request = post(memoryGateway(), headers=[(b"authorization", b"Bearer x")])
        self.assertTrue(request.finished)
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/problem+json"])

    def test_rateLimited(self) -> None:
        """
        Keyless under a local rate limit: the request is counted and gets
        its RateLimit headers at once, and the one over the limit is a 429.
        """
        gateway = memoryGateway(clock=Clock(), extra="rate-limit = 1/min\n")
        first = post(gateway)
        self.assertEqual(first.responseCode, 202)
        self.assertEqual(first.responseHeaders.getRawHeaders(b"ratelimit-remaining"), [b"0"])
        second = post(gateway)
        self.assertTrue(second.finished)
        self.assertEqual(second.responseCode, 429)

    def test_otherPlansDeferred(self) -> None:
        """
        A plan that is not synchronous (api-key) answers through
        C{authenticate}: a missing key is still a 401 with its challenge.
        """
        treq = StubTreq(keyGateway(Clock()).resource)
        response = self.successResultOf(treq.post(URL, data=b'{"n":1}'))
        self.assertEqual(response.code, 401)
        self.assertTrue(response.headers.getRawHeaders("www-authenticate"))
