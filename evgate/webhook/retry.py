"""
When to try a delivery again, and how long to wait.

Outcomes of one attempt (L{classifyStatus}):

 - 2xx: delivered;
 - 408, 429 and 5xx, a timeout, a refused or broken connection: worth
   another attempt (I{retryable});
 - anything else (other 4xx, and 3xx: redirects are not followed): the
   receiver will not take this message (I{rejected}); it goes to the dead
   letters at once.

Waiting: exponential backoff with full jitter (a random delay between 0 and
C{min(maxDelay, initialDelay * 2 ** (attempt - 1))}), so that receivers
coming back are not hit by every subscription at once.  A 429 or 503 with
C{Retry-After} (seconds or an HTTP date) is honoured, up to C{maxDelay}.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Mapping, Optional

DELIVERED = "delivered"
RETRYABLE = "retryable"
REJECTED = "rejected"

DEFAULT_INITIAL_DELAY = 1.0
DEFAULT_MAX_DELAY = 600.0
DEFAULT_MAX_ATTEMPTS = 15
MAX_ATTEMPTS_LIMIT = 100
MAX_DELAY_LIMIT = 86400.0


@dataclass(frozen=True)
class RetryPolicy:
    """
    How often and how long apart a message is tried.

    @ivar initialDelay: seconds; the cap of the first backoff.
    @ivar maxDelay: seconds; no wait is longer (Retry-After included).
    @ivar maxAttempts: attempts in all, the first included; after the last
        one fails the message is dead-lettered.
    """

    initialDelay: float = DEFAULT_INITIAL_DELAY
    maxDelay: float = DEFAULT_MAX_DELAY
    maxAttempts: int = DEFAULT_MAX_ATTEMPTS

    def delay(self, attempt: int, retryAfter: Optional[float] = None,
              random: Any = _random) -> float:
        """
        Seconds to wait after failed attempt number C{attempt} (1-based).
        """
        if retryAfter is not None:
            return min(max(retryAfter, 0.0), self.maxDelay)
        ceiling = min(self.maxDelay, self.initialDelay * (2.0 ** min(attempt - 1, 62)))
        return float(random.uniform(0.0, ceiling))

    def asJSON(self) -> Mapping[str, Any]:
        """
        The policy as the admin API shows and takes it.
        """
        return {"initialDelay": self.initialDelay, "maxDelay": self.maxDelay, "maxAttempts": self.maxAttempts}


def parsePolicy(document: Any, default: RetryPolicy) -> RetryPolicy:
    """
    A policy from a subscription's C{retry} object, each missing field taken
    from C{default}.

    @raise ValueError: with a sentence for the client, if a field is wrong.
    """
    if document is None:
        return default
    if not isinstance(document, dict):
        raise ValueError("retry must be an object")
    unknown = sorted(set(document) - {"initialDelay", "maxDelay", "maxAttempts"})
    if unknown:
        raise ValueError(f"retry has an unknown field {unknown[0]!r} "
                         "(known: initialDelay, maxDelay, maxAttempts)")

    def number(name: str, fallback: float) -> float:
        value = document.get(name, fallback)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DELAY_LIMIT:
            raise ValueError(f"retry.{name} must be a number of seconds above 0 and at most {MAX_DELAY_LIMIT:g}")
        return float(value)

    initial = number("initialDelay", default.initialDelay)
    maximum = number("maxDelay", max(default.maxDelay, initial))
    if maximum < initial:
        raise ValueError("retry.maxDelay must not be smaller than retry.initialDelay")
    attempts = document.get("maxAttempts", default.maxAttempts)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"retry.maxAttempts must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}")
    return RetryPolicy(initial, maximum, attempts)


def classifyStatus(status: int) -> str:
    """
    L{DELIVERED}, L{RETRYABLE} or L{REJECTED} for an HTTP status.
    """
    if 200 <= status < 300:
        return DELIVERED
    if status in (408, 429) or status >= 500:
        return RETRYABLE
    return REJECTED


def parseRetryAfter(value: Optional[str], now: float) -> Optional[float]:
    """
    The seconds a C{Retry-After} header asks to wait (delta-seconds or an
    HTTP date, relative to C{now}, POSIX seconds), or L{None} if it is
    absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
