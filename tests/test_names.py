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


def test_remapped_uid_aliases_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A de-identified mount remembers remapped UIDs to resolve them back, oldest out first
    past a bound (a forgotten one is found again by listing its parent)."""
    from collections import OrderedDict

    import mdm.namespace.bridge
    from mdm.access.views import View
    from mdm.namespace.bridge import Bridge

    monkeypatch.setattr(mdm.namespace.bridge, "MAX_ALIASES", 20)
    bridge = Bridge.__new__(Bridge)
    bridge._aliases = OrderedDict()
    view = View("deidentified", "trial", b"k" * 32)
    uids = [f"1.2.3.{i}" for i in range(50)]
    names = [bridge._name(view, u) for u in uids]
    assert all(n.startswith("2.25.") and n != u for n, u in zip(names, uids, strict=True))
    assert len(bridge._aliases) <= 20
    assert bridge._original(names[-1]) == uids[-1]  # the newest still resolve directly
    assert bridge._original(names[0]) == names[0]  # the oldest are gone: listing finds them
    assert bridge._name(view, uids[0]) == names[0]  # and the mapping is the same again
    assert bridge._original(names[0]) == uids[0]
