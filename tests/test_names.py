"""Names built from PACS strings: safe, bounded and injective."""

from __future__ import annotations

import itertools

from mdm.namespace.names import is_uid, safe_name, uid_name

HOSTILE = [
    "../../etc/passwd",
    "..",
    ".",
    "",
    "a/b",
    "a_b",
    "a\x00b",
    "line\nbreak",
    ".hidden",
    "x" * 400,
    "name~0123456789",
    "DOE^JOHN",
    "back\\slash",
]


def test_safe_names_are_safe() -> None:
    for s in HOSTILE:
        n = safe_name(s)
        assert "/" not in n and "\x00" not in n and "\\" not in n
        assert n not in ("", ".", "..") and not n.startswith(".")
        assert all(ord(c) >= 0x20 for c in n)
        assert len(n.encode()) <= 255


def test_injective() -> None:
    names = [safe_name(s) for s in HOSTILE]
    assert len(set(names)) == len(names)
    for a, b in itertools.combinations(HOSTILE, 2):
        assert safe_name(a) != safe_name(b)


def test_plain_names_unchanged() -> None:
    assert safe_name("MDM0001") == "MDM0001"
    assert uid_name("1.2.840.10008.1.2") == "1.2.840.10008.1.2"
    assert is_uid("1.2.3") and not is_uid("1.2.a") and not is_uid("1." + "2" * 70)
    assert uid_name("../1.2") != "../1.2"
