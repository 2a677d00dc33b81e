"""Turn a mount path or a UID into the policy :class:`~mdm.access.decide.Resource` it designates.

Used by ``mdm policy explain --token FILE PATH|UID``: the attributes come from a federated
C-FIND (the same ones the mount decides on), so the explanation is about the real object.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath

from pydicom.dataset import Dataset

from mdm.access.decide import Resource, resource_of
from mdm.catalog.attrs import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, dataset_attrs, query_dataset
from mdm.config import Config
from mdm.dicom.query import fan_out
from mdm.errors import NotFound, UserError
from mdm.namespace.names import is_uid
from mdm.namespace.tree import TOP


def find_all(config: Config, level: str, q: Dataset) -> list[tuple[str, Dataset]]:
    """(site, answer) of a C-FIND at every site at once (``query.fan_out``), failures left
    out: for commands without a mount (``policy explain``, ``reidentify``)."""
    out = []
    for r in fan_out(config.sites, config.bridge, level, q):
        for ds in r.datasets if r.error is None else []:
            out.append((r.site.name, ds))
    return out


def parse_target(target: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(study, series, sop, bare uid) named by a mount path or a bare UID."""
    if "/" not in target:
        if not is_uid(target):
            raise UserError(f"{target!r} is neither a UID nor a path in a mount")
        return None, None, None, target
    parts = list(PurePosixPath(target).parts)
    anchor = next((i for i, p in enumerate(parts) if p in TOP), None)
    if anchor is None:
        raise UserError(
            f"{target}: not a path under /studies, /patients, /sites or /browse of a mount"
        )
    rest = parts[anchor + 1 :]
    if parts[anchor] == "sites":
        rest = rest[2:]
    elif parts[anchor] == "patients":
        rest = rest[1:]
    elif parts[anchor] == "browse":  # readable names end with their UID
        rest = [
            p if p == ".metadata.json" else p.removesuffix(".dcm").rsplit("_", 1)[-1]
            for p in rest[1:]
        ]
    rest = [p for p in rest if p != ".metadata.json"]
    if not rest:
        raise UserError(f"{target}: name a study, series or file")
    study = rest[0]
    series = rest[1] if len(rest) > 1 else None
    sop = rest[2].removesuffix(".dcm") if len(rest) > 2 else None
    return study, series, sop, None


def resource_for(config: Config, target: str) -> Resource:
    """The resource a path or UID designates, with the attributes policies match on."""
    study, series, sop, uid = parse_target(target)
    if uid is not None:
        for level, key, keys in (
            ("STUDY", "StudyInstanceUID", STUDY_KEYS),
            ("SERIES", "SeriesInstanceUID", SERIES_KEYS),
            ("IMAGE", "SOPInstanceUID", IMAGE_KEYS),
        ):
            hits = find_all(config, level, query_dataset(level, keys, **{key: uid}))
            if hits:
                ds = hits[0][1]
                study = str(ds.get("StudyInstanceUID", ""))
                if level in ("SERIES", "IMAGE"):
                    series = str(ds.get("SeriesInstanceUID", ""))
                if level == "IMAGE":
                    sop = uid
                break
        else:
            raise NotFound(f"no site holds {uid}")
    assert study is not None
    hits = find_all(config, "STUDY", query_dataset("STUDY", STUDY_KEYS, StudyInstanceUID=study))
    if not hits:
        raise NotFound(f"no site holds study {study}")
    attrs = dataset_attrs(hits[0][1], STUDY_KEYS)
    sites = {s for s, _ in hits}
    sattrs = None
    if series:
        q = query_dataset("SERIES", SERIES_KEYS, StudyInstanceUID=study, SeriesInstanceUID=series)
        shits = find_all(config, "SERIES", q)
        if not shits:
            raise NotFound(f"no site holds series {series}")
        sites = {s for s, _ in shits}
        sattrs = {**dataset_attrs(shits[0][1], SERIES_KEYS), "SeriesInstanceUID": series}
    # The same attributes -> resource as the mount and find (one modality rule).
    res = resource_of(sites, attrs, sattrs, study_uid=study)
    return dataclasses.replace(res, sop_uid=sop)
