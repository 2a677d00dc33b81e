#!/usr/bin/env python3
"""Generate (or check) mdm/deid/annex_e.csv: DICOM PS3.15 Table E.1-1 as data.

Where the table comes from
--------------------------
No network but PyPI is reachable here, so the standard's HTML cannot be scraped directly. Two
maintained PyPI packages ship the table, each scraped from the standard by its authors:

* ``idiscore`` 1.6.0 (``idiscore/_public_dicom.py``, "scrape date: 2025-06-24" of
  dicom.nema.org/medical/dicom/current/.../part15/chapter_E.html): EVERY column of Table E.1-1
  (Basic Profile and each option). This is the primary source.
* ``dicom-anonymizer`` 2.1.0 (KitwareMedical; ``dicom_anonymization_databases/
  dicomfields_2024b.py`` and ``dicomfields_2026c.py``): the Basic Profile column of the 2024b
  and 2026c editions. Used to cross-check the Basic column and to bracket the edition.

Neither package is imported (idiscore 1.6.0 needs Python >= 3.12): their source files are
parsed with :mod:`ast`, so nothing of theirs is executed. The wheels are fetched with
``pip download --no-deps`` into a temporary directory; neither becomes a dependency of mdm.

Usage::

    .venv/bin/python scripts/gen_annex_e.py           # regenerate mdm/deid/annex_e.csv
    .venv/bin/python scripts/gen_annex_e.py --check   # exit 1 if the committed file differs
    .venv/bin/python scripts/gen_annex_e.py --src DIR  # use wheels already in DIR
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pydicom._dicom_dict import RepeatersDictionary
from pydicom.datadict import dictionary_description, keyword_for_tag

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "mdm" / "deid" / "annex_e.csv"

IDISCORE = "idiscore==1.6.0"
ANONYMIZER = "dicom-anonymizer==2.1.0"

# The edition: idiscore scraped "current" on 2025-06-24. Cross-checking the Basic column
# against dicom-anonymizer's 2024b and 2026c lists (see the report this script prints) places it
# after 2024b and before 2026c; 2025-06-24 falls in the publication window of 2025b (2025c came
# out later that summer). The edition is therefore named "2025b" with that evidence.
EDITION = "DICOM PS3.15 2025b Table E.1-1"

# idiscore's ActionCodes attribute names -> the codes printed in Table E.1-1.
CODES = {
    "DUMMY": "D",
    "EMPTY": "Z",
    "REMOVE": "X",
    "KEEP": "K",
    "CLEAN": "C",
    "UID": "U",
    "EMPTY_OR_DUMMY": "Z/D",
    "REMOVE_OR_EMPTY": "X/Z",
    "REMOVE_OR_DUMMY": "X/D",
    "REMOVE_OR_EMPTY_OR_DUMMY": "X/Z/D",
    "REMOVE_OR_EMPTY_OR_UID": "X/Z/U*",
}

# idiscore rule-set variable -> our column name (the order of the columns in Table E.1-1).
COLUMNS = [
    ("basic_profile", "basic"),
    ("retain_safe_private", "rtn_safe_private"),
    ("retain_uid", "rtn_uids"),
    ("retain_device_id", "rtn_device_identity"),
    ("retain_institution_id", "rtn_institution_identity"),
    ("retain_patient_characteristics", "rtn_patient_characteristics"),
    ("retain_full_dates", "rtn_long_full_dates"),
    ("retain_modified_dates", "rtn_long_modified_dates"),
    ("clean_descriptors", "clean_descriptors"),
    ("clean_structured_content", "clean_structured_content"),
    ("clean_graphics", "clean_graphics"),
]

ANON_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def fetch(dest: Path) -> None:
    """Download the two wheels (no dependencies) into ``dest``."""
    for spec in (IDISCORE, ANONYMIZER):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--dest",
                str(dest),
                spec,
            ],
            check=True,
        )


def wheel_member(src: Path, prefix: str, member: str) -> str:
    """The text of ``member`` inside the wheel in ``src`` whose name starts with ``prefix``."""
    (wheel,) = sorted(src.glob(f"{prefix}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8")


def tag_key(call: ast.Call) -> str:
    """SingleTag("00100010") -> "00100010"; RepeatingGroup("60xx3000") -> "60XX3000"."""
    func = call.func
    assert isinstance(func, ast.Name)
    if func.id == "PrivateTags":
        return "PRIVATE"
    arg = call.args[0]
    assert isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    text = arg.value.upper()
    if func.id == "SingleTag":
        int(text, 16)
    elif func.id != "RepeatingGroup":
        raise ValueError(f"unknown identifier {func.id}")
    return text.replace("X", "x")


def parse_idiscore(text: str) -> dict[str, dict[str, str]]:
    """{column: {tag key: code}} from idiscore's ``_public_dicom.py``."""
    tree = ast.parse(text)
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        target = node.targets[0]
        assert isinstance(target, ast.Name)
        kw = {k.arg: k.value for k in node.value.keywords}
        rules = kw["rules"]
        assert isinstance(rules, ast.List)
        col: dict[str, str] = {}
        for elt in rules.elts:
            assert isinstance(elt, ast.Tuple)
            ident, action = elt.elts
            assert isinstance(ident, ast.Call) and isinstance(action, ast.Attribute)
            key = tag_key(ident)
            code = CODES[action.attr]
            if key in col and col[key] != code:
                raise ValueError(f"{target.id}: {key} listed twice with different codes")
            col[key] = code
        out[target.id] = col
    return out


def parse_anonymizer(text: str) -> dict[str, str]:
    """{tag key: code} of the Basic Profile column from a dicom-anonymizer fields file."""
    tree = ast.parse(text)
    out: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
            continue
        target = node.targets[0]
        assert isinstance(target, ast.Name)
        if target.id not in ANON_LISTS:
            continue
        for elt in node.value.elts:
            values = [ast.literal_eval(v) for v in elt.elts]  # type: ignore[attr-defined]
            if len(values) == 2:
                key = f"{values[0]:04X}{values[1]:04X}"
            else:  # (group, element, group mask, element mask): a repeating group
                g, e, gm, em = values
                gtxt = "".join(
                    c if (gm >> (12 - 4 * i)) & 0xF else "x" for i, c in enumerate(f"{g:04X}")
                )
                etxt = "".join(
                    c if (em >> (12 - 4 * i)) & 0xF else "x" for i, c in enumerate(f"{e:04X}")
                )
                key = gtxt + etxt
            out[key] = ANON_LISTS[target.id]
    return out


def idiscore_keywords(text: str) -> dict[str, str]:
    """{tag key: keyword} from the trailing comments of idiscore's rules (newer attributes
    than pydicom's dictionary knows still get a keyword)."""
    return {
        m.group(1).upper(): m.group(2)
        for m in re.finditer(r'SingleTag\("([0-9a-fA-F]{8})"\)[^#]*?#\s*(\w+)', text)
        if m.group(2) != "Unknown"
    }


def anonymizer_names(text: str) -> dict[str, str]:
    """{tag key: name} from the comments of a dicom-anonymizer fields file."""
    return {
        (m.group(1) + m.group(2)).upper(): m.group(3).strip()
        for m in re.finditer(r"\(0x([0-9A-Fa-f]{4}), 0x([0-9A-Fa-f]{4})\),\s*#\s*(.+)", text)
    }


def describe(key: str) -> tuple[str, str]:
    """(keyword, name) of a table key from pydicom's dictionary ("" when it has none)."""
    if key == "PRIVATE":
        return "", "Private Attributes"
    if "x" in key:
        entry = RepeatersDictionary.get(key)
        if entry:
            return entry[4], entry[2]
        return "", {"50xxxxxx": "Curve Data"}.get(key, "")
    tag = int(key, 16)
    try:
        return keyword_for_tag(tag), dictionary_description(tag)
    except KeyError:
        return "", ""


def build(src: Path) -> tuple[str, list[str]]:
    """The CSV text and the cross-check report lines."""
    idis_text = wheel_member(src, "idiscore", "idiscore/_public_dicom.py")
    idis = parse_idiscore(idis_text)
    comment_kw = idiscore_keywords(idis_text)
    base = "dicomanonymizer/dicom_anonymization_databases/"
    a24 = parse_anonymizer(wheel_member(src, "dicom_anonymizer", base + "dicomfields_2024b.py"))
    a26_text = wheel_member(src, "dicom_anonymizer", base + "dicomfields_2026c.py")
    a26 = parse_anonymizer(a26_text)
    names26 = anonymizer_names(a26_text)
    basic = idis["basic_profile"]

    report: list[str] = []
    for label, other in (("2024b", a24), ("2026c", a26)):
        only_ours = sorted(set(basic) - set(other) - {"PRIVATE"})
        only_theirs = sorted(set(other) - set(basic))
        differ = sorted(k for k in set(basic) & set(other) if basic[k] != other[k])
        report.append(
            f"basic vs dicom-anonymizer {label}: {len(basic)} vs {len(other)} rows; "
            f"only in ours {len(only_ours)}, only in {label} {len(only_theirs)}, "
            f"codes differ {len(differ)}"
        )
        for k in only_ours:
            report.append(f"  only ours ({label}): {k} {describe(k)[0]} {basic[k]}")
        for k in only_theirs:
            report.append(f"  only {label}: {k} {describe(k)[0]} {other[k]}")
        for k in differ:
            report.append(
                f"  differs ({label}): {k} {describe(k)[0]} ours={basic[k]} {label}={other[k]}"
            )

    keys = set()
    for col in idis.values():
        keys |= set(col)
    missing_basic = sorted(keys - set(basic))
    for k in missing_basic:
        report.append(f"  option row without a basic code: {k} {describe(k)[0]}")

    def order(k: str) -> tuple[int, str]:
        return (1, k) if k == "PRIVATE" else (0, k)

    buf = io.StringIO()
    buf.write(f"# {EDITION}: Basic Application Level Confidentiality Profile and options.\n")
    buf.write("# Generated by scripts/gen_annex_e.py -- do not edit by hand; rerun it.\n")
    buf.write(
        "# Source: PyPI idiscore 1.6.0 (idiscore/_public_dicom.py, scraped from the standard's\n"
        "# part15 chapter E 'current' edition on 2025-06-24), every column; Basic column\n"
        "# cross-checked against PyPI dicom-anonymizer 2.1.0 dicomfields_2024b.py and\n"
        "# dicomfields_2026c.py (see the script's report).\n"
    )
    buf.write(
        "# tag: 8 hex digits, 'x' = any hex digit of a repeating group, PRIVATE = all private\n"
        "# attributes. Codes: D Z X K C U and the combinations X/Z X/D X/Z/D X/Z/U* Z/D;\n"
        "# an empty option cell means the option does not change the Basic action.\n"
    )
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["tag", "keyword", "name", *[c for _, c in COLUMNS]])
    for k in sorted(keys, key=order):
        kw, name = describe(k)
        kw = kw or comment_kw.get(k, "")
        # Attributes newer than pydicom's dictionary: the name from dicom-anonymizer's comment.
        name = name or names26.get(k, "")
        writer.writerow(
            [k, kw, name, *[idis.get(src_col, {}).get(k, "") for src_col, _ in COLUMNS]]
        )
    return buf.getvalue(), report


def main() -> int:
    """Regenerate or check the table; print the cross-check report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file")
    parser.add_argument("--src", type=Path, help="directory holding the two wheels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or Path(tmp)
        if args.src is None:
            fetch(src)
        text, report = build(src)
    print("\n".join(report))
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} differs from the generated table")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
