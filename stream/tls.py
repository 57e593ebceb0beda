"""TLS for every link: the gateway's https/wss, the workers' wss, and a self-signed pair for a LAN.

WebRTC media is already encrypted (DTLS-SRTP); TLS covers what is not:
signaling (the SDP, the client's token) and the worker links, which carry
the audio and transcripts between boxes. On a LAN without a certificate
authority, ``edgestream cert create DIR`` makes one self-signed certificate
naming the boxes' addresses; every process uses it as its certificate, and
the gateway (and the SDK) trust it as their only CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path


class TlsError(ValueError):
    """A certificate or key that cannot be loaded."""


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side context with this process's certificate (PEM) and private key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the certificate {cert} with key {key}: {exc}") from None
    return context


def client_context(ca: str | Path | None = None) -> ssl.SSLContext:
    """A client-side context that verifies peers against ``ca`` (PEM), or the system's CAs when ``None``."""
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the CA certificates {ca}: {exc}") from None


def default_names() -> list[str]:
    """Names a certificate for this box should carry: localhost, loopback, the host name."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    return list(dict.fromkeys(names))


def create_self_signed(cert_path: str | Path, key_path: str | Path, names: list[str], days: int = 825) -> None:
    """Write a new EC P-256 key (owner-readable only) and a certificate for ``names`` (host names and IPs).

    The certificate is its own CA, so clients can trust exactly it
    (``[security] tls_ca``). Existing files are never replaced.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path, key_path = Path(cert_path), Path(key_path)
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; not replacing it")
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgestream {names[0] if names else 'LAN'}")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
