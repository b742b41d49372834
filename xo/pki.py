"""A small development CA and per-host certificates for the lab and the demo.

Agents authenticate each other with mutual TLS: every agent holds a certificate signed by the
same CA whose subject common name (and DNS SAN) is the agent's identity, and each agent accepts
only the identities listed in its peers. Production deployments bring their own PKI; this
module exists so the lab and the demo never run the protocol in clear text.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Lab certificates live as long as a lab; a day is plenty and keeps them from being reused.
VALIDITY = datetime.timedelta(days=1)
# Tolerate clocks of namespaces/VMs being slightly behind the one that signed.
BACKDATE = datetime.timedelta(minutes=5)
KEY_FILE_MODE = 0o600


class PkiError(ValueError):
    """A name or file that cannot make a usable certificate."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM file paths an agent needs: the CA to trust, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _san(identity: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        return x509.DNSName(identity)


class DevCA:
    """An in-memory CA that writes host certificates into a directory."""

    def __init__(self, name: str = "xo-dev-ca") -> None:
        if not name:
            raise PkiError("the CA needs a name")
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: str) -> tuple[bytes, bytes]:
        """A (cert PEM, key PEM) pair for `identity`, usable as TLS server and client. An IP
        address gets an IP SAN (clients such as boto3 verify an IP endpoint against it)."""
        if not identity or any(c.isspace() for c in identity):
            raise PkiError(f"identity must be a non-empty name without spaces: {identity!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_san(identity)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def write(self, directory: Path, identity: str) -> TlsFiles:
        """Write ca.pem, IDENTITY.pem and IDENTITY.key (mode 0600) into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = self.issue(identity)
        files = TlsFiles(directory / "ca.pem", directory / f"{identity}.pem",
                         directory / f"{identity}.key")
        files.ca.write_bytes(self.cert_pem)
        files.cert.write_bytes(cert_pem)
        _write_key(files.key, key_pem)
        return files


def make_lab_pki(directory: Path, identities: list[str]) -> dict[str, TlsFiles]:
    """One fresh CA and a certificate per identity, all in `directory`."""
    ca = DevCA()
    return {identity: ca.write(directory, identity) for identity in identities}
