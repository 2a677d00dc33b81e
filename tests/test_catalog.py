"""The LMDB catalog: merge by UID, site membership, listings with a TTL, nothing in clear."""

from __future__ import annotations

import time
from pathlib import Path

from mdm.catalog.records import ROOT, Catalog, Record
from mdm.store.db import open_env


def cat(tmp_path: Path, ttl: float = 60.0) -> Catalog:
    return Catalog(open_env(tmp_path), b"s" * 32, ttl)


def study(uid: str, pid: str, site: str, **attrs: str) -> Record:
    return Record("STUDY", uid, pid, {"PatientID": pid, **attrs}, {site: 0.0})


def test_merge_sites_and_children(tmp_path: Path) -> None:
    c = cat(tmp_path)
    c.merge([study("1.1", "P1", "A"), study("1.2", "P2", "A")])
    c.merge([study("1.1", "P1", "B")])
    assert set(c.get("STUDY", "1.1").sites) == {"A", "B"}  # type: ignore[union-attr]
    assert {r.uid for r in c.children("STUDY", ROOT)} == {"1.1", "1.2"}
    assert [r.uid for r in c.children("STUDY", "P1")] == ["1.1"]
    # Site B's full listing no longer has 1.1: it loses B, keeps A.
    c.merge([], replace_site="B", replace_scope=("STUDY", ROOT))
    assert set(c.get("STUDY", "1.1").sites) == {"A"}  # type: ignore[union-attr]


def test_listing_ttl(tmp_path: Path) -> None:
    c = cat(tmp_path, ttl=0.2)
    assert not c.fresh("studies")
    c.merge([], listed="studies")
    assert c.fresh("studies")
    time.sleep(0.3)
    assert not c.fresh("studies")


def test_no_phi_in_clear(tmp_path: Path) -> None:
    c = cat(tmp_path)
    c.merge(
        [
            Record("PATIENT", "PHIPID12345", ROOT, {"PatientName": "ZZTOPSECRET^NAME"}, {"A": 0}),
            study("1.9", "PHIPID12345", "A", PatientName="ZZTOPSECRET^NAME", StudyDate="19991231"),
        ]
    )
    c.env.sync(True)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "index.lmdb").iterdir())
    for needle in (b"PHIPID12345", b"ZZTOPSECRET", b"19991231"):
        assert needle not in raw
    assert c.get("PATIENT", "PHIPID12345").attrs["PatientName"] == "ZZTOPSECRET^NAME"  # type: ignore[union-attr]
