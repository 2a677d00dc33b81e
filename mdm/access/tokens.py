"""A local token issuer for demos and development (``mdm token init|issue|show``).

``init`` makes an Ed25519 signing key (algorithm EdDSA) and publishes its public half as a
JWKS whose ``kid`` is the key's RFC 7638 thumbprint; ``issue`` signs a token with that kid, so
``[identity] public_keys = "DIR/jwks.json"`` verifies it. Production uses its own identity
provider; nothing in the bridge depends on this module.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mdm.access.identity import RESERVED_CLAIMS, jwk_thumbprint, public_jwk
from mdm.errors import UserError

KEY_NAME = "signing-key.pem"
JWKS_NAME = "jwks.json"
ISSUER_CLAIMS = RESERVED_CLAIMS | {"jti"}
"""Claims the issuer sets itself; --claim may not override them."""
SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class IssuerFiles:
    """What ``mdm token init`` wrote."""

    key: Path
    jwks: Path
    kid: str


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp, fsync, rename) with ``mode`` from the first byte on."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init_issuer(directory: str | Path, force: bool = False) -> IssuerFiles:
    """Create ``DIR/signing-key.pem`` (Ed25519, 0600) and ``DIR/jwks.json`` (its public JWK)."""
    d = Path(directory)
    key_path, jwks_path = d / KEY_NAME, d / JWKS_NAME
    if key_path.exists() and not force:
        raise UserError(f"{key_path} already exists (use --force to replace it)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    kid = jwk_thumbprint(key.public_key())
    jwk = {**public_jwk(key.public_key()), "kid": kid, "alg": "EdDSA", "use": "sig"}
    _write_private(key_path, pem, 0o600)
    _write_private(jwks_path, (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode(), 0o644)
    return IssuerFiles(key_path, jwks_path, kid)


def load_signing_key(path: str | Path) -> SigningKey:
    """Read a private signing key; refuse one that group/other may access."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{p}: no such signing key") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise UserError(
            f"{p}: mode {st.st_mode & 0o777:04o} lets group/other access this signing key; "
            f"run 'chmod 600 {p}'"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{p}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, SigningKey):
        raise UserError(f"{p}: unsupported key type {type(key).__name__}")
    return key


def _alg_for(key: SigningKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name)
        if alg is None:
            raise UserError(f"EC curve {key.curve.name} is not supported")
        return alg
    return "RS256"


def parse_claim(text: str) -> tuple[str, Any]:
    """``k=v`` -> ``("k", "v")`` (a string); ``k:=JSON`` -> a JSON value (number, list...)."""
    if ":=" in text and ("=" not in text or text.index(":=") < text.index("=")):
        name, _, raw = text.partition(":=")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"--claim {name}:= : not valid JSON ({e.msg})") from None
    elif "=" in text:
        name, _, value = text.partition("=")
    else:
        raise UserError(f"--claim {text!r}: expected NAME=VALUE or NAME:=JSON")
    name = name.strip()
    if not name:
        raise UserError(f"--claim {text!r}: empty claim name")
    if name in ISSUER_CLAIMS:
        raise UserError(f"--claim {name}: set by the issuer (use --sub/--groups/--ttl)")
    return name, value


def issue_token(
    key_path: str | Path,
    *,
    issuer: str,
    audience: str,
    sub: str,
    groups: list[str] | None = None,
    claims: dict[str, Any] | None = None,
    ttl: float = 8 * 3600,
    now: float | None = None,
) -> str:
    """A signed JWT; its ``kid`` is the signing key's thumbprint (as in ``jwks.json``)."""
    if ttl <= 0:
        raise UserError("--ttl must be positive")
    if not sub:
        raise UserError("--sub must not be empty")
    key = load_signing_key(key_path)
    t = int(time.time() if now is None else now)
    payload: dict[str, Any] = dict(claims or {})
    payload.update(
        iss=issuer, aud=audience, sub=sub, iat=t, nbf=t, exp=t + int(ttl), jti=secrets.token_hex(8)
    )
    if groups:
        payload["groups"] = list(groups)
    headers = {"kid": jwk_thumbprint(key.public_key())}
    return jwt.encode(payload, key, algorithm=_alg_for(key), headers=headers)


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a token, WITHOUT verifying anything (for ``token show``)."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.exceptions.PyJWTError as e:
        raise UserError(f"not a JWT: {e}") from None
    return header, claims


def human_delta(seconds: float) -> str:
    """``7h59m``, ``3d2h``, ``45s``: a rough human duration."""
    s = int(abs(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"
