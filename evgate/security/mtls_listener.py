"""
The C{mtls:} listener: TLS that asks clients for a certificate and checks
the one they present against the client CAs of the listener.

    [gateway]
    listen = mtls:8443:certKey=tls/gateway.pem:privateKey=tls/gateway.key:caCerts=tls/clients-ca.pem

Twisted's C{ssl:} endpoint description cannot ask for or verify client
certificates, so evgate reads this description itself and builds the
listener from public API: L{CertificateOptions} with C{verify=True},
C{caCerts} and C{requireCertificate=False}, in an L{SSL4ServerEndpoint}.

What a client meets:

 - a client without a certificate completes the handshake: APIs with
   other plans on the same port keep working, and an API with the C{mtls}
   plan answers it with a 401 (L{evgate.security.mtls});
 - a certificate that does not chain to C{caCerts}, is expired or not yet
   valid fails the handshake (OpenSSL's verification, before any HTTP):
   a certificate the gateway sees is always a verified one;
 - renegotiation is refused, so that the certificate of a connection
   cannot change under the requests that follow.

Fields (C{:}-separated, C{\\} escapes a C{:} in a value; positional
C{PORT} first):

 - C{certKey}: the server's certificate in PEM, with its chain after it
   (leaf first); required.
 - C{privateKey}: the server's private key in PEM, unencrypted (default:
   in C{certKey}'s file).
 - C{caCerts}: the CA certificates (PEM, one or more) that issue client
   certificates; required.
 - C{extraCertChain}: more chain certificates for the server (PEM).
 - C{interface}, C{backlog}: as for C{tcp:}.

Paths are relative to the directory of evgate.ini; C{credential\\:NAME}
names a systemd credential (see L{evgate.secrets}).  Files are read when
the configuration is read, and every mistake is a L{ConfigError} at
C{[gateway] listen}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import CertificateOptions

from evgate.ini import SectionReader, descriptionFields, gatewayKeys
from evgate.secrets import resolvePath

PREFIX = "mtls"
_FIELDS = ("certKey", "privateKey", "caCerts", "extraCertChain", "interface", "backlog")


def isMtls(description: str) -> bool:
    """
    Whether the listener description C{description} is an C{mtls:} one.
    """
    return description.split(":", 1)[0].lower() == PREFIX


@dataclass(frozen=True)
class MtlsListener:
    """
    One C{mtls:} listener, its files read.

    @ivar description: the description as configured.
    @ivar certificate: the server's certificate (pyOpenSSL).
    @ivar privateKey: its private key (pyOpenSSL).
    @ivar chain: the certificates that follow it in the chain.
    @ivar authorities: the CAs whose client certificates are accepted.
    """

    description: str
    port: int
    interface: str = ""
    backlog: int = 50
    certificate: Any = field(default=None, compare=False, repr=False)
    privateKey: Any = field(default=None, compare=False, repr=False)
    chain: Tuple[Any, ...] = field(default=(), compare=False, repr=False)
    authorities: Tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def options(self) -> CertificateOptions:
        """
        The TLS options of the listener: its certificate, client
        certificates asked for and verified against C{authorities} but not
        required, and no renegotiation.
        """
        options = CertificateOptions(
            privateKey=self.privateKey, certificate=self.certificate, extraCertChain=list(self.chain),
            verify=True, caCerts=list(self.authorities), requireCertificate=False)
        # The context is made once and shared by every connection of the
        # listener; what CertificateOptions has no argument for is set on it
        # here, before the first connection.
        context = options.getContext()
        # The CAs named in the certificate request: clients that hold several
        # certificates (browsers, curl with a store) pick one of these.
        context.set_client_ca_list([authority.get_subject() for authority in self.authorities])
        context.set_options(SSL.OP_NO_RENEGOTIATION)
        return options

    def endpoint(self, reactor: Any) -> SSL4ServerEndpoint:
        """
        The server endpoint of the listener on C{reactor}.
        """
        return SSL4ServerEndpoint(reactor, self.port, self.options(), backlog=self.backlog, interface=self.interface)


def _read(section: SectionReader, description: str, name: str, value: str) -> Tuple[str, bytes]:
    path = resolvePath(section, "listen", value)
    try:
        with open(path, "rb") as f:
            return path, f.read()
    except OSError as e:
        raise section.error("listen", f"{description}: {name}: cannot read {path}: {e.strerror or e}") from None


def _certificates(section: SectionReader, description: str, name: str, value: str) -> List[Any]:
    path, data = _read(section, description, name, value)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise section.error("listen", f"{description}: {name}: {path} holds no PEM certificate") from None
        raise section.error("listen", f"{description}: {name}: {path} has a broken certificate ({e})") from None
    return [crypto.X509.from_cryptography(c) for c in certificates]


def _privateKey(section: SectionReader, description: str, name: str, value: str) -> Any:
    path, data = _read(section, description, name, value)
    if b"PRIVATE KEY-----" not in data:
        hint = " (give its key file as privateKey=)" if name == "certKey" else ""
        raise section.error("listen", f"{description}: {name}: {path} holds no PEM private key{hint}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise section.error("listen", f"{description}: {name}: the key in {path} is encrypted; give it "
                                      "unencrypted and protect the file instead (mode 0640)") from None
    except (ValueError, crypto.Error) as e:
        raise section.error("listen", f"{description}: {name}: {path} has a broken private key ({e})") from None
    return crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]


def parseMtlsListen(section: SectionReader, description: str) -> MtlsListener:
    """
    Read the C{mtls:} listener C{description} of C{[gateway] listen} and
    its files (see the module's docstring).

    @raise ConfigError: for any mistake, at C{[gateway] listen}.
    """
    def error(message: str) -> Exception:
        return section.error("listen", f"{description}: {message}")

    kind, *rest = descriptionFields(description)
    values: Dict[str, str] = {}
    positional = ["port", "interface", "backlog"]
    for item in rest:
        name, equals, value = item.partition("=")
        if not equals:
            if not positional:
                raise error(f"unexpected field {item!r}")
            name, value = positional.pop(0), item
        elif name not in _FIELDS:
            raise error(f"unknown field {name!r} (known: port, {', '.join(_FIELDS)})")
        if name in values:
            raise error(f"{name} is given twice")
        values[name] = value
    try:
        port = int(values.get("port", ""))
    except ValueError:
        raise error(f"the port must be a number, got {values.get('port', '')!r}") from None
    if not 0 <= port <= 65535:
        raise error(f"the port must be between 0 and 65535, got {port}")
    try:
        backlog = int(values.get("backlog", "50"))
    except ValueError:
        raise error(f"backlog must be a number, got {values['backlog']!r}") from None
    for name in ("certKey", "caCerts"):
        if not values.get(name):
            raise error(f"{name}= is required (mtls:PORT:certKey=FILE:privateKey=FILE:caCerts=FILE)")
    served = _certificates(section, description, "certKey", values["certKey"])
    key = _privateKey(section, description, "privateKey" if "privateKey" in values else "certKey",
                      values.get("privateKey", values["certKey"]))
    certificate, chain = served[0], served[1:]
    if values.get("extraCertChain"):
        chain += _certificates(section, description, "extraCertChain", values["extraCertChain"])
    if certificate.get_pubkey().to_cryptography_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.to_cryptography_key().public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise error("privateKey is not the key of the certificate in certKey")
    authorities = _certificates(section, description, "caCerts", values["caCerts"])
    return MtlsListener(description=description, port=port, interface=values.get("interface", ""),
                        backlog=backlog, certificate=certificate, privateKey=key, chain=tuple(chain),
                        authorities=tuple(authorities))


@gatewayKeys
def parseMtlsListeners(section: SectionReader) -> Optional[Mapping[str, Any]]:
    """
    The C{mtls:} listeners of C{[gateway] listen}, by description, under
    C{mtlsListeners} in the gateway's options.
    """
    listeners = {d: parseMtlsListen(section, d) for d in section.getList("listen", ()) if isMtls(d)}
    return {"mtlsListeners": listeners} if listeners else None
