"""Who a mount runs as: the principal, verified from a JWT (or the local administrator).

A mount presents one signed JWT (a token file). :class:`TokenVerifier` checks it against
``[identity]`` of ``mdm.toml``: the issuer, the audience, and the public keys of a JWKS or PEM
file, the key chosen by the token's ``kid``. The accepted algorithms are pinned to each key's
type *before* any signature is checked, so ``alg: none`` and the HMAC-with-a-public-key
confusion can never reach a verifier. :class:`TokenFile` re-reads a token refreshed in place.

Messages never contain the token itself (it is a bearer credential), only its claims' names.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mdm.config import IdentitySettings
from mdm.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """A verified identity. ``admin`` is the local administrator of a single-user workstation."""

    sub: str
    issuer: str
    groups: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    admin: bool = False
    expires: float = math.inf
    """When the token expires (seconds since the epoch); ``inf`` for the local administrator."""

    def label(self) -> str:
        """``sub@issuer``, for logs and audit records (never contains PHI)."""
        return f"{self.sub}@{self.issuer}"


LOCAL_ADMIN = Principal(sub="local-admin", issuer="local", admin=True)


class InvalidToken(UserError):
    """A token is missing, unreadable, malformed, or fails verification (EACCES on open).

    ``code`` names the kind of failure for callers (``expired``, ``immature``, ``signature``,
    ``issuer``, ``audience``, ``algorithm``, ``kid``, ``claims``, ``malformed``, ``file``,
    ``keys``); the message is the clear reason, never the token.
    """

    errno = errno.EACCES
    exit_code = 3

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


# Algorithms pinned per key type. A JWK's own "alg" may narrow these further, never widen.
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA_ALGS = frozenset({"EdDSA"})
MIN_RSA_BITS = 2048
MAX_TOKEN_BYTES = 64 * 1024
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
AnyPublicKey = PublicKey | ed448.Ed448PublicKey

_KID_COMMENT = re.compile(rb"^\s*#\s*kid\s*:\s*(\S+)\s*$")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN (PUBLIC KEY|RSA PUBLIC KEY|CERTIFICATE)-----.*?-----END \1-----", re.DOTALL
)
_PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True)
class VerifyKey:
    """One public key, the algorithms it may verify, and where it came from."""

    kid: str | None
    key: AnyPublicKey
    algorithms: frozenset[str]
    kind: str
    """``RSA``, ``EC P-256``, ``Ed25519``... for messages."""
    source: str


class KeySet:
    """The public keys of an issuer, by ``kid``."""

    def __init__(self, keys: list[VerifyKey], source: str) -> None:
        self.source = source
        self._by_kid: dict[str | None, VerifyKey] = {}
        for k in keys:
            if k.kid in self._by_kid:
                raise ConfigError(source, None, f"duplicate key id {k.kid!r}")
            self._by_kid[k.kid] = k
        if None in self._by_kid and len(self._by_kid) > 1:
            raise ConfigError(
                source, None, "a key has no kid: with several keys, every key needs a kid"
            )

    def __len__(self) -> int:
        return len(self._by_kid)

    def __iter__(self) -> Iterator[VerifyKey]:
        return iter(self._by_kid.values())

    def kids(self) -> list[str]:
        """The key ids, sorted (for messages)."""
        return sorted(k for k in self._by_kid if k is not None)

    def select(self, kid: object) -> VerifyKey:
        """The key a token's ``kid`` header names (the only key when it names none)."""
        if kid is None:
            if len(self._by_kid) == 1:
                return next(iter(self._by_kid.values()))
            raise InvalidToken(
                f"token has no key id (kid) and {len(self._by_kid)} keys are configured",
                "kid",
            )
        if not isinstance(kid, str):
            raise InvalidToken("token header 'kid' is not a string", "kid")
        key = self._by_kid.get(kid)
        if key is None:
            known = ", ".join(repr(k) for k in self.kids()) or "none"
            raise InvalidToken(f"unknown key id {_short(kid)!r} (known: {known})", "kid")
        return key


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_uint(n: int) -> str:
    return _b64u(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


def public_jwk(key: AnyPublicKey) -> dict[str, str]:
    """The RFC 7517 JWK members that define a public key (no kid, alg or use)."""
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {"e": _b64u_uint(nums.e), "kty": "RSA", "n": _b64u_uint(nums.n)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        size = (key.curve.key_size + 7) // 8
        pn = key.public_numbers()
        return {
            "crv": crv,
            "kty": "EC",
            "x": _b64u(pn.x.to_bytes(size, "big")),
            "y": _b64u(pn.y.to_bytes(size, "big")),
        }
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
    return {"crv": crv, "kty": "OKP", "x": _b64u(raw)}


def jwk_thumbprint(key: AnyPublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint of a public key, base64url: the ``kid`` of local keys."""
    canon = json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":"))
    return _b64u(hashlib.sha256(canon.encode("ascii")).digest())


def _classify(key: object, source: str) -> tuple[AnyPublicKey, frozenset[str], str]:
    """The pinned algorithms of a public key; refuse any other kind of key."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(source, None, "holds a private key; publish only the public key")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ConfigError(source, None, "holds a private key; publish only the public key")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                source, None, f"RSA key of {key.key_size} bits is too small (min {MIN_RSA_BITS})"
            )
        return key, RSA_ALGS, "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGS.get(key.curve.name)
        if alg is None:
            raise ConfigError(source, None, f"EC curve {key.curve.name} is not accepted")
        return key, frozenset({alg}), f"EC {public_jwk(key)['crv']}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, EDDSA_ALGS, "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return key, EDDSA_ALGS, "Ed448"
    raise ConfigError(source, None, f"unsupported key type {type(key).__name__}")


def _key_from_jwk(jwk: object, where: str) -> VerifyKey | None:
    if not isinstance(jwk, dict):
        raise ConfigError(where, None, "expected a JSON object (a JWK)")
    kty = jwk.get("kty")
    if jwk.get("use", "sig") != "sig":
        return None  # an encryption key (Keycloak publishes one): not for signatures
    if kty == "oct":
        raise ConfigError(where, None, "symmetric (kty 'oct') keys are never accepted")
    if "d" in jwk:
        raise ConfigError(where, None, "holds a private key; publish only the public key")
    loader = {
        "RSA": jwt.algorithms.RSAAlgorithm.from_jwk,
        "EC": jwt.algorithms.ECAlgorithm.from_jwk,
        "OKP": jwt.algorithms.OKPAlgorithm.from_jwk,
    }.get(str(kty))
    if loader is None:
        raise ConfigError(where, None, f"unsupported key type (kty) {kty!r}")
    try:
        key = loader(jwk)
    except (jwt.exceptions.InvalidKeyError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(where, None, f"invalid {kty} key: {e}") from None
    pub, algs, kind = _classify(key, where)
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise ConfigError(where, None, "kid must be a non-empty string")
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in algs:
            raise ConfigError(
                where,
                None,
                f"alg {alg!r} is not allowed for an {kind} key ({', '.join(sorted(algs))})",
            )
        algs = frozenset({alg})
    return VerifyKey(kid, pub, algs, kind, where)


def _keys_from_pem(data: bytes, path: Path) -> list[VerifyKey]:
    if _PEM_PRIVATE.search(data):
        raise ConfigError(path, None, "holds a private key; publish only the public key")
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise ConfigError(path, None, "no PEM public key or certificate found")
    keys: list[VerifyKey] = []
    pos = 0
    for i, m in enumerate(blocks):
        # The kid of a block is the last "# kid: NAME" line between it and the block before.
        kid: str | None = None
        for line in data[pos : m.start()].splitlines():
            km = _KID_COMMENT.match(line)
            if km:
                kid = km.group(1).decode("utf-8", "replace")
        pos = m.end()
        if kid is None:
            if len(blocks) > 1:
                raise ConfigError(
                    path, None, f"key #{i + 1}: several keys in one file need '# kid: NAME' lines"
                )
            kid = path.stem
        where = f"{path} (key {kid!r})"
        pem = m.group(0)
        try:
            if m.group(1) == b"CERTIFICATE":
                # The certificate is a container for the key; its dates and chain are not checked.
                obj: object = x509.load_pem_x509_certificate(pem).public_key()
            else:
                obj = serialization.load_pem_public_key(pem)
        except ValueError as e:
            raise ConfigError(where, None, f"not a valid PEM key: {e}") from None
        pub, algs, kind = _classify(obj, where)
        keys.append(VerifyKey(kid, pub, algs, kind, where))
    return keys


def load_keys(path: str | Path) -> KeySet:
    """Read an issuer's public keys: a JWKS file, a PEM file, or a directory of ``*.pem``.

    JWKS: ``{"keys": [...]}`` (or one bare JWK); keys with ``"use": "enc"`` are skipped.
    PEM: public keys or certificates; a ``# kid: NAME`` line before a block names it, a file
    with a single key and no such line takes the file name's stem as kid. Raises
    :class:`ConfigError` naming the file for anything it cannot accept.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.pem"))
        if not files:
            raise ConfigError(p, None, "directory holds no *.pem public keys")
        keys: list[VerifyKey] = []
        for f in files:
            keys.extend(_keys_from_pem(_read(f), f))
        return KeySet(keys, str(p))
    data = _read(p)
    if data.lstrip().startswith(b"{"):
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(p, None, f"not valid JSON: {e}") from None
        jwks = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
        if not isinstance(jwks, list):
            raise ConfigError(p, "keys", "expected a list of JWKs")
        keys = []
        for i, jwk in enumerate(jwks):
            k = _key_from_jwk(jwk, f"{p}: keys[{i}]")
            if k is not None:
                keys.append(k)
        if not keys:
            raise ConfigError(p, None, "no signature keys in this JWKS")
        return KeySet(keys, str(p))
    return KeySet(_keys_from_pem(data, p), str(p))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None


def _keys_signature(path: Path) -> tuple[Any, ...]:
    """What changes when a key file (or a directory of them) is replaced or edited."""
    try:
        st = path.stat()
        sig: tuple[Any, ...] = (st.st_ino, st.st_mtime_ns, st.st_size)
        if path.is_dir():
            for f in sorted(path.glob("*.pem")):
                fs = f.stat()
                sig += (f.name, fs.st_ino, fs.st_mtime_ns, fs.st_size)
        return sig
    except OSError:
        return ("missing",)


def _iso(ts: object) -> str:
    """A timestamp claim for messages (whatever a hostile token put there)."""
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime(  # type: ignore[arg-type]
            "%Y-%m-%dT%H:%M:%SZ"
        )
    except (OverflowError, ValueError, OSError, TypeError):
        return _short(repr(ts), 32)


def _parse_groups(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(g for g in re.split(r"[\s,]+", value) if g)
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        return tuple(g for g in value if g)
    raise InvalidToken("claim 'groups' must be a list of strings or a string", "claims")


RESERVED_CLAIMS = frozenset({"sub", "iss", "aud", "exp", "nbf", "iat", "groups"})
"""Registered claims that become Principal fields (or were checked) when a token is verified;
everything else stays in ``Principal.claims``, so a policy rule cannot match on these through
``claims`` (``mdm policy check`` says so) and the token issuer sets them itself."""


class TokenVerifier:
    """Verifies JWTs against ``[identity]``; the key file is re-read when it changes."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sig = _keys_signature(settings.public_keys)
        self._keys: KeySet | None = load_keys(settings.public_keys)  # ConfigError: refuse start
        self._error: ConfigError | None = None
        self.generation = 0
        """Incremented whenever a changed key file is loaded (callers re-verify then)."""

    def keys(self) -> KeySet:
        """The key set in force, reloaded first if the file changed.

        A key file that became unreadable or invalid fails closed (:class:`InvalidToken`)
        until it is fixed; keys are not kept from an older version of the file, so removing
        a compromised key always takes effect.
        """
        path = self.settings.public_keys
        sig = _keys_signature(path)
        with self._lock:
            if sig != self._sig:
                self._sig = sig
                self.generation += 1
                try:
                    self._keys, self._error = load_keys(path), None
                    log.info("reloaded public keys from %s (%d keys)", path, len(self._keys))
                except ConfigError as e:
                    self._keys, self._error = None, e
                    log.error("public keys unusable, every token is refused: %s", e)
            if self._keys is None:
                raise InvalidToken(f"public keys unusable: {self._error}", "keys")
            return self._keys

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; :class:`InvalidToken` with the reason otherwise."""
        token = token.strip()
        if not token:
            raise InvalidToken("the token is empty", "malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"the token is larger than {MAX_TOKEN_BYTES} bytes", "malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.PyJWTError as e:
            raise InvalidToken(f"malformed token: {e}", "malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise InvalidToken("token header has no algorithm (alg)", "algorithm")
        if alg.lower() == "none":
            raise InvalidToken("algorithm 'none' is not accepted", "algorithm")
        key = self.keys().select(header.get("kid"))
        # Pinned before any verification: an HS256 token "signed" with the public key as an
        # HMAC secret is refused here, whatever the library would do with it.
        if alg not in key.algorithms:
            raise InvalidToken(
                f"algorithm {_short(alg, 16)} not allowed for an {key.kind} key "
                f"(allowed: {', '.join(sorted(key.algorithms))})",
                "algorithm",
            )
        s = self.settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.exceptions.InvalidSignatureError:
            raise InvalidToken("signature verification failed", "signature") from None
        except jwt.exceptions.ExpiredSignatureError:
            exp = _unverified_claim(token, "exp")
            raise InvalidToken(f"token expired at {_iso(exp)}", "expired") from None
        except jwt.exceptions.ImmatureSignatureError as e:
            which = "iat" if "iat" in str(e) else "nbf"
            at = _iso(_unverified_claim(token, which))
            what = "issued in the future" if which == "iat" else "valid from"
            raise InvalidToken(f"token not yet valid ({what} {at})", "immature") from None
        except jwt.exceptions.InvalidIssuerError:
            iss = _unverified_claim(token, "iss")
            raise InvalidToken(
                f"wrong issuer {_short(str(iss))!r} (expected {s.issuer!r})", "issuer"
            ) from None
        except jwt.exceptions.InvalidAudienceError:
            aud = _unverified_claim(token, "aud")
            raise InvalidToken(
                f"wrong audience {_short(json.dumps(aud))} (expected {s.audience!r})", "audience"
            ) from None
        except jwt.exceptions.MissingRequiredClaimError as e:
            raise InvalidToken(f"token lacks the required claim {e.claim!r}", "claims") from None
        except jwt.exceptions.PyJWTError as e:
            raise InvalidToken(f"invalid token: {e}", "claims") from None
        return principal_from_claims(claims, verified=True)


def _unverified_claim(token: str, name: str) -> Any:
    """A claim of a token whose signature has already been verified (for messages only)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get(name, "?")
    except jwt.exceptions.PyJWTError:
        return "?"


def principal_from_claims(claims: Mapping[str, Any], *, verified: bool = False) -> Principal:
    """The principal of decoded token claims: the one construction, used by the verifier
    (``verified=True``: ``sub`` and ``exp`` are checked, a malformed ``groups`` is refused)
    and by ``policy explain`` (claims read as they are, for describing a decision)."""
    if verified:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("claim 'sub' must be a non-empty string", "claims")
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise InvalidToken("claim 'exp' must be a number", "claims")
    try:
        groups = _parse_groups(claims.get("groups"))
    except InvalidToken:
        if verified:
            raise
        groups = ()
    return Principal(
        sub=str(claims.get("sub", "")),
        issuer=str(claims.get("iss", "")),
        groups=groups,
        claims={k: v for k, v in claims.items() if k not in RESERVED_CLAIMS},
        admin=False,
        expires=float(claims["exp"]) if verified else math.inf,
    )


class TokenFile:
    """A token file re-read when it changes; :meth:`current` is called on every open.

    The file must belong to the current user and be private to it (mode 0600). A valid token
    is cached until the file (inode, mtime, size) or the issuer's keys change; its expiry is
    re-checked on every call. A failure is logged once per version of the file, then raised
    from the cache (a not-yet-valid token is re-checked, as it may become valid).
    """

    def __init__(self, path: str | Path, verifier: TokenVerifier) -> None:
        self.path = Path(path)
        self.verifier = verifier
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int, int] | None = None
        self._principal: Principal | None = None
        self._error: InvalidToken | None = None
        self._expired_logged = False

    def current(self) -> Principal:
        """The principal of the current token, or :class:`InvalidToken` with the reason."""
        with self._lock:
            st = self._stat()
            self.verifier.keys()  # reload rotated keys (bumps generation) before the cache check
            sig = (st.st_ino, st.st_mtime_ns, st.st_size, self.verifier.generation)
            if sig != self._sig or (self._error is not None and self._error.code == "immature"):
                self._load(sig)
            if self._error is not None:
                raise self._error
            assert self._principal is not None
            p = self._principal
            if time.time() >= p.expires + self.verifier.settings.leeway:
                if not self._expired_logged:
                    self._expired_logged = True
                    log.warning("token of %s expired at %s", p.label(), _iso(p.expires))
                raise InvalidToken(f"token expired at {_iso(p.expires)}", "expired")
            return p

    def _stat(self) -> os.stat_result:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise self._file_error(f"cannot read token file {self.path}: no such file") from None
        except OSError as e:
            raise self._file_error(f"cannot read token file {self.path}: {e.strerror}") from None
        problem = _private_problem(self.path, st)
        if problem:
            raise self._file_error(problem)
        return st

    def _file_error(self, message: str) -> InvalidToken:
        err = InvalidToken(message, "file")
        if self._error is None or str(self._error) != message:
            log.error("%s", message)
        self._sig, self._principal, self._error = None, None, err
        return err

    def _load(self, sig: tuple[int, int, int, int]) -> None:
        try:
            # Symlinks are followed (Kubernetes projects tokens through them); the file
            # actually opened is the one checked below.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._file_error(f"cannot read token file {self.path}: {e.strerror}") from None
        try:
            # Check the file actually opened (it may have been swapped since the stat).
            problem = _private_problem(self.path, os.fstat(fd))
            if problem:
                raise self._file_error(problem)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise self._file_error(f"cannot read token file {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)
        old = self._error
        self._sig, self._expired_logged = sig, False
        try:
            self._principal = self.verifier.verify(raw.decode("ascii"))
            self._error = None
            log.info("token of %s loaded from %s", self._principal.label(), self.path)
        except UnicodeDecodeError:
            self._principal = None
            self._error = InvalidToken(f"token file {self.path} is not ASCII text", "malformed")
        except InvalidToken as e:
            self._principal, self._error = None, e
        if self._error is not None and (old is None or str(old) != str(self._error)):
            log.error("token in %s refused: %s", self.path, self._error)


def _private_problem(path: Path, st: os.stat_result) -> str:
    """Why a token file is not private to the current user ("" when it is)."""
    if st.st_mode & 0o077:
        what = "readable" if st.st_mode & 0o044 else "writable"
        return (
            f"token file {path} is {what} by group/other "
            f"(mode {st.st_mode & 0o777:04o}; chmod 600 {path})"
        )
    if st.st_uid != os.geteuid():
        return (
            f"token file {path} is owned by uid {st.st_uid}, not the current user ({os.geteuid()})"
        )
    return ""
