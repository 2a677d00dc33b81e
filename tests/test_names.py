"""Names built from PACS strings: safe, bounded and injective."""

from __future__ import annotations

import itertools

from mdm.access.views import View
from mdm.namespace.names import is_uid, safe_name, uid_name
from mdm.namespace.naming import AliasTable

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


def test_alias_table_is_bounded() -> None:
    """Remapped UIDs are remembered to resolve them back, oldest out first past a bound (a
    forgotten one is found again by listing its parent)."""
    table = AliasTable(limit=20)
    view = View("deidentified", "trial", b"k" * 32)
    uids = [f"1.2.3.{i}" for i in range(50)]
    shown = [view.uid_name(u) for u in uids]
    for n, u in zip(shown, uids, strict=True):
        table.learn(n, u)
    assert all(n.startswith("2.25.") and n != u for n, u in zip(shown, uids, strict=True))
    assert len(table) <= 20
    assert table.original(shown[-1]) == uids[-1]  # the newest still resolve directly
    assert table.original(shown[0]) == shown[0]  # the oldest are gone: listing finds them
    table.learn(shown[0], uids[0])
    assert table.original(shown[0]) == uids[0]
    table.learn("1.2.3", "1.2.3")  # a name shown as it is needs no alias
    assert "1.2.3" not in table
