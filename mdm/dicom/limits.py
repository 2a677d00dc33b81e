"""Limits on what a DICOM peer can make the bridge hold, and the error that ends an
association which breaks one (docs/DICOM.md, Limits).

Which of them hold with the stock pynetdicom layers (``[bridge] fast_dicom = false``) and
which only on the fast path is listed in docs/DICOM.md.
"""

from __future__ import annotations

MAX_ASSOCIATE_PDU = 1 << 20
"""Largest A-ASSOCIATE-RQ/AC accepted (one with 128 contexts x 30 syntaxes is ~100 KB)."""
DEFAULT_MAX_PDU = 4 << 20
"""The largest PDU we announce when ``bridge.max_pdu`` is 0 (no explicit choice): never
"unlimited", so that a peer cannot make us read a PDU of any length."""
PART10_PREFIX = "_mdm_part10_prefix"
"""Attribute of a received C-STORE request primitive: the length of the Part-10 header
written ahead of its data set in ``DataSet`` (absent: the data set alone)."""
PDU_SLACK = 64
"""Bytes over the announced maximum tolerated (peers differ on what the maximum counts)."""
MAX_MESSAGE_BYTES = 1 << 30
"""Largest DIMSE message (command set and data set) received; the association is aborted."""
ASSOCIATE_DEADLINE = 10.0
"""Seconds an inbound connection has to present its A-ASSOCIATE-RQ."""
MAX_UNAUTHENTICATED = 8
"""Inbound connections that have not yet been associated, at most, per listener."""


class PeerViolation(Exception):
    """A peer broke the protocol or a limit: the association is aborted at once. The message
    carries no byte sent by the peer."""


def max_pdu_of(max_pdu: int) -> int:
    """The maximum receive PDU we announce: ``bridge.max_pdu``, or DEFAULT_MAX_PDU for 0
    (PS3.8's "unlimited" would let a peer send a PDU of any length)."""
    return int(max_pdu) if int(max_pdu) > 0 else DEFAULT_MAX_PDU
