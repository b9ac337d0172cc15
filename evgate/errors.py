"""
Errors the gateway returns to clients, as RFC 9457 problem details.

Every L{Problem} has a stable C{type} URI (documented in docs/errors.md), a
short C{title} and a C{detail} that says what to change.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple

PROBLEM_BASE = "https://evgate.dev/problems/"


class Problem(Exception):
    """
    An error with an HTTP status that is shown to the client as
    C{application/problem+json}.
    """

    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        headers: Sequence[Tuple[str, str]] = (),
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = tuple(headers)
        self.extra = dict(extra or {})

    @property
    def type(self) -> str:
        """
        The stable problem type URI.
        """
        return PROBLEM_BASE + self.slug

    def asJSON(self) -> Dict[str, Any]:
        """
        The problem document.
        """
        doc: Dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        doc.update(self.extra)
        return doc

    def body(self) -> bytes:
        """
        The serialised problem document.
        """
        return json.dumps(self.asJSON()).encode("utf-8")


class BadRequest(Problem):
    """The request is malformed."""

    status = 400
    slug = "bad-request"
    title = "Bad request"


class BadCursor(BadRequest):
    """A cursor cannot be decoded or belongs to another stream."""

    slug = "bad-cursor"
    title = "Bad cursor"


class BadFilter(BadRequest):
    """A filter expression does not compile."""

    slug = "bad-filter"
    title = "Bad filter"


class TransformRefused(BadRequest):
    """
    A publish step of the API (evgate.pipeline) refused the message: the
    document names the C{step}, its C{line} and, where that applies, a
    JSON C{pointer} into the content.
    """

    slug = "transform-refused"
    title = "Message refused by a transform"


class Unauthorized(Problem):
    """Credentials are missing or invalid."""

    status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class Forbidden(Problem):
    """Valid credentials without the right to do this."""

    status = 403
    slug = "forbidden"
    title = "Forbidden"


class AuthenticationUnavailable(Problem):
    """The service that checks credentials (introspection, JWKS) cannot answer."""

    status = 503
    slug = "authentication-unavailable"
    title = "Authentication unavailable"

    def __init__(self, detail: str, retryAfter: int = 5, **kw: Any) -> None:
        headers = list(kw.pop("headers", ())) + [("Retry-After", str(retryAfter))]
        super().__init__(detail, headers=headers, **kw)


class NotFound(Problem):
    """No API or resource at this path."""

    status = 404
    slug = "not-found"
    title = "Not found"


class MethodNotAllowed(Problem):
    """The API does not serve this method."""

    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"


class Conflict(Problem):
    """The request contradicts the state or configuration of its target."""

    status = 409
    slug = "conflict"
    title = "Conflict"


class MalformedRequest(BadRequest):
    """The request line or headers break HTTP/1.1's syntax."""

    slug = "malformed-request"
    title = "Malformed request"


class RequestTimeout(Problem):
    """The request's head or body came too slowly."""

    status = 408
    slug = "request-timeout"
    title = "Request timeout"


class HeaderFieldsTooLarge(Problem):
    """The request line and headers are larger than max-header-bytes."""

    status = 431
    slug = "header-fields-too-large"
    title = "Request header fields too large"


class UnsupportedMediaType(Problem):
    """The request body is not in a format the route takes."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class NotAcceptable(Problem):
    """No representation matches the Accept header."""

    status = 406
    slug = "not-acceptable"
    title = "Not acceptable"


class PayloadTooLarge(Problem):
    """The message is larger than max-message-bytes."""

    status = 413
    slug = "payload-too-large"
    title = "Payload too large"


class TooManyRequests(Problem):
    """A rate limit or quota is exhausted."""

    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class EndpointUnavailable(Problem):
    """The broker refused or cannot be reached."""

    status = 503
    slug = "endpoint-unavailable"
    title = "Endpoint unavailable"

    def __init__(self, detail: str, retryAfter: int = 1, **kw: Any) -> None:
        headers = list(kw.pop("headers", ())) + [("Retry-After", str(retryAfter))]
        super().__init__(detail, headers=headers, **kw)


class ServiceOverloaded(Problem):
    """The node holds as many connections as max-connections allows."""

    status = 503
    slug = "overloaded"
    title = "Service overloaded"

    def __init__(self, detail: str, retryAfter: int = 1, **kw: Any) -> None:
        headers = list(kw.pop("headers", ())) + [("Retry-After", str(retryAfter))]
        super().__init__(detail, headers=headers, **kw)


class EndpointTimeout(Problem):
    """The broker did not acknowledge in time."""

    status = 504
    slug = "endpoint-timeout"
    title = "Endpoint timeout"
