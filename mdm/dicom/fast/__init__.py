"""The DICOM fast path: pynetdicom's transport, DUL, DIMSE and association layers with the
overrides that make the bridge fast and hold a hostile peer to the limits of docs/DICOM.md.

Everything here touches pynetdicom's private names (overridden private methods, copied
upstream loops, ``__class__`` swaps, replaced internal queues); nothing outside this package
does. ``tests/test_dicom_drift.py`` fails when an upstream function copied or overridden
here changes. ``[bridge] fast_dicom = false`` runs without any of it (stock pynetdicom).

Public API: :class:`FastAE` (an application entity whose associations use the fast layers),
:func:`start_server`, :class:`ProgressQueue` (pending C-MOVE/C-GET responses reported
without waking the reader) and :data:`FAST_CLASSES`. The byte-level encoders are public for
the tests that compare them with pynetdicom's.
"""

from __future__ import annotations

from mdm.dicom.fast.ae import FastAE, start_server
from mdm.dicom.fast.association import (
    FastAssociation,
    FastRequestorAssociation,
    accepted_context,
)
from mdm.dicom.fast.dimse import (
    FastDIMSE,
    FastMessage,
    InlineStoreQueue,
    ProgressQueue,
    encode_pdata_tf,
    encode_store_response,
)
from mdm.dicom.fast.dul import FastDUL, pdv_items
from mdm.dicom.fast.transport import (
    FastAssociationSocket,
    GatedServer,
    TunedRequestHandler,
    tune_socket,
)

FAST_CLASSES: tuple[type, ...] = (
    FastAE,
    FastAssociation,
    FastRequestorAssociation,
    FastDUL,
    FastDIMSE,
    FastMessage,
    FastAssociationSocket,
    GatedServer,
    TunedRequestHandler,
    InlineStoreQueue,
    ProgressQueue,
)
"""Every class of the fast path that replaces one of pynetdicom's on a live association."""

__all__ = [
    "FAST_CLASSES",
    "FastAE",
    "FastAssociationSocket",
    "FastDIMSE",
    "FastDUL",
    "ProgressQueue",
    "accepted_context",
    "encode_pdata_tf",
    "encode_store_response",
    "pdv_items",
    "start_server",
    "tune_socket",
]
