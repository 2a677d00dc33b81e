"""The PHI sentinels: identifying values of every generated patient a test PACS holds.

One module, imported by name everywhere (``tests.phi``): pytest loads ``tests/conftest.py`` as
``conftest`` while test modules import ``tests.conftest``, a second copy of that module, so
state kept there would be two sets, one of them always empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mdm_demo.synth import GeneratedInstance

PHI_SENTINELS: set[str] = set()
"""Names, Patient IDs and accession numbers (dates are left out: digits occur in UIDs)."""


def remember_phi(instances: Sequence[GeneratedInstance]) -> None:
    """Add the PHI of generated instances to the sentinels the log and byte checks look for."""
    for i in instances:
        PHI_SENTINELS.update(v for v in (i.patient_id, i.accession_number) if v)
        PHI_SENTINELS.update(p for p in i.patient_name.split("^") if len(p) >= 4)


def phi_in(text: str) -> list[str]:
    """The sentinels found in ``text`` as whole words (a name inside a longer word, such as
    MARY in PRIMARY, is not a finding)."""
    return sorted(
        s
        for s in PHI_SENTINELS
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(s) + r"(?![A-Za-z0-9])", text)
    )
