"""Certificates and TLS contexts: every role is known by the certificate it holds.

``make_certs`` writes a private CA and one key + certificate per role: each compute node, the
model owner, and one or more clients. A certificate's subject says who holds it:
``OU`` is the role (``node``, ``owner``, ``client``) and ``CN`` its name (the node id, ``owner``,
the client's name). Node certificates also carry their id as a DNS name, so a connecting peer
checks that the server it reached *is* that node (TLS host-name verification against the id,
not against an address). Every channel of the service is mutual TLS 1.3 under this CA:
owner/client <-> node (gRPC) and node <-> node (the tunnels of tunnel.py); a peer's role is
read from its verified certificate, never from what it says.

Keys are ECDSA P-256, written with mode 0600. The CA key signs new client certificates
(``spu_run certs --add-client NAME``); keep it away from the nodes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("node", "owner", "client")
_VALID_DAYS = 365


class CertError(ValueError):
    """Missing, unreadable or mismatched certificates; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Where one role's credentials live: its certificate, its key, and the CA to trust."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate PEM, key PEM, CA PEM)."""
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as err:
            raise CertError(f"cannot read credentials ({err}); make them with "
                            "`spu_run certs --out DIR --config CONFIG`") from None


def identity(certs_dir: str | os.PathLike, name: str) -> Identity:
    """The credentials of ``name`` (a node id, ``owner`` or a client name) in ``certs_dir``."""
    d = Path(certs_dir)
    ident = Identity(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
    missing = [str(p) for p in (ident.cert, ident.key, ident.ca) if not p.exists()]
    if missing:
        raise CertError(f"no credentials for {name!r} in {d}: missing {missing}; make them with "
                        f"`spu_run certs --out {d} --config CONFIG` (clients: --clients NAME)")
    return ident


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(role: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mpcformer_jax"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _load_ca(d: Path):
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as err:
        raise CertError(f"cannot read the CA in {d} ({err})") from None
    return cert, key


def _new_ca(d: Path):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("ca", "mpcformer_jax service CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(d / "ca.key", key)
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(certs_dir: str | os.PathLike, role: str, name: str, hosts: tuple[str, ...] = ()
          ) -> Identity:
    """Issues a key and certificate for ``name`` in ``role`` with the CA in ``certs_dir``.

    Args:
      role: "node", "owner" or "client".
      name: the node id, "owner", or the client's name (file names ``name.pem``/``name.key``).
      hosts: extra DNS names or IP addresses of a node's host (its id is always included).
    """
    if role not in ROLES:
        raise CertError(f"unknown role {role!r}; choose one of {ROLES}")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name == "ca":
        raise CertError(f"bad name {name!r}: use letters, digits, '-', '_' or '.' (not 'ca')")
    d = Path(certs_dir)
    ca_cert, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if role == "node" else [])
    builder = (x509.CertificateBuilder().subject_name(_name(role, name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    if role == "node":
        import ipaddress

        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    ident = Identity(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
    _write_key(ident.key, key)
    ident.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ident


def make_certs(out_dir: str | os.PathLike, node_ids, clients=("client",),
               node_hosts: dict[str, tuple[str, ...]] | None = None) -> Path:
    """A new CA in ``out_dir`` and credentials for every node, the owner and each client.

    Refuses to overwrite an existing CA (certificates issued under it would stop working).
    """
    d = Path(out_dir)
    if (d / "ca.pem").exists():
        raise CertError(f"{d} already holds a CA; use another folder, or add a client with "
                        f"`spu_run certs --out {d} --add-client NAME`")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _new_ca(d)
    for node in node_ids:
        issue(d, "node", node, (node_hosts or {}).get(node, ()))
    issue(d, "owner", "owner")
    for name in clients:
        issue(d, "client", name)
    return d


# --------------------------------------------------------------------- peers


def subject_of(cert_der_or_pem: bytes) -> tuple[str, str]:
    """(role, name) from a verified certificate (its OU and CN)."""
    if cert_der_or_pem.startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(cert_der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(cert_der_or_pem)

    def attr(oid):
        values = cert.subject.get_attributes_for_oid(oid)
        return values[0].value if values else ""

    return str(attr(NameOID.ORGANIZATIONAL_UNIT_NAME)), str(attr(NameOID.COMMON_NAME))


def server_context(ident: Identity) -> ssl.SSLContext:
    """A TLS 1.3 server context that demands a client certificate from our CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.load_verify_locations(ident.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ident: Identity) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``ident`` and trusting only our CA.

    Connect with ``server_hostname=<node id>``: the server must hold that node's certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.load_verify_locations(ident.ca)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
