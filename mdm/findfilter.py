"""``mdm find`` under a policy: the principal of a token sees what a mount would show it.

Answers are filtered by the decision on their study (its attributes come from a federated
study-level C-FIND); below ``identified`` the Patient ID becomes the view's pseudonym and the
other patient attributes are dropped; in a de-identified view UIDs are remapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdm.access import AccessLevel, Resource
from mdm.bridge import STUDY_KEYS, _attrs, _query
from mdm.config import Config
from mdm.explain import _find
from mdm.keys import LocalKeyring
from mdm.session import open_session
from mdm.views import View, deid_options

PHI = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDescription")
UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def filter_rows(
    config: Config, token_file: Path | None, level: str, rows: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The rows the token's principal may see, presented in its view."""
    from mdm.keyservice.client import provider_for

    session = open_session(config, token_file, audit=False)
    principal = session.principal()
    keys = provider_for(config.keys, token_file) or LocalKeyring.load(config.keys.keyring)
    studies: dict[str, tuple[set[str], dict[str, str]]] = {}
    for site, ds in _find(config, "STUDY", _query("STUDY", STUDY_KEYS)):
        a = _attrs(ds, STUDY_KEYS)
        studies.setdefault(a.get("StudyInstanceUID", ""), (set(), a))[0].add(site)
    by_patient: dict[str, list[str]] = {}
    for uid, (_s, a) in studies.items():
        by_patient.setdefault(a.get("PatientID", ""), []).append(uid)
    out: dict[str, dict[str, Any]] = {}
    for uid, row in rows.items():
        cands = [row["StudyInstanceUID"]] if row.get("StudyInstanceUID") else []
        if level == "PATIENT":
            cands = by_patient.get(str(row.get("PatientID", "")), [])
        best: tuple[AccessLevel, str, Any] | None = None
        for st in cands:
            if st not in studies:
                continue
            sites, a = studies[st]
            res = Resource(
                sites=frozenset(sites) & frozenset(row["sites"]) or frozenset(sites),
                patient_id=a.get("PatientID"),
                study_uid=st,
                trial=a.get("ClinicalTrialProtocolID") or None,
                modalities=frozenset(
                    m
                    for m in (row.get("Modality") or a.get("ModalitiesInStudy", "")).split("\\")
                    if m
                ),
                study_date=a.get("StudyDate") or None,
            )
            d = session.resolver.decide(principal, res)
            if best is None or d.level > best[0]:
                best = (d.level, d.rule, d)
        if best is None or best[0] < AccessLevel.METADATA:
            continue
        level_, rule, d = best
        if level_ >= AccessLevel.IDENTIFIED:
            out[uid] = row
            continue
        if level_ >= AccessLevel.DEIDENTIFIED:
            pol = getattr(session.resolver, "policy", None)
            r = pol.rule(rule) if pol is not None else None
            options, scope = deid_options(rule, getattr(r, "deid", None))
            view = View("deidentified", scope, keys.secret("pseudonym:" + scope), options)
        else:
            view = View("metadata", rule, keys.secret("pseudonym:metadata:" + rule))
        shown = {k: v for k, v in row.items() if k not in PHI}
        if shown.get("PatientID"):
            shown["PatientID"] = view.patient_name(str(shown["PatientID"]))
        for k in UID_KEYS:
            if shown.get(k):
                shown[k] = view.uid_name(str(shown[k]))
        out[view.uid_name(uid) if level != "PATIENT" else shown.get("PatientID", uid)] = shown
    return out
