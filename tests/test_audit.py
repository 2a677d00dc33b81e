"""The hash-chained audit log: format, PHI guard, concurrency, and tamper detection by line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import stat
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mdm.access.identity import Principal
from mdm.audit.log import GENESIS, AuditError, AuditLog, follow, head_path, verify
from mdm.cli.audit import audit
from mdm.cli.main import MdmGroup

ALICE = Principal(sub="alice", issuer="https://idp.test")
STUDY = "1.2.826.0.1.3680043.8.498.1"


def _fill(path: Path, n: int, start: int = 0) -> None:
    with AuditLog(path, fsync_interval=0.05) as log:
        for i in range(start, start + n):
            log.record(
                principal=ALICE,
                action="open",
                decision="allow" if i % 3 else "deny",
                resource={"site": "CHLA", "study_uid": STUDY, "sop_uid": f"{STUDY}.{i}"},
                rule="radiologists-chla",
                policy="a" * 64,
                outcome="ok",
                bytes=1000 + i,
            )


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _put_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _named(path: Path) -> set[int]:
    return {p.line_no for p in verify(path)}


def test_record_format_modes_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "var" / "audit" / "audit.jsonl"
    _fill(path, 3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(head_path(path).stat().st_mode) == 0o600
    raw = _lines(path)
    recs = [json.loads(x) for x in raw]
    assert list(recs[0]) == [
        "seq",
        "time",
        "sub",
        "iss",
        "action",
        "decision",
        "rule",
        "policy",
        "resource",
        "outcome",
        "bytes",
        "prev",
        "hash",
    ]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev"] == GENESIS
    assert recs[1]["prev"] == hashlib.sha256(raw[0].rstrip(b"\n")).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", recs[0]["time"])
    assert (recs[0]["sub"], recs[0]["iss"], recs[0]["decision"]) == ("alice", ALICE.issuer, "deny")
    assert recs[2]["resource"] == {"site": "CHLA", "study_uid": STUDY, "sop_uid": f"{STUDY}.2"}
    # A restart resumes the chain.
    _fill(path, 2, start=3)
    assert [json.loads(x)["seq"] for x in _lines(path)] == [1, 2, 3, 4, 5]
    assert verify(path) == []


def test_phi_guard(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        for resource, extra in [
            ({"PatientName": "DOE^JANE"}, {}),
            ({"PatientID": "12345"}, {}),
            ({"patient_id": "12345"}, {}),
            ({"study_uid": "DOE^JANE"}, {}),
            ({"site": "CHLA"}, {"patient_name": "DOE^JANE"}),
            ({"site": "CHLA"}, {"path": "/mnt/CHLA/DOE^JANE"}),
            ({"site": "CHLA"}, {"prev": "0" * 64}),
            ({"site": "CHLA"}, {"detail": {"nested": "x"}}),
        ]:
            with pytest.raises(ValueError):
                log.record(
                    principal=ALICE, action="open", decision="allow", resource=resource, **extra
                )
        log.record(principal=ALICE, action="retrieve", decision="ok", resource={"site": "X"})
    assert len(_lines(path)) == 1 and b"DOE" not in path.read_bytes()


def test_1000_records_from_4_threads_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync_interval=0.05)

    def worker(t: int) -> None:
        for i in range(250):
            log.record(
                principal=ALICE,
                action="open",
                decision="allow",
                resource={"sop_uid": f"{STUDY}.{t}.{i}"},
            )

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    recs = [json.loads(x) for x in _lines(path)]
    assert [r["seq"] for r in recs] == list(range(1, 1001))
    assert len({r["resource"]["sop_uid"] for r in recs}) == 1000
    assert verify(path) == []


def _proc_writer(path: str, tag: int, n: int) -> None:
    with AuditLog(path, fsync_interval=0.05) as log:
        for i in range(n):
            log.record(
                principal=ALICE,
                action="retrieve",
                decision="ok",
                resource={"sop_uid": f"9.{tag}.{i}"},
            )


def test_two_processes_append_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 5)  # the processes resume an existing chain
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_proc_writer, args=(str(path), t, 300)) for t in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = [json.loads(x) for x in _lines(path)]
    assert len(recs) == 605 and [r["seq"] for r in recs] == list(range(1, 606))
    tags = [r["resource"]["sop_uid"].split(".")[1] for r in recs[5:]]
    assert tags.count("1") == tags.count("2") == 300
    assert verify(path) == []


@pytest.fixture
def log20(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _fill(path, 20)
    assert verify(path) == []
    return path


def test_one_byte_edit_of_any_line_is_named(log20: Path) -> None:
    original = _lines(log20)
    for idx in (0, 9, 19):  # first, middle and last line: every byte of each
        line = original[idx]
        for pos in range(len(line) - 1):  # not the newline
            b = line[pos]
            new = b"1" if b != ord("1") else b"2"
            edited = [*original]
            edited[idx] = line[:pos] + new + line[pos + 1 :]
            _put_lines(log20, edited)
            named = _named(log20)
            assert idx + 1 in named, (idx, pos, chr(b), verify(log20))
    # Every line, a realistic edit (deny -> allow), and the CLI says which.
    for idx in range(20):
        edited = [*original]
        edited[idx] = original[idx].replace(b'"deny"', b'"allw"').replace(b'"allow"', b'"deny!"')
        _put_lines(log20, edited)
        assert idx + 1 in _named(log20)
    _put_lines(log20, original)
    assert verify(log20) == []


def test_removed_line_is_named(log20: Path) -> None:
    original = _lines(log20)
    for idx in (0, 7, 18):
        _put_lines(log20, original[:idx] + original[idx + 1 :])
        problems = verify(log20)
        assert idx + 1 in {p.line_no for p in problems}, problems
        assert any("missing" in p.reason or "broken" in p.reason for p in problems)
    # The last line removed: the head anchor notices.
    _put_lines(log20, original[:-1])
    problems = verify(log20)
    assert [(p.line_no, "removed from the end" in p.reason) for p in problems] == [(20, True)]
    # And a writer refuses to continue a log that lost records.
    _put_lines(log20, original[:-3])
    with pytest.raises(AuditError, match="records were removed"):
        AuditLog(log20)


def test_swapped_lines_are_named(log20: Path) -> None:
    original = _lines(log20)
    for a in (0, 10, 18):
        swapped = [*original]
        swapped[a], swapped[a + 1] = swapped[a + 1], swapped[a]
        _put_lines(log20, swapped)
        named = _named(log20)
        assert {a + 1, a + 2} <= named, (a, verify(log20))


def test_truncated_last_line_then_resume(log20: Path) -> None:
    data = log20.read_bytes()
    log20.write_bytes(data[:-40])  # a torn write
    problems = verify(log20)
    assert 20 in {p.line_no for p in problems}
    assert any("truncated" in p.reason for p in problems)
    _fill(log20, 2, start=20)  # the writer ends the torn line and chains after it
    problems = verify(log20)
    assert [p.line_no for p in problems] == [20], problems
    assert [json.loads(x)["seq"] for x in _lines(log20)[20:]] == [21, 22]


def test_rotated_log_starts_a_new_chain(log20: Path) -> None:
    log = AuditLog(log20)
    log.record(principal=ALICE, action="open", decision="allow", resource={"site": "A"})
    old = log20.with_name("audit.jsonl.1")
    os.rename(log20, old)
    os.rename(head_path(log20), head_path(old))
    log.record(principal=ALICE, action="open", decision="allow", resource={"site": "A"})
    log.close()
    assert verify(old) == [] and len(_lines(old)) == 21
    assert verify(log20) == [] and json.loads(_lines(log20)[0])["prev"] == GENESIS


def test_follow_yields_new_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 2)
    stop = threading.Event()
    got: list[str] = []

    def reader() -> None:
        for line in follow(path, stop, poll=0.02):
            got.append(line)
            if len(got) == 3:
                stop.set()

    t = threading.Thread(target=reader)
    t.start()
    threading.Event().wait(0.2)
    _fill(path, 3, start=2)
    t.join(10)
    assert not t.is_alive()
    assert [json.loads(x)["seq"] for x in got] == [3, 4, 5]


@pytest.fixture
def mdm() -> click.Group:
    return MdmGroup(name="mdm", commands={"audit": audit})


def test_cli_verify_and_tail(tmp_path: Path, log20: Path, mdm: click.Group) -> None:
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[audit]\nlog = "{log20.name}"\n')
    runner = CliRunner()
    r = runner.invoke(mdm, ["audit", "verify", "--config", str(cfg)])
    assert r.exit_code == 0 and "20 records, chain intact" in r.stdout, r.output
    r = runner.invoke(mdm, ["audit", "tail", "-n", "3", "--config", str(cfg)])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3
    assert "#20 alice@https://idp.test open" in r.stdout and "rule=radiologists-chla" in r.stdout
    r = runner.invoke(mdm, ["audit", "tail", "-n", "2", "--json", "--log", str(log20)])
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [19, 20]

    lines = _lines(log20)
    lines[6] = lines[6].replace(b'"rule":"radiologists-chla"', b'"rule":"radiologists-chlb"')
    _put_lines(log20, lines)
    r = runner.invoke(mdm, ["audit", "verify", "--config", str(cfg)])
    assert r.exit_code == 1 and "line 7: edited" in r.stdout and "NOT intact" in r.stdout
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n')
    # Without [audit] the log is cache.dir/audit.jsonl: none written yet is a failure.
    r = runner.invoke(mdm, ["audit", "verify", "--config", str(cfg)])
    assert r.exit_code == 1 and "audit.jsonl: no such file" in r.stdout


def test_a_log_opened_but_never_written_verifies(tmp_path: Path) -> None:
    """A mount that has recorded nothing yet leaves an empty log and an empty head: sound."""
    p = tmp_path / "audit.jsonl"
    AuditLog(p).close()
    assert p.read_bytes() == b"" and head_path(p).read_bytes() == b""
    assert verify(p) == []
