"""
The console page in headless Chromium, against a real C{twistd -n
evgate}: the page asks for the admin token, then shows the APIs, endpoint
health and webhook subscriptions, and a live tail shows a message as it is
published.  The browser is driven over the Chrome DevTools Protocol with
the C{websockets} package; a screenshot is kept as a test artifact
(C{_trial_temp/console.png}, its path printed in the test log).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from .helpers import GatewayIni, GatewayProcess, WebhookReceiver, httpRequest, waitFor

CHROMIUM = "/usr/bin/chromium"
TOKEN = "console-token-0123456789abcdef"

def consoleIni() -> GatewayIni:
    """
    Two memory endpoints; /orders with streams and webhooks to 127.0.0.1,
    /telemetry behind API keys; an admin API with a memory store.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1").admin(TOKEN).gateway(store="memory")
            .loopbackWebhooks().memory().memory("spare")
            .api("orders", entrypoints="http-post sse webhook")
            .api("telemetry", endpoint="spare", entrypoints="http-post http-get websocket", plans="api-key"))


class DevTools:
    """
    A minimal Chrome DevTools Protocol client for one page.
    """

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.connection = connect(url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> Dict[str, Any]:
        """
        Call C{method} and return its result (events in between are
        dropped).
        """
        id = next(self.ids)
        self.connection.send(json.dumps({"id": id, "method": method, "params": params}))
        while True:
            message = json.loads(self.connection.recv(timeout=30))
            if message.get("id") == id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        """
        The value of a JavaScript expression in the page.
        """
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.connection.close()


class ConsoleBrowserTests(SynchronousTestCase):
    """
    The console in a real browser.
    """

    def setUp(self) -> None:
        # Integration tests fail loudly rather than skip.
        self.assertTrue(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is needed (scripts/install-system-deps)")
        self.gateway = GatewayProcess(consoleIni()).start()
        self.addCleanup(self.gateway.stop)
        # Accepts everything, over keep-alive connections as real receivers do.
        self.receiver = WebhookReceiver(decide=lambda body, attempt: 204)
        self.addCleanup(self.receiver.stop)

    def browser(self) -> DevTools:
        """
        A fresh headless Chromium and a DevTools connection to its page;
        both are closed when the test ends.
        """
        profile = tempfile.mkdtemp(prefix="evgate-chromium-")
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--window-size=1400,1100", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

        def close() -> None:
            browser.kill()
            browser.wait(20)
            shutil.rmtree(profile, ignore_errors=True)

        self.addCleanup(close)
        portFile = os.path.join(profile, "DevToolsActivePort")
        waitFor(lambda: os.path.exists(portFile) and open(portFile).read().strip(), 60,
                what="Chromium's DevTools port")
        port = int(open(portFile).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            targets = json.load(response)
        page = [t for t in targets if t["type"] == "page"][0]
        devtools = DevTools(page["webSocketDebuggerUrl"])
        self.addCleanup(devtools.close)
        devtools.send("Page.enable")
        devtools.send("Runtime.enable")
        return devtools

    def waitForPage(self, devtools: DevTools, expression: str, what: str) -> Any:
        """
        Wait until C{expression} is true in the page (one that throws, as
        while the page loads, is not true yet).
        """
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"
        return waitFor(lambda: devtools.evaluate(guarded), 30, interval=0.1, what=what)

    def test_console(self) -> None:
        """
        Sign in with the token; the page shows both APIs with their
        entrypoints and plans, both endpoints connected, the webhook
        subscription; the live tail of API orders shows a message
        published after it opened.  A screenshot is saved.
        """
        gateway = self.gateway
        callback = self.receiver.url
        status, _, body = httpRequest("POST", gateway.adminUrl("/apis/orders/subscriptions"),
                                      json.dumps({"callbackUrl": callback}).encode(),
                                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        subscription = json.loads(body)["id"]

        devtools = self.browser()
        devtools.send("Page.navigate", url=gateway.adminUrl("/"))
        self.waitForPage(devtools, "!document.getElementById('login').hidden", "the token prompt")
        self.assertEqual(devtools.evaluate("document.getElementById('console').hidden"), True)
        devtools.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                          "document.getElementById('login-form').requestSubmit(); true")
        self.waitForPage(devtools, "document.querySelector('tr[data-api=\"telemetry\"]') !== null", "the APIs")

        apis = devtools.evaluate("Array.from(document.querySelectorAll('#apis tr')).map(r => r.innerText)")
        self.assertEqual(len(apis), 2)
        self.assertIn("orders", apis[0])
        self.assertIn("webhook", apis[0])
        self.assertIn("api-key", apis[1])
        endpoints = devtools.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('#endpoints tr'))"
            ".map(r => [r.dataset.endpoint, r.querySelector('.badge').textContent]))")
        self.assertEqual(endpoints, {"local": "connected", "spare": "connected"})
        self.waitForPage(devtools, f"document.querySelector('tr[data-subscription=\"{subscription}\"]') !== null",
                         "the webhook subscription")
        row = devtools.evaluate(f"document.querySelector('tr[data-subscription=\"{subscription}\"]').innerText")
        self.assertIn(callback, row)
        self.assertIn("active", row)
        self.assertEqual(devtools.evaluate("sessionStorage.getItem('evgate.adminToken')"), TOKEN)

        devtools.evaluate("document.querySelector('tr[data-api=\"orders\"] button').click(); true")
        self.waitForPage(devtools, "document.getElementById('tail-lines').innerText.includes('tailing orders')",
                         "the tail to open")
        for content in (b"hello from the test", b'{"order": 42, "total": 9.5}'):
            status, _, body = httpRequest("POST", gateway.url("/orders?key=o-42"), content,
                                          {"Content-Type": "application/json"})
            self.assertEqual(status, 202, body)
        self.waitForPage(devtools, "document.getElementById('tail-lines').innerText.includes('\"order\": 42')",
                         "the published message in the tail")
        tailText = devtools.evaluate("document.getElementById('tail-lines').innerText")
        self.assertIn("hello from the test", tailText)
        self.assertIn("o-42", tailText)
        self.waitForPage(devtools, "document.querySelector('tr[data-api=\"orders\"]').innerText.includes('\\t2\\t')",
                         "the message counts")
        self.waitForPage(devtools, f"document.querySelector('tr[data-subscription=\"{subscription}\"]')"
                                   ".innerText.includes('\\t2\\t')", "the webhook deliveries")

        shot = devtools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        import base64

        path = os.path.abspath("console.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"console screenshot: {path}")
        self.assertGreater(os.path.getsize(path), 10000)
