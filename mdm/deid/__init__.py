"""De-identified views: DICOM PS3.15 Annex E Basic Profile and options, keyed pseudonyms.

A pure library: bytes (or catalog attributes) in, de-identified bytes (or attributes) out. The
action table is data (``annex_e.csv``, the standard's Table E.1-1; see
``scripts/gen_annex_e.py``); docs/DEID.md describes every choice the standard leaves open.
"""

from mdm.deid.engine import (
    BURNED_IN_SOP_CLASSES,
    DeidMalformed,
    DeidRefused,
    check_burned_in,
    deidentify,
    deidentify_attrs,
    deidentify_dataset,
    map_uid,
    pseudonym,
)
from mdm.deid.profile import DeidOptions, edition, load_table
from mdm.deid.pseudo import Pseudonymizer

__all__ = [
    "BURNED_IN_SOP_CLASSES",
    "DeidMalformed",
    "DeidOptions",
    "DeidRefused",
    "Pseudonymizer",
    "check_burned_in",
    "deidentify",
    "deidentify_attrs",
    "deidentify_dataset",
    "edition",
    "load_table",
    "map_uid",
    "pseudonym",
]
