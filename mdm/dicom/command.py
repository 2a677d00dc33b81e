"""Direct reading of the DIMSE command sets that arrive once per object.

pynetdicom decodes every command set into a pydicom ``Dataset`` and then copies it element
by element into a primitive: about 0.3 ms of CPU per message, paid for every C-STORE-RQ the
storage SCP receives and for every pending C-MOVE/C-GET response a retrieval reads, on the
thread that also reads the socket. A command set is a short run of group 0000 elements in
Implicit VR Little Endian, each with a fixed value representation (PS3.7 E.1). The three
per-object messages (C-STORE-RQ, C-MOVE-RSP, C-GET-RSP) are read here straight into
pynetdicom's own primitives, through their validating setters.

Anything else — another message, an element outside the message's usual set (an error
comment, an offending element...), a value of the wrong length, bytes that are not ASCII, a
truncated or repeated element, a setter that refuses a value — returns ``None`` and the
message takes pynetdicom's path unchanged. ``tests/test_dicom_command.py`` checks that both
paths give equal primitives for the same bytes.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE

_HEAD = struct.Struct("<HHI")  # group, element, value length

# element -> (keyword, value representation)
_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
# Elements of the message itself, not parameters of the primitive (pynetdicom skips them too).
_NOT_PARAMETERS = frozenset({"CommandGroupLength", "CommandField", "CommandDataSetType"})

_RSP = frozenset(
    {
        "CommandGroupLength",
        "AffectedSOPClassUID",
        "CommandField",
        "MessageIDBeingRespondedTo",
        "CommandDataSetType",
        "Status",
        "NumberOfRemainingSuboperations",
        "NumberOfCompletedSuboperations",
        "NumberOfFailedSuboperations",
        "NumberOfWarningSuboperations",
    }
)
# CommandField -> (primitive class, keywords it may carry, name of its data set parameter)
_FAST: dict[int, tuple[type[Any], frozenset[str], str]] = {
    0x0001: (
        C_STORE,
        frozenset(
            {
                "CommandGroupLength",
                "AffectedSOPClassUID",
                "CommandField",
                "MessageID",
                "Priority",
                "CommandDataSetType",
                "AffectedSOPInstanceUID",
                "MoveOriginatorApplicationEntityTitle",
                "MoveOriginatorMessageID",
            }
        ),
        "DataSet",
    ),
    0x8021: (C_MOVE, _RSP, "Identifier"),
    0x8010: (C_GET, _RSP, "Identifier"),
}

NO_DATA_SET = 0x0101


def decode_command(raw: bytes) -> dict[str, Any] | None:
    """Keyword -> value of a command set made only of the elements above, else ``None``."""
    out: dict[str, Any] = {}
    off, end = 0, len(raw)
    while off < end:
        if off + 8 > end:
            return None
        group, element, length = _HEAD.unpack_from(raw, off)
        off += 8
        spec = _ELEMENTS.get(element)
        if group != 0 or spec is None or length == 0 or off + length > end:
            return None
        keyword, vr = spec
        if keyword in out:
            return None
        value = raw[off : off + length]
        off += length
        if vr == "US":
            if length != 2:
                return None
            out[keyword] = int.from_bytes(value, "little")
        elif vr == "UL":
            if length != 4:
                return None
            out[keyword] = int.from_bytes(value, "little")
        else:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return None
            # pydicom: a UI value loses its trailing NUL padding, an AE its spaces.
            text = text.rstrip("\x00") if vr == "UI" else text.strip(" ")
            if not text or not text.isprintable():
                return None
            out[keyword] = text
    return out


def read_command(raw: bytes) -> tuple[Any, bool, str] | None:
    """The primitive of a C-STORE-RQ, C-MOVE-RSP or C-GET-RSP command set, whether a data set
    follows, and the primitive's data set parameter; ``None`` for anything else."""
    fields = decode_command(raw)
    if fields is None or "CommandDataSetType" not in fields:
        return None
    spec = _FAST.get(fields.get("CommandField", -1))
    if spec is None:
        return None
    cls, allowed, dataset_keyword = spec
    if not fields.keys() <= allowed:
        return None
    primitive = cls()
    try:
        for keyword, value in fields.items():
            if keyword not in _NOT_PARAMETERS:
                setattr(primitive, keyword, value)
    except (ValueError, TypeError):
        return None
    return primitive, fields["CommandDataSetType"] != NO_DATA_SET, dataset_keyword
