"""
Which callback URLs the gateway may call: the guard against server-side
request forgery (SSRF).

A webhook subscription makes the gateway send requests, from inside the
operator's network, to a URL someone typed.  So a callback may only reach
addresses on the public Internet: loopback, private (RFC 1918, unique
local), link-local, multicast, reserved, shared (CGNAT) and other
non-global addresses are refused, and so are IPv6 addresses that carry
one of those inside (IPv4-mapped, NAT64, 6to4, Teredo).  The gateway's
C{webhook-allow-private = true} allows them, for development and tests;
cloud metadata services (169.254.169.254, fd00:ec2::254 ...) stay refused
even then, because no webhook receiver lives there and a credential leak
from one is the classic SSRF.

The check is made twice:

 - when a subscription is created (L{checkCallback}): the URL's syntax and
   scheme (plain http only with C{webhook-allow-http = true}), then every
   address its host resolves to;
 - when a delivery connects (L{GuardedEndpointFactory}): the host is
   resolved again and the connection goes to a checked address, never to
   a name resolved behind the check's back.  A DNS answer that changed to
   a private address after creation (DNS rebinding) is refused there.

The checks look at resolved addresses, never at the host's text, so the
many spellings of an address (C{2130706433}, C{0x7f.1}, C{localhost.})
cannot slip past.  Redirects are never followed (see
L{evgate.webhook.delivery}).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Instance metadata services of the big clouds: refused whatever the
# configuration says.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack, DigitalOcean ...
    "169.254.170.2",     # AWS ECS task metadata
    "169.254.169.253",   # AWS DNS / time services
    "fd00:ec2::254",     # AWS IMDS over IPv6
    "100.100.100.200",   # Alibaba Cloud
    "168.63.129.16",     # Azure wire server
))

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

MAX_URL_LENGTH = 2048


class BadCallback(ValueError):
    """
    A callback URL the gateway will not call; the text says why.
    """


class ForbiddenAddress(ConnectError):
    """
    A delivery was about to connect to an address the policy refuses.
    """


def _embedded(address: Address) -> Optional[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    for network in _NAT64:
        if address in network:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def addressClass(text: str) -> Optional[str]:
    """
    What kind of non-public address C{text} is (C{"loopback"},
    C{"private"}, C{"link-local"}, C{"multicast"}, C{"reserved"},
    C{"unspecified"}, C{"site-local"}, C{"not globally routable"} or
    C{"cloud metadata"}), or L{None} for a public address.

    @raise ValueError: if C{text} is not an IP address.
    """
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    inner = _embedded(address)
    if inner is not None:
        if inner in METADATA_ADDRESSES:
            return "cloud metadata"
        innerClass = addressClass(str(inner))
        if innerClass is not None:
            return innerClass
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """
    Which addresses deliveries may connect to.

    @ivar allowPrivate: C{webhook-allow-private}: allow every non-public
        address but cloud metadata services.
    """

    allowPrivate: bool = False

    def refusal(self, address: str) -> Optional[str]:
        """
        Why C{address} is refused, or L{None} when it is allowed.
        """
        try:
            kind = addressClass(address)
        except ValueError:
            return f"{address} is not an IP address"
        if kind is None:
            return None
        if kind == "cloud metadata":
            return f"{address} is a cloud metadata address"
        if self.allowPrivate:
            return None
        return (f"{address} is a {kind} address (set webhook-allow-private = true in [gateway] "
                "to allow non-public receivers)")


@dataclass(frozen=True)
class CallbackUrl:
    """
    A callback URL that passed the syntax check.
    """

    url: str
    scheme: str
    host: str
    port: int


def parseCallbackUrl(text: Any, allowHttp: bool) -> CallbackUrl:
    """
    Check the syntax of a callback URL: absolute, C{https} (or C{http} when
    allowed), a host, no user name or password, no fragment.

    @raise BadCallback: if it is not acceptable.
    """
    if not isinstance(text, str) or not text:
        raise BadCallback("callbackUrl must be a non-empty string")
    if len(text) > MAX_URL_LENGTH:
        raise BadCallback(f"callbackUrl is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in text):
        raise BadCallback("callbackUrl must not contain spaces or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise BadCallback(f"callbackUrl is not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if allowHttp else ("https",)
    if scheme not in allowed:
        if scheme == "http":
            raise BadCallback("callbackUrl must use https (set webhook-allow-http = true in [gateway] "
                              "to allow plain http)")
        raise BadCallback(f"callbackUrl must be an {' or '.join(allowed)} URL")
    if "@" in parts.netloc:
        raise BadCallback("callbackUrl must not carry a user name or password; use headers for credentials")
    if parts.fragment or text.endswith("#"):
        raise BadCallback("callbackUrl must not have a fragment")
    host = parts.hostname
    if not host:
        raise BadCallback("callbackUrl has no host")
    try:
        host.encode("idna")
    except UnicodeError:
        raise BadCallback(f"callbackUrl's host {host!r} is not a valid host name") from None
    return CallbackUrl(text, scheme, host, port if port is not None else (443 if scheme == "https" else 80))


def loggableUrl(url: str) -> str:
    """
    C{url} for logs: without its query string, which may carry a
    receiver's credentials.
    """
    base, sep, _ = url.partition("?")
    return base + ("?..." if sep else "")


Resolver = Callable[[str, int], "Deferred[List[str]]"]


def reactorResolver(reactor: Any) -> Resolver:
    """
    A resolver on C{reactor}'s name resolver (C{getaddrinfo} on a thread,
    by default): a function of (host, port) to a Deferred of address texts.
    """
    def resolve(host: str, port: int) -> "Deferred[List[str]]":
        d: Deferred = Deferred()
        found: List[str] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                if address.host not in found:
                    found.append(address.host)

            def resolutionComplete(self) -> None:
                if found:
                    d.callback(found)
                else:
                    d.errback(DNSLookupError(host))

        reactor.nameResolver.resolveHostName(Receiver(), host, port)
        return d

    return resolve


def checkCallback(url: CallbackUrl, policy: AddressPolicy, resolve: Resolver) -> "Deferred[List[str]]":
    """
    Resolve C{url}'s host and check every address it has.

    @return: a Deferred of the addresses, failing with L{BadCallback} when
        the name does not resolve or any address is refused.
    """
    d = resolve(url.host, url.port)

    def resolved(addresses: List[str]) -> List[str]:
        for address in addresses:
            refusal = policy.refusal(address)
            if refusal is not None:
                raise BadCallback(f"callbackUrl's host {url.host} resolves to a refused address: {refusal}")
        return addresses

    def unresolved(failure: Any) -> None:
        failure.trap(DNSLookupError)
        raise BadCallback(f"callbackUrl's host {url.host} does not resolve")

    d.addCallbacks(resolved, unresolved)
    return d


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """
    A client endpoint that resolves its host, refuses if any address is
    forbidden, and connects to the allowed addresses in turn (wrapped in
    TLS for https, verified against the host name).
    """

    def __init__(self, reactor: Any, host: str, port: int, policy: AddressPolicy, resolve: Resolver,
                 connectTimeout: float, tlsCreator: Any = None) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.policy = policy
        self.resolve = resolve
        self.connectTimeout = connectTimeout
        self.tlsCreator = tlsCreator

    def connect(self, protocolFactory: Any) -> Deferred:
        d = self.resolve(self.host, self.port)
        d.addCallback(self._checked)
        d.addCallback(self._connectTo, protocolFactory)
        return d

    def _checked(self, addresses: List[str]) -> List[str]:
        for address in addresses:
            refusal = self.policy.refusal(address)
            if refusal is not None:
                # One bad answer refuses them all: a name that points at an
                # internal address at all is not a receiver to trust.
                raise ForbiddenAddress(string=f"{self.host}: {refusal}")
        return addresses

    def _connectTo(self, addresses: List[str], protocolFactory: Any) -> Deferred:
        remaining = list(addresses)

        def attempt() -> Deferred:
            address = remaining.pop(0)
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint: Any = kind(self.reactor, address, self.port, timeout=self.connectTimeout)
            if self.tlsCreator is not None:
                endpoint = wrapClientTLS(self.tlsCreator, endpoint)
            d = endpoint.connect(protocolFactory)
            if remaining:
                d.addErrback(nextAddress)
            return d  # type: ignore[no-any-return]

        def nextAddress(failure: Any) -> Deferred:
            # Only a failed connect moves on; anything else is not about
            # this address.
            failure.trap(ConnectError)
            return attempt()

        if not remaining:
            return fail(DNSLookupError(self.host))
        return attempt()


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """
    The endpoint factory of the delivery agent
    (C{Agent.usingEndpointFactory}): every connection goes through a
    L{GuardedEndpoint}.
    """

    def __init__(self, reactor: Any, policy: AddressPolicy, resolve: Optional[Resolver] = None,
                 connectTimeout: float = 10.0, tlsPolicy: Any = None) -> None:
        self.reactor = reactor
        self.policy = policy
        self.resolve = resolve if resolve is not None else reactorResolver(reactor)
        self.connectTimeout = connectTimeout
        if tlsPolicy is None:
            tlsPolicy = BrowserLikePolicyForHTTPS()
        self.tlsPolicy = tlsPolicy

    def endpointForURI(self, uri: Any) -> GuardedEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        creator = None
        if uri.scheme == b"https":
            creator = self.tlsPolicy.creatorForNetloc(uri.host, uri.port)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        return GuardedEndpoint(self.reactor, host, uri.port, self.policy, self.resolve, self.connectTimeout,
                               creator)
