"""
The C{mtls} plan: the caller is the client certificate of its TLS
connection.

    [gateway]
    listen = mtls:8443:certKey=gateway.pem:privateKey=gateway.key:caCerts=clients-ca.pem

    [api:orders]
    plans = mtls
    mtls.identity = san-dns                 ; cn (default) | san-dns | san-email | san-uri
    mtls.allowed-issuers = CN=Partners CA,O=Example      ; one glob per line (else 403)
    mtls.allowed-subjects = *.billing.example            ; one glob per line (else 403)

The certificate is checked by the listener (L{evgate.security.mtls_listener}):
a certificate that its C{caCerts} do not trust, or that is expired, never
completes the handshake.  So the plan's credentials are present when the
request's connection carries a client certificate at all, and its work is
to say who that is:

 - the consumer id is the certificate's subject CN, or its first DNS,
   e-mail or URI subjectAltName (C{mtls.identity}); a certificate without
   it is a 403;
 - the claims (what filters see as C{claims}) are C{subject} and
   C{issuer} (RFC 4514 strings), C{cn}, C{serial} (upper-case hex),
   C{san} (C{dns}, C{email}, C{uri}, C{ip} lists), C{notBefore} and
   C{notAfter} (POSIX seconds) and C{sha256} (the certificate's
   fingerprint, lower-case hex);
 - C{expiresAt} is the certificate's notAfter, so that streams end when it
   expires, as they do at a token's C{exp}; a request on a keep-alive
   connection whose certificate expired since the handshake is a 401.

A request without a client certificate is not this plan's: on an API
without another plan that takes it, the gateway answers 401 with this
plan's challenge (C{WWW-Authenticate: MutualTLS realm="orders"}).  A
certificate counts as credentials on APIs that list C{mtls} only, and there
the usual rule holds: a request that also carries a bearer token or an API
key carries credentials of two plans, a 401.

The peer certificate is read through L{ISSLTransport.getPeerCertificate}
on the request's transport (public API).  What a certificate says is
worked out once per certificate (kept by fingerprint in a small
least-recently-used map), not per request.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.web.server import Request
from zope.interface import implementer

from evgate.errors import Forbidden, Problem, Unauthorized
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IPlan
from evgate.security.consumer import Consumer
from evgate.security.jwt import ownedKeys

if TYPE_CHECKING:
    from evgate.gateway import ApiRuntime

IDENTITIES = ("cn", "san-dns", "san-email", "san-uri")
# Certificates whose consumer is kept, per API.
CACHE_SIZE = 1024


def peerCertificate(request: Request) -> Optional[x509.Certificate]:
    """
    The client certificate of the connection C{request} came on, if it is
    a TLS connection with one; else L{None}.
    """
    transport = getattr(request, "transport", None)
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    try:
        peer = transport.getPeerCertificate()
    except SSL.Error:
        return None
    if peer is None:
        return None
    return peer.to_cryptography()  # type: ignore[no-any-return,attr-defined]


def _attributes(name: x509.Name, oid: x509.ObjectIdentifier) -> List[str]:
    return [str(attribute.value) for attribute in name.get_attributes_for_oid(oid)]


def certificateClaims(certificate: x509.Certificate) -> Dict[str, Any]:
    """
    What C{certificate} says about its holder, as the claims of its
    consumer (see the module's docstring).
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    common = _attributes(certificate.subject, NameOID.COMMON_NAME)
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "cn": common[0] if common else None,
        "serial": f"{certificate.serial_number:X}",
        "san": {
            "dns": [str(n) for n in names.get_values_for_type(x509.DNSName)],
            "email": [str(n) for n in names.get_values_for_type(x509.RFC822Name)],
            "uri": [str(n) for n in names.get_values_for_type(x509.UniformResourceIdentifier)],
            "ip": [str(n) for n in names.get_values_for_type(x509.IPAddress)],
        },
        "notBefore": int(certificate.not_valid_before_utc.timestamp()),
        "notAfter": int(certificate.not_valid_after_utc.timestamp()),
        "sha256": certificate.fingerprint(hashes.SHA256()).hex(),
    }


def identityOf(claims: Mapping[str, Any], identity: str) -> Optional[str]:
    """
    The consumer id that C{identity} (one of L{IDENTITIES}) picks from a
    certificate's C{claims}, or L{None} if the certificate has none.
    """
    if identity == "cn":
        return claims["cn"] or None
    values = claims["san"][identity[4:]]
    return values[0] if values else None


def _matches(patterns: Tuple[str, ...], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def mtlsChallenge(api: Any) -> str:
    """
    The C{WWW-Authenticate} challenge of the mtls plan.
    """
    realm = api.name.replace("\\", "").replace('"', "'")
    return f'MutualTLS realm="{realm}"'


@implementer(IPlan)
class MtlsPlan:
    """
    Authenticates a caller by the verified client certificate of its
    connection (see the module's docstring).
    """

    name = "mtls"

    def __init__(self, api: "ApiRuntime") -> None:
        self.api = api
        options = api.config.options.get("mtls", {})
        self.identity: str = options.get("identity", "cn")
        self.allowedIssuers: Tuple[str, ...] = options.get("allowedIssuers", ())
        self.allowedSubjects: Tuple[str, ...] = options.get("allowedSubjects", ())
        self.challenge = mtlsChallenge(api)
        self.reactor = api.node.reactor
        self._known: "OrderedDict[bytes, Union[Consumer, Problem]]" = OrderedDict()

    def present(self, request: Request) -> bool:
        """
        Whether C{request} came on a connection with a client certificate.
        """
        return peerCertificate(request) is not None

    def authenticate(self, request: Request) -> Deferred:
        """
        The consumer the connection's client certificate names.
        """
        certificate = peerCertificate(request)
        if certificate is None:
            return fail(self._unauthorized("the connection carries no client certificate"))
        fingerprint = certificate.fingerprint(hashes.SHA256())
        known = self._known.get(fingerprint)
        if known is None:
            known = self._judge(certificate)
            self._known[fingerprint] = known
            while len(self._known) > CACHE_SIZE:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(fingerprint)
        if isinstance(known, Problem):
            return fail(known)
        # Checked at the handshake, and again here: a keep-alive connection
        # may outlive its certificate.
        now = self.reactor.seconds()
        if now >= known.claims["notAfter"]:
            return fail(self._unauthorized("the client certificate expired; connect again with a valid one"))
        if now < known.claims["notBefore"]:
            return fail(self._unauthorized("the client certificate is not valid yet"))
        return succeed(known)

    def stop(self) -> None:
        """
        Nothing to release.
        """

    def _unauthorized(self, detail: str) -> Unauthorized:
        return Unauthorized(detail, headers=[("WWW-Authenticate", self.challenge)])

    def _judge(self, certificate: x509.Certificate) -> Union[Consumer, Problem]:
        claims = certificateClaims(certificate)
        if self.allowedIssuers and not _matches(self.allowedIssuers, claims["issuer"]):
            return Forbidden(f"API {self.api.name} does not take client certificates issued by "
                             f"{claims['issuer']} (mtls.allowed-issuers)")
        consumer = identityOf(claims, self.identity)
        if consumer is None:
            what = "subject CN" if self.identity == "cn" else f"{self.identity[4:]} subjectAltName"
            return Forbidden(f"the client certificate has no {what}, which names the caller on API "
                             f"{self.api.name} (mtls.identity = {self.identity})")
        if self.allowedSubjects and not _matches(self.allowedSubjects, consumer):
            return Forbidden(f"API {self.api.name} does not take the client certificate of {consumer} "
                             "(mtls.allowed-subjects)")
        return Consumer(id=consumer, plan=self.name, claims=claims, expiresAt=float(claims["notAfter"]))


def _lines(section: SectionReader, key: str) -> Tuple[str, ...]:
    # One pattern per line: distinguished names hold commas and spaces.
    return tuple(line.strip() for line in section.get(key, "").splitlines() if line.strip())


@apiOptionParser
def parseMtlsOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The C{mtls.*} keys of an API (see the module's docstring); an error if
    they are set on an API without the mtls plan.
    """
    ownedKeys(section, context, "mtls", "mtls.")
    if "mtls" not in context.plans:
        return {}
    return {"mtls": {
        "identity": section.getChoice("mtls.identity", IDENTITIES, "cn"),
        "allowedIssuers": _lines(section, "mtls.allowed-issuers"),
        "allowedSubjects": _lines(section, "mtls.allowed-subjects"),
    }}
