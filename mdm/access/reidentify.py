"""Re-identification: map a pseudonym or a remapped UID of a de-identified view back.

Only for a principal with ``identified`` access to the very object (the policy decides, as for
a mount), and every attempt is audited. The view alone never allows it: pseudonyms and
remapped UIDs are keyed HMACs, so going back means recomputing them over the federation's
identifiers with the scope's secret, which only the bridge holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mdm.access.decide import AccessLevel, Resource, resource_of
from mdm.access.explain import find_all
from mdm.access.session import Session
from mdm.catalog.attrs import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, dataset_attrs, query_dataset
from mdm.config import Config
from mdm.deid import map_uid, pseudonym
from mdm.errors import NotFound


@dataclass(frozen=True)
class Match:
    """What a pseudonymous value designates."""

    kind: str  # patient, study, series, instance
    original: str
    study_uid: str
    resource: Resource


def _studies(config: Config) -> Iterator[tuple[set[str], dict[str, str]]]:
    by_uid: dict[str, tuple[set[str], dict[str, str]]] = {}
    for site, ds in find_all(config, "STUDY", query_dataset("STUDY", STUDY_KEYS)):
        a = dataset_attrs(ds, STUDY_KEYS)
        uid = a.get("StudyInstanceUID", "")
        if uid:
            by_uid.setdefault(uid, (set(), a))[0].add(site)
    yield from by_uid.values()


def find_original(config: Config, secret: bytes, value: str) -> list[Match]:
    """Every object of the federation whose pseudonym or remapped UID is ``value``."""
    out: list[Match] = []
    studies = list(_studies(config))
    for sites, a in studies:
        res = resource_of(sites, a)
        pid, st = a.get("PatientID", ""), a.get("StudyInstanceUID", "")
        if pid and pseudonym(pid, secret=secret) == value:
            out.append(Match("patient", pid, st, res))
        if map_uid(st, secret=secret) == value:
            out.append(Match("study", st, st, res))
    if out or not value.startswith("2.25."):
        return out
    for sites, a in studies:
        st = a["StudyInstanceUID"]
        res = resource_of(sites, a)
        q = query_dataset("SERIES", SERIES_KEYS, StudyInstanceUID=st)
        for _site, ds in find_all(config, "SERIES", q):
            se = str(ds.get("SeriesInstanceUID", ""))
            if map_uid(se, secret=secret) == value:
                return [Match("series", se, st, res)]
            qi = query_dataset("IMAGE", IMAGE_KEYS, StudyInstanceUID=st, SeriesInstanceUID=se)
            for _s, di in find_all(config, "IMAGE", qi):
                sop = str(di.get("SOPInstanceUID", ""))
                if map_uid(sop, secret=secret) == value:
                    return [Match("instance", sop, st, res)]
    return out


def reidentify(config: Config, session: Session, secret: bytes, value: str) -> list[Match]:
    """The originals behind ``value`` that the session's principal may see identified.

    A principal that may not re-identify ``value`` gets the same answer whether or not it
    designates something (NotFound either way): the answer is no membership oracle.
    """
    principal = session.principal()
    matches = find_original(config, secret, value)
    allowed: list[Match] = []
    for m in matches:
        d = session.resolver.decide(principal, m.resource)
        ok = d.level >= AccessLevel.IDENTIFIED
        if session.audit is not None:
            session.audit.record(
                principal=principal,
                action="reidentify",
                decision="allow" if ok else "deny",
                resource={"study_uid": m.study_uid, "level": m.kind},
                rule=d.rule,
                policy=d.version or session.resolver.version(),
            )
        if ok:
            allowed.append(m)
    if not matches and session.audit is not None:
        session.audit.record(
            principal=principal,
            action="reidentify",
            decision="deny",
            resource={"kind": "no-match"},
            rule="",
            policy=session.resolver.version(),
        )
    if not allowed:
        raise NotFound(
            f"{value}: nothing you may re-identify has this pseudonym or UID in this scope"
        )
    return allowed
