"""JWT verification (mdm.access.identity): real keys, real signatures, every bad token refused."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from mdm.access.identity import (
    LOCAL_ADMIN,
    InvalidToken,
    TokenFile,
    TokenVerifier,
    jwk_thumbprint,
    load_keys,
    public_jwk,
)
from mdm.config import IdentitySettings
from mdm.errors import ConfigError

ISS = "https://idp.test/realms/mdm"
AUD = "mdm"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str, **extra: str) -> dict[str, str]:
    return {**public_jwk(key.public_key()), "kid": kid, **extra}


def _write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _jwks(path: Path, *jwks: dict[str, str]) -> Path:
    _write_atomic(path, json.dumps({"keys": list(jwks)}))
    return path


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 3600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _sign(key: Any, kid: str | None, alg: str = "RS256", **over: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(_claims(**over), key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _verifier(keys: Path, leeway: float = 30.0) -> TokenVerifier:
    return TokenVerifier(
        IdentitySettings(issuer=ISS, audience=AUD, public_keys=keys, leeway=leeway)
    )


@pytest.fixture
def two_keys(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    eck = ec.generate_private_key(ec.SECP256R1())
    path = _jwks(tmp_path / "jwks.json", _jwk(rsa_key, "rsa-1"), _jwk(eck, "ec-1"))
    return path, eck


def _refused(v: TokenVerifier, token: str, *fragments: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as ei:
        v.verify(token)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, msg
    # The token is a bearer credential: never in a message.
    sig = token.split(".")[-1]
    assert token not in msg and (not sig or sig not in msg)
    assert ei.value.errno == 13  # EACCES
    return ei.value


def test_valid_rsa_and_ec_tokens(two_keys: tuple[Path, Any], rsa_key: Any) -> None:
    path, eck = two_keys
    v = _verifier(path)
    p = v.verify(_sign(rsa_key, "rsa-1", groups=["radiology", "chla"], site="CHLA"))
    assert (p.sub, p.issuer, p.groups, p.admin) == ("alice", ISS, ("radiology", "chla"), False)
    assert p.claims == {"site": "CHLA"}
    assert p.expires > time.time() and p.label() == f"alice@{ISS}"
    p2 = v.verify(_sign(eck, "ec-1", "ES256", sub="job-7", groups="a b,c"))
    assert p2.sub == "job-7" and p2.groups == ("a", "b", "c")
    for alg in ("PS256", "RS512"):
        assert v.verify(_sign(rsa_key, "rsa-1", alg)).sub == "alice"
    assert LOCAL_ADMIN.admin and math.isinf(LOCAL_ADMIN.expires)


def test_tampered_signature_and_payload(two_keys: tuple[Path, Any], rsa_key: Any) -> None:
    v = _verifier(two_keys[0])
    tok = _sign(rsa_key, "rsa-1")
    h, p, s = tok.split(".")
    mid = len(s) // 2
    bad_sig = f"{h}.{p}.{s[:mid]}{'A' if s[mid] != 'A' else 'B'}{s[mid + 1 :]}"
    _refused(v, bad_sig, "signature verification failed")
    forged = _b64(json.dumps(_claims(sub="mallory")).encode())
    _refused(v, f"{h}.{forged}.{s}", "signature verification failed")
    # A signature from another RSA key under the same kid.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(v, _sign(other, "rsa-1"), "signature verification failed")


def test_alg_none_refused(two_keys: tuple[Path, Any]) -> None:
    v = _verifier(two_keys[0])
    body = _b64(json.dumps(_claims()).encode())
    for alg in ("none", "None", "NONE"):
        head = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
        _refused(v, f"{head}.{body}.", "algorithm 'none' is not accepted")


def test_hs256_with_rsa_public_key_as_secret_refused(
    two_keys: tuple[Path, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic confusion attack: HMAC keyed with the (public) PEM of the RSA key."""
    v = _verifier(two_keys[0])
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps(_claims(sub="mallory")).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    _refused(v, f"{head}.{body}.{_b64(mac)}", "algorithm HS256 not allowed for an RSA key")
    # And an RSA algorithm against the EC key, an EC one of the wrong size.
    _refused(v, _sign(rsa_key, "ec-1"), "algorithm RS256 not allowed for an EC P-256 key")
    eck = two_keys[1]
    head384 = _b64(json.dumps({"alg": "ES384", "kid": "ec-1"}).encode())
    sig = _b64(eck.sign(f"{head384}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    _refused(v, f"{head384}.{body}.{sig}", "algorithm ES384 not allowed")


def test_issuer_audience_and_time_claims(two_keys: tuple[Path, Any], rsa_key: Any) -> None:
    v = _verifier(two_keys[0], leeway=30)
    now = int(time.time())
    _refused(v, _sign(rsa_key, "rsa-1", iss="https://evil"), "wrong issuer 'https://evil'", ISS)
    _refused(v, _sign(rsa_key, "rsa-1", aud="other-app"), "wrong audience", "'mdm'")
    e = _refused(v, _sign(rsa_key, "rsa-1", iat=now - 7200, exp=now - 3600), "token expired at")
    assert e.code == "expired"
    _refused(v, _sign(rsa_key, "rsa-1", nbf=now + 600), "token not yet valid", "valid from")
    _refused(
        v, _sign(rsa_key, "rsa-1", iat=now + 600), "token not yet valid", "issued in the future"
    )
    _refused(v, _sign(rsa_key, "rsa-1", exp=None), "lacks the required claim 'exp'")
    _refused(v, _sign(rsa_key, "rsa-1", iat=None), "lacks the required claim 'iat'")
    _refused(v, _sign(rsa_key, "rsa-1", aud=None), "lacks the required claim 'aud'")
    # Within the leeway, clock skew is tolerated.
    assert v.verify(_sign(rsa_key, "rsa-1", exp=now - 10, iat=now - 100)).sub == "alice"
    assert v.verify(_sign(rsa_key, "rsa-1", nbf=now + 10, iat=now + 10)).sub == "alice"
    strict = _verifier(two_keys[0], leeway=0)
    _refused(strict, _sign(rsa_key, "rsa-1", exp=now - 10, iat=now - 100), "expired")


def test_kid_selection(tmp_path: Path, two_keys: tuple[Path, Any], rsa_key: Any) -> None:
    v = _verifier(two_keys[0])
    _refused(v, _sign(rsa_key, "rsa-9"), "unknown key id 'rsa-9'", "'ec-1', 'rsa-1'")
    _refused(v, _sign(rsa_key, None), "no key id")
    single = _verifier(_jwks(tmp_path / "one.json", public_jwk(rsa_key.public_key())))  # no kid
    assert single.verify(_sign(rsa_key, None)).sub == "alice"


def test_rotation_by_kid_reloads_without_restart(
    tmp_path: Path, rsa_key: Any, rsa_key2: Any
) -> None:
    path = _jwks(tmp_path / "jwks.json", _jwk(rsa_key, "2024"), _jwk(rsa_key2, "2025"))
    v = _verifier(path)
    old, new = _sign(rsa_key, "2024"), _sign(rsa_key2, "2025")
    assert v.verify(old).sub == v.verify(new).sub == "alice"
    _jwks(path, _jwk(rsa_key2, "2025"))  # the 2024 key retired
    _refused(v, old, "unknown key id '2024'")
    assert v.verify(new).sub == "alice"
    # A key file broken mid-rotation fails closed, and recovers when fixed.
    _write_atomic(path, "{not json")
    _refused(v, new, "public keys unusable")
    _jwks(path, _jwk(rsa_key2, "2025"))
    assert v.verify(new).sub == "alice"


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_pem_files_and_directory(tmp_path: Path, rsa_key: Any, rsa_key2: Any) -> None:
    edk = ed25519.Ed25519PrivateKey.generate()
    multi = tmp_path / "idp.pem"
    multi.write_bytes(
        b"# kid: old\n"
        + _pem(rsa_key)
        + b"\n# kid: ed\n"
        + _pem(edk)
        + b"# kid: cert\n"
        + _cert(rsa_key2)
    )
    v = _verifier(multi)
    assert sorted(load_keys(multi).kids()) == ["cert", "ed", "old"]
    assert v.verify(_sign(rsa_key, "old")).sub == "alice"
    assert v.verify(_sign(edk, "ed", "EdDSA")).sub == "alice"
    assert v.verify(_sign(rsa_key2, "cert", "PS384")).sub == "alice"
    _refused(v, _sign(edk, "old", "EdDSA"), "EdDSA not allowed for an RSA key")

    d = tmp_path / "keys"
    d.mkdir()
    (d / "k2024.pem").write_bytes(_pem(rsa_key))
    (d / "k2025.pem").write_bytes(_pem(rsa_key2))
    vd = _verifier(d)
    assert vd.verify(_sign(rsa_key2, "k2025")).sub == "alice"
    (d / "k2024.pem").unlink()
    _refused(vd, _sign(rsa_key, "k2024"), "unknown key id 'k2024'")
    bad = tmp_path / "two.pem"
    bad.write_bytes(_pem(rsa_key) + _pem(rsa_key2))
    with pytest.raises(ConfigError, match="kid"):
        load_keys(bad)


def test_unacceptable_key_files(tmp_path: Path, rsa_key: Any) -> None:
    def refused(name: str, data: str | bytes, fragment: str) -> None:
        p = tmp_path / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        with pytest.raises(ConfigError, match=fragment):
            load_keys(p)

    refused(
        "oct.json", json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}), "never"
    )
    priv = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    refused("priv.json", json.dumps({"keys": [priv]}), "private key")
    pem_priv = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    refused("priv.pem", pem_priv, "private key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    refused("small.pem", _pem(small), "too small")
    refused("k1.pem", _pem(ec.generate_private_key(ec.SECP256K1())), "not accepted")
    refused("hs.json", json.dumps({"keys": [_jwk(rsa_key, "a", alg="HS256")]}), "not allowed")
    refused("dup.json", json.dumps({"keys": [_jwk(rsa_key, "a"), _jwk(rsa_key, "a")]}), "duplicate")
    with pytest.raises(ConfigError, match="no such file"):
        load_keys(tmp_path / "absent.json")


def test_jwk_alg_narrows_and_enc_keys_skipped(tmp_path: Path, rsa_key: Any, rsa_key2: Any) -> None:
    path = _jwks(
        tmp_path / "kc.json",
        _jwk(rsa_key, "sig", alg="RS256", use="sig"),
        _jwk(rsa_key2, "enc", alg="RSA-OAEP", use="enc"),  # Keycloak publishes one like this
    )
    v = _verifier(path)
    assert v.verify(_sign(rsa_key, "sig")).sub == "alice"
    _refused(v, _sign(rsa_key, "sig", "PS256"), "PS256 not allowed")
    _refused(v, _sign(rsa_key2, "enc"), "unknown key id 'enc'")


def test_thumbprint_rfc7638_example() -> None:
    """The RFC 7638 section 3.1 example key has a known thumbprint."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    key = jwt.algorithms.RSAAlgorithm.from_jwk({"kty": "RSA", "n": n, "e": "AQAB"})
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# ------------------------------------------------------------------------------ token file
@pytest.fixture
def token_env(tmp_path: Path, rsa_key: Any) -> tuple[TokenVerifier, Path]:
    return _verifier(_jwks(tmp_path / "jwks.json", _jwk(rsa_key, "k1"))), tmp_path / "token"


def _put(path: Path, token: str, mode: int = 0o600) -> None:
    """Rewrite in place (same inode), as a job refreshing its token does."""
    with open(path, "w") as f:
        f.write(token + "\n")
    path.chmod(mode)


def test_token_file_refresh_in_place(token_env: tuple[TokenVerifier, Path], rsa_key: Any) -> None:
    v, path = token_env
    _put(path, _sign(rsa_key, "k1", sub="job-1"))
    tf = TokenFile(path, v)
    assert tf.current().sub == "job-1"
    ino = path.stat().st_ino
    _put(path, _sign(rsa_key, "k1", sub="job-1-refreshed"))
    assert path.stat().st_ino == ino
    assert tf.current().sub == "job-1-refreshed"
    # Many threads on the cached path agree.
    seen: list[str] = []

    def reader() -> None:
        for _ in range(200):
            seen.append(tf.current().sub)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["job-1-refreshed"] * 1600


def test_token_file_loose_mode_missing_unreadable_foreign(
    token_env: tuple[TokenVerifier, Path], rsa_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    v, path = token_env
    tok = _sign(rsa_key, "k1")
    tf = TokenFile(path, v)
    with caplog.at_level(logging.DEBUG, logger="mdm"):
        with pytest.raises(InvalidToken, match=r"cannot read token file .*no such file"):
            tf.current()
        _put(path, tok, 0o644)
        with pytest.raises(InvalidToken, match=r"readable by group/other \(mode 0644; chmod 600"):
            tf.current()
        path.chmod(0o620)
        with pytest.raises(InvalidToken, match="writable by group/other"):
            tf.current()
        path.chmod(0o600)
        assert tf.current().sub == "alice"
        os.chown(path, 4242, -1)
        try:
            with pytest.raises(InvalidToken, match="owned by uid 4242"):
                tf.current()
        finally:
            os.chown(path, os.geteuid(), -1)
        path.unlink()
        path.mkdir(mode=0o700)  # passes the mode check, but cannot be read as a file
        with pytest.raises(InvalidToken, match=r"cannot read token file .*directory"):
            tf.current()
    assert tok not in caplog.text and tok.split(".")[2] not in caplog.text


def test_token_file_expires_while_cached(
    token_env: tuple[TokenVerifier, Path], rsa_key: Any
) -> None:
    v, _ = token_env
    strict = TokenVerifier(
        IdentitySettings(issuer=ISS, audience=AUD, public_keys=v.settings.public_keys, leeway=0)
    )
    path = token_env[1]
    exp = int(time.time()) + 2
    _put(path, _sign(rsa_key, "k1", exp=exp))
    tf = TokenFile(path, strict)
    assert tf.current().sub == "alice"
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(InvalidToken, match="token expired at") as ei:
        tf.current()
    assert ei.value.code == "expired"
    # A fresh token in the same file brings the mount back.
    _put(path, _sign(rsa_key, "k1", sub="renewed"))
    assert tf.current().sub == "renewed"


def test_token_file_follows_key_rotation(
    token_env: tuple[TokenVerifier, Path], rsa_key: Any, rsa_key2: Any
) -> None:
    v, path = token_env
    _put(path, _sign(rsa_key, "k1"))
    tf = TokenFile(path, v)
    assert tf.current().sub == "alice"
    _jwks(v.settings.public_keys, _jwk(rsa_key2, "k2"))  # k1 revoked; the token file unchanged
    with pytest.raises(InvalidToken, match="unknown key id 'k1'"):
        tf.current()
    _put(path, _sign(rsa_key2, "k2", sub="bob"))
    assert tf.current().sub == "bob"


def test_token_file_garbage(token_env: tuple[TokenVerifier, Path]) -> None:
    v, path = token_env
    _put(path, "not-a-jwt")
    with pytest.raises(InvalidToken, match="malformed token"):
        TokenFile(path, v).current()
