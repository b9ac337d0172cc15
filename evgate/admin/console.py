"""
The console: a page at C{/} of the admin listener, in plain HTML,
JavaScript and CSS from C{evgate/admin/static/} (no build step).

The page and its script load without the token (they hold no data); the
page asks for the token, keeps it in the tab's C{sessionStorage}, and sends
it as C{Authorization: Bearer} on every C{fetch} to the admin API.  The
live tail reads C{GET /apis/<api>/tail} with C{fetch} and a stream reader,
because an C{EventSource} cannot send that header.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

from twisted.web.server import Request

from evgate.admin.app import AdminApp, Answer, adminRoute

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

# The page runs only its own script and style, talks only to its origin,
# and is never framed.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

FILES: Dict[str, Tuple[str, str]] = {
    "/": ("console.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
    "/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/deadletters.js": ("deadletters.js", "text/javascript; charset=utf-8"),
}


def staticAnswer(path: str) -> Answer:
    """
    The answer serving the console file at C{path}.
    """
    name, contentType = FILES[path]
    with open(os.path.join(STATIC, name), "rb") as f:
        body = f.read()
    return Answer(200, body, (("Content-Type", contentType),) + SECURITY_HEADERS)


@adminRoute("/", methods=["GET"], public=True)
def consolePage(admin: AdminApp, request: Request) -> Answer:
    """
    The console page (it asks for the token itself).
    """
    return staticAnswer("/")


@adminRoute("/console.js", methods=["GET"], public=True)
def consoleScript(admin: AdminApp, request: Request) -> Answer:
    """
    The console's script.
    """
    return staticAnswer("/console.js")


@adminRoute("/console.css", methods=["GET"], public=True)
def consoleStyle(admin: AdminApp, request: Request) -> Answer:
    """
    The console's style sheet.
    """
    return staticAnswer("/console.css")


@adminRoute("/charts.js", methods=["GET"], public=True)
def consoleCharts(admin: AdminApp, request: Request) -> Answer:
    """
    The console's charts (SVG, drawn by the page).
    """
    return staticAnswer("/charts.js")


@adminRoute("/deadletters.js", methods=["GET"], public=True)
def consoleDeadLetters(admin: AdminApp, request: Request) -> Answer:
    """
    The console's dead-letters panel.
    """
    return staticAnswer("/deadletters.js")
