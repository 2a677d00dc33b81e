"""The audit chain anchored at real key servers (three processes on loopback, TLS).

Each attack of someone who can write the log, its ``.head`` and ``.anchors`` is first shown to
beat the plain hash chain (``verify`` of mdm.audit.log finds nothing), then to be reported by
``mdm audit verify`` against the anchors the key servers signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from mdm.access.identity import Principal
from mdm.access.session import open_session
from mdm.audit.anchor import AuditAnchorer, anchors_path, log_id
from mdm.audit.log import GENESIS, AuditLog, encode_record, head_path, verify
from mdm.cli.audit import audit
from mdm.cli.main import MdmGroup
from mdm.keyservice.anchor import book_path
from mdm.keyservice.client import HttpsPool
from tests import test_keyservice as ks

pytestmark = pytest.mark.timeout(180)

dep = ks.dep  # this module's own three key servers (the fixture of tests/test_keyservice.py)
ALICE = Principal(sub="alice", issuer=ks.ISS)
STUDY = "1.2.826.0.1.3680043.8.498.7"


@dataclass
class Writer:
    """A log, its anchorer, and the files an attacker edits."""

    path: Path
    log: AuditLog
    anchor: AuditAnchorer
    config: Path
    token_file: Path
    n: int = 0

    def record(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            self.log.record(
                principal=ALICE,
                action="open",
                decision="deny" if self.n % 4 == 0 else "allow",
                resource={"site": "SiteA", "study_uid": STUDY, "sop_uid": f"{STUDY}.{self.n}"},
                rule="radiology-a",
                policy="a" * 64,
            )

    def close(self) -> None:
        self.anchor.close()
        self.log.close()


@pytest.fixture
def writer(dep: ks.Deployment, tmp_path: Path) -> Iterator[Writer]:
    path = tmp_path / "var" / "audit.jsonl"
    log = AuditLog(path, fsync_interval=0.05)
    anchor = AuditAnchorer(log, dep.config.keys, lambda: dep.tokens["alice"], interval=3600)
    token_file = tmp_path / "alice.jwt"
    token_file.write_text(dep.tokens["alice"])
    token_file.chmod(0o600)
    cfg = tmp_path / "mdm.toml"
    cfg.write_text((dep.root / "mdm.toml").read_text() + f'[audit]\nlog = "{path}"\n')
    w = Writer(path, log, anchor, cfg, token_file)
    try:
        yield w
    finally:
        w.close()


def run_verify(mdm: click.Group, w: Writer, *more: str, token: bool = True) -> Result:
    args = ["audit", "verify", "--config", str(w.config), *more]
    if token:
        args += ["--token-file", str(w.token_file)]
    return CliRunner().invoke(mdm, args, env={"MDM_TOKEN_FILE": None})


@pytest.fixture
def mdm() -> click.Group:
    return MdmGroup(name="mdm", commands={"audit": audit})


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def rebuild(path: Path, recs: list[dict[str, Any]]) -> None:
    """What an attacker with write access does: a consistent chain and head from ``recs``."""
    prev, out = GENESIS, []
    for i, r in enumerate(recs, 1):
        r = {k: v for k, v in r.items() if k not in ("prev", "hash")}
        r["seq"], r["prev"] = i, prev
        line = encode_record(r)
        out.append(line + b"\n")
        prev = hashlib.sha256(line).hexdigest()
    path.write_bytes(b"".join(out))
    head_path(path).write_text(f'{{"seq":{len(recs):20d},"sha256":"{prev}"}}\n')
    assert verify(path) == [], "the rewrite must beat the plain hash chain"


def assert_detected(r: Result, *phrases: str) -> None:
    assert r.exit_code == 1, r.output
    assert "chain NOT intact" in r.output and "records, chain intact" not in r.output
    for p in phrases:
        assert p in r.output, (p, r.output)


def test_anchors_are_signed_kept_and_verified(
    dep: ks.Deployment, writer: Writer, mdm: click.Group
) -> None:
    writer.record(20)
    assert writer.anchor.anchor_now() == 3
    assert writer.anchor.anchor_now() == 0  # unchanged: nothing sent
    writer.record(5)
    writer.close()  # anchors the last records
    local = [json.loads(x) for x in anchors_path(writer.path).read_bytes().splitlines()]
    assert sorted((a["seq"], a["server"]) for a in local) == [
        (s, k) for s in (20, 25) for k in (1, 2, 3)
    ]
    assert {a["log"] for a in local} == {log_id(writer.path)}
    head = hashlib.sha256(writer.path.read_bytes().splitlines()[-1]).hexdigest()
    assert {a["head"] for a in local if a["seq"] == 25} == {head}
    for k in (1, 2, 3):  # each server keeps them, and audits who anchored what
        book = book_path(dep.ks_dir / f"server-{k}.keys.json", k).read_text()
        assert head in book
        audit_log = (dep.ks_dir / f"server-{k}-audit.log").read_text()
        assert '"action":"audit-anchor"' in audit_log and '"sub":"alice"' in audit_log
    r = run_verify(mdm, writer)
    assert r.exit_code == 0, r.output
    assert "25 records, chain intact" in r.output
    assert "key servers asked: 3 of 3 answered" in r.output
    assert "last anchor: seq 25, signed by key servers 1, 2, 3" in r.output
    assert "s ago); 0 record(s) after it" in r.output
    # No PHI in anchors: hashes, numbers, times, the log's hashed name.
    assert set(local[0]) == {"log", "chain", "seq", "head", "server", "time", "sig"}


def test_truncated_tail_with_rewritten_head(writer: Writer, mdm: click.Group) -> None:
    writer.record(20)
    writer.anchor.anchor_now()
    writer.close()
    rebuild(writer.path, records(writer.path)[:15])
    assert_detected(run_verify(mdm, writer), "5 record(s) removed from the end", "anchored seq 20")
    # The attacker deletes the anchors file too: the servers still hold the anchors.
    anchors_path(writer.path).unlink()
    assert_detected(run_verify(mdm, writer), "5 record(s) removed from the end")


def test_forged_lines_appended_after_the_last_anchor(writer: Writer, mdm: click.Group) -> None:
    writer.record(20)
    writer.anchor.anchor_now()
    writer.close()
    recs = records(writer.path)
    forged = {**recs[-1], "decision": "allow", "rule": "forged"}
    # Appended beyond the last anchor: consistent, so reported as not anchored, not as forged.
    rebuild(writer.path, [*recs, forged, forged])
    r = run_verify(mdm, writer)
    assert r.exit_code == 0, r.output
    assert "last anchor: seq 20" in r.output and "2 record(s) after it are not anchored" in r.output
    # Forged lines in place of anchored ones (the tail rewritten, then extended): detected.
    rebuild(writer.path, recs[:18] + [forged] * 4)
    assert_detected(run_verify(mdm, writer), "line 20: rewritten: record seq 20")


def test_edit_in_the_middle_with_the_chain_recomputed(
    writer: Writer, mdm: click.Group, caplog: pytest.LogCaptureFixture
) -> None:
    writer.record(12)
    writer.anchor.anchor_now()
    writer.record(8)
    writer.anchor.anchor_now()
    recs = records(writer.path)
    recs[5] = {**recs[5], "decision": "allow" if recs[5]["decision"] == "deny" else "deny"}
    rebuild(writer.path, recs)
    assert_detected(
        run_verify(mdm, writer), "line 12: rewritten: record seq 12", "and the anchors of seq 20"
    )
    # Re-anchoring the rewritten log is refused (and audited) by every server.
    with caplog.at_level(logging.WARNING, logger="mdm.audit.anchor"):
        assert writer.anchor.anchor_now() == 0
    assert "was anchored at" in caplog.text and "another hash" in caplog.text


def test_every_deny_deleted_and_the_chain_rebuilt(writer: Writer, mdm: click.Group) -> None:
    writer.record(20)
    writer.anchor.anchor_now()
    writer.close()
    recs = records(writer.path)
    assert sum(r["decision"] == "deny" for r in recs) == 5
    rebuild(writer.path, [r for r in recs if r["decision"] != "deny"])
    # The attacker also empties the anchors file: the servers' copies suffice.
    anchors_path(writer.path).write_bytes(b"")
    assert_detected(run_verify(mdm, writer), "5 record(s) removed from the end")


def test_log_emptied_and_head_deleted(writer: Writer, mdm: click.Group) -> None:
    writer.record(20)
    writer.close()  # the final anchor on close
    writer.path.write_bytes(b"")
    head_path(writer.path).unlink()
    anchors_path(writer.path).unlink()
    assert verify(writer.path) == []
    r = run_verify(mdm, writer)
    assert_detected(r, "the log is empty, but key servers 1, 2, 3 anchored seq 20")
    assert "0 records, chain intact" not in r.output
    writer.path.unlink()
    assert_detected(run_verify(mdm, writer), "the log is missing")


def test_log_replaced_by_a_new_chain_anchored_with_the_token(
    dep: ks.Deployment, writer: Writer, mdm: click.Group
) -> None:
    writer.record(10)
    writer.close()
    for f in (writer.path, head_path(writer.path), anchors_path(writer.path)):
        f.unlink()
    # The attacker holds the writer's token, starts a fresh log and anchors it.
    with AuditLog(writer.path) as log:
        log.record(principal=ALICE, action="open", decision="allow", resource={"site": "SiteA"})
        a = AuditAnchorer(log, dep.config.keys, lambda: dep.tokens["alice"], interval=3600)
        assert a.anchor_now() == 3
        a.close()
    assert_detected(run_verify(mdm, writer), "no file holds the chain of which key servers 1, 2, 3")


def test_forged_or_edited_anchor_lines(writer: Writer, mdm: click.Group) -> None:
    writer.record(6)
    writer.close()
    ap = anchors_path(writer.path)
    lines = ap.read_bytes().splitlines(keepends=True)
    a = json.loads(lines[0])
    a["seq"] = 1000  # claims a longer log than was anchored
    b = {**json.loads(lines[0]), "server": 9}  # or a server that does not exist
    forged = [json.dumps(x).encode() + b"\n" for x in (a, b)]
    ap.write_bytes(b"".join(forged) + b"garbage\n" + b"".join(lines))
    assert_detected(
        run_verify(mdm, writer),
        "line 1: anchor of seq 1000 does not carry key server 1's signature",
        "line 2: anchor of seq 6 names key server 9, which does not exist",
        "line 3: not a valid anchor",
    )


def test_rotation_is_not_tampering_but_a_lost_rotated_file_is(
    writer: Writer, mdm: click.Group
) -> None:
    writer.record(7)
    writer.anchor.anchor_now()
    old = writer.path.with_name("audit.jsonl.1")
    os.rename(writer.path, old)
    os.rename(head_path(writer.path), head_path(old))
    writer.record(3)  # the writer starts a new file
    writer.close()
    r = run_verify(mdm, writer)
    assert r.exit_code == 0, r.output
    assert "3 records, chain intact" in r.output and "last anchor: seq 3" in r.output
    # The rotated file rewritten: named by its own path.
    rebuild(old, records(old)[:5])
    assert_detected(run_verify(mdm, writer), f"{old}: line 6: 2 record(s) removed from the end")
    old.unlink()
    assert_detected(run_verify(mdm, writer), "or a rotated file is gone")
    # Deleted after its retention: --since DAY stops looking for chains anchored before DAY.
    today = datetime.now(UTC).date()
    r = run_verify(mdm, writer, "--since", str(today + timedelta(days=1)))
    assert r.exit_code == 0 and "1 chain(s) last anchored before" in r.output, r.output
    r = run_verify(mdm, writer, "--since", str(today - timedelta(days=1)))
    assert_detected(r, "or a rotated file is gone")


def test_verify_without_token_uses_the_local_anchors_only(writer: Writer, mdm: click.Group) -> None:
    writer.record(9)
    writer.close()
    r = run_verify(mdm, writer, token=False)
    assert r.exit_code == 0 and "were not asked (no --token-file)" in r.output, r.output
    rebuild(writer.path, records(writer.path)[:4])
    assert_detected(run_verify(mdm, writer, token=False), "5 record(s) removed from the end")
    anchors_path(writer.path).unlink()  # without the servers, this hides the truncation
    r = run_verify(mdm, writer, token=False)
    assert r.exit_code == 0 and "which whoever can write the log can delete" in r.output
    assert "4 records, chain intact (as far as local files show: key servers not asked)" in r.output


def test_session_anchors_the_log_it_writes(dep: ks.Deployment, tmp_path: Path) -> None:
    from mdm.config import load_config

    path = tmp_path / "audit.jsonl"
    cfg = tmp_path / "mdm.toml"
    cfg.write_text((dep.root / "mdm.toml").read_text() + f'[audit]\nlog = "{path}"\n')
    tok = tmp_path / "alice.jwt"
    tok.write_text(dep.tokens["alice"])
    tok.chmod(0o600)
    session = open_session(load_config(cfg), tok)
    try:
        assert session.anchor is not None and session.audit is not None
        session.audit.record(principal=ALICE, action="open", decision="deny", resource={})
    finally:
        session.close()
    got = [json.loads(x) for x in anchors_path(path).read_bytes().splitlines()]
    assert {(a["seq"], a["server"]) for a in got} == {(1, 1), (1, 2), (1, 3)}


def test_servers_down_do_not_stop_the_writer(
    dep: ks.Deployment, writer: Writer, mdm: click.Group, caplog: pytest.LogCaptureFixture
) -> None:
    writer.record(1)
    assert writer.anchor.anchor_now() == 3
    dep.stop(3)
    try:
        with caplog.at_level(logging.INFO, logger="mdm.audit.anchor"):
            writer.record(1)
            assert writer.anchor.anchor_now() == 2  # one server down: 2 signatures
            writer.record(1)
            assert writer.anchor.anchor_now() == 2
        partial = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(partial) == 1 and "key server 3" in partial[0].getMessage()
        caplog.clear()
        dep.stop(1)
        dep.stop(2)
        with caplog.at_level(logging.INFO, logger="mdm.audit.anchor"):
            writer.record(2)
            assert writer.anchor.anchor_now() == 0
            writer.record(2)
            assert writer.anchor.anchor_now() == 0
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
            # verify still checks the local anchors, and says the servers did not answer.
            r = run_verify(mdm, writer)
            assert r.exit_code == 0 and "no key server answered" in r.output, r.output
            assert "chain intact (as far as local files show: no key server answered)" in r.output
            assert "last anchor: seq 3, signed by key servers 1, 2 at" in r.output
            assert "4 record(s) after it" in r.output
    finally:
        for k in (1, 2, 3):
            dep.start(k)
    with caplog.at_level(logging.INFO, logger="mdm.audit.anchor"):
        assert writer.anchor.anchor_now() == 3
    assert "reachable again; anchored seq 7" in caplog.text
    pool = HttpsPool(dep.config.keys.servers, dep.ks_dir / "ca.pem")
    try:  # the listing endpoint wants a valid token that some rule names
        for who in ("forged", "carol"):
            with pytest.raises(ks_server_error(), match="HTTP 40"):
                pool.post(1, "/v1/anchor/list", {"log": log_id(writer.path)}, dep.tokens[who], 5)
        got = pool.post(1, "/v1/anchor/list", {"log": log_id(writer.path)}, dep.tokens["bob"], 5)
        assert [a["seq"] for a in got["anchors"]] == [1, 2, 3, 7]
    finally:
        pool.close()


def ks_server_error() -> type[Exception]:
    from mdm.keyservice.client import ServerError

    return ServerError


def test_key_store_made_before_anchors_gets_an_anchor_key(tmp_path: Path) -> None:
    from mdm.keyservice.store import KeyStore

    path = tmp_path / "server-1.keys.json"
    KeyStore.create(path, 1, "x" * 64, 12345, ["SiteA/identified"])
    doc = json.loads(path.read_text())
    assert len(base64.b64decode(doc.pop("anchor_key"))) == 32
    path.write_text(json.dumps(doc))
    first = KeyStore.load(path).anchor_public()
    assert "anchor_key" in json.loads(path.read_text())  # made once and kept
    assert KeyStore.load(path).anchor_public() == first
    assert path.stat().st_mode & 0o777 == 0o600
