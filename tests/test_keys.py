"""The local keyring (mdm.store.keys):
file safety, persistence, sealing bound to object and scope."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from mdm.access.identity import LOCAL_ADMIN
from mdm.errors import ConfigError, KeyUnavailable
from mdm.store.crypto import new_key
from mdm.store.keys import LocalKeyring, Scope

ID_A = b"mdm-object-v1\0identified\0" + b"1.2.3.4"
ID_B = b"mdm-object-v1\0identified\0" + b"1.2.3.5"
CHLA = Scope("CHLA", "identified")
CHLA_DEID = Scope("CHLA", "deidentified")


def test_created_0600_and_persists_across_reload(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keyring.json"
    kr = LocalKeyring.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    dek = new_key()
    sealed = kr.seal(ID_A, CHLA, dek)
    secret = kr.secret("catalog")
    assert dek not in path.read_bytes()

    kr2 = LocalKeyring.load(path, create=False)
    assert kr2.open(LOCAL_ADMIN, ID_A, CHLA, sealed) == dek
    assert kr2.secret("catalog") == secret
    assert len(secret) == 32
    assert kr2.secret("pseudonym:CHLA") != secret
    assert set(json.loads(path.read_text())["scopes"]) == {"CHLA/identified"}
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_missing_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        LocalKeyring.load(tmp_path / "nope.json", create=False)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_loose_mode_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring.load(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as ei:
        LocalKeyring.load(path)
    assert str(path) in str(ei.value) and "chmod 600" in str(ei.value)


def test_other_owner_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = tmp_path / "keyring.json"
    LocalKeyring.load(path)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        LocalKeyring.load(path)


def test_malformed_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("{not json")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="malformed"):
        LocalKeyring.load(path)


def test_sealed_key_bound_to_identity_and_scope(tmp_path: Path) -> None:
    kr = LocalKeyring.load(tmp_path / "k.json")
    dek = new_key()
    sealed = kr.seal(ID_A, CHLA, dek)
    kr.seal(ID_A, CHLA_DEID, new_key())  # make sure the other scope has a key too
    with pytest.raises(KeyUnavailable):
        kr.open(LOCAL_ADMIN, ID_B, CHLA, sealed)
    with pytest.raises(KeyUnavailable):
        kr.open(LOCAL_ADMIN, ID_A, CHLA_DEID, sealed)
    with pytest.raises(KeyUnavailable):
        kr.open(LOCAL_ADMIN, ID_A, Scope("CHLA", "identified", program="NANT"), sealed)
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(KeyUnavailable) as ei:
        kr.open(LOCAL_ADMIN, ID_A, CHLA, bytes(bad))
    assert dek.hex() not in str(ei.value)
    assert kr.open(LOCAL_ADMIN, ID_A, CHLA, sealed) == dek


def test_unknown_scope_is_not_created_by_open(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    kr = LocalKeyring.load(path)
    with pytest.raises(KeyUnavailable, match="UCSF/identified"):
        kr.open(LOCAL_ADMIN, ID_A, Scope("UCSF", "identified"), b"\x01" + bytes(60))
    assert json.loads(path.read_text())["scopes"] == {}


def test_two_keyrings_on_one_file_keep_each_others_scopes(tmp_path: Path) -> None:
    # Stands in for two processes (mount and fetch) sharing a keyring file.
    path = tmp_path / "k.json"
    a = LocalKeyring.load(path)
    b = LocalKeyring.load(path)
    sa = a.seal(ID_A, Scope("A", "identified"), dek_a := new_key())
    sb = b.seal(ID_A, Scope("B", "identified"), dek_b := new_key())
    c = LocalKeyring.load(path)
    assert c.open(LOCAL_ADMIN, ID_A, Scope("A", "identified"), sa) == dek_a
    assert c.open(LOCAL_ADMIN, ID_A, Scope("B", "identified"), sb) == dek_b
    # a learns B's key from the file instead of inventing a second one
    assert a.open(LOCAL_ADMIN, ID_A, Scope("B", "identified"), sb) == dek_b


def test_concurrent_seal_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    kr = LocalKeyring.load(path)
    results: list[tuple[Scope, bytes, bytes]] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                scope = Scope(f"S{(i + j) % 4}", "identified")
                dek = new_key()
                results.append((scope, dek, kr.seal(ID_A, scope, dek)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reloaded = LocalKeyring.load(path)
    for scope, dek, sealed in results:
        assert reloaded.open(LOCAL_ADMIN, ID_A, scope, sealed) == dek
    assert len(json.loads(path.read_text())["scopes"]) == 4


def test_scope_validation() -> None:
    assert Scope("CHLA", "deidentified", "NANT").label() == "CHLA/deidentified/NANT"
    with pytest.raises(ValueError):
        Scope("CHLA", "secret")
    with pytest.raises(ValueError):
        Scope("", "identified")
