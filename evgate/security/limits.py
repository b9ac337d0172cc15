"""
Rate limits and quotas, per API, per plan and per consumer.

    [api:orders]
    rate-limit = 100/s              ; every plan of the API
    quota = 100000/day
    keyless.rate-limit = 5/s        ; a plan's own, instead of the API's
    api-key.quota = 1000000/day

A limit is C{COUNT/WINDOW}, the window a unit (C{s}, C{min}, C{h}, C{day})
optionally with a multiple (C{600/10min}).  Both keys count the same thing;
they are two keys so that an operator can say "100 a second, and 100000 a
day" and the answers can tell the client which one ran out.

What is counted
===============

Each consumer (L{evgate.gateway.Consumer.id}; all keyless callers share
C{anonymous}) has its own counters per API and plan: requests for HTTP POST
and GET, messages for streams (SSE, WebSocket) and webhooks.  A request
that is refused is not counted, and a request is counted against every
policy or none (one atomic step), so that a request refused by the rate
limit does not eat the quota.

Windows are fixed and aligned on the epoch (a C{day} quota resets at 00:00
UTC): cheap, exact to report, and the same on every node.  A client can
send up to twice a rate limit across the boundary of two windows; choose
the window accordingly.

Answers
=======

Every response of a limited API carries the IETF draft's fields
(draft-ietf-httpapi-ratelimit-headers-07) for the policy closest to
running out, and the list of policies::

    RateLimit-Limit: 100
    RateLimit-Remaining: 42
    RateLimit-Reset: 1                  seconds until that window ends
    RateLimit-Policy: 100;w=1, 100000;w=86400

A request over a limit is a 429 problem with C{Retry-After} (seconds); a
stream cannot start while its consumer is over a limit.

Where the counters live
=======================

On the node by default (L{LocalCounters}, on the reactor's clock).  With
C{limits-store = redis://host:port/db} in C{[gateway]}, request counters
are shared by every node through Redis (L{RedisCounters}): one Lua script
checks and increments all the counters of a request atomically.  The
client is txredisapi, which speaks Redis on the reactor itself: no thread,
and a slow Redis shows as a Deferred that times out rather than as a
blocked reactor.  When Redis does not answer within C{limits-timeout}
seconds (default 0.25) or refuses, the node logs it once, counts locally
(each node then enforces the whole limit on its own), tries Redis again
after L{REDIS_RETRY} seconds, and logs when Redis is back.

Messages of streams are always counted on the node that serves the stream
(L{MessageMeter}): a stream lives on one node, and a network round trip
per batch of messages would cost more than the counting is worth.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from evgate.config import PLAN_NAMES, ApiContext, SectionReader, apiOptionParser, gatewayKeys
from evgate.errors import TooManyRequests
from evgate.secrets import resolvePath, secretOption

UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_LIMIT = re.compile(r"^\s*(\d[\d_]*)\s*/\s*(\d*)\s*([a-z]+)\s*$")

# Entrypoints that count messages rather than requests.
STREAMING = frozenset({"sse", "websocket", "webhook"})

DEFAULT_REDIS_TIMEOUT = 0.25
# Seconds between attempts to reach a Redis that failed.
REDIS_RETRY = 5.0
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


def parseLimit(text: str, kind: str = "rate-limit") -> Policy:
    """
    The L{Policy} of C{COUNT/[MULTIPLE]UNIT}.

    @raise ValueError: if C{text} is not one.
    """
    match = _LIMIT.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not COUNT/UNIT (e.g. 100/s, 6000/min, 100000/day)")
    count, multiple, unit = match.groups()
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r} in {text!r} (s, min, h or day)")
    window = UNITS[unit] * (int(multiple) if multiple else 1)
    limit = int(count.replace("_", ""))
    if window <= 0 or limit <= 0:
        raise ValueError(f"{text!r}: count and window must be positive")
    return Policy(kind, limit, window)


@dataclass(frozen=True)
class PolicyState:
    """
    Where a consumer stands against one policy after a check.

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


@dataclass(frozen=True)
class Decision:
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

    def headers(self) -> List[Tuple[str, str]]:
        """
        The C{RateLimit-*} response headers of this decision.
        """
        closest = self.closest()
        return [
            ("RateLimit-Limit", str(closest.policy.limit)),
            ("RateLimit-Remaining", str(closest.remaining)),
            ("RateLimit-Reset", str(max(0, math.ceil(closest.reset)))),
            ("RateLimit-Policy", ", ".join(s.policy.describe() for s in self.states)),
        ]


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
    from OpenSSL.SSL import Error as TLSError

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
                 caFile: Optional[str] = None) -> None:
        parsed = urlparse(url)
        self.url = redactedUrl(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.tls = parsed.scheme == "rediss"
        self.port = parsed.port or 6379
        path = parsed.path.strip("/")
        self.db = int(path) if path else 0
        self.username = parsed.username or None
        self.password = password if password is not None else parsed.password
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

    def startService(self) -> None:
        super().startService()
        counters = self

        class Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
            # Keeps why a connection ended before it was usable: txredisapi
            # reports a TLS failure during AUTH as "could not auth".
            def connectionMade(self) -> Any:
                counters._lostBeforeReady = None
                return super().connectionMade()

            def connectionLost(self, why: Any) -> None:
                if not self._ready:
                    counters._lostBeforeReady = redisConnectionProblem(why)
                super().connectionLost(why)

        class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
            protocol = Protocol

            def connectionError(self, why: str) -> None:
                counters._refused(why)
                super().connectionError(why)

        timeout = max(1.0, self.timeout * 4)
        factory = Factory(f"{self.host}:{self.port}", self.db, 1, isLazy=True, password=self.password,
                          replyTimeout=timeout, convertNumbers=True, username=self.username)
        endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(redisTlsOptions(self.host, self.caFile), endpoint)
        factory.startConnecting(endpoint)
        self.redis = factory.handler

    def _refused(self, why: str) -> None:
        # txredisapi gave up on the connection (it does not retry after
        # this): authentication refused, or TLS failed while authenticating.
        if self._lostBeforeReady is not None:
            problem = self._lostBeforeReady
        else:
            problem = (f"authentication failed: {why.split(': ', 2)[-1]} (check the user in limits-store and "
                       "limits-store-password-file)")
        if problem != self.problem:
            self.log.error("limits store {url}: {problem}; counting on this node", url=self.url, problem=problem)
        self.problem = problem

    def stopService(self) -> Any:
        super().stopService()
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


class Limits(Service):
    """
    The node's limits: where counters live, and the checks the gateway and
    the streams make.
    """

    log = Logger()

    def __init__(self, reactor: Any, storeUrl: Optional[str] = None,
                 timeout: float = DEFAULT_REDIS_TIMEOUT, prefix: str = "evgate:limits:",
                 password: Optional[str] = None, caFile: Optional[str] = None) -> None:
        self.reactor = reactor
        self.local = LocalCounters(reactor)
        # Messages are always counted here (see the module's docstring).
        self.messages = LocalCounters(reactor)
        self.shared: Optional[RedisCounters] = None
        if storeUrl is not None:
            self.shared = RedisCounters(storeUrl, reactor, self.local, timeout, prefix, password, caFile)

    def startService(self) -> None:
        super().startService()
        if self.shared is not None:
            self.shared.startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.shared is not None:
            return self.shared.stopService()
        return None

    def take(self, key: str, policies: Sequence[Policy], cost: int, need: Optional[int] = None) -> Any:
        """
        Count a request: a L{Decision}, or a Deferred of one.
        """
        if self.shared is not None and self.shared.running:
            return self.shared.take(key, policies, cost, need)
        return self.local.take(key, policies, cost, need)


def consumerKey(api: Any, consumer: Any, unit: str) -> str:
    """
    The counter key of C{consumer} on C{api}: per API, plan and consumer,
    and per unit (requests or messages) so that the two never mix.
    """
    return f"{api.name}|{consumer.plan}|{unit}|{consumer.id}"


def policiesFor(api: Any, plan: str) -> Tuple[Policy, ...]:
    """
    The policies of C{plan} on the API runtime C{api}.
    """
    return api.config.options.get("limits", {}).get(plan, ())  # type: ignore[no-any-return]


def limitsOf(api: Any) -> Optional[Limits]:
    """
    The L{Limits} of the node serving C{api}, if it has any.
    """
    return api.node.limits  # type: ignore[no-any-return]


def admit(api: Any, entrypoint: Any, request: Any, consumer: Any) -> Any:
    """
    Apply the limits of C{api} to an authenticated request, after the plan
    chain (C{consumer} is a L{evgate.gateway.Consumer} or a Deferred of
    one).

    A request counts one; a stream's opening counts nothing but is refused
    while its consumer has nothing left (its messages are counted as they
    go, by L{MessageMeter}).  The C{RateLimit-*} headers are set on
    C{request}.

    @return: the consumer, at once when that is known, else a Deferred
        that fails with L{TooManyRequests} when a limit is reached.
    """
    limits = limitsOf(api)
    if limits is None or not api.config.options.get("limits"):
        return consumer
    if isinstance(consumer, Deferred):
        return consumer.addCallback(lambda who: _admit(limits, api, entrypoint, request, who))
    return _admit(limits, api, entrypoint, request, consumer)


def _admit(limits: Limits, api: Any, entrypoint: Any, request: Any, consumer: Any) -> Any:
    policies = policiesFor(api, consumer.plan)
    if not policies:
        return consumer
    if entrypoint.name in STREAMING:
        # The stream's messages count, not its opening, but a consumer
        # with nothing left cannot open one.
        key = consumerKey(api, consumer, "messages")
        decision = limits.messages.take(key, policies, 0, 1)
    else:
        key = consumerKey(api, consumer, "requests")
        decision = limits.take(key, policies, 1)
    return _decided(decision, api, request, consumer)


def chargeMore(api: Any, request: Any, consumer: Any, count: int) -> Any:
    """
    Count C{count} more requests for a request that stands for several (a
    batch POST stands for one per record; L{admit} counted the first).
    Counted against every policy or none.

    @return: the consumer, or a Deferred of it; fails with
        L{TooManyRequests} (or a Deferred does) when there is no room.
    """
    limits = limitsOf(api)
    if count <= 0 or limits is None or not api.config.options.get("limits"):
        return consumer
    policies = policiesFor(api, consumer.plan)
    if not policies:
        return consumer
    return _decided(limits.take(consumerKey(api, consumer, "requests"), policies, count), api, request, consumer)


def _decided(decision: Any, api: Any, request: Any, consumer: Any) -> Any:
    # A Decision now, or a Deferred of one (Redis): the consumer, or a
    # failure with TooManyRequests, either way as a Deferred when it was one.
    if isinstance(decision, Deferred):
        return decision.addCallback(_apply, api, request, consumer)
    try:
        return _apply(decision, api, request, consumer)
    except TooManyRequests as e:
        return fail(e)


def _apply(decision: Decision, api: Any, request: Any, consumer: Any) -> Any:
    headers = decision.headers()
    if not decision.allowed:
        closest = decision.closest()
        raise TooManyRequests(
            f"{consumer.id} reached the {closest.policy.kind} {closest.policy.text()} of API {api.name}; "
            f"retry in {decision.retryAfter} s",
            headers=headers + [("Retry-After", str(decision.retryAfter))],
            extra={"retryAfter": decision.retryAfter})
    for name, value in headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return consumer


class MessageMeter:
    """
    The message budget of one stream's consumer: how many of a batch of
    messages may go out now, and when the rest may.
    """

    def __init__(self, limits: Limits, key: str, policies: Sequence[Policy]) -> None:
        self.limits = limits
        self.key = key
        self.policies = tuple(policies)

    def take(self, count: int) -> Tuple[int, float]:
        """
        Count up to C{count} messages.

        @return: how many were granted (from 0 to C{count}) and, when not
            all, the seconds until more may go.
        """
        if count <= 0:
            return 0, 0.0
        decision = self.limits.messages.take(self.key, self.policies, 0, 0)
        room = min(s.remaining for s in decision.states)
        granted = min(room, count)
        if granted:
            self.limits.messages.take(self.key, self.policies, granted)
        if granted == count:
            return granted, 0.0
        blocking = [s.reset for s in decision.states if s.remaining - granted <= 0]
        return granted, max(blocking) if blocking else 0.0

    def exhaustedFor(self) -> float:
        """
        Seconds until a message may go again (0 when one may now).
        """
        decision = self.limits.messages.take(self.key, self.policies, 0, 1)
        return 0.0 if decision.allowed else float(decision.retryAfter)


def meterFor(call: Any) -> Optional[MessageMeter]:
    """
    The L{MessageMeter} of a stream's L{evgate.gateway.ApiCall}, or L{None}
    when its consumer's plan has no limits.
    """
    api = call.api
    limits = limitsOf(api)
    policies = policiesFor(api, call.consumer.plan)
    if limits is None or not policies:
        return None
    return MessageMeter(limits, consumerKey(api, call.consumer, "messages"), policies)


@apiOptionParser
def parseLimitOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    C{rate-limit} and C{quota}, and C{<plan>.rate-limit} / C{<plan>.quota}
    for a plan of their own: the policies of each plan of the API.
    """
    def read(key: str, kind: str) -> Optional[Policy]:
        text = section.get(key, None)
        if not text:
            return None
        try:
            return parseLimit(text, kind)
        except ValueError as e:
            raise section.error(key, str(e)) from None

    common = {kind: read(kind, kind) for kind in ("rate-limit", "quota")}
    byPlan: Dict[str, Tuple[Policy, ...]] = {}
    for plan in PLAN_NAMES:
        own = {}
        for kind in ("rate-limit", "quota"):
            key = f"{plan}.{kind}"
            if section.has(key) and plan not in context.plans:
                raise section.error(key, f"the plan {plan} is not in this API's plans")
            own[kind] = read(key, kind)
        if plan not in context.plans:
            continue
        policies = tuple(p for p in (own[k] or common[k] for k in ("rate-limit", "quota")) if p is not None)
        if policies:
            byPlan[plan] = policies
    return {"limits": byPlan}


@gatewayKeys
def parseLimitsStore(section: SectionReader) -> Mapping[str, Any]:
    """
    C{limits-store} (C{local}, the default, C{redis://[user@]host:port/db},
    or C{rediss://...} for TLS), C{limits-store-password} /
    C{limits-store-password-file}, C{limits-store-ca-file} (the CA that
    signed the server's certificate, for C{rediss}), C{limits-timeout}
    (seconds) and C{limits-prefix} (of the Redis keys).
    """
    store = section.get("limits-store", "local")
    password = secretOption(section, "limits-store-password")
    caFile = section.get("limits-store-ca-file", None)
    if store == "local":
        for key, value in (("limits-store-password", password), ("limits-store-ca-file", caFile)):
            if value is not None:
                raise section.error(key, "is only used with limits-store = redis:// or rediss://")
    else:
        parsed = urlparse(store)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise section.error("limits-store", f"{redactedUrl(store)!r} is neither local nor "
                                                "redis://host:port/db (rediss:// for TLS)")
        if parsed.password is not None and password is not None:
            raise section.error("limits-store-password-file", "the URL in limits-store has a password already")
        if caFile is not None:
            if parsed.scheme != "rediss":
                raise section.error("limits-store-ca-file", "needs limits-store = rediss://...")
            caFile = resolvePath(section, "limits-store-ca-file", caFile)
            try:
                redisTlsOptions(parsed.hostname, caFile)
            except (OSError, ValueError) as e:
                raise section.error("limits-store-ca-file", f"cannot use {caFile}: {e}") from None
        path = parsed.path.strip("/")
        if path and not path.isdigit():
            raise section.error("limits-store", f"{store!r}: the database is a number (redis://host:port/0)")
        try:
            _ = parsed.port
        except ValueError:
            raise section.error("limits-store", f"{store!r}: bad port") from None
    return {
        "limitsStore": None if store == "local" else store,
        "limitsStorePassword": password,
        "limitsStoreCaFile": caFile,
        "limitsTimeout": section.getFloat("limits-timeout", DEFAULT_REDIS_TIMEOUT, minimum=0.01),
        "limitsPrefix": section.get("limits-prefix", "evgate:limits:"),
    }


def buildLimits(settings: Any, reactor: Any) -> Limits:
    """
    The L{Limits} of a node with the C{[gateway]} C{settings}.
    """
    options = getattr(settings, "options", {}) or {}
    return Limits(reactor, options.get("limitsStore"), options.get("limitsTimeout", DEFAULT_REDIS_TIMEOUT),
                  options.get("limitsPrefix", "evgate:limits:"), options.get("limitsStorePassword"),
                  options.get("limitsStoreCaFile"))


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
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    trustRoot = None
    if caFile is not None:
        with open(caFile, "rb") as f:
            trustRoot = Certificate.loadPEM(f.read())
    return optionsForClientTLS(host, trustRoot=trustRoot)
