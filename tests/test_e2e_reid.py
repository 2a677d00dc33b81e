"""Re-identification attacks by principals holding a valid token, end to end.

`mdm find` answers exactly what the principal's mount shows (same view code), filters act on
the shown values, and a filter on a real PHI value cannot be told apart from a made-up one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mdm.access.views import NON_PHI
from mdm.cli.main import main
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_policy import forged_token, identity_config, token

pytestmark = pytest.mark.e2e

POLICY = f"""
[[allow]]
id = "nant-grid"
description = "grid jobs of the trial, de-identified, dates shifted per patient"
principals = {{ groups = ["grid"] }}
resources = {{ trial = "{TRIAL_PROTOCOL}" }}
access = "deidentified"
[allow.deid]
scope = "nant"
retain_longitudinal = "offset"

[[allow]]
id = "cohort-metadata"
description = "a researcher: chosen patients, metadata"
principals = {{ subjects = ["asmith"] }}
resources = {{ patient_ids = ["@COHORT@"] }}
access = "metadata"

[[allow]]
id = "radiology-a"
description = "radiologists of SiteA: identified"
principals = {{ groups = ["radiologists"] }}
resources = {{ sites = ["SiteA"] }}
access = "identified"
"""


def setup(pair: PacsPair, d: Path, idp: Path, cohort: list[str]) -> Path:
    policy = POLICY.replace('"@COHORT@"', ", ".join(f'"{c}"' for c in cohort))
    return identity_config(pair, d, idp, policy, audit=d / "audit.jsonl")


class Finder:
    """`mdm find` run in-process through the real command (click's runner)."""

    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg
        self.runner = CliRunner()

    def __call__(self, tok: Path, level: str, *filters: str) -> tuple[int, str]:
        args = ["find", "--config", str(self.cfg), "--token-file", str(tok), "--json"]
        res = self.runner.invoke(main, [*args, "--level", level, *filters])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.output
        return res.exit_code, res.stdout

    def rows(self, tok: Path, level: str, *filters: str) -> list[dict[str, object]]:
        code, out = self(tok, level, *filters)
        assert code == 0, out
        return json.loads(out)  # type: ignore[no-any-return]


def test_find_is_no_reidentification_oracle(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    victim = trial[0]
    cohort = [victim.patient_id]
    cfg = setup(pair, tmp_path, idp, cohort)
    find = Finder(cfg)
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    res = token(idp, tmp_path / "res.jwt", "asmith")
    nobody = token(idp, tmp_path / "nobody.jwt", "mallory", "visitors")
    phi = {
        "PatientName": (victim.patient_name, "QUIMBY^ZELDA"),
        "PatientID": (victim.patient_id, "ZZ-NOT-A-PATIENT"),
        "PatientBirthDate": (victim.birth_date, "19010101"),
        "AccessionNumber": (victim.accession_number, "ACC00000000"),
    }
    for tok in (grid, res, nobody):
        for key, (real, fake) in phi.items():
            assert real and real != fake
            for level in ("patient", "study", "series"):
                a = find(tok, level, f"{key}={real}")
                b = find(tok, level, f"{key}={fake}")
                assert a == b, (tok.name, key, level)
            # Wildcards and ranges on the originals tell nothing either.
            a = find(tok, "study", f"{key}={real[:3]}*")
            b = find(tok, "study", f"{key}={fake[:3]}*")
            assert a == b, (tok.name, key, "wildcard")

    # Nothing a non-identified principal gets back holds PHI of any patient.
    # (Birth dates are not searched for as text: a shifted study date may equal one by chance;
    # the attribute itself must be absent.)
    secrets = {v for i in pair.instances for v in (i.patient_name, i.patient_id)}
    secrets |= {i.accession_number for i in pair.instances}
    for tok in (grid, res):
        for level in ("patient", "study", "series"):
            rows = find.rows(tok, level)
            text = json.dumps(rows)
            assert not [s for s in secrets if s and s in text], (tok.name, level)
            assert not [r for r in rows if r.get("PatientBirthDate")], (tok.name, level)
    # The metadata view shows only what its .metadata.json shows: non-PHI keys and a pseudonym.
    for row in find.rows(res, "series") + find.rows(res, "study"):
        assert set(row) <= NON_PHI | {"PatientID", "sites"}, row
    assert find.rows(nobody, "study") == []

    # Every query is audited with its keys and row count, never the filter values.
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    finds = [r for r in recs if r["action"] == "find"]
    assert finds and all("filter_keys" in r and "rows" in r for r in finds)
    assert any(r["filter_keys"] == "PatientName" and r["sub"] == "mallory" for r in finds)
    log = (tmp_path / "audit.jsonl").read_text()
    assert victim.patient_name not in log and "QUIMBY" not in log


def test_find_matches_the_mount_view_and_its_shifted_dates(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    victim = next(i for i in pair.instances if i.trial == TRIAL_PROTOCOL)
    cfg = setup(pair, tmp_path, idp, [victim.patient_id])
    find = Finder(cfg)
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    with Mount(cfg, tmp_path / "mnt", token_file=grid) as m:
        studies = m.mountpoint / "studies"
        shown_studies = {
            json.loads((studies / s / ".metadata.json").read_text())["attributes"][
                "StudyInstanceUID"
            ]: json.loads((studies / s / ".metadata.json").read_text())["attributes"]
            for s in os.listdir(studies)
            if s != ".metadata.json"
        }
        # /browse names come from the same view: shifted dates, remapped UIDs, no PHI.
        browse = m.mountpoint / "browse"
        for pseudo in os.listdir(browse):
            if pseudo == ".metadata.json":
                continue
            for name in os.listdir(browse / pseudo):
                if name == ".metadata.json":
                    continue
                uid = name.rsplit("_", 1)[1]
                assert uid in shown_studies, name
                assert name.startswith(shown_studies[uid].get("StudyDate", "nodate") + "_")
                assert not [i for i in pair.instances if i.patient_name.split("^")[0] in name]
    rows = find.rows(grid, "study")
    assert {r["StudyInstanceUID"] for r in rows} == set(shown_studies)
    for r in rows:
        meta = shown_studies[str(r["StudyInstanceUID"])]
        for k, v in r.items():
            if k != "sites":  # --json gives numbers as numbers; .metadata.json DICOM strings
                assert meta.get(k) == str(v), (k, v, meta.get(k))
    # The victim's study, as the mount shows it: found by its pseudonym and its shifted date.
    row = next(r for r in rows if r.get("StudyDate"))
    pseudo, shifted = str(row["PatientID"]), str(row["StudyDate"])
    assert [r["StudyInstanceUID"] for r in find.rows(grid, "study", f"PatientID={pseudo}")] == [
        r["StudyInstanceUID"] for r in rows if r["PatientID"] == pseudo
    ]
    hits = find.rows(grid, "study", f"StudyDate={shifted}")
    assert row["StudyInstanceUID"] in {r["StudyInstanceUID"] for r in hits}
    hits = find.rows(grid, "study", f"StudyDate={shifted[:4]}0101-{shifted[:4]}1231")
    assert row["StudyInstanceUID"] in {r["StudyInstanceUID"] for r in hits}
    # The series of that study, named by the remapped study UID the mount shows.
    series = find.rows(grid, "series", f"StudyInstanceUID={row['StudyInstanceUID']}")
    assert series and all(s["StudyInstanceUID"] == row["StudyInstanceUID"] for s in series)
    real_series = {i.series_uid for i in pair.instances}
    assert not {s["SeriesInstanceUID"] for s in series} & real_series
    # `policy explain` takes the names of the principal's own (de-identified) mount.
    shown = f"/mnt/x/studies/{row['StudyInstanceUID']}/{series[0]['SeriesInstanceUID']}"
    for target in (shown, str(row["StudyInstanceUID"]), str(series[0]["SeriesInstanceUID"])):
        res = mdm("policy", "explain", "--config", str(cfg), "--token-file", str(grid), target)
        assert res.stdout.startswith("decision: deidentified by nant-grid"), res.stdout
    # The real UIDs of the same studies find nothing: filters never see the originals.
    for inst in pair.instances:
        if inst.trial == TRIAL_PROTOCOL:
            code, out = find(grid, "study", f"StudyInstanceUID={inst.study_uid}")
            assert code == 0 and json.loads(out) == []


def test_hidden_and_missing_names_cost_the_same(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    """A study that exists but is hidden is no faster to refuse than one that exists nowhere
    (before: ~0.2 ms against a ~20 ms federated C-FIND)."""
    import statistics
    import time

    pair = orthanc_pair
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
    hidden = sorted(pair.b.study_uids - pair.a.study_uids)
    assert len(hidden) >= 2

    def cost(p: Path) -> float:
        t0 = time.perf_counter()
        with pytest.raises(FileNotFoundError):
            os.stat(p)
        return time.perf_counter() - t0

    with Mount(cfg, tmp_path / "mnt", token_file=rad) as m:
        studies = m.mountpoint / "studies"
        listed = set(os.listdir(studies))  # the catalog now knows the hidden studies too
        assert not listed & set(hidden)
        t_hidden, t_missing = [], []
        for k, uid in enumerate(hidden):
            t_hidden.append(cost(studies / uid))
            t_missing.append(cost(studies / f"1.2.826.0.1.3680043.9.7777.{k + 1}"))
        h, miss = statistics.median(t_hidden), statistics.median(t_missing)
        assert h > 0.4 * miss, (t_hidden, t_missing)
        # Asked again within the negative cache's lifetime, both are quick alike.
        again = cost(studies / hidden[0]), cost(studies / "1.2.826.0.1.3680043.9.7777.1")
        assert max(again) < 0.5 * min(h, miss) or max(again) < 0.005, again


def test_explain_and_fetch_reveal_nothing_of_hidden_objects(
    orthanc_pair: PacsPair, idp: Path, tmp_path: Path
) -> None:
    pair = orthanc_pair
    cfg = setup(pair, tmp_path, idp, ["NOBODY"])
    # A security officer may explain anything; say so in the config.
    text = cfg.read_text().replace("[policy]\n", '[policy]\nofficers = ["sec-officers"]\n')
    cfg.write_text(text)
    rad = token(idp, tmp_path / "rad.jwt", "drad", "radiologists")
    nobody = token(idp, tmp_path / "nobody.jwt", "mallory", "visitors")
    officer = token(idp, tmp_path / "off.jwt", "sec1", "sec-officers")
    hidden = next(i for i in pair.instances if "SiteA" not in pair.sites_holding(i.sop_uid))
    visible = next(i for i in pair.instances if "SiteA" in pair.sites_holding(i.sop_uid))
    missing = "1.2.826.0.1.3680043.9.7777.42"

    def explain(tok: Path | None, target: str) -> tuple[int, str, str]:
        args = ["policy", "explain", "--config", str(cfg), target]
        res = mdm(*args, *(["--token", str(tok)] if tok else []), check=False)
        return res.returncode, res.stdout, res.stderr.replace(target, "T")

    # Without a token: refused, nothing printed about the object.
    code, out, err = explain(None, hidden.study_uid)
    assert code != 0 and hidden.patient_id not in out + err and "--token" in err
    # A principal that may not see it: the same answer as for a UID that exists nowhere.
    for tok in (rad, nobody):
        assert explain(tok, hidden.study_uid) == explain(tok, missing)
        assert explain(tok, hidden.study_uid)[0] == 1
    # The radiologist sees its own object explained; the officer sees the hidden one.
    code, out, _ = explain(rad, visible.series_uid)
    assert code == 0 and "radiology-a" in out
    code, out, _ = explain(officer, hidden.study_uid)
    assert code == 0 and hidden.patient_id in out
    # A forged token is refused before anything is looked up.
    forged = forged_token(tmp_path, "sec1", "sec-officers")
    code, out, err = explain(forged, hidden.study_uid)
    assert code != 0 and hidden.patient_id not in out + err

    # `mdm fetch` of a hidden UID and of a missing one: one line each, exit 1, alike.
    def fetch(uid: str) -> tuple[int, str, str]:
        res = mdm("fetch", "--config", str(cfg), "--token-file", str(rad), "-q", uid, check=False)
        return res.returncode, res.stdout.replace(uid, "U"), res.stderr.replace(uid, "U")

    h, m = fetch(hidden.study_uid), fetch(missing)
    assert h == m and h[0] == 1, (h, m)
    assert "Traceback" not in h[2] and "ExceptionGroup" not in h[2]
    assert h[1] == "U: error: no study, series or instance you may see\n"
