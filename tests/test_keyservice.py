"""The key service with real parts: three key-server processes on loopback with TLS.

A real ObjectStore (LMDB + blobs in a tmp dir) seals its objects' keys M-of-N with
KeyServiceProvider; the servers verify real JWTs and evaluate real policy files.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.access.tokens import init_issuer, issue_token
from mdm.config import Config, load_config
from mdm.errors import KeyUnavailable
from mdm.keyservice import shares as sss
from mdm.keyservice.client import HttpsPool, KeyServiceProvider
from mdm.keyservice.seal import open_from, public_bytes
from mdm.keyservice.wire import INFO_REPLY, SealedKey, b64d, b64e, reply_aad
from mdm.store.db import open_env
from mdm.store.keys import Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectRef
from mdm_demo.localpacs import free_port

ISS = "https://idp.test"
AUD = "mdm-test"
SCOPE = Scope("SiteA", "identified")
ANY = Principal(sub="unused-by-the-key-service", issuer="-")
BASE_POLICY = """
[[allow]]
id = "radiology-a"
description = "radiologists: SiteA identified"
principals = { groups = ["radiologists"] }
resources = { sites = ["SiteA"] }
access = "identified"
"""
GRID_RULE = """
[[allow]]
id = "grid-a"
description = "grid jobs: SiteA identified (revoked by a test)"
principals = { groups = ["grid"] }
resources = { sites = ["SiteA"] }
access = "identified"
"""
COHORT_RULE = """
[[allow]]
id = "cohort"
description = "a researcher: one patient, de-identified"
principals = { subjects = ["asmith"] }
resources = { patient_ids = ["PAT-SECRET-77"] }
access = "deidentified"
"""

_KEYSERVER = "from mdm.cli.keys import keyserver; keyserver()"
_KEYS = "from mdm.cli.keys import keys; keys()"


@dataclass
class Deployment:
    root: Path
    config: Config
    ks_dir: Path
    policy_file: Path
    procs: dict[int, subprocess.Popen[bytes]]
    logs: dict[int, Path]
    tokens: dict[str, str]
    idp: Path

    def url(self, k: int) -> str:
        return self.config.keys.servers[k - 1]

    def start(self, k: int) -> None:
        log = self.logs[k].open("ab")
        self.procs[k] = subprocess.Popen(
            [sys.executable, "-c", _KEYSERVER, "--config", str(self.ks_dir / f"server-{k}.toml")],
            stdout=log,
            stderr=log,
            cwd=self.root,
        )
        wait_healthy(self, k)

    def stop(self, k: int) -> None:
        p = self.procs[k]
        p.send_signal(signal.SIGCONT)
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def provider(self, token: str = "alice", **kw: object) -> KeyServiceProvider:
        ks = self.config.keys
        assert ks.ca_file is not None
        args: dict[str, object] = {"token": lambda: self.tokens[token], "timeout": ks.timeout}
        args.update(kw)
        servers = args.pop("servers", ks.servers)
        threshold = args.pop("threshold", ks.threshold)
        return KeyServiceProvider(servers, threshold, ks.ca_file, **args)  # type: ignore[arg-type]


def wait_healthy(dep: Deployment, k: int, deadline: float = 20.0) -> None:
    ctx = ssl.create_default_context(cafile=str(dep.ks_dir / "ca.pem"))
    host, port = dep.url(k).removeprefix("https://").rsplit(":", 1)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert dep.procs[k].poll() is None, dep.logs[k].read_text()
        try:
            with (
                socket.create_connection((host, int(port)), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as s,
            ):
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                if b'"index": %d' % k in got:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"key server {k} did not start: {dep.logs[k].read_text()}")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("keyservice")
    idp = root / "idp"
    init_issuer(idp)
    pol = root / "policy"
    pol.mkdir()
    policy_file = pol / "rules.toml"
    policy_file.write_text(BASE_POLICY + GRID_RULE + COHORT_RULE)
    ports = [free_port() for _ in range(3)]
    ks_dir = root / "ks"
    base = (
        f'[cache]\ndir = "{root / "cache"}"\n'
        '[[site]]\nname = "SiteA"\nae_title = "SITEA"\nhost = "127.0.0.1"\nport = 4242\n'
        f'[identity]\nissuer = "{ISS}"\naudience = "{AUD}"\n'
        f'public_keys = "{idp / "jwks.json"}"\nleeway = 0\n'
        f'[policy]\ndir = "{pol}"\n'
    )
    cfg_path = root / "mdm.toml"
    cfg_path.write_text(base)
    listen = ",".join(f"127.0.0.1:{p}" for p in ports)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _KEYS,
            "init",
            str(ks_dir),
            "--config",
            str(cfg_path),
            "--shares",
            "3",
            "--threshold",
            "2",
            "--listen",
            listen,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "threshold = 2" in out.stdout
    servers = ", ".join(f'"https://127.0.0.1:{p}"' for p in ports)
    cfg_path.write_text(
        base
        + f'[keys]\nservers = [{servers}]\nthreshold = 2\nca_file = "{ks_dir / "ca.pem"}"\n'
        + 'timeout = "2s"\n'
    )
    key = idp / "signing-key.pem"
    tokens = {
        "alice": issue_token(key, issuer=ISS, audience=AUD, sub="alice", groups=["radiologists"]),
        "bob": issue_token(key, issuer=ISS, audience=AUD, sub="bob", groups=["grid"]),
        "asmith": issue_token(key, issuer=ISS, audience=AUD, sub="asmith"),
        "carol": issue_token(key, issuer=ISS, audience=AUD, sub="carol", groups=["nobody"]),
        "expired": issue_token(
            key,
            issuer=ISS,
            audience=AUD,
            sub="alice",
            groups=["radiologists"],
            ttl=60,
            now=time.time() - 3600,
        ),
    }
    other = root / "other-idp"
    init_issuer(other)
    tokens["forged"] = issue_token(
        other / "signing-key.pem", issuer=ISS, audience=AUD, sub="alice", groups=["radiologists"]
    )
    d = Deployment(
        root,
        load_config(cfg_path),
        ks_dir,
        policy_file,
        {},
        {k: root / f"server-{k}.log" for k in (1, 2, 3)},
        tokens,
        idp,
    )
    try:
        for k in (1, 2, 3):
            d.start(k)
        yield d
    finally:
        for k in list(d.procs):
            d.stop(k)


@pytest.fixture(scope="module")
def store(dep: Deployment) -> Iterator[tuple[ObjectStore, dict[ObjectRef, bytes]]]:
    cache = dep.config.cache.dir
    env = open_env(cache)
    provider = dep.provider()
    st = ObjectStore(cache, env, provider, 10 * 2**20, chunk_size=4096)
    objects = {
        ObjectRef(f"1.2.826.0.1.3680043.8.498.{i}"): os.urandom(10_000 + i) for i in range(1, 4)
    }
    for ref, data in objects.items():
        st.put(ref, SCOPE, data)
    try:
        yield st, objects
    finally:
        st.close()
        provider.close()
        env.close()


def read_all(st: ObjectStore, ref: ObjectRef) -> bytes:
    with st.open(ref, ANY) as r:
        return r.read(0, r.size)


def test_config_validation(tmp_path: Path) -> None:
    from mdm.config import config_from_dict
    from mdm.errors import ConfigError

    p = tmp_path / "mdm.toml"
    urls = ["https://127.0.0.1:1", "https://h.example:2"]
    good: dict[str, object] = {"servers": urls, "threshold": 2}
    ks = config_from_dict({"cache": {"dir": "c"}, "keys": {**good, "ca_file": "ca.pem"}}, p).keys
    assert ks.servers == tuple(urls) and ks.ca_file == tmp_path / "ca.pem"
    for bad, key in [
        ({"servers": ["http://x:1"]}, "keys.servers[0]"),
        ({**good, "threshold": 3, "ca_file": "c"}, "keys.threshold"),
        ({**good, "threshold": 1, "ca_file": "c"}, "keys.threshold"),
        ({"threshold": 2}, "keys.threshold"),
        (good, "keys.ca_file"),
        ({**good, "ca_file": "c", "timeout": "0s"}, "keys.timeout"),
    ]:
        with pytest.raises(ConfigError) as ei:
            config_from_dict({"cache": {"dir": "c"}, "keys": bad}, p)
        assert ei.value.key == key


def test_key_store_refused_if_readable_by_others(tmp_path: Path) -> None:
    from mdm.errors import ConfigError
    from mdm.keyservice.store import KeyStore

    path = tmp_path / "server-1.keys.json"
    KeyStore.create(path, 1, "x" * 64, 12345, ["SiteA/identified"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert KeyStore.load(path).public("SiteA/identified") is not None
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyStore.load(path)


def test_shares_need_threshold() -> None:
    secret = os.urandom(32)
    parts = sss.split(secret, 3, 5)
    assert sss.combine([parts[4], parts[0], parts[2]], 3) == secret
    assert sss.combine(parts[:2] + parts[3:4], 3) == secret
    # Too few shares give a wrong key silently: hence the commitments checked by the client.
    assert sss.combine(parts[:2], 2) != secret
    with pytest.raises(ValueError):
        sss.combine(parts[:2], 3)
    assert all(secret[:16] not in s and secret[16:] not in s for _, s in parts)


def test_reads_with_three_and_two_servers_fail_closed_with_one(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, objects = store
    for ref, data in objects.items():
        assert read_all(st, ref) == data
    ref = next(iter(objects))
    # Server 3 hangs (SIGSTOP): two answers are enough, without waiting for the deadline.
    dep.procs[3].send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert read_all(st, ref) == objects[ref]
        assert time.monotonic() - t0 < 1.5
        # Server 2 down as well (killed): fail closed within the deadline, saying how many.
        dep.stop(2)
        t0 = time.monotonic()
        with pytest.raises(KeyUnavailable) as ei:
            st.open(ref, ANY)
        assert time.monotonic() - t0 < dep.config.keys.timeout + 1.0
        msg = str(ei.value)
        assert "1 of 3 key servers answered" in msg and "2 needed" in msg
        assert "key server 3" in msg and "no answer within the deadline" in msg
        assert "key server 2" in msg
        assert ei.value.errno == 13  # EACCES
    finally:
        dep.procs[3].send_signal(signal.SIGCONT)
        if dep.procs[2].poll() is not None:
            dep.start(2)
    assert read_all(st, ref) == objects[ref]


def test_caching_needs_no_server(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, _ = store
    for k in (1, 2, 3):
        dep.procs[k].send_signal(signal.SIGSTOP)
    try:
        ref = ObjectRef("1.2.826.0.1.3680043.8.498.99")
        st.put(ref, SCOPE, b"cached while every key server is down")
    finally:
        for k in (1, 2, 3):
            dep.procs[k].send_signal(signal.SIGCONT)
    assert read_all(st, ref) == b"cached while every key server is down"


def test_bad_tokens_replays_and_wrong_servers_are_refused(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, objects = store
    ref_a, ref_b = list(objects)[:2]
    info_a, info_b = st.info(ref_a), st.info(ref_b)
    assert info_a is not None and info_b is not None
    for who, reason in [
        ("forged", "token refused"),
        ("expired", "token refused"),
        ("carol", "not granted"),
    ]:
        p = dep.provider(who)
        try:
            with pytest.raises(KeyUnavailable) as ei:
                p.open(ANY, ref_a.identity(), SCOPE, info_a.sealed_key)
            assert "0 of 3 key servers answered" in str(ei.value)
            assert reason in str(ei.value)
        finally:
            p.close()
    p = dep.provider()
    try:
        # B's sealed key presented for A, or under another scope: the AAD binding refuses it.
        with pytest.raises(KeyUnavailable, match="does not belong to this object"):
            p.open(ANY, ref_a.identity(), SCOPE, info_b.sealed_key)
        with pytest.raises(KeyUnavailable):
            p.open(ANY, ref_a.identity(), Scope("SiteA", "deidentified"), info_a.sealed_key)
        # A share of server 1 relabelled as server 2's.
        sk = SealedKey.decode(info_a.sealed_key)
        s1, s2 = sk.shares[0], sk.shares[1]
        swapped = sk.replace(type(s2)(2, s1.kid, s2.commitment, s1.sealed))
        p.open(ANY, ref_a.identity(), SCOPE, swapped.encode())  # servers 1 and 3 suffice
        broken = swapped.replace(type(s1)(1, s1.kid, s1.commitment, s2.sealed))
        with pytest.raises(KeyUnavailable, match="1 of 3"):
            p.open(ANY, ref_a.identity(), SCOPE, broken.encode())
    finally:
        p.close()
    # The servers listed in the wrong order: each refuses to answer for another index.
    ks = dep.config.keys.servers
    p = dep.provider(servers=(ks[1], ks[0], ks[2]), threshold=2)
    try:
        with pytest.raises(KeyUnavailable) as ei:
            p.open(ANY, ref_a.identity(), SCOPE, info_a.sealed_key)
        assert "this is key server 2, not key server 1" in str(ei.value)
    finally:
        p.close()
    audit = (dep.ks_dir / "server-1-audit.log").read_text()
    assert '"decision":"deny"' in audit and '"decision":"allow"' in audit
    assert (
        "this is key server 2, not key server 1" in (dep.ks_dir / "server-2-audit.log").read_text()
    )


def _fake_tls_server(dep: Deployment, mode: str) -> tuple[str, threading.Event]:
    """A TLS listener (certificate from the deployment's CA) that answers garbage or nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(dep.ks_dir / "server-3.crt", dep.ks_dir / "server-3.key")
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            try:
                tls = ctx.wrap_socket(conn, server_side=True)
                tls.settimeout(5)
                req = b""
                while b"\r\n\r\n" not in req:
                    req += tls.recv(65536)
                head, _, body = req.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += tls.recv(65536)
                if mode == "garbage":
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")
                    tls.close()
                else:
                    held.append(tls)  # never answers
            except OSError:
                conn.close()
        lsock.close()
        for s in held:
            s.close()

    threading.Thread(target=run, daemon=True).start()
    return f"https://127.0.0.1:{lsock.getsockname()[1]}", stop


@pytest.mark.parametrize("mode", ["garbage", "silent"])
def test_garbage_or_silent_server(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]], mode: str
) -> None:
    st, objects = store
    ref = next(iter(objects))
    info = st.info(ref)
    assert info is not None
    url, stop = _fake_tls_server(dep, mode)
    ks = dep.config.keys.servers
    try:
        p = dep.provider(servers=(ks[0], ks[1], url), threshold=2, timeout=1.5)
        assert p.open(ANY, ref.identity(), SCOPE, info.sealed_key)  # 2 good servers suffice
        p.close()
        p = dep.provider(servers=(ks[0], url, ks[2]), threshold=2, timeout=1.5)
        sk = SealedKey.decode(info.sealed_key)
        # Needing all three shares, the fake server must make it fail.
        all_three = SealedKey(3, sk.check, sk.shares).encode()
        t0 = time.monotonic()
        with pytest.raises(KeyUnavailable) as ei:
            p.open(ANY, ref.identity(), SCOPE, all_three)
        assert time.monotonic() - t0 < 3.0
        want = "answered garbage" if mode == "garbage" else "no answer within the deadline"
        assert f"key server 2 (127.0.0.1:{url.rsplit(':', 1)[1]}): {want}" in str(ei.value)
        p.close()
    finally:
        stop.set()


def test_patient_attribute_is_sealed_and_decides(dep: Deployment) -> None:
    p = dep.provider("asmith")
    try:
        ident = ObjectRef("1.2.826.0.1.3680043.8.498.500", "deidentified").identity()
        scope = Scope("SiteA", "deidentified")
        dek = os.urandom(32)
        mine = Resource(sites=frozenset({"SiteA"}), patient_id="PAT-SECRET-77")
        other = Resource(sites=frozenset({"SiteA"}), patient_id="PAT-OTHER-12")
        sealed_mine = p.seal(ident, scope, dek, resource=mine)
        assert p.open(ANY, ident, scope, sealed_mine) == dek
        sealed_other = p.seal(ident, scope, dek, resource=other)
        with pytest.raises(KeyUnavailable, match="not granted"):
            # The mount claims the granted patient: the servers decide on the sealed one.
            p.open(ANY, ident, scope, sealed_other, resource=mine)
        assert b"PAT-SECRET" not in sealed_mine and b"PAT-OTHER" not in sealed_other
    finally:
        p.close()
    for k in (1, 2, 3):
        assert "PAT-" not in (dep.ks_dir / f"server-{k}-audit.log").read_text()


def test_revoked_grant_loses_access_within_5s(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, objects = store
    ref = next(iter(objects))
    info = st.info(ref)
    assert info is not None
    p = dep.provider("bob")
    try:
        assert p.open(ANY, ref.identity(), SCOPE, info.sealed_key)
        dep.policy_file.write_text(BASE_POLICY + COHORT_RULE)
        t0 = time.monotonic()
        while True:
            try:
                p.open(ANY, ref.identity(), SCOPE, info.sealed_key)
            except KeyUnavailable as e:
                assert "0 of 3" in str(e) and "not granted" in str(e)
                break
            assert time.monotonic() - t0 < 5.0, "still released 5 s after the revocation"
            time.sleep(0.1)
    finally:
        p.close()
        dep.policy_file.write_text(BASE_POLICY + GRID_RULE + COHORT_RULE)
    assert read_all(st, ref) == objects[ref]  # alice keeps her grant


def test_pseudonym_keys_are_scoped_stable_and_m_of_n(dep: Deployment) -> None:
    """A pseudonym key leaves the servers only for a principal granted its scope; it is the
    same for every entitled principal and any M servers; the catalog key never leaves."""
    p1, p2, carol = dep.provider("asmith"), dep.provider("asmith"), dep.provider("carol")
    alice = dep.provider("alice")
    try:
        dep.procs[1].send_signal(signal.SIGSTOP)
        try:
            a = p1.secret("pseudonym:cohort")  # asmith's de-identified grant: scope "cohort"
        finally:
            dep.procs[1].send_signal(signal.SIGCONT)
        assert a == p2.secret("pseudonym:cohort") and len(a) == 32
        # Identified access (re-identification needs it) gets the same key.
        assert alice.secret("pseudonym:cohort") == a
        # Another scope, a metadata rule it does not hold, or no grant at all: nothing.
        for who, name in [
            (p1, "pseudonym:other-programme"),
            (p1, "pseudonym:metadata:radiology-a"),
            (carol, "pseudonym:cohort"),
            (carol, "pseudonym:metadata:cohort"),
        ]:
            with pytest.raises(KeyUnavailable, match="0 of 3"):
                who.secret(name)
        # The catalog key is this process's own: never the same twice, never asked for.
        assert p1.secret("catalog") != p2.secret("catalog")
    finally:
        for p in (p1, p2, carol, alice):
            p.close()
    for k in (1, 2, 3):
        log = (dep.ks_dir / f"server-{k}-audit.log").read_text()
        assert '"action":"pseudonym-release"' in log and "secret-release" not in log


def test_no_rule_no_token_gets_nothing_from_any_endpoint(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    """A valid token that matches no rule gets nothing from any endpoint, and the refusals
    name no rule, level or key id (those stay in the server's own log)."""
    st, objects = store
    ref = next(iter(objects))
    info = st.info(ref)
    assert info is not None
    sk = SealedKey.decode(info.sealed_key)
    pool = HttpsPool(dep.config.keys.servers, dep.ks_dir / "ca.pem")
    eph = b64e(public_bytes(X25519PrivateKey.generate()))
    s = sk.shares[0]
    calls = {
        "/v1/public-key": {"scope": "SiteA/identified"},
        "/v1/pseudonym": {"label": "deid:cohort", "reply_key": eph},
        "/v1/open": {
            "identity": b64e(ref.identity()),
            "scope": SCOPE.label(),
            "index": s.index,
            "kid": s.kid,
            "sealed": b64e(s.sealed),
            "reply_key": eph,
        },
        "/v1/secret": {"reply_key": eph},
    }
    try:
        for who in ("carol", "forged", "expired"):
            for path, body in calls.items():
                with pytest.raises(Exception) as ei:
                    pool.post(1, path, body, dep.tokens[who], 5)
                msg = str(ei.value)
                assert "HTTP 40" in msg, (who, path, msg)
                for leak in ("default-deny", "radiology", "cohort", "identified", "kid", "key id"):
                    assert leak not in msg.split("refused (HTTP")[1], (who, path, msg)
    finally:
        pool.close()


def test_scope_x_cannot_open_scope_y(dep: Deployment) -> None:
    """A de-identified grant in pseudonym scope X opens de-identified copies of scope X only."""
    p = dep.provider("asmith")
    try:
        mine = Resource(sites=frozenset({"SiteA"}), patient_id="PAT-SECRET-77")
        scope = Scope("SiteA", "deidentified")
        dek = os.urandom(32)
        here = ObjectRef("1.2.826.0.1.3680043.8.498.600", "deid/cohort/0123456789ab").identity()
        there = ObjectRef("1.2.826.0.1.3680043.8.498.600", "deid/other/0123456789ab").identity()
        assert p.open(ANY, here, scope, p.seal(here, scope, dek, resource=mine)) == dek
        with pytest.raises(KeyUnavailable, match="not granted"):
            p.open(ANY, there, scope, p.seal(there, scope, dek, resource=mine))
    finally:
        p.close()


def test_a_copy_of_the_cache_and_a_token_decrypt_nothing(dep: Deployment, tmp_path: Path) -> None:
    """What a compromised worker's disk holds: the private catalog of a running process is
    under a key that never left it, and is gone with the process; a token matching no rule
    opens no object key and no pseudonym key."""
    import shutil

    from mdm.catalog.records import Catalog, Record

    cat = Catalog.private(tmp_path / "cache", 600)
    cat.merge([Record("STUDY", "1.2.3.4", "PAT-SECRET-77", {"PatientName": "DOE^JANE"})])
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "cache", copy)
    raw = b"".join(f.read_bytes() for f in copy.rglob("*") if f.is_file())
    assert b"DOE^JANE" not in raw and b"PAT-SECRET" not in raw
    cat.close()
    assert not list((tmp_path / "cache" / "catalogs").iterdir())
    # A later process cannot read what the copy holds: its key was random and in memory.
    p = dep.provider("carol")
    try:
        with pytest.raises(KeyUnavailable):
            p.secret("pseudonym:cohort")
        assert p.secret("catalog") not in raw
    finally:
        p.close()
    # A crashed process's private catalog is removed by the next one.
    dead = tmp_path / "cache" / "catalogs" / "c-dead"
    dead.mkdir()
    (dead / "owner.lock").write_bytes(b"")
    Catalog.private(tmp_path / "cache", 600).close()
    assert not dead.exists()


def test_rotation_reseals_and_destroys_old_keys(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, objects = store
    before = {k: json.loads((dep.ks_dir / f"server-{k}.keys.json").read_text()) for k in (1, 2, 3)}
    old = {k: before[k]["scopes"][SCOPE.label()]["current"] for k in (1, 2, 3)}
    # A rotation that crashed after "begin": the next run resumes with the same pending keys.
    pool = HttpsPool(dep.config.keys.servers, dep.ks_dir / "ca.pem")
    admin = (dep.ks_dir / "admin.key").read_text().strip()
    pending = {
        k: pool.post(k, "/v1/admin/rotate/begin", {"scope": SCOPE.label()}, admin, 5)["kid"]
        for k in (1, 2, 3)
    }
    with pytest.raises(Exception, match="admin credential refused"):
        pool.post(1, "/v1/admin/rotate/begin", {"scope": SCOPE.label()}, "guess", 5)
    pool.close()
    out = subprocess.run(
        [sys.executable, "-c", _KEYS, "rotate", SCOPE.label(), "--config", str(dep.config.path)],
        capture_output=True,
        text=True,
        cwd=dep.root,
    )
    assert out.returncode == 0, out.stderr
    n = len(st.list_refs())
    assert f"rotated {SCOPE.label()}: {n} cached objects, {n} re-sealed" in out.stdout
    for k in (1, 2, 3):
        doc = json.loads((dep.ks_dir / f"server-{k}.keys.json").read_text())["scopes"]
        sc = doc[SCOPE.label()]
        assert sc["current"] == pending[k] and sc["pending"] is None
        assert list(sc["keys"]) == [pending[k]] and old[k] not in sc["keys"]
    for ref, data in objects.items():
        info = st.info(ref)
        assert info is not None
        assert {s.kid for s in SealedKey.decode(info.sealed_key).shares} == set(pending.values())
        assert read_all(st, ref) == data
    # New objects seal to the new keys (public-keys.json was rewritten).
    ref = ObjectRef("1.2.826.0.1.3680043.8.498.777")
    st.put(ref, SCOPE, b"after rotation")
    assert read_all(st, ref) == b"after rotation"
    assert not (dep.config.cache.dir / "keyservice-rotate.json").exists()


def test_no_key_or_share_in_clear_anywhere(
    dep: Deployment, store: tuple[ObjectStore, dict[ObjectRef, bytes]]
) -> None:
    st, objects = store
    secrets: list[bytes] = []
    pool = HttpsPool(dep.config.keys.servers, dep.ks_dir / "ca.pem")
    p = dep.provider()
    try:
        for ref in objects:
            info = st.info(ref)
            assert info is not None
            secrets.append(p.open(ANY, ref.identity(), SCOPE, info.sealed_key))
            for s in SealedKey.decode(info.sealed_key).shares:
                # Ask for each share as the client does, to know the bytes to look for.
                eph = X25519PrivateKey.generate()
                body = {
                    "identity": b64e(ref.identity()),
                    "scope": SCOPE.label(),
                    "index": s.index,
                    "kid": s.kid,
                    "sealed": b64e(s.sealed),
                    "reply_key": b64e(public_bytes(eph)),
                }
                a = pool.post(s.index, "/v1/open", body, dep.tokens["alice"], 5)
                share = open_from(
                    eph,
                    b64d(a["share"]),
                    reply_aad(ref.identity(), SCOPE.label(), s.index),
                    INFO_REPLY,
                )
                secrets += [share, share[:16], share[16:]]
        secrets.append(p.secret("catalog"))
    finally:
        pool.close()
        p.close()
    assert len(secrets) == 3 + 3 * 9 + 1
    needles = set()
    for sec in secrets:
        needles |= {sec, base64.b64encode(sec), sec.hex().encode()}
    files = [f for f in dep.root.rglob("*") if f.is_file() and "idp" not in f.parts]
    assert any("index.lmdb" in str(f) for f in files) and any("audit" in f.name for f in files)
    for f in files:
        data = f.read_bytes()
        for n in needles:
            assert n not in data, f"key material in clear in {f}"
