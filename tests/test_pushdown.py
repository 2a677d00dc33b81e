"""Policy push-down (pure): what a principal's grants say its listings may ask a PACS for."""

from __future__ import annotations

from datetime import date

from mdm.access.decide import AccessLevel
from mdm.policy.model import Rule
from mdm.policy.pushdown import Narrowing, narrowing


def rule(**kw: object) -> Rule:
    return Rule(id="r", effect="allow", access=AccessLevel.DEIDENTIFIED, file="f", line=1, **kw)  # type: ignore[arg-type]


def test_every_grant_constrains_a_dimension() -> None:
    n = narrowing(
        [
            rule(trials=frozenset({"NANT"}), modalities=frozenset({"CT"})),
            rule(
                trials=frozenset({"NANT"}),
                modalities=frozenset({"MR"}),
                study_dates=(date(2015, 1, 1), date(2020, 12, 31)),
                sites=frozenset({"A"}),
            ),
        ]
    )
    # Dates and sites: one grant does not constrain them, so they are not pushed.
    assert n.sites is None
    assert n.keys == (("ClinicalTrialProtocolID", "NANT"), ("ModalitiesInStudy", "CT\\MR"))
    assert n.queries() == [n.keys]
    assert n.listing_key().startswith("studies?")


def test_dates_sites_and_patient_ids() -> None:
    n = narrowing(
        [
            rule(
                sites=frozenset({"A"}),
                patient_ids=frozenset({"P1", "P2"}),
                study_dates=(date(2010, 1, 1), date(2012, 1, 1)),
            ),
            rule(
                sites=frozenset({"B"}),
                patient_ids=frozenset({"P3"}),
                study_dates=(date(2011, 1, 1), date(2024, 12, 31)),
            ),
        ]
    )
    assert n.sites == frozenset({"A", "B"})
    assert ("StudyDate", "20100101-20241231") in n.keys
    assert n.split == ("PatientID", ("P1", "P2", "P3"))
    assert len(n.queries()) == 3


def test_no_grant_and_unbounded() -> None:
    assert narrowing([]).nothing
    assert narrowing([rule()]).unbounded
    assert Narrowing().listing_key() == "studies"
