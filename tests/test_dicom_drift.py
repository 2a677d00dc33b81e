"""Drift guard for the DICOM fast path (mdm/dicom/net.py).

The fast path subclasses pynetdicom's transport, DUL, DIMSE and association classes and
overrides some of their private methods, copying parts of upstream loops. Nothing else would
notice if a pynetdicom release changed what those methods do, so this test hashes the source
of every upstream method the fast path overrides, and of the upstream methods it copies,
per pinned pynetdicom version. A new version, or a changed method, fails here with the list:
re-read those upstream functions against ours, then record them again with
``.venv/bin/python -m tests.test_dicom_drift --record``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

import pynetdicom

from mdm.dicom import net

RECORD = Path(__file__).with_name("pynetdicom_upstream.json")


def overridden() -> dict[str, str]:
    """``Class.method`` of pynetdicom -> SHA-256 of its source, for every method a class of
    the fast path overrides."""
    out: dict[str, str] = {}
    for _name, ours in inspect.getmembers(net, inspect.isclass):
        if ours.__module__ != net.__name__:
            continue
        for base in ours.__mro__[1:]:
            if not base.__module__.startswith("pynetdicom"):
                continue
            for attr in vars(ours):
                upstream = vars(base).get(attr)
                if upstream is None or not callable(upstream) or attr.startswith("__"):
                    continue
                key = f"{base.__module__}.{base.__qualname__}.{attr}"
                src = inspect.getsource(upstream)
                out[key] = hashlib.sha256(src.encode()).hexdigest()
    return dict(sorted(out.items()))


def test_upstream_methods_the_fast_path_overrides_are_unchanged() -> None:
    recorded = json.loads(RECORD.read_text())
    version = pynetdicom.__version__
    assert version in recorded, (
        f"pynetdicom {version} is not verified against the fast path (verified: "
        f"{', '.join(sorted(recorded))}): re-read the upstream methods it overrides, then "
        "record them (python -m tests.test_dicom_drift --record)"
    )
    now = overridden()
    assert len(now) >= 8, now  # the guard itself must see the overrides
    changed = sorted(
        k for k in set(now) | set(recorded[version]) if now.get(k) != recorded[version].get(k)
    )
    assert not changed, f"upstream changed or the fast path's overrides changed: {changed}"


if __name__ == "__main__" and "--record" in sys.argv:
    doc = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    doc[pynetdicom.__version__] = overridden()
    RECORD.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    v = pynetdicom.__version__
    print(f"recorded {len(doc[v])} methods of pynetdicom {v}")
