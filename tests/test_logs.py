"""Log formats (mdm.ops.logs) and ``mdm --version``, down to the real ``mdm`` command.

The JSON lines of a fetch, a find and a mount against real Orthancs name their sites and never
carry the sentinel patient's name, ID or birth date, at DEBUG level.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from mdm.ops import logs
from mdm_demo.synth import GeneratedInstance
from tests.conftest import PacsPair
from tests.mountutil import ROOT, Mount

KEYS = ["time", "level", "logger", "process", "event", "message", "site", "uid", "error"]
SENTINEL_NAME = "Zzphisentinel^Qqvorname"
SENTINEL_ID = "PHISENTINEL-4711"
SENTINEL_BIRTH = "19230417"
MDM = Path(sys.executable).parent / "mdm"  # the console script, as installed


def run_mdm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MDM), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
        env=env,
    )


def record(msg: str, *args: object, **kw: object) -> logging.LogRecord:
    return logging.LogRecord("mdm.test", logging.WARNING, __file__, 1, msg, args, None, **kw)  # type: ignore[arg-type]


def as_json(rec: logging.LogRecord, process: str | None = None) -> dict[str, object]:
    out: dict[str, object] = json.loads(logs.JsonFormatter(process).format(rec))
    return out


# ---------------------------------------------------------------------------- units
def test_json_line_has_the_fixed_keys_in_order() -> None:
    msg = "retrieving %d object(s) of series %s from site %s (%s)"
    d = as_json(record(msg, 3, "1.2", "A", "x"))
    assert list(d) == KEYS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(d["time"]))
    assert d["level"] == "WARNING" and d["logger"] == "mdm.test" and d["process"] is None
    assert d["event"] == "retrieving %d object(s) of series %s from site %s (%s)"
    assert d["message"] == "retrieving 3 object(s) of series 1.2 from site A (x)"
    assert d["site"] == "A" and d["uid"] is None and d["error"] is None


@pytest.mark.parametrize(
    ("msg", "args", "site"),
    [
        ("site %s: C-FIND ended with %s", ("NORTH", "Failure"), "NORTH"),
        ("C-FIND %s at site %s failed: %s", ("STUDY", "SOUTH", "x"), "SOUTH"),
        ("object %s from site %s not stored: %s", ("1.2.3", "EAST", "y"), "EAST"),
        ("100%% of %s from site %s", ("1.2", "WEST"), "WEST"),
        ("%-8s opened a website %s", ("a", "b"), None),  # "website" is no site
        ("cache recovered: %s", ("ok",), None),
        ("no arguments, site %s", (), None),
    ],
)
def test_site_is_the_argument_after_site(msg: str, args: tuple[object, ...], site: str) -> None:
    assert as_json(record(msg, *args))["site"] == site


def test_extra_site_and_uid_win() -> None:
    rec = record("stored", extra=None)
    rec.site, rec.uid = "CHLA", "1.2.840.1"
    d = as_json(rec, "receiver")
    assert (d["site"], d["uid"], d["process"]) == ("CHLA", "1.2.840.1", "receiver")


def test_error_from_exc_info_or_from_an_argument() -> None:
    try:
        raise TimeoutError("deadline passed")
    except TimeoutError:
        rec = logging.LogRecord("m", logging.ERROR, "f", 1, "failed", (), sys.exc_info())
    d = as_json(rec)
    assert d["error"] == "TimeoutError: deadline passed"
    assert "Traceback" in str(d["traceback"])
    d = as_json(record("retrieval from site %s failed: %s", "A", ConnectionError("refused")))
    assert d["error"] == "ConnectionError: refused" and d["site"] == "A"
    assert "traceback" not in d


def test_human_format_is_unchanged() -> None:
    f = logs.make_formatter("human", "receiver")
    line = f.format(record("site %s: up", "A"))
    assert re.fullmatch(r"\S+ \S+ WARNING mdm\.test\[receiver\]: site A: up", line)


# ---------------------------------------------------------------------------- the command
def test_version_names_the_stack() -> None:
    res = run_mdm("--version")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    names = [ln.split(" ", 1)[0] for ln in lines]
    assert names == ["mdm-bridge", "pynetdicom", "pydicom", "pyfuse3", "libfuse"]
    got = dict(ln.split(" ", 1) for ln in lines)
    from importlib.metadata import version

    assert got["mdm-bridge"] == version("mdm-bridge")
    assert got["pydicom"] == pydicom.__version__
    assert re.match(r"3\.\d+", got["libfuse"]), got["libfuse"]
    assert run_mdm("-V").stdout == res.stdout  # the short form, as dcmtk and rclone have it


def test_log_format_json_and_its_environment_variable(tmp_path: Path) -> None:
    """Every log line is JSON; $MDM_LOG_FORMAT does the same; human stays the default."""
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "MDMT"\nport = 1\n[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[keys]\nkeyring = "{tmp_path / "keyring.json"}"\n'
        '[[site]]\nname = "Nowhere"\nae_title = "X"\nhost = "127.0.0.1"\nport = 1\n'
    )
    find = ["--log-level", "DEBUG", "find", "--config", str(cfg)]  # no PACS there: it logs
    res = run_mdm("--log-format", "json", *find)
    env = dict(os.environ, MDM_LOG_FORMAT="json")
    for r in (res, run_mdm(*find, env=env)):
        assert r.returncode == 1, r.stderr
        records = _json_lines(r.stderr)
        assert any(d["logger"] == "mdm.access.session" for d in records), r.stderr
    human = run_mdm(*find)
    assert re.search(r"^\S+ \S+ \w+ mdm\.access\.session: no \[identity\]", human.stderr, re.M)
    assert run_mdm("--log-format", "xml", "policy", "check", "acl_policies").returncode == 2


# ---------------------------------------------------------------------------- no PHI, real PACS
def _sentinel(pair: PacsPair) -> pydicom.Dataset:
    """A copy of one of SiteA's instances as the sentinel patient, stored in SiteA."""
    src: GeneratedInstance = pair.a.instances[0]
    ds = pydicom.dcmread(io.BytesIO(src.read()))
    ds.PatientName = SENTINEL_NAME
    ds.PatientID = SENTINEL_ID
    ds.PatientBirthDate = SENTINEL_BIRTH
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    pair.a.server.upload([buf.getvalue()])
    return ds


def _json_lines(text: str) -> list[dict[str, object]]:
    """The records of a JSON log; lines of the command's own output (``mdm: ...``) aside."""
    out = []
    for ln in text.splitlines():
        if ln.strip() and not ln.startswith("mdm: "):
            d = json.loads(ln)  # every line is one JSON object: no human line slips in
            assert list(d)[: len(KEYS)] == KEYS, d
            out.append(d)
    return out


def _no_phi(text: str) -> None:
    for needle in (SENTINEL_NAME, *SENTINEL_NAME.split("^"), SENTINEL_ID, SENTINEL_BIRTH):
        assert needle.lower() not in text.lower(), f"{needle!r} in the log"


@pytest.mark.e2e
def test_json_logs_name_sites_and_carry_no_phi(
    orthanc_pair_private: PacsPair, tmp_path: Path
) -> None:
    pair = orthanc_pair_private
    ds = _sentinel(pair)
    cfg = pair.write_config(tmp_path / "cmd", retrieve="move")
    base = ["--log-format", "json", "--log-level", "DEBUG"]
    find = run_mdm(
        *base, "find", "--config", str(cfg), "--level", "study", "--json", "PatientName=Zzphi*"
    )
    assert find.returncode == 0, find.stderr
    assert SENTINEL_NAME in find.stdout  # the answer has it; the log must not
    fetch = run_mdm(*base, "fetch", "--config", str(cfg), "--quiet", ds.StudyInstanceUID)
    assert fetch.returncode == 0, fetch.stderr
    records = _json_lines(find.stderr) + _json_lines(fetch.stderr)
    _no_phi(find.stderr + fetch.stderr)
    assert {r["site"] for r in records} >= {"SiteA"}
    assert any(r["process"] == "receiver" for r in records)  # the receiver process too


@pytest.mark.e2e
def test_json_mount_log_carries_no_phi(
    orthanc_pair_private: PacsPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = orthanc_pair_private
    ds = _sentinel(pair)
    cfg = pair.write_config(tmp_path / "m", retrieve="move")
    monkeypatch.setenv("MDM_LOG_FORMAT", "json")  # the daemon inherits it
    with Mount(cfg, tmp_path / "mnt", log_level="DEBUG") as m:
        study = m.mountpoint / "studies" / ds.StudyInstanceUID
        (f,) = (study / ds.SeriesInstanceUID).glob("*.dcm")
        assert pydicom.dcmread(f).PatientName == SENTINEL_NAME
        assert SENTINEL_ID in os.listdir(m.mountpoint / "patients")
        assert ds.StudyInstanceUID in os.listdir(m.mountpoint / "patients" / SENTINEL_ID)
    text = m.log.read_text()
    records = _json_lines(text)
    _no_phi(text)
    assert {"SiteA"} <= {r["site"] for r in records}


def _site_calls() -> list[tuple[str, str, int, int]]:
    """Log calls of the code base with a site's name among their arguments:
    (file:line, message, number of arguments, index of the site's name)."""
    import ast

    out = []
    for path in sorted(
        [*ROOT.joinpath("mdm").rglob("*.py"), *ROOT.joinpath("mdm_fuse").rglob("*.py")]
    ):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warning", "error", "exception")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            for i, arg in enumerate(node.args[1:]):
                src = ast.unparse(arg)
                if re.search(r"(^|\.)site(\.name)?$|\[['\"]site['\"]\]$", src):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    out.append((where, node.args[0].value, len(node.args) - 1, i))
    return out


def test_every_log_line_about_a_site_names_it_in_the_json_site_key() -> None:
    """The convention site_of relies on ("site %s"), held over the whole code base."""
    calls = _site_calls()
    assert len(calls) >= 8  # the scan finds them
    wrong = []
    for where, msg, n, i in calls:
        args = tuple("SITE-X" if j == i else f"a{j}" for j in range(n))
        if logs.site_of(record(msg, *args)) != "SITE-X":
            wrong.append(f"{where}: {msg!r}")
    assert not wrong, "name the site as 'site %s' (or pass extra={'site': ...}):\n" + "\n".join(
        wrong
    )
