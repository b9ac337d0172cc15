"""
Unit tests of reloading evgate.ini (evgate.reload): what a reload applies,
what it refuses, and that open streams of unchanged APIs stay open, on a
gateway driven by a L{Clock} through StubTreq.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase

from evgate.config import ConfigError
from evgate.reload import RestartRequired

from .test_ops import TOKEN, OpsHarness, iniText

API_B = """
[api:b]
path = /b
endpoint = local
topic = b
entrypoints = http-post http-get
"""

API_C_ON_NEW_ENDPOINT = """
[endpoint:extra]
type = memory

[api:c]
path = /c
endpoint = extra
topic = c
entrypoints = http-post
"""


class ReloadTests(SynchronousTestCase):
    """
    Reloads through the gateway's reloader (what SIGHUP runs) and through
    POST /reload.
    """

    def setUp(self) -> None:
        self.ops = OpsHarness()

    def reload(self) -> Any:
        """
        Run a reload; its plan, or the failure's exception.
        """
        results: List[Any] = []
        d = self.ops.gateway.reloader.reload()
        d.addBoth(results.append)
        self.ops.settle()
        self.assertEqual(len(results), 1)
        result = results[0]
        return result.value if hasattr(result, "value") and hasattr(result, "trap") else result

    def openStream(self) -> Any:
        """
        An SSE stream on API demo.
        """
        stream = self.ops.stream("/demo", {"Accept": "text/event-stream"})
        self.assertEqual(stream.response.code, 200)
        return stream

    def test_addApi(self) -> None:
        """
        An API added to the file is served after the reload, and an open
        stream of an unchanged API stays open and keeps receiving.
        """
        stream = self.openStream()
        self.assertEqual(self.ops.publish("/b", b"x"), 404)
        self.ops.rewrite(extra=API_B)
        plan = self.reload()
        self.assertEqual((plan.added, plan.unchanged, plan.changed, plan.removed), (["b"], ["demo"], [], []))
        self.assertEqual(self.ops.publish("/b", b"for b"), 202)
        self.assertEqual(self.ops.publish("/demo", b"after the reload"), 202)
        self.assertFalse(stream.done)
        self.assertIn(b"data: after the reload", stream.body)
        self.assertEqual(self.ops.gateway.metrics.reloads["applied"], 1)

    def test_changeApi(self) -> None:
        """
        A changed API serves its new definition, and its open streams end
        so that clients reconnect to it.
        """
        stream = self.openStream()
        self.ops.rewrite(extra="sse.retry = 500\n")
        plan = self.reload()
        self.assertEqual(plan.changed, ["demo"])
        self.ops.settle()
        self.assertTrue(stream.done)
        self.assertEqual(self.ops.gateway.api("demo").config.options["sseRetry"], 500)
        again = self.openStream()
        self.assertIn(b"retry: 500", again.body)

    def test_removeApi(self) -> None:
        """
        A removed API answers 404 and its counters are forgotten.
        """
        self.ops.rewrite(extra=API_B)
        self.reload()
        self.ops.publish("/b", b"x")
        self.ops.rewrite()
        plan = self.reload()
        self.assertEqual(plan.removed, ["b"])
        self.assertEqual(self.ops.publish("/b", b"x"), 404)
        self.assertNotIn(("b", "http-post"), self.ops.gateway.metrics.tallies)

    def test_addAndRemoveEndpoint(self) -> None:
        """
        A new endpoint is started with the API that uses it; removing both
        stops it.
        """
        self.ops.rewrite(extra=API_C_ON_NEW_ENDPOINT)
        plan = self.reload()
        self.assertEqual(plan.endpointsAdded, ["extra"])
        connector = self.ops.gateway.connectors["extra"]
        self.assertIs(connector.parent, self.ops.gateway)
        self.assertEqual(self.ops.publish("/c", b"x"), 202)
        self.ops.rewrite()
        plan = self.reload()
        self.assertEqual(plan.endpointsRemoved, ["extra"])
        self.assertNotIn("extra", self.ops.gateway.connectors)
        self.assertIsNone(connector.parent)

    def test_brokenFile(self) -> None:
        """
        A file with a mistake is refused with its file, section and key,
        and the running configuration stays as it was.
        """
        stream = self.openStream()
        self.ops.rewrite(extra=API_B.replace("entrypoints = http-post http-get",
                                             "entrypoints = http-post carrier-pigeon"))
        error = self.reload()
        self.assertIsInstance(error, ConfigError)
        self.assertEqual((error.section, error.key), ("api:b", "entrypoints"))
        self.assertEqual(self.ops.publish("/b", b"x"), 404)
        self.assertEqual(self.ops.publish("/demo", b"still here"), 202)
        self.assertIn(b"still here", stream.body)
        self.assertEqual(self.ops.gateway.metrics.reloads["refused"], 1)
        self.assertFalse(self.ops.gateway.reloader.last["applied"])

    def test_restartRequired(self) -> None:
        """
        Changing a listener or an endpoint is refused as a whole ("restart
        required for ..."), even with other changes in the same file.
        """
        self.ops.rewrite(gateway="listen = tcp:9999\n", extra=API_B)
        error = self.reload()
        self.assertIsInstance(error, RestartRequired)
        self.assertEqual(error.reasons, ["[gateway] listen"])
        self.assertEqual(self.ops.publish("/b", b"x"), 404)
        text = open(self.ops.path).read().replace("listen = tcp:9999", "listen = tcp:0").replace(
            "retention = 1000", "retention = 5")
        self.ops.rewrite(text=text)
        error = self.reload()
        self.assertIsInstance(error, RestartRequired)
        self.assertEqual(error.reasons, ["[endpoint:local] retention"])
        self.assertIn("restart required for [endpoint:local] retention", str(error))

    def test_accessLogApplied(self) -> None:
        """
        access-log is a [gateway] key a reload applies.
        """
        self.assertFalse(self.ops.gateway.requestLog.enabled)
        self.ops.rewrite(gateway="access-log = true\n")
        plan = self.reload()
        self.assertEqual(plan.gatewayChanged, ["access-log"])
        self.assertTrue(self.ops.gateway.requestLog.enabled)

    def test_noChange(self) -> None:
        """
        Reloading an unchanged file changes nothing.
        """
        plan = self.reload()
        self.assertTrue(plan.empty)
        self.assertEqual(self.ops.gateway.metrics.reloads["unchanged"], 1)

    def test_webhookApiAdded(self) -> None:
        """
        An API with the webhook entrypoint added to a gateway that had none
        gets the node a webhook service.
        """
        ops = OpsHarness(gateway="store = memory\n")
        self.assertIsNone(ops.gateway.webhooks)
        ops.rewrite(gateway="store = memory\n", extra=API_B.replace("http-post http-get", "webhook"))
        self.ops = ops
        plan = self.reload()
        self.assertEqual(plan.added, ["b"])
        self.assertIsNotNone(ops.gateway.webhooks)
        self.assertEqual(ops.json("GET", "/apis/b/subscriptions"), (200, {"items": []}))


class ReloadRouteTests(SynchronousTestCase):
    """
    POST /reload on the admin API.
    """

    def setUp(self) -> None:
        self.ops = OpsHarness()

    def test_applied(self) -> None:
        """
        A good file: 200 with what changed.
        """
        self.ops.rewrite(extra=API_B)
        status, document = self.ops.json("POST", "/reload")
        self.assertEqual(status, 200)
        self.assertEqual(document["apis"], {"added": ["b"], "changed": [], "removed": [], "unchanged": ["demo"]})
        status, document = self.ops.json("POST", "/reload")
        self.assertEqual((status, document), (200, {"applied": True, "detail": "no change"}))

    def test_broken(self) -> None:
        """
        A broken file: 400 problem naming the file, section and key.
        """
        self.ops.rewrite(extra="max-poll-timeout = soon\n")
        status, headers, body = self.ops.call("POST", "/reload")
        document = json.loads(body)
        self.assertEqual((status, headers["content-type"]), (400, "application/problem+json"))
        self.assertEqual(document["type"], "https://evgate.dev/problems/bad-configuration")
        self.assertEqual((document["file"], document["section"], document["key"]),
                         (self.ops.path, "api:demo", "max-poll-timeout"))
        self.assertFalse(document["applied"])

    def test_restart(self) -> None:
        """
        A change only a restart applies: 409 problem listing it.
        """
        self.ops.rewrite(gateway="listen = tcp:0 tcp:0\n")
        status, document = self.ops.json("POST", "/reload")
        self.assertEqual(status, 409)
        self.assertEqual(document["restartRequired"], ["[gateway] listen"])
        self.assertIn("restart required for [gateway] listen", document["detail"])

    def test_needsToken(self) -> None:
        """
        POST /reload needs the token.
        """
        self.assertEqual(self.ops.call("POST", "/reload", headers={})[0], 401)


class AdminTokenTests(SynchronousTestCase):
    """
    The admin token is rotated by a reload, without a restart.
    """

    def test_tokenFileReadAgain(self) -> None:
        """
        After admin-token-file's content changed, a reload makes the old
        token 401 and the new one work.
        """
        directory = tempfile.mkdtemp(prefix="evgate-token-")
        tokenPath = os.path.join(directory, "admin.token")
        with open(tokenPath, "w") as f:
            f.write(TOKEN + "\n")
        text = iniText().replace(f"admin-token = {TOKEN}", f"admin-token-file = {tokenPath}")
        self.ops = OpsHarness()
        self.ops.rewrite(text=text)
        status, document = self.ops.json("POST", "/reload")
        self.assertEqual(status, 200)
        newToken = "a-new-admin-token-after-rotation-0123456789"
        with open(tokenPath, "w") as f:
            f.write(newToken + "\n")
        status, document = self.ops.json("POST", "/reload")
        self.assertEqual(status, 200)
        self.assertEqual(document["gateway"], {"changed": ["admin-token"]})
        self.assertEqual(self.ops.call("GET", "/apis")[0], 401)
        status, _, _ = self.ops.call("GET", "/apis", headers={"Authorization": f"Bearer {newToken}"})
        self.assertEqual(status, 200)

    def test_inlineTokenChanged(self) -> None:
        """
        A new admin-token in the file is applied by a reload too.
        """
        self.ops = OpsHarness()
        newToken = "another-admin-token-0123456789abcdef"
        self.ops.rewrite(text=iniText().replace(f"admin-token = {TOKEN}", f"admin-token = {newToken}"))
        status, _ = self.ops.json("POST", "/reload")
        self.assertEqual(status, 200)
        self.assertEqual(self.ops.call("GET", "/apis")[0], 401)
        self.assertEqual(self.ops.call("GET", "/apis",
                                       headers={"Authorization": f"Bearer {newToken}"})[0], 200)
