"""
The counters behind rate limits and quotas: the policies and decisions,
the node's own counters (L{LocalCounters}) and the ones shared through
Redis (L{RedisCounters}).

Windows are fixed and aligned on the epoch (L{windowOf}).  The Redis
counters check and increment every counter of a request in one Lua script
(L{TAKE_SCRIPT}), all or nothing; while Redis does not answer they count on
the node and try Redis again after L{REDIS_RETRY} seconds.  Which policies
apply to whom, and the answers, are in L{evgate.security.limits}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import urlparse

import txredisapi
from OpenSSL.SSL import Error as TLSError
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger

from evgate.twistedprivate import redisProtocolReady

UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}

DEFAULT_REDIS_TIMEOUT = 0.25
# Seconds between attempts to reach a Redis that failed.
REDIS_RETRY = 5.0
# Seconds between new connections to a Redis that refused the gateway
# (authentication, TLS): txredisapi stops trying after a refusal.
REDIS_REFUSED_RETRY = 5.0
# How often (in counted requests) the local counters drop ended windows.
SWEEP_EVERY = 1000



@dataclass(frozen=True)
class Policy:
    """
    One limit: at most C{limit} per C{window} seconds.

    @ivar kind: C{"rate-limit"} or C{"quota"}, the key that set it.
    """

    kind: str
    limit: int
    window: int

    def describe(self) -> str:
        """
        The policy as C{RateLimit-Policy} writes it.
        """
        return f"{self.limit};w={self.window}"

    @cached_property
    def described(self) -> bytes:
        """
        L{describe} as bytes, made once.
        """
        return self.describe().encode("ascii")

    def text(self) -> str:
        """
        The policy as the configuration writes it.
        """
        for unit in ("day", "h", "min", "s"):
            size = UNITS[unit]
            if self.window % size == 0:
                count = self.window // size
                return f"{self.limit}/{count if count > 1 else ''}{unit}"
        return f"{self.limit}/{self.window}s"  # pragma: no cover - every window divides by 1 s


class PolicyState(NamedTuple):
    """
    Where a consumer stands against one policy after a check (a named
    tuple: one is made per policy per request).

    @ivar used: how much of the window is used, this request included.
    @ivar reset: seconds until the window ends.
    """

    policy: Policy
    used: int
    reset: float

    @property
    def remaining(self) -> int:
        """
        What is left in the window.
        """
        return max(0, self.policy.limit - self.used)


class Decision(NamedTuple):
    """
    The outcome of a check: allowed or not, and the state of every policy.
    """

    allowed: bool
    states: Tuple[PolicyState, ...]

    def closest(self) -> PolicyState:
        """
        The policy closest to running out (the one refused, if any).
        """
        return min(self.states, key=lambda s: (s.remaining, -s.reset))

    @property
    def retryAfter(self) -> int:
        """
        Whole seconds until a refused request may succeed.
        """
        blocking = [s.reset for s in self.states if s.remaining <= 0] or [0.0]
        return max(1, math.ceil(max(blocking)))

    def rawHeaders(self) -> Tuple[Tuple[bytes, bytes], ...]:
        """
        The C{RateLimit-*} response headers of this decision, as bytes:
        every response of a limited API carries them.
        """
        states = self.states
        # One policy (the usual case) needs no search for the closest and
        # no join.
        if len(states) == 1:
            closest = states[0]
            policies = closest.policy.described
        else:
            closest = self.closest()
            policies = b", ".join(s.policy.described for s in states)
        return (
            (b"RateLimit-Limit", b"%d" % (closest.policy.limit,)),
            (b"RateLimit-Remaining", b"%d" % (closest.remaining,)),
            (b"RateLimit-Reset", b"%d" % (max(0, math.ceil(closest.reset)),)),
            (b"RateLimit-Policy", policies),
        )

    def headers(self) -> List[Tuple[str, str]]:
        """
        The C{RateLimit-*} response headers of this decision (L{rawHeaders}
        as text, for a problem document's headers).
        """
        return [(name.decode("ascii"), value.decode("ascii")) for name, value in self.rawHeaders()]


def windowOf(policy: Policy, now: float) -> Tuple[int, float]:
    """
    The index of the window of C{policy} that holds C{now}, and the seconds
    until it ends.
    """
    index = int(now // policy.window)
    return index, (index + 1) * policy.window - now


class LocalCounters:
    """
    Counters in this process, on the reactor's clock.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        # key -> (window index, count)
        self.counts: Dict[str, Tuple[int, int]] = {}
        self._sinceSweep = 0

    def take(self, key: str, policies: Sequence[Policy], cost: int, need: Optional[int] = None) -> Decision:
        """
        Count C{cost} against every policy of C{key} if each has room for
        C{need} (default C{cost}); else count nothing.
        """
        need = cost if need is None else need
        now = self.reactor.seconds()
        slots = []
        allowed = True
        for policy in policies:
            counter = f"{key}:{policy.kind}:{policy.window}"
            index, reset = windowOf(policy, now)
            held = self.counts.get(counter)
            used = held[1] if held is not None and held[0] == index else 0
            if used + need > policy.limit:
                allowed = False
            slots.append((counter, index, used, reset, policy))
        states = []
        for counter, index, used, reset, policy in slots:
            if allowed and cost:
                used += cost
                self.counts[counter] = (index, used)
            states.append(PolicyState(policy, used, reset))
        self._sinceSweep += 1
        if self._sinceSweep >= SWEEP_EVERY:
            self.sweep()
        return Decision(allowed, tuple(states))

    def sweep(self) -> None:
        """
        Forget the counters of windows that ended.
        """
        self._sinceSweep = 0
        now = self.reactor.seconds()
        for counter, (index, _) in list(self.counts.items()):
            window = int(counter.rsplit(":", 1)[1])
            if (index + 1) * window <= now:
                del self.counts[counter]


# KEYS: one counter per policy.  ARGV[1]: cost, ARGV[2]: need, then the
# limit and the expiry (ms) of each counter.  All or nothing: the counters
# move only when every one has room.
TAKE_SCRIPT = """
local cost = tonumber(ARGV[1])
local need = tonumber(ARGV[2])
local n = #KEYS
local used = {}
local allowed = 1
for i = 1, n do
  local c = tonumber(redis.call('GET', KEYS[i]) or '0')
  used[i] = c
  if c + need > tonumber(ARGV[2 + i]) then allowed = 0 end
end
if allowed == 1 and cost > 0 then
  for i = 1, n do
    used[i] = redis.call('INCRBY', KEYS[i], cost)
    if used[i] == cost then redis.call('PEXPIRE', KEYS[i], ARGV[2 + n + i]) end
  end
end
table.insert(used, 1, allowed)
return used
"""


def redisConnectionProblem(reason: Any) -> str:
    """
    One line on why a connection to Redis was lost before it could be used
    (C{reason} a L{Failure}): TLS failures say what to check.
    """
    if reason.check(TLSError):
        text = "; ".join(":".join(str(part) for part in item if part) for item in (reason.value.args[0] or ())
                         if isinstance(item, tuple)) or str(reason.value)
        if "certificate verify failed" in text:
            return (f"TLS failed: the Redis server's certificate is not trusted: {text} (check "
                    "limits-store-ca-file and the host in limits-store)")
        return f"TLS failed: {text}"
    return f"connection lost: {reason.getErrorMessage()}"


class RedisCounters(Service):
    """
    Counters shared by every node through Redis, with the node's own
    L{LocalCounters} as the fall-back while Redis is unreachable.

    @ivar problem: why Redis cannot be used (authentication refused, TLS
        failed, the last error), or L{None} while it answers.
    """

    log = Logger()

    def __init__(self, url: str, reactor: Any, local: LocalCounters, timeout: float = DEFAULT_REDIS_TIMEOUT,
                 prefix: str = "evgate:limits:", password: Optional[str] = None,
                 caFile: Optional[str] = None, passwordFile: Optional[str] = None) -> None:
        parsed = urlparse(url)
        self.url = redactedUrl(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.tls = parsed.scheme == "rediss"
        self.port = parsed.port or 6379
        path = parsed.path.strip("/")
        self.db = int(path) if path else 0
        self.username = parsed.username or None
        self.password = password if password is not None else parsed.password
        # Read again before every new connection after a refusal, so that a
        # rotated (or corrected) password is taken without a restart.
        self.passwordFile = passwordFile
        self.caFile = caFile
        self.reactor = reactor
        self.local = local
        self.timeout = timeout
        self.prefix = prefix
        self.redis: Any = None
        self.downSince: Optional[float] = None
        self.retryAt = 0.0
        self.fallbacks = 0
        self.problem: Optional[str] = None
        self._lostBeforeReady: Optional[str] = None
        self._factory: Any = None
        self._reconnectCall: Any = None
        self.refusedRetry = REDIS_REFUSED_RETRY

    def startService(self) -> None:
        super().startService()
        self._connect()

    def _connect(self) -> None:
        # A fresh txredisapi factory (its pool of one connection), which
        # reconnects by itself while Redis is unreachable, but not after a
        # refusal: then _refused schedules the next one.
        self._reconnectCall = None
        counters = self

        class Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
            # Keeps why a connection ended before it was usable: txredisapi
            # reports a TLS failure during AUTH as "could not auth".
            def connectionMade(self) -> Any:
                counters._lostBeforeReady = None
                return super().connectionMade()

            def connectionLost(self, why: Any) -> None:
                if not redisProtocolReady(self):
                    counters._lostBeforeReady = redisConnectionProblem(why)
                super().connectionLost(why)

        class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
            protocol = Protocol

            def connectionError(self, why: str) -> None:
                if self is counters._factory:
                    counters._refused(why)
                super().connectionError(why)

        timeout = max(1.0, self.timeout * 4)
        factory = Factory(f"{self.host}:{self.port}", self.db, 1, isLazy=True, password=self.password,
                          replyTimeout=timeout, convertNumbers=True, username=self.username)
        endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(redisTlsOptions(self.host, self.caFile), endpoint)
        # The pool's "ready" Deferred fails on a refusal, which _refused
        # reports; nobody waits on it (the handler is lazy).
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(endpoint)
        self._factory = factory
        self.redis = factory.handler

    def _rereadPassword(self) -> None:
        if self.passwordFile is None:
            return
        try:
            self.password = rereadSecret(self.passwordFile)
        except (OSError, ValueError) as e:
            problem = f"cannot read limits-store-password-file {self.passwordFile}: {e}"
            if problem != self.problem:
                self.log.error("limits store {url}: {problem}; trying with the password read before",
                               url=self.url, problem=problem)
            self.problem = problem

    def _refused(self, why: str) -> None:
        # txredisapi gave up on the connection (it does not retry after
        # this): authentication refused, or TLS failed while authenticating.
        if self._lostBeforeReady is not None:
            problem = self._lostBeforeReady
        else:
            problem = (f"authentication failed: {why.split(': ', 2)[-1]} (check the user in limits-store and "
                       "limits-store-password-file)")
        if problem != self.problem:
            self.log.error("limits store {url}: {problem}; counting on this node, and trying again every "
                           "{retry:g} s", url=self.url, problem=problem, retry=self.refusedRetry)
        self.problem = problem
        now = self.reactor.seconds()
        if self.downSince is None:
            self.downSince = now
        # Nothing to ask until the next connection: count on the node.
        self.retryAt = now + self.refusedRetry
        if self.running and (self._reconnectCall is None or not self._reconnectCall.active()):
            self._reconnectCall = self.reactor.callLater(self.refusedRetry, self._reconnect)

    def _reconnect(self) -> None:
        """
        A new connection after a refusal, with the password file read again.
        """
        self._reconnectCall = None
        if not self.running:
            return
        old, self._factory = self._factory, None
        if old is not None:
            old.disconnect().addErrback(lambda f: None)
        self._rereadPassword()
        self._connect()

    def stopService(self) -> Any:
        super().stopService()
        if self._reconnectCall is not None and self._reconnectCall.active():
            self._reconnectCall.cancel()
        self._reconnectCall = None
        self._factory = None
        redis, self.redis = self.redis, None
        if redis is not None:
            return redis.disconnect()
        return None

    def take(self, key: str, policies: Sequence[Policy], cost: int, need: Optional[int] = None) -> Any:
        """
        Like L{LocalCounters.take}, through Redis: a Deferred of a
        L{Decision}, or a L{Decision} at once while Redis is known down.
        """
        need = cost if need is None else need
        now = self.reactor.seconds()
        if self.redis is None or (self.downSince is not None and now < self.retryAt):
            self.fallbacks += 1
            return self.local.take(key, policies, cost, need)
        keys, limits, expiries, resets = [], [], [], []
        for policy in policies:
            index, reset = windowOf(policy, now)
            # The braces make every counter of a consumer one Redis Cluster
            # hash slot, as a multi-key script requires.
            keys.append(f"{self.prefix}{{{key}}}:{policy.kind}:{policy.window}:{index}")
            limits.append(policy.limit)
            expiries.append(int(policy.window * 1000 + 1000))
            resets.append(reset)
        d = self._eval(keys, [cost, need, *limits, *expiries])
        d.addTimeout(self.timeout, self.reactor)

        def decided(reply: Any) -> Decision:
            self.problem = None
            if self.downSince is not None:
                self.log.info("limits store {url} is back after {seconds:.1f} s; counting in Redis again",
                              url=self.url, seconds=self.reactor.seconds() - self.downSince)
                self.downSince = None
            allowed = bool(int(reply[0]))
            states = tuple(PolicyState(p, int(u), r) for p, u, r in zip(policies, reply[1:], resets, strict=True))
            return Decision(allowed, states)

        def unreachable(failure: Any) -> Decision:
            first = self.downSince is None
            self.downSince = self.downSince if not first else self.reactor.seconds()
            self.retryAt = self.reactor.seconds() + REDIS_RETRY
            if self.problem is None:
                # A refusal (_refused) was logged when it happened; this is
                # a Redis that does not answer.
                self.problem = self._lostBeforeReady or failure.getErrorMessage() or failure.type.__name__
                if first:
                    self.log.warn("limits store {url} unavailable ({error}); counting on this node until it "
                                  "is back", url=self.url, error=self.problem)
            self.fallbacks += 1
            return self.local.take(key, policies, cost, need)

        d.addCallbacks(decided, unreachable)
        return d

    def _eval(self, keys: List[str], args: List[Any]) -> Deferred:
        # txredisapi sends EVALSHA once it has loaded the script on a
        # connection, and EVAL again when Redis forgot it (NOSCRIPT).
        return self.redis.eval(TAKE_SCRIPT, keys, args)  # type: ignore[no-any-return]


def rereadSecret(path: str) -> str:
    """
    The secret in the file C{path} (already resolved from the
    configuration), read as the configuration reads it: UTF-8, without
    one trailing newline.

    @raise OSError: when the file cannot be read.
    @raise ValueError: when it is empty or not UTF-8 text.
    """
    with open(path, "rb") as f:
        content = f.read()
    if content.endswith(b"\r\n"):
        content = content[:-2]
    elif content.endswith(b"\n"):
        content = content[:-1]
    if not content:
        raise ValueError("the file is empty")
    return content.decode("utf-8")


def redactedUrl(url: str) -> str:
    """
    C{url} without its password, for logs and errors.
    """
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.rsplit("@", 1)[1]
    user = parsed.username or ""
    return parsed._replace(netloc=f"{user}:***@{netloc}").geturl()


def redisTlsOptions(host: str, caFile: Optional[str]) -> Any:
    """
    The TLS client options for a C{rediss://} store: the server's
    certificate must be valid for C{host} and signed by the CA in
    C{caFile} (the platform's roots when L{None}).
    """
    trustRoot = None
    if caFile is not None:
        with open(caFile, "rb") as f:
            trustRoot = Certificate.loadPEM(f.read())
    return optionsForClientTLS(host, trustRoot=trustRoot)

