"""
Throw-away CAs and certificates for the TLS tests (client certificates,
HTTPS webhook receivers, proxy targets), made with C{cryptography}.  No
tests here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Issued = Tuple[Any, x509.Certificate]


def _name(common: Optional[str], organization: Optional[str] = None) -> x509.Name:
    attributes = []
    if common is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common))
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def makeCA(common: str) -> Issued:
    """
    A CA valid from five minutes ago for a day: its key and certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common)).issuer_name(_name(common))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def issue(ca: Issued, common: Optional[str] = None, organization: Optional[str] = None,
          dns: Sequence[str] = (), emails: Sequence[str] = (), uris: Sequence[str] = (),
          ips: Sequence[str] = (), server: bool = False, notBefore: Optional[datetime.datetime] = None,
          notAfter: Optional[datetime.datetime] = None, serial: Optional[int] = None) -> Issued:
    """
    A certificate signed by C{ca} (a client certificate, or a server one
    with C{server}): its key and certificate.
    """
    caKey, caCertificate = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common, organization)).issuer_name(caCertificate.subject)
        .public_key(key.public_key()).serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(notBefore or now - datetime.timedelta(minutes=5))
        .not_valid_after(notAfter or now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    names = ([x509.DNSName(d) for d in dns] + [x509.RFC822Name(e) for e in emails]
             + [x509.UniformResourceIdentifier(u) for u in uris]
             + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(caKey, hashes.SHA256())


def certificatePem(certificate: x509.Certificate) -> bytes:
    """
    C{certificate} as PEM.
    """
    return certificate.public_bytes(serialization.Encoding.PEM)


def keyPem(key: Any) -> bytes:
    """
    The private C{key} as unencrypted PKCS#8 PEM.
    """
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[no-any-return]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def writeIssued(directory: str, name: str, issued: Issued) -> Tuple[str, str]:
    """
    C{issued} as C{name.pem} and C{name.key} in C{directory}: their paths.
    """
    key, certificate = issued
    certPath = os.path.join(directory, f"{name}.pem")
    keyPath = os.path.join(directory, f"{name}.key")
    with open(certPath, "wb") as f:
        f.write(certificatePem(certificate))
    with open(keyPath, "wb") as f:
        f.write(keyPem(key))
    os.chmod(keyPath, 0o600)
    return certPath, keyPath
