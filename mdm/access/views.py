"""Views: how one access level presents names, metadata and content.

- ``identified``: original Patient IDs and UIDs, original objects.
- ``metadata``: the tree and non-PHI metadata; patient directories carry a keyed pseudonym
  (a Patient ID is PHI), UIDs are shown as they are (not PHI under the trust model); no content.
- ``deidentified``: pseudonymous Patient IDs and remapped UIDs everywhere (names,
  ``.metadata.json``, file content), consistent with the de-identified objects (DICOM PS3.15
  Annex E, ``mdm.deid``), keyed by a secret per pseudonym scope.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mdm.access.decide import AccessLevel, AccessResolver, Decision
from mdm.deid import DeidOptions, deidentify_attrs, map_uid, pseudonym
from mdm.errors import AccessDenied
from mdm.namespace.names import safe_name, uid_name

DEID_KEYS = {f for f in DeidOptions.__dataclass_fields__}
# Attributes that are not PHI: shown in .metadata.json (and by ``find``) below the identified
# level.
NON_PHI = {
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ModalitiesInStudy",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "BodyPartExamined",
    "ClinicalTrialProtocolID",
}


@dataclass(frozen=True)
class View:
    """One way of presenting the federation (see the module docstring)."""

    kind: str
    scope: str = ""
    secret: bytes = field(default=b"", repr=False)
    options: DeidOptions | None = None

    @property
    def store_view(self) -> str:
        """The store's view name of objects served in this view."""
        if self.kind != "deidentified":
            return "identified"
        opts = json.dumps(asdict(self.options or DeidOptions()), sort_keys=True)
        return f"deid/{self.scope}/{hashlib.sha256(opts.encode()).hexdigest()[:12]}"

    def patient_name(self, pid: str) -> str:
        """The directory name of a patient."""
        if self.kind == "identified":
            return safe_name(pid)
        return pseudonym(pid, secret=self.secret)

    def uid_name(self, uid: str) -> str:
        """The directory or file stem of a UID."""
        if self.kind == "deidentified" and not (self.options and self.options.retain_uids):
            return map_uid(uid, secret=self.secret)
        return uid_name(uid)

    def attrs(self, level: str, attrs: Mapping[str, str], non_phi: set[str]) -> dict[str, str]:
        """The attributes a ``.metadata.json`` shows in this view."""
        if self.kind == "identified":
            return dict(attrs)
        if self.kind == "deidentified":
            return deidentify_attrs(
                level, attrs, secret=self.secret, options=self.options or DeidOptions()
            )
        out = {k: v for k, v in attrs.items() if k in non_phi}
        if "PatientID" in attrs:
            out["PatientID"] = self.patient_name(attrs["PatientID"])
        return out

    def deid_spec(self) -> dict[str, Any]:
        """What a receiver needs to de-identify objects for this view (picklable)."""
        assert self.kind == "deidentified"
        return {"secret": self.secret, "options": asdict(self.options or DeidOptions())}


def deid_options(rule_id: str, table: Mapping[str, Any] | None) -> tuple[DeidOptions, str]:
    """(options, pseudonym scope) from a rule's ``[allow.deid]`` table (scope: the rule id
    unless ``scope = "..."`` names a programme shared by several rules)."""
    t = dict(table or {})
    scope = str(t.pop("scope", rule_id))
    unknown = set(t) - DEID_KEYS
    if unknown:
        raise AccessDenied(
            f"policy rule {rule_id}: unknown de-identification option(s): "
            f"{', '.join(sorted(unknown))}"
        )
    try:
        return DeidOptions(**t), scope
    except (TypeError, ValueError) as e:
        raise AccessDenied(f"policy rule {rule_id}: [allow.deid]: {e}") from None


def view_of(decision: Decision, resolver: AccessResolver, secret: Callable[[str], bytes]) -> View:
    """The view a decision grants: the one construction used by the mount, ``find`` and
    ``reidentify``. ``secret(name)`` gives the pseudonym key of a scope (``pseudonym:SCOPE``
    or ``pseudonym:metadata:RULE``), from the keyring or the key servers."""
    if decision.level >= AccessLevel.IDENTIFIED:
        return View("identified")
    if decision.level >= AccessLevel.DEIDENTIFIED:
        options, scope = deid_options(decision.rule, resolver.deid_of(decision.rule))
        return View("deidentified", scope, secret("pseudonym:" + scope), options)
    return View("metadata", decision.rule, secret("pseudonym:metadata:" + decision.rule))
