"""The gate's memo of recent decisions (Gate.decide, DECISION_TTL) and the sticky revocation
check of open files (mdm.namespace.opening.revocation_check), over a real PolicyResolver."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from mdm.access.decide import AccessLevel
from mdm.access.gate import DECISION_TTL, Gate, fixed
from mdm.access.identity import Principal
from mdm.access.views import View
from mdm.catalog.records import Record
from mdm.errors import AccessDenied
from mdm.namespace import opening
from mdm.namespace.naming import Names
from mdm.policy import PolicyResolver
from tests.test_policy import rewrite_file

ISS = "https://idp.test"
STUDY_UID = "1.2.840.99.1"
SERIES_UID = "1.2.840.99.1.1"

ALLOW_CT = """
[[allow]]
id = "staff-ct"
principals = { groups = ["staff"] }
resources = { modalities = ["CT"] }
access = "identified"
"""
DENY_STAFF = (
    ALLOW_CT
    + """
[[deny]]
id = "staff-out"
principals = { groups = ["staff"] }
"""
)


def _resolver(tmp_path: Path, text: str = ALLOW_CT) -> PolicyResolver:
    """A resolver that reloads only when told (refresh) and at once (no settle time)."""
    rewrite_file(tmp_path / "p.toml", text)
    return PolicyResolver(tmp_path, reload_interval=3600.0, settle=0.0)


def _set_policy(r: PolicyResolver, text: str) -> None:
    rewrite_file(r.directory / "p.toml", text)
    assert r.refresh()


def _study(modality: str = "CT") -> Record:
    return Record(
        "STUDY",
        STUDY_UID,
        "P1",
        attrs={"ModalitiesInStudy": modality, "StudyDate": "20200101"},
        sites={"SiteA": time.time()},
    )


def _series(modality: str = "CT") -> Record:
    return Record("SERIES", SERIES_UID, STUDY_UID, {"Modality": modality}, {"SiteA": time.time()})


def _staff(expires: float = math.inf) -> Principal:
    return Principal(sub="u", issuer=ISS, groups=("staff",), expires=expires)


def _other() -> Principal:
    return Principal(sub="u", issuer=ISS, groups=("other",))


def test_principals_never_share_a_decision(tmp_path: Path) -> None:
    """Two principals with the same sub, one allowed and one denied, asked alternately within
    the TTL, each get their own decision; so do short-lived principals (whose ids recur)."""
    gate = Gate(_resolver(tmp_path), None)
    study, series = _study(), _series()
    a, b = _staff(), _other()
    for _ in range(200):
        assert gate.decide(a, study).level == AccessLevel.IDENTIFIED
        assert gate.decide(b, study).level == AccessLevel.NONE
        assert gate.decide(b, study, series).level == AccessLevel.NONE
        assert gate.decide(a, study, series).level == AccessLevel.IDENTIFIED
    for i in range(400):
        p = _staff() if i % 2 else _other()
        want = AccessLevel.IDENTIFIED if i % 2 else AccessLevel.NONE
        assert gate.decide(p, study, series).level == want, i
        del p


def test_policy_change_decides_anew_at_once(tmp_path: Path) -> None:
    """A reloaded policy (new version) is applied by the very next decide, within the TTL."""
    r = _resolver(tmp_path)
    gate = Gate(r, None)
    study, series, a = _study(), _series(), _staff()
    for _ in range(3):
        t0 = time.monotonic()
        assert gate.decide(a, study, series).level == AccessLevel.IDENTIFIED
        assert gate.decide(a, study).level == AccessLevel.IDENTIFIED
        _set_policy(r, DENY_STAFF)
        d = gate.decide(a, study, series)
        assert (d.level, d.rule) == (AccessLevel.NONE, "staff-out")
        assert gate.decide(a, study).rule == "staff-out"
        _set_policy(r, ALLOW_CT)
        assert gate.decide(a, study, series).rule == "staff-ct"
        assert time.monotonic() - t0 < DECISION_TTL  # all of it inside one TTL


def test_refreshed_record_decides_anew_at_once(tmp_path: Path) -> None:
    """A new Record object for the same UID (a refreshed catalog entry) is decided anew, even
    within the TTL: its attributes may change the decision."""
    gate = Gate(_resolver(tmp_path), None)
    a = _staff()
    ct, mr = _study("CT"), _study("MR")
    s_ct, s_mr = _series("CT"), _series("MR")
    for _ in range(50):
        assert gate.decide(a, ct).level == AccessLevel.IDENTIFIED
        assert gate.decide(a, mr).level == AccessLevel.NONE
        assert gate.decide(a, ct, s_ct).level == AccessLevel.IDENTIFIED
        assert gate.decide(a, ct, s_mr).level == AccessLevel.NONE


def test_expired_principal_gets_no_memoized_decision(tmp_path: Path) -> None:
    """Within the TTL a live principal is given the same decision object again; one whose
    token has expired is decided anew each time (never handed the memoized allow)."""
    gate = Gate(_resolver(tmp_path), None)
    study = _study()
    live = _staff()
    d1 = gate.decide(live, study)
    assert d1.level == AccessLevel.IDENTIFIED and gate.decide(live, study) is d1  # memo used

    expired = _staff(expires=time.time() - 1)
    e1 = gate.decide(expired, study)
    e2 = gate.decide(expired, study)
    assert e2 is not e1

    soon = _staff(expires=time.time() + 0.3)
    s1 = gate.decide(soon, study)
    assert gate.decide(soon, study) is s1  # still valid: memoized
    time.sleep(max(0.0, soon.expires - time.time()) + 0.02)
    s2 = gate.decide(soon, study)
    assert s2 is not s1 and gate.decide(soon, study) is not s2


def test_revocation_is_sticky_until_the_next_check(tmp_path: Path) -> None:
    """Once the re-check of an open file raises AccessDenied, every call keeps raising until
    the next check (RECHECK_SECONDS later), even if the grant is back meanwhile; then the
    check passes again."""
    r = _resolver(tmp_path)
    gate = Gate(r, None)
    # Names.view needs only the gate's resolver and the pseudonym secret (identified: unused)
    names = Names(None, gate, lambda name: b"\0" * 32)  # type: ignore[arg-type]
    check = opening.revocation_check(
        gate, names, fixed(_staff()), _study(), _series(), View("identified")
    )
    check()
    _set_policy(r, DENY_STAFF)
    t_created = time.monotonic()
    time.sleep(opening.RECHECK_SECONDS + 0.05)
    with pytest.raises(AccessDenied, match="revoked"):
        check()
    t_revoked = time.monotonic()
    _set_policy(r, ALLOW_CT)  # granted again, but the last answer holds until the next check
    n = 0
    while time.monotonic() - t_revoked < opening.RECHECK_SECONDS * 0.6:
        with pytest.raises(AccessDenied, match="revoked"):
            check()
        n += 1
        time.sleep(0.01)
    assert n > 5 and t_revoked - t_created > opening.RECHECK_SECONDS
    time.sleep(max(0.0, t_revoked + opening.RECHECK_SECONDS + 0.05 - time.monotonic()))
    check()  # the next check sees the grant
    check()
