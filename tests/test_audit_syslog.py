"""A single workstation: what the hash chain alone detects, and the syslog copy off the host.

Real syslog receivers (TCP and UDP on loopback) get each record as an RFC 5424 message; every
rewrite that beats the plain chain is then reported by ``mdm audit verify --against COPY``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from mdm.access.identity import Principal
from mdm.access.session import open_session
from mdm.audit import syslog as audit_syslog
from mdm.audit.log import GENESIS, AuditLog, encode_record, head_path, verify
from mdm.audit.syslog import SyslogSink
from mdm.cli.audit import audit
from mdm.cli.main import MdmGroup
from mdm.config import load_config
from mdm_demo.localpacs import free_port

pytestmark = pytest.mark.timeout(60)

ALICE = Principal(sub="alice", issuer="https://idp.test")
STUDY = "1.2.826.0.1.3680043.8.498.9"
RFC5424 = re.compile(
    r"^<86>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ mdm-audit \d+ audit - (\{.*\})$"
)


class _Lines(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for raw in self.rfile:
            self.server.got.append(raw.decode().rstrip("\n"))  # type: ignore[attr-defined]


class TcpReceiver(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Lines)
        self.got: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


@pytest.fixture
def tcp() -> Iterator[TcpReceiver]:
    r = TcpReceiver()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def mdm() -> click.Group:
    return MdmGroup(name="mdm", commands={"audit": audit})


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record(
            principal=ALICE,
            action="open",
            decision="deny" if i % 4 == 3 else "allow",
            resource={"site": "SiteA", "sop_uid": f"{STUDY}.{i}"},
            rule="r-1",
        )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def rebuild(path: Path, recs: list[dict[str, Any]]) -> None:
    """A rewrite with the chain and .head recomputed: it beats the plain chain."""
    prev, out = GENESIS, []
    for i, r in enumerate(recs, 1):
        r = {k: v for k, v in r.items() if k not in ("prev", "hash")}
        r["seq"], r["prev"] = i, prev
        line = encode_record(r)
        out.append(line + b"\n")
        prev = hashlib.sha256(line).hexdigest()
    path.write_bytes(b"".join(out))
    head_path(path).write_text(f'{{"seq":{len(recs):20d},"sha256":"{prev}"}}\n')
    assert verify(path) == []


def run_verify(mdm: click.Group, cfg: Path, *more: str) -> Result:
    return CliRunner().invoke(mdm, ["audit", "verify", "--config", str(cfg), *more])


def workstation(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    path = tmp_path / "audit.jsonl"
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n[audit]\nlog = "{path}"\n{extra}')
    return path, cfg


def test_single_workstation_detects_naive_edits_only(tmp_path: Path, mdm: click.Group) -> None:
    """Exactly the table of docs/AUDIT.md, "Single workstation"."""
    path, cfg = workstation(tmp_path)
    with AuditLog(path) as log:
        fill(log, 12)
    original = path.read_bytes()
    r = run_verify(mdm, cfg)
    assert r.exit_code == 0 and "no key servers configured" in r.output, r.output
    # Detected: an edit without recomputing, the tail cut with the .head left as it was.
    path.write_bytes(original.replace(b'"deny"', b'"allow"', 1))
    assert run_verify(mdm, cfg).exit_code == 1
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:9]))
    assert "removed from the end" in run_verify(mdm, cfg).output
    # Not detected: the same with the chain and .head recomputed, and the log emptied.
    path.write_bytes(original)
    rebuild(path, [r for r in records(path) if r["decision"] != "deny"])
    r = run_verify(mdm, cfg)
    assert r.exit_code == 0 and "9 records, chain intact" in r.output
    path.write_bytes(b"")
    head_path(path).unlink()
    r = run_verify(mdm, cfg)
    assert r.exit_code == 0 and "0 records, chain intact" in r.output
    assert "a rewrite of the whole file and its .head is not detected" in r.output


def test_syslog_copy_detects_every_rewrite(
    tmp_path: Path, tcp: TcpReceiver, mdm: click.Group
) -> None:
    path, cfg = workstation(tmp_path)
    with AuditLog(path, sink=SyslogSink(f"tcp://127.0.0.1:{tcp.server_address[1]}")) as log:
        fill(log, 20)
    deadline = time.monotonic() + 10
    while len(tcp.got) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = path.read_bytes().splitlines()
    assert len(tcp.got) == 20
    for msg, line in zip(tcp.got, lines, strict=True):
        m = RFC5424.match(msg)
        assert m is not None, msg
        assert m.group(1).encode() == line  # the record itself, byte for byte
    copy = tmp_path / "remote.log"
    copy.write_text("".join(f"Dec  1 12:00:00 loghost {m}\n" for m in tcp.got))
    original = path.read_bytes()
    r = run_verify(mdm, cfg, "--against", str(copy))
    assert r.exit_code == 0 and "20 record(s) checked" in r.output, r.output

    def detected(*phrases: str) -> None:
        r = run_verify(mdm, cfg, "--against", str(copy))
        assert r.exit_code == 1 and "chain NOT intact" in r.output, r.output
        for p in phrases:
            assert p in r.output, (p, r.output)

    recs = records(path)
    rebuild(path, recs[:15])  # the tail cut, the .head rewritten
    detected("5 record(s) of the copy remote.log are in no log file (the first: seq 16")
    edited = [*recs]
    edited[3] = {**edited[3], "decision": "allow"}
    rebuild(path, edited)  # an edit in the middle, the chain recomputed
    detected("17 record(s) of the copy", "(the first: seq 4 ")
    rebuild(path, [r for r in recs if r["decision"] != "deny"])  # every deny deleted
    detected("(the first: seq 4 ")
    path.write_bytes(b"")  # emptied, .head deleted
    head_path(path).unlink()
    detected("the log is empty, and 20 record(s) of the copy")
    path.write_bytes(original)
    rebuild(path, [*recs, recs[-1], recs[-1]])  # forged records appended
    r = run_verify(mdm, cfg, "--against", str(copy))
    assert r.exit_code == 0 and "2 record(s) of the log after it are not in the copy" in r.output


def test_syslog_over_udp(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    try:
        path = tmp_path / "audit.jsonl"
        with AuditLog(path, sink=SyslogSink(f"udp://127.0.0.1:{rx.getsockname()[1]}")) as log:
            fill(log, 3)
        got = [rx.recv(65536).decode() for _ in range(3)]
    finally:
        rx.close()
    lines = path.read_bytes().splitlines()
    assert [RFC5424.match(g).group(1).encode() for g in got] == lines  # type: ignore[union-attr]


def test_syslog_down_does_not_stop_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_syslog, "RETRY", 0.1)
    port = free_port()
    path = tmp_path / "audit.jsonl"
    sink = SyslogSink(f"tcp://127.0.0.1:{port}")
    log = AuditLog(path, sink=sink)
    rx: TcpReceiver | None = None
    try:
        with caplog.at_level(logging.INFO, logger="mdm.audit.syslog"):
            fill(log, 3)  # nobody listens: records are written all the same
            time.sleep(0.3)
            fill(log, 3, start=3)
            time.sleep(0.3)
            assert len(records(path)) == 6
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
            rx = TcpReceiver(port)
            time.sleep(0.2)
            fill(log, 2, start=6)
            deadline = time.monotonic() + 10
            # The sender thread logs its recovery after the send: wait for both, while the
            # INFO capture is still on.
            while not (rx.got and "sending again" in caplog.text):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        assert rx.got and '"seq":7' in rx.got[0]
        assert "sending again" in caplog.text
    finally:
        log.close()
        if rx is not None:
            rx.stop()


def test_session_copies_to_syslog(tmp_path: Path, tcp: TcpReceiver) -> None:
    _, cfg = workstation(tmp_path, f'syslog = "tcp://127.0.0.1:{tcp.server_address[1]}"\n')
    session = open_session(load_config(cfg), None)
    try:
        assert session.audit is not None and session.anchor is None
        fill(session.audit, 2)
    finally:
        session.close()
    deadline = time.monotonic() + 10
    while len(tcp.got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [json.loads(RFC5424.match(g).group(1))["seq"] for g in tcp.got] == [1, 2]  # type: ignore[union-attr]


def test_syslog_and_anchor_interval_settings(tmp_path: Path) -> None:
    from mdm.config import config_from_dict
    from mdm.errors import ConfigError

    p = tmp_path / "mdm.toml"
    ok = config_from_dict(
        {"cache": {"dir": "c"}, "audit": {"log": "a", "syslog": "unix:/dev/log"}}, p
    ).audit
    assert ok is not None and ok.syslog == "unix:/dev/log" and ok.anchor_interval == 5.0
    for bad, key in [
        ({"syslog": "http://x:1"}, "audit.syslog"),
        ({"syslog": "tcp://host"}, "audit.syslog"),
        ({"anchor_interval": "0s"}, "audit.anchor_interval"),
    ]:
        with pytest.raises(ConfigError) as ei:
            config_from_dict({"cache": {"dir": "c"}, "audit": {"log": "a", **bad}}, p)
        assert ei.value.key == key
