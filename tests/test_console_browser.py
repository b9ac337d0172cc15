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
    Two memory endpoints; /orders with streams and webhooks to 127.0.0.1
    (dead letters to the memory topic orders-dlq),
    /telemetry behind API keys and on the portal; an admin API with a
    memory store.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1").admin(TOKEN).gateway(store="memory", portal="/portal")
            .loopbackWebhooks().memory().memory("spare")
            .api("orders", entrypoints="http-post sse webhook", dlq="local/orders-dlq")
            .api("telemetry", endpoint="spare", entrypoints="http-post http-get websocket sse", plans="api-key",
                 portal=True))


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


class ConsoleManagementBrowserTests(ConsoleBrowserTests):
    """
    The console's charts, keys, webhook subscriptions (with replay), tail
    filter, test publish and reload preview, in a real browser.
    """

    def signedIn(self) -> DevTools:
        """
        A browser on the console, signed in.
        """
        devtools = self.browser()
        devtools.send("Page.navigate", url=self.gateway.adminUrl("/"))
        self.waitForPage(devtools, "!document.getElementById('login').hidden", "the token prompt")
        devtools.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                          "document.getElementById('login-form').requestSubmit(); true")
        self.waitForPage(devtools, "document.querySelector('tr[data-api=\"telemetry\"]') !== null", "the APIs")
        return devtools

    def test_console(self) -> None:
        """
        (The page as a whole is tested by the parent class.)
        """

    def test_chartsDrawAndUpdate(self) -> None:
        """
        The charts draw the sampled series, and the messages-in line of
        API orders rises, on a later poll, once messages are published.
        """
        devtools = self.signedIn()
        self.waitForPage(devtools, "document.querySelector('#chart-messagesIn polyline[data-series=\"orders\"]')"
                                   " !== null", "the first chart line")
        self.assertTrue(devtools.evaluate("document.querySelector('#chart-subscribers svg.chart') !== null"))
        for index in range(20):
            status, _, body = httpRequest("POST", self.gateway.url("/orders"), f"m{index}".encode(),
                                          {"Content-Type": "text/plain"})
            self.assertEqual(status, 202, body)
        self.waitForPage(devtools, "document.querySelector('#chart-messagesIn .legend').innerText"
                                   ".match(/orders · [1-9]/) !== null", "the rate of orders in the legend")
        points = devtools.evaluate("Number(document.querySelector('#chart-messagesIn polyline[data-series=\"orders\"]')"
                                   ".dataset.points)")
        self.assertGreaterEqual(points, 2)
        self.waitForPage(devtools, "document.querySelector('#chart-publishLatency polyline') !== null",
                         "the latency line")
        self.assertEqual(devtools.evaluate("document.querySelectorAll('[style]').length"), 0)
        screenshot(devtools, "console-charts.png")

    def test_keys(self) -> None:
        """
        Issue a key (shown once), set its expiry, revoke it.
        """
        devtools = self.signedIn()
        devtools.evaluate("window.confirm = () => true; true")
        self.waitForPage(devtools, "document.getElementById('key-api').value === 'telemetry'", "the key API")
        devtools.evaluate("document.getElementById('key-name').value = 'billing';"
                          "document.getElementById('key-form').requestSubmit(); true")
        self.waitForPage(devtools, "!document.getElementById('key-issued').hidden", "the issued key")
        key = devtools.evaluate("document.getElementById('key-issued-value').textContent")
        keyId = devtools.evaluate("document.getElementById('key-issued-id').textContent")
        self.assertTrue(key.startswith("evg_"), key)
        status, _, _ = httpRequest("POST", self.gateway.url("/telemetry"), b"x", {"X-Api-Key": key})
        self.assertEqual(status, 202)
        row = f"document.querySelector('tr[data-key=\"{keyId}\"]')"
        self.waitForPage(devtools, f"{row} !== null", "the key's row")
        self.assertNotIn(key, devtools.evaluate("document.getElementById('keys').innerText"))
        devtools.evaluate(f"{row}.querySelector('input.expiry').value = '2099-01-02T03:04:05';"
                          f"{row}.querySelector('[data-action=\"set expiry\"]').click(); true")
        self.waitForPage(devtools, f"{row}.innerText.includes('2099')", "the new expiry")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"revoke\"]').click(); true")
        self.waitForPage(devtools, f"{row} === null", "the key to go")
        status, _, _ = httpRequest("POST", self.gateway.url("/telemetry"), b"x", {"X-Api-Key": key})
        self.assertEqual(status, 401)

    def test_subscriptions(self) -> None:
        """
        Create a subscription (the secret shown once), see deliveries,
        pause, replay from an hour ago while paused, resume (the messages
        are delivered again), delete.
        """
        devtools = self.signedIn()
        devtools.evaluate("window.confirm = () => true; true")
        callback = self.receiver.url
        devtools.evaluate(f"document.getElementById('subscription-url').value = {json.dumps(callback)};"
                          "document.getElementById('subscription-form').requestSubmit(); true")
        self.waitForPage(devtools, "!document.getElementById('subscription-secret').hidden", "the secret")
        secret = devtools.evaluate("document.getElementById('subscription-secret-value').textContent")
        id = devtools.evaluate("document.getElementById('subscription-secret-id').textContent")
        self.assertTrue(secret.startswith("whsec_"), secret)
        row = f"document.querySelector('tr[data-subscription=\"{id}\"]')"
        self.waitForPage(devtools, f"{row} !== null", "the subscription's row")
        for index in range(3):
            httpRequest("POST", self.gateway.url("/orders"), f"m{index}".encode(), {"Content-Type": "text/plain"})
        self.waitForPage(devtools, f"{row}.innerText.includes('\\t3\\t')", "three deliveries")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"pause\"]').click(); true")
        self.waitForPage(devtools, f"{row}.innerText.includes('paused')", "the pause")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"replay\"]').click(); true")
        self.waitForPage(devtools, "!document.getElementById('replay-form').hidden", "the replay form")
        devtools.evaluate("document.getElementById('replay-form').requestSubmit(); true")
        self.waitForPage(devtools, "document.getElementById('subscription-message').innerText"
                                   ".includes('replaying from')", "the replay")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"resume\"]').click(); true")
        self.waitForPage(devtools, f"{row}.innerText.includes('\\t6\\t')", "the messages delivered again")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"delete\"]').click(); true")
        self.waitForPage(devtools, f"{row} === null", "the subscription to go")

    def test_deadLetters(self) -> None:
        """
        A receiver that refuses makes dead letters; once it accepts, the
        console shows the subscription's dead letters (reason, content)
        and redelivers one, then the rest, and the receiver gets them.
        """
        accepting = [False]
        self.receiver.decide = lambda body, attempt: 204 if accepting[0] else 400
        status, _, body = httpRequest("POST", self.gateway.adminUrl("/apis/orders/subscriptions"),
                                      json.dumps({"callbackUrl": self.receiver.url}).encode(),
                                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        id = json.loads(body)["id"]
        for index in range(3):
            httpRequest("POST", self.gateway.url("/orders"), f"dead-{index}".encode(), {"Content-Type": "text/plain"})

        def deadLettered() -> bool:
            _, _, view = httpRequest("GET", self.gateway.adminUrl(f"/apis/orders/subscriptions/{id}"), None,
                                     {"Authorization": f"Bearer {TOKEN}"})
            return bool(json.loads(view)["counts"]["deadLettered"] == 3)

        waitFor(deadLettered, 30, what="three dead letters")
        accepting[0] = True
        devtools = self.signedIn()
        row = f"document.querySelector('tr[data-subscription=\"{id}\"]')"
        self.waitForPage(devtools, f"{row} !== null", "the subscription's row")
        devtools.evaluate(f"{row}.querySelector('[data-action=\"dead letters\"]').click(); true")
        rows = "document.querySelectorAll('#dead-letter-rows tr[data-dead-letter]')"
        self.waitForPage(devtools, f"{rows}.length === 3", "the dead letters")
        text = devtools.evaluate("document.getElementById('dead-letter-rows').innerText")
        self.assertIn("rejected: HTTP 400 Bad Request", text)
        self.assertIn("dead-0", text)
        self.assertIn("orders/0@0", text)
        devtools.evaluate(f"{rows}[0].querySelector('[data-action=\"redeliver\"]').click(); true")
        self.waitForPage(devtools, f"{rows}[0].querySelector('td.outcome').innerText.includes('redelivered')",
                         "the first redelivery")
        self.assertEqual(self.receiver.delivered(), [b"dead-0"])
        devtools.evaluate("document.getElementById('dead-letters-redeliver-all').click(); true")
        self.waitForPage(devtools, "document.getElementById('dead-letters-message').innerText"
                                   ".includes('3 redelivered')", "the redelivery of all shown")
        self.assertEqual(sorted(self.receiver.delivered()), [b"dead-0", b"dead-0", b"dead-1", b"dead-2"])
        self.assertEqual(devtools.evaluate("document.querySelectorAll('[style]').length"), 0)
        screenshot(devtools, "console-dead-letters.png")

    def test_tailPublishAndReload(self) -> None:
        """
        A filtered tail shows only matching messages published from the
        page; the reload preview shows an added API before it is applied.
        """
        devtools = self.signedIn()
        devtools.evaluate("document.getElementById('tail-api').value = 'orders';"
                          "document.getElementById('tail-filter').value = 'key == \"wanted\"';"
                          "document.getElementById('tail-form').requestSubmit(); true")
        self.waitForPage(devtools, "document.getElementById('tail-lines').innerText.includes('tailing orders')",
                         "the tail")
        for key, content in (("other", "not shown"), ("wanted", "shown")):
            devtools.evaluate(f"document.getElementById('publish-api').value = 'orders';"
                              f"document.getElementById('publish-key').value = {json.dumps(key)};"
                              f"document.getElementById('publish-content').value = {json.dumps(content)};"
                              "document.getElementById('publish-form').requestSubmit(); true")
            self.waitForPage(devtools, "document.getElementById('publish-result').innerText.includes('offset')",
                             "the publish")
            devtools.evaluate("document.getElementById('publish-result').textContent = ''; true")
        self.waitForPage(devtools, "document.getElementById('tail-lines').innerText.includes('shown')", "the message")
        self.assertNotIn("not shown", devtools.evaluate("document.getElementById('tail-lines').innerText"))
        with open(self.gateway.ini, "a") as f:
            f.write("\n[api:extra]\npath = /extra\nendpoint = local\ntopic = extra\nentrypoints = sse\n")
        devtools.evaluate("document.getElementById('reload-preview').click(); true")
        self.waitForPage(devtools, "document.getElementById('reload-plan').innerText.includes('API extra: added')",
                         "the reload plan")
        self.assertIsNone(devtools.evaluate("document.querySelector('tr[data-api=\"extra\"]')"))
        devtools.evaluate("document.getElementById('reload-apply').click(); true")
        self.waitForPage(devtools, "document.querySelector('tr[data-api=\"extra\"]') !== null", "the added API")


def screenshot(devtools: DevTools, name: str) -> str:
    """
    Save a full-page screenshot as C{name} in the test's directory; its
    path (printed in the test log).
    """
    import base64

    shot = devtools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path = os.path.abspath(name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


class PortalBrowserTests(ConsoleBrowserTests):
    """
    The developer portal on the gateway listener, in a real browser.
    """

    def test_console(self) -> None:
        """
        (The console is tested by the parent class.)
        """

    def test_portal(self) -> None:
        """
        The list shows the opted-in API only; its page shows how to
        authenticate and examples; "try it" with an issued key subscribes,
        publishes, and shows the message arrive; without the key the
        publish is refused with the problem's words.  Screenshots are
        saved.
        """
        status, _, body = httpRequest("POST", self.gateway.adminUrl("/apis/telemetry/keys"),
                                      json.dumps({"name": "portal"}).encode(),
                                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        key = json.loads(body)["key"]
        devtools = self.browser()
        devtools.send("Page.navigate", url=self.gateway.url("/portal"))
        self.waitForPage(devtools, "document.querySelector('li[data-api=\"telemetry\"]') !== null", "the list")
        self.assertEqual(devtools.evaluate("document.querySelectorAll('#api-list li').length"), 1)
        devtools.evaluate("document.querySelector('li[data-api=\"telemetry\"] a').click(); true")
        self.waitForPage(devtools, "document.getElementById('api-name').textContent === 'telemetry'", "the page")
        auth = devtools.evaluate("document.getElementById('api-auth').innerText")
        self.assertIn("X-Api-Key", auth)
        self.assertIn("?api-key=", auth)
        examples = devtools.evaluate("Array.from(document.querySelectorAll('[data-example]'))"
                                     ".map(e => e.dataset.example)")
        self.assertIn("curl: publish", examples)
        self.assertIn("Browser: EventSource", examples)
        self.assertIn("Browser: WebSocket", examples)
        self.assertIn("Python: subscribe", examples)
        text = devtools.evaluate("document.getElementById('examples').innerText")
        self.assertIn(self.gateway.url("/telemetry"), text)
        self.assertNotIn(key, devtools.evaluate("document.body.innerText"))

        devtools.evaluate("document.getElementById('try-content').value = 'no key';"
                          "document.getElementById('try-publish').requestSubmit(); true")
        self.waitForPage(devtools, "document.getElementById('try-result').innerText.includes('401')",
                         "the refusal")
        devtools.evaluate(f"document.getElementById('try-credential').value = {json.dumps(key)};"
                          "document.getElementById('try-subscribe').click(); true")
        self.waitForPage(devtools, "document.getElementById('try-state').innerText === 'subscribed'",
                         "the subscription")
        devtools.evaluate("document.getElementById('try-content').value = '{\"reading\": 21.5}';"
                          "document.getElementById('try-publish').requestSubmit(); true")
        self.waitForPage(devtools, "document.getElementById('try-messages').innerText.includes('21.5')",
                         "the message to arrive")
        self.assertEqual(devtools.evaluate("document.getElementById('try-result').innerText"), "published")
        self.assertEqual(devtools.evaluate("document.querySelectorAll('[style]').length"), 0)
        screenshot(devtools, "portal.png")
