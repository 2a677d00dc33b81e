"""From principal to access level to view.

Every decision in the bridge goes through an :class:`AccessResolver`: given the principal and
the attributes of a resource (site, patient, study, trial, modality, study date), it answers an
:class:`AccessLevel`. The level decides the view: ``metadata`` sees the tree only,
``deidentified`` reads the de-identified view, ``identified`` reads the original objects.

Until ACL policy files are wired in, the only resolver is :class:`LocalAdminResolver`: the local
administrator of a single-user workstation sees everything; any other principal sees nothing
(fail closed).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mdm.access.identity import Principal


class AccessLevel(enum.IntEnum):
    """Ordered access levels: a higher level includes everything below it."""

    NONE = 0
    METADATA = 1
    DEIDENTIFIED = 2
    IDENTIFIED = 3

    @classmethod
    def parse(cls, text: str) -> AccessLevel:
        """``"deidentified"`` -> ``AccessLevel.DEIDENTIFIED`` (ValueError otherwise)."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown access level {text!r} (none, metadata, deidentified, identified)"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Resource:
    """What a decision is about: the attributes policies match on (no PHI leaves this object)."""

    sites: frozenset[str] = frozenset()
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    trial: str | None = None
    modalities: frozenset[str] = frozenset()
    study_date: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """An access decision and the rule that made it (for audit and ``policy explain``)."""

    level: AccessLevel
    rule: str
    reason: str = ""
    version: str = ""
    """The version of the policy that made it ("" for the embedded resolver); audit records
    take it from the decision, which is exact even when a reload happens in between."""


class AccessResolver(Protocol):
    """Decides the access level of a principal on a resource."""

    def decide(self, principal: Principal, resource: Resource) -> Decision: ...

    def version(self) -> str:
        """An identifier of the policy in force (its hash), recorded in audit records."""
        ...

    def deid_of(self, rule_id: str) -> Mapping[str, Any] | None:
        """The ``[allow.deid]`` table of a rule (None: defaults, or no such rule)."""
        ...

    def refresh(self) -> bool:
        """Pick up an edited policy now (off the event loop); True if a new one is in force."""
        ...


class LocalAdminResolver:
    """The embedded default: the local administrator sees everything, identified."""

    def decide(self, principal: Principal, resource: Resource) -> Decision:
        """Identified access for the local administrator, none for anyone else."""
        if principal.admin:
            return Decision(AccessLevel.IDENTIFIED, "local-admin", "single-user workstation")
        return Decision(AccessLevel.NONE, "default-deny", "no policy grants access")

    def version(self) -> str:
        return "local-admin"

    def deid_of(self, rule_id: str) -> Mapping[str, Any] | None:
        return None

    def refresh(self) -> bool:
        """Nothing to reload: the embedded resolver has no policy files."""
        return False


def resource_of(
    sites: Iterable[str],
    study: Mapping[str, str],
    series: Mapping[str, str] | None = None,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
) -> Resource:
    """The policy attributes of a study (or of one of its series) from C-FIND attributes.

    The one place that turns catalog attributes into a :class:`Resource`, for the mount,
    ``find``, ``explain`` and ``reidentify`` alike: a series is matched on its own Modality,
    a study on ModalitiesInStudy.
    """
    series = series or {}
    mods = series.get("Modality") if series.get("Modality") else study.get("ModalitiesInStudy")
    return Resource(
        sites=frozenset(sites),
        patient_id=patient_id or study.get("PatientID"),
        study_uid=study_uid or study.get("StudyInstanceUID"),
        series_uid=series.get("SeriesInstanceUID"),
        trial=study.get("ClinicalTrialProtocolID") or None,
        modalities=frozenset(m for m in (mods or "").split("\\") if m),
        study_date=study.get("StudyDate") or None,
    )
