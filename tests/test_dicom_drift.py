"""Drift guard for the DICOM fast path (the package mdm/dicom/fast/).

The fast path subclasses pynetdicom's transport, DUL, DIMSE and association classes and
overrides some of their private methods, copying parts of upstream loops; other upstream
functions it replicates without overriding them (a state-machine action done inline, the
non-blocking branch of ``start_server``), or whose contract its replaced queues depend on.
Nothing else would notice if a pynetdicom release changed what those functions do, so this
test hashes the source of:

* every pynetdicom method, constructor or property that a class of ``mdm.dicom.fast``
  overrides (found by walking the package: a new override is covered without editing this
  file);
* every upstream function in :data:`COPIED` (listed by hand, with the reason).

per pinned pynetdicom version. A new version, or a changed function, fails here with the
list: re-read those upstream functions against ours, then record them again with
``.venv/bin/python -m tests.test_dicom_drift --record``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import pynetdicom

import mdm.dicom.fast

RECORD = Path(__file__).with_name("pynetdicom_upstream.json")

COPIED: dict[str, str] = {
    "pynetdicom.fsm.DT_1": "FastDIMSE._send_now writes a C-STORE-RSP as DT-1 would",
    "pynetdicom.fsm.DT_2": "FastDUL._read_pdu_data hands a P-DATA-TF to DIMSE as DT-2 would",
    "pynetdicom.fsm.AA_1": "FastDUL.abort_now sends the A-ABORT that AA-1 sends",
    "pynetdicom.fsm.AA_4": "FastDUL.abort_now wakes the waiters AA-4 wakes",
    "pynetdicom.dul.DULServiceProvider._decode_pdu": "FastDUL._read_pdu_data's fallback",
    "pynetdicom.dul.DULServiceProvider._is_transport_event": "called by FastDUL's loop",
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive": "called by FastDUL's loop",
    "pynetdicom.ae.ApplicationEntity.start_server": "fast.start_server, non-blocking branch",
    "pynetdicom.association.Association._wrap_get_move_responses": (
        "ProgressQueue drops pending responses this generator would only count"
    ),
    "pynetdicom.dimse.DIMSEServiceProvider.get_msg": (
        "the requestor reactor and InlineStoreQueue depend on its queue protocol"
    ),
    "pynetdicom.service_class.StorageServiceClass.SCP": (
        "FastAssociation.serve_store answers a C-STORE as this SCP does"
    ),
    "pynetdicom.service_class.attempt": "FastAssociation.serve_store's 0xC211 on a raise",
}
"""Upstream functions the fast path replicates or depends on without overriding them."""


def _fast_classes() -> list[type]:
    out: list[type] = []
    pkg = mdm.dicom.fast
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                out.append(cls)
    return out


def _source(obj: Any) -> str:
    if isinstance(obj, property):
        parts = [inspect.getsource(f) for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
        return "\n".join(parts)
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    return inspect.getsource(obj)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def overridden() -> dict[str, str]:
    """``module.Class.attr`` of pynetdicom -> SHA-256 of its source, for every method,
    constructor or property that a class of the fast path overrides."""
    out: dict[str, str] = {}
    for ours in _fast_classes():
        for base in ours.__mro__[1:]:
            if not base.__module__.startswith("pynetdicom"):
                continue
            for attr, mine in vars(ours).items():
                upstream = vars(base).get(attr)
                if upstream is None or not (
                    inspect.isfunction(upstream)
                    or isinstance(upstream, property | staticmethod | classmethod)
                ):
                    continue
                if not (callable(mine) or isinstance(mine, property)):
                    continue
                out[f"{base.__module__}.{base.__qualname__}.{attr}"] = _digest(_source(upstream))
    return out


def copied() -> dict[str, str]:
    """``module.function`` (or ``module.Class.method``) -> SHA-256 of its source, for
    :data:`COPIED`."""
    out: dict[str, str] = {}
    for dotted in COPIED:
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name)
            out[dotted] = _digest(_source(obj))
            break
    return out


def upstream_hashes() -> dict[str, str]:
    return dict(sorted({**overridden(), **copied()}.items()))


def test_the_guard_sees_every_override() -> None:
    """The walk finds the private methods the fast path is known to override (a guard that
    saw nothing would pass whatever upstream did)."""
    now = overridden()
    for key in (
        "pynetdicom.ae.ApplicationEntity._create_socket",
        "pynetdicom.dul.DULServiceProvider._read_pdu_data",
        "pynetdicom.dul.DULServiceProvider.run_reactor",
        "pynetdicom.dul.DULServiceProvider.__init__",
        "pynetdicom.association.Association._run_reactor",
        "pynetdicom.association.Association._serve_request",
        "pynetdicom.transport.RequestHandler._create_association",
        "pynetdicom.transport.AssociationSocket.ready",
        "pynetdicom.dimse_messages.DIMSEMessage.__init__",
        "pynetdicom.dimse_messages.DIMSEMessage.decode_msg",
    ):
        assert key in now, key
    assert set(copied()) == set(COPIED)


def test_upstream_functions_the_fast_path_copies_or_overrides_are_unchanged() -> None:
    recorded = json.loads(RECORD.read_text())
    version = pynetdicom.__version__
    assert version in recorded, (
        f"pynetdicom {version} is not verified against the fast path (verified: "
        f"{', '.join(sorted(recorded))}): re-read the upstream functions it overrides or "
        "copies, then record them (python -m tests.test_dicom_drift --record)"
    )
    now = upstream_hashes()
    changed = sorted(
        k for k in set(now) | set(recorded[version]) if now.get(k) != recorded[version].get(k)
    )
    assert not changed, f"upstream changed or the fast path's overrides changed: {changed}"


if __name__ == "__main__" and "--record" in sys.argv:
    doc = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    doc[pynetdicom.__version__] = upstream_hashes()
    RECORD.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    v = pynetdicom.__version__
    print(f"recorded {len(doc[v])} functions of pynetdicom {v}")
