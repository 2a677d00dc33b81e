"""The PS3.15 Annex E action table, the options, and the action each option set resolves to.

The table itself is data (``annex_e.csv``, generated and cross-checked by
``scripts/gen_annex_e.py``); this module loads it once and answers, for a set of
:class:`DeidOptions`, the action code of any tag. It knows nothing of datasets: the engine
applies the codes.

Resolving options (Table E.1-1 gives one column per option; an empty cell leaves the Basic
code alone):

* A temporal row (one with a code in the longitudinal columns) is governed by the
  longitudinal option only: ``off`` keeps the Basic code, ``full`` the "Rtn. Long. Full Dates"
  code (K), ``offset`` the "Modif. Dates" code (C: the engine shifts dates). Another option's
  K on such a row (e.g. Retain Device Identity on Date of Last Calibration) does not bring the
  real date back: temporal information is released by the temporal option alone.
* Any other row: the codes of the active options; when two disagree (Retain Patient
  Characteristics C and Clean Descriptors C agree; K against C never occurs in 2025b but is
  handled), C wins over K because it is the more protective one.
"""

from __future__ import annotations

import csv
import enum
import functools
from dataclasses import dataclass, fields
from importlib import resources
from typing import Literal

TABLE_FILE = "annex_e.csv"
SAFE_PRIVATE_FILE = "safe_private.csv"

Longitudinal = Literal["off", "full", "offset"]

# CID 7050 "De-identification Method": the codes the profile and each option are named by.
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
CODE_LONG_FULL = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
CODE_LONG_MODIFIED = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARS = ("113108", "Retain Patient Characteristics Option")
CODE_DEVICE = ("113109", "Retain Device Identity Option")
CODE_UIDS = ("113110", "Retain UIDs Option")
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")
CODE_INSTITUTION = ("113112", "Retain Institution Identity Option")


class Action(enum.StrEnum):
    """The single action the engine performs on one element (combinations resolved)."""

    KEEP = "K"
    REMOVE = "X"
    ZERO = "Z"
    DUMMY = "D"
    CLEAN = "C"
    UID = "U"


@dataclass(frozen=True)
class DeidOptions:
    """The options of one de-identified view (one policy rule). All off by default.

    ``retain_longitudinal``: ``"off"`` (dates follow the Basic Profile: removed or dummied),
    ``"full"`` (dates kept) or ``"offset"`` (dates shifted by a per-patient number of days
    derived from the keyed pseudonym function; times kept). ``allow_burned_in`` lets objects
    that are flagged, or are of a kind known, to carry burned-in text through (the pixels are
    never cleaned: the rule that sets it takes responsibility).
    """

    retain_longitudinal: Longitudinal = "off"
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    clean_descriptors: bool = False
    retain_safe_private: bool = False
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if self.retain_longitudinal not in ("off", "full", "offset"):
            raise ValueError(
                f"retain_longitudinal must be 'off', 'full' or 'offset', "
                f"not {self.retain_longitudinal!r}"
            )
        for f in fields(self):
            if f.name != "retain_longitudinal" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be a bool")

    def method_codes(self) -> list[tuple[str, str]]:
        """The CID 7050 (code value, meaning) pairs of the profile and the options applied."""
        out = [CODE_BASIC]
        if self.clean_descriptors:
            out.append(CODE_CLEAN_DESCRIPTORS)
        if self.retain_longitudinal == "full":
            out.append(CODE_LONG_FULL)
        elif self.retain_longitudinal == "offset":
            out.append(CODE_LONG_MODIFIED)
        if self.retain_patient_characteristics:
            out.append(CODE_PATIENT_CHARS)
        if self.retain_device_identity:
            out.append(CODE_DEVICE)
        if self.retain_uids:
            out.append(CODE_UIDS)
        if self.retain_safe_private:
            out.append(CODE_SAFE_PRIVATE)
        if self.retain_institution_identity:
            out.append(CODE_INSTITUTION)
        return out

    def method_text(self) -> list[str]:
        """DeidentificationMethod values (LO, at most 64 characters each, one per line)."""
        out = [f"MDM {edition().removeprefix('DICOM ')}"[:64]]
        out += [meaning[:64] for _, meaning in self.method_codes()]
        return out


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1."""

    tag: str
    """8 hex digits, with 'x' for the wildcard digits of a repeating group, or PRIVATE."""
    keyword: str
    name: str
    codes: dict[str, str]
    """Column name -> code ('' when the option leaves the Basic code alone)."""


@dataclass(frozen=True)
class Table:
    """Table E.1-1 as loaded from ``annex_e.csv``."""

    edition: str
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class SafePrivate:
    """One entry of the safe private list."""

    group: int
    creator: str
    element: int
    """The low byte of the element number (the block offset)."""
    vr: str
    name: str


_OPTION_COLUMNS = (
    ("rtn_uids", "retain_uids"),
    ("rtn_device_identity", "retain_device_identity"),
    ("rtn_institution_identity", "retain_institution_identity"),
    ("rtn_patient_characteristics", "retain_patient_characteristics"),
    ("clean_descriptors", "clean_descriptors"),
)
_TEMPORAL = ("rtn_long_full_dates", "rtn_long_modified_dates")


@functools.cache
def load_table() -> Table:
    """Load ``annex_e.csv`` (once); ValueError if it is malformed."""
    text = resources.files(__package__).joinpath(TABLE_FILE).read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# DICOM PS3.15"):
        raise ValueError(f"{TABLE_FILE}: the first line must name the standard's edition")
    ed = lines[0].removeprefix("# ").split(":", 1)[0]
    reader = csv.DictReader(line for line in lines if not line.startswith("#"))
    rows: list[Row] = []
    for rec in reader:
        tag = rec.pop("tag")
        if tag != "PRIVATE" and (len(tag) != 8 or any(c not in "0123456789ABCDEFx" for c in tag)):
            raise ValueError(f"{TABLE_FILE}: bad tag {tag!r}")
        keyword, name = rec.pop("keyword"), rec.pop("name")
        for col, code in rec.items():
            if code not in _VALID_CODES:
                raise ValueError(f"{TABLE_FILE}: {tag} {col}: unknown action code {code!r}")
        if not rec.get("basic"):
            raise ValueError(f"{TABLE_FILE}: {tag} has no Basic Profile code")
        rows.append(Row(tag=tag, keyword=keyword, name=name, codes=dict(rec)))
    return Table(edition=ed, rows=tuple(rows))


_VALID_CODES = frozenset({"", "D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "X/Z/D", "X/Z/U*", "Z/D"})


def edition() -> str:
    """The standard's edition the table was taken from, e.g. "DICOM PS3.15 2025b Table E.1-1"."""
    return load_table().edition


@functools.cache
def load_safe_private() -> tuple[SafePrivate, ...]:
    """The safe private list (``safe_private.csv``)."""
    text = resources.files(__package__).joinpath(SAFE_PRIVATE_FILE).read_text(encoding="utf-8")
    reader = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    out = []
    for rec in reader:
        group = int(rec["group"], 16)
        if group % 2 == 0:
            raise ValueError(f"{SAFE_PRIVATE_FILE}: group {rec['group']} is not private")
        out.append(
            SafePrivate(
                group=group,
                creator=rec["creator"],
                element=int(rec["element"], 16),
                vr=rec["vr"],
                name=rec["name"],
            )
        )
    return tuple(out)


def resolve_row(row: Row, options: DeidOptions) -> str:
    """The (possibly combined) code of ``row`` under ``options``."""
    c = row.codes
    if c.get(_TEMPORAL[0]) or c.get(_TEMPORAL[1]):
        if options.retain_longitudinal == "full" and c.get(_TEMPORAL[0]):
            return c[_TEMPORAL[0]]
        if options.retain_longitudinal == "offset" and c.get(_TEMPORAL[1]):
            return c[_TEMPORAL[1]]
        return c["basic"]
    chosen = [c[col] for col, opt in _OPTION_COLUMNS if getattr(options, opt) and c.get(col)]
    if options.retain_safe_private and c.get("rtn_safe_private"):
        chosen.append(c["rtn_safe_private"])
    if not chosen:
        return c["basic"]
    return "C" if "C" in chosen else chosen[0]


@dataclass(frozen=True)
class ActionMap:
    """Tag -> resolved (possibly combined) code for one option set."""

    exact: dict[int, str]
    repeaters: tuple[tuple[int, int, str], ...]
    """(mask, value, code): a tag matches when ``tag & mask == value``."""
    private: str

    def lookup(self, tag: int) -> str | None:
        """The code of a public ``tag``, or None if Table E.1-1 does not list it."""
        code = self.exact.get(tag)
        if code is not None:
            return code
        for mask, value, rcode in self.repeaters:
            if tag & mask == value:
                return rcode
        return None


@functools.cache
def action_map(options: DeidOptions) -> ActionMap:
    """The :class:`ActionMap` of ``options`` (cached: options are frozen)."""
    exact: dict[int, str] = {}
    reps: list[tuple[int, int, str]] = []
    private = "X"
    for row in load_table().rows:
        code = resolve_row(row, options)
        if row.tag == "PRIVATE":
            private = code
        elif "x" in row.tag:
            mask = int("".join("0" if ch == "x" else "F" for ch in row.tag), 16)
            value = int(row.tag.replace("x", "0"), 16)
            reps.append((mask, value, code))
        else:
            exact[int(row.tag, 16)] = code
    return ActionMap(exact=exact, repeaters=tuple(reps), private=private)
