"""``mdm keys init``: a CA, TLS certificates, key stores and configs for N key servers.

Writes into DIR::

    ca.pem, ca.key (0600)                the CA the mounts check the servers against
    server-K.crt, server-K.key (0600)    server K's TLS certificate (for its host or IP)
    server-K.keys.json (0600)            server K's key store (scope keys, secret share)
    server-K.toml                        server K's config: listen, TLS, key store, audit log,
                                         and the [identity] and [policy] of mdm.toml
    public-keys.json                     every server's public scope keys, the
                                         pseudonym-PRF commitments (read by mounts) and
                                         the public keys of the servers' audit anchors
    admin.key (0600)                     the admin credential for ``mdm keys rotate``
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mdm.config import Config
from mdm.errors import ConfigError, UserError
from mdm.keyservice import prf
from mdm.keyservice import shares as sss
from mdm.keyservice.client import PUBLIC_FILE, write_public_keys
from mdm.keyservice.store import KeyStore, admin_hash
from mdm.keyservice.wire import b64e
from mdm.store.keys import LEVELS, Scope

ADMIN_FILE = "admin.key"


@dataclass(frozen=True)
class InitResult:
    """What ``mdm keys init`` wrote."""

    ca: Path
    public_file: Path
    admin_file: Path
    server_configs: tuple[Path, ...]
    urls: tuple[str, ...]


def parse_listen(text: str) -> list[tuple[str, int]]:
    """``"HOST:PORT,HOST:PORT"`` (IPv6 as ``[::1]:PORT``) -> ``[(host, port), ...]``."""
    out: list[tuple[str, int]] = []
    for item in (x.strip() for x in text.split(",")):
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"--listen: expected HOST:PORT, got {item!r}")
        out.append((host, int(port)))
    return out


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _toml_str(v: str | Path) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(v))


def init_deployment(
    directory: Path, config: Config, shares: int, threshold: int, listen: list[tuple[str, int]]
) -> InitResult:
    """Create everything N key servers need in ``directory`` (refuses to overwrite)."""
    if config.identity is None or config.policy is None:
        raise ConfigError(
            config.path,
            "identity",
            "key servers verify tokens and policy: [identity] and [policy] are required",
        )
    if not 2 <= threshold <= shares <= sss.MAX_SHARES:
        raise UserError(f"need 2 <= --threshold <= --shares <= {sss.MAX_SHARES}")
    if len(listen) != shares:
        raise UserError(f"--listen names {len(listen)} addresses for {shares} servers")
    d = directory.resolve()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (d / "ca.pem").exists() or (d / PUBLIC_FILE).exists():
        raise UserError(f"{d} already holds a key service; refusing to overwrite it")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MDM key service CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(d / "ca.key", _key_pem(ca_key), 0o600)
    _write(d / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    admin = secrets.token_urlsafe(32)
    _write(d / ADMIN_FILE, admin.encode() + b"\n", 0o600)
    # The pseudonym PRF key: split at once and never stored whole (mdm.keyservice.prf).
    prf_shares = prf.split(prf.random_scalar(), threshold, shares)
    labels = [Scope(s.name, lv).label() for s in config.sites for lv in LEVELS]
    public_scopes: dict[str, dict[str, dict[str, str]]] = {label: {} for label in labels}
    anchor_public: dict[str, str] = {}
    configs: list[Path] = []
    urls: list[str] = []
    ident, pol = config.identity, config.policy
    for k, (host, port) in enumerate(listen, start=1):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(d / f"server-{k}.key", _key_pem(key), 0o600)
        _write(d / f"server-{k}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        store = KeyStore.create(
            d / f"server-{k}.keys.json", k, admin_hash(admin), prf_shares[k], labels
        )
        anchor_public[str(k)] = b64e(store.anchor_public())
        for label in labels:
            got = store.public(label)
            assert got is not None
            public_scopes[label][str(k)] = {"kid": got[0], "public": b64e(got[1])}
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        text = (
            f"# Key server {k} of {shares} (threshold {threshold}), made by 'mdm keys init'.\n"
            "[server]\n"
            f"index = {k}\n"
            f"listen = [{_toml_str(hostport)}]\n"
            f"certfile = {_toml_str(d / f'server-{k}.crt')}\n"
            f"keyfile = {_toml_str(d / f'server-{k}.key')}\n"
            f"keystore = {_toml_str(d / f'server-{k}.keys.json')}\n"
            f"audit_log = {_toml_str(d / f'server-{k}-audit.log')}\n\n"
            "[identity]\n"
            f"issuer = {_toml_str(ident.issuer)}\n"
            f"audience = {_toml_str(ident.audience)}\n"
            f"public_keys = {_toml_str(ident.public_keys.resolve())}\n"
            f"leeway = {ident.leeway}\n\n"
            "[policy]\n"
            f"dir = {_toml_str(pol.dir.resolve())}\n"
        )
        _write(d / f"server-{k}.toml", text.encode(), 0o644)
        configs.append(d / f"server-{k}.toml")
        urls.append(f"https://{hostport}")
    doc = {
        "version": 1,
        "threshold": threshold,
        "servers": urls,
        "scopes": public_scopes,
        "prf": {str(i): b64e(prf.commitment(s)) for i, s in prf_shares.items()},
        "anchor": anchor_public,
    }
    write_public_keys(d / PUBLIC_FILE, doc)
    return InitResult(d / "ca.pem", d / PUBLIC_FILE, d / ADMIN_FILE, tuple(configs), tuple(urls))
