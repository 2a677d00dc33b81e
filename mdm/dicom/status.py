"""DIMSE status codes: their names and categories, and the codes our storage SCP answers."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.status import (
    GENERAL_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

_TABLES: dict[str, dict[int, tuple[str, str]]] = {
    "echo": GENERAL_STATUS,
    "find": {**GENERAL_STATUS, **QR_FIND_SERVICE_CLASS_STATUS},
    "move": {**GENERAL_STATUS, **QR_MOVE_SERVICE_CLASS_STATUS},
    "get": {**GENERAL_STATUS, **QR_GET_SERVICE_CLASS_STATUS},
    "store": {**GENERAL_STATUS, **STORAGE_SERVICE_CLASS_STATUS},
}

PENDING = "Pending"
SUCCESS = "Success"
WARNING = "Warning"
FAILURE = "Failure"
CANCEL = "Cancel"


def status_code(status: Dataset) -> int | None:
    """The (0000,0900) Status of a response, or None for pynetdicom's empty status dataset
    (timeout, abort, invalid response)."""
    code = status.get("Status", None)
    return int(code) if isinstance(code, int) else None


def status_category(code: int) -> str:
    """Pending, Success, Warning, Failure or Cancel (unknown codes count as Failure)."""
    cat = str(code_to_category(code))
    return cat if cat in (PENDING, SUCCESS, WARNING, CANCEL) else FAILURE


def status_name(service: str, code: int) -> str:
    """A readable name for a DIMSE status, e.g. ``Failure 0xA701 (Refused: Out of Resources)``.

    ``service`` is one of ``echo``, ``find``, ``move``, ``get``, ``store``.
    """
    table = _TABLES.get(service, GENERAL_STATUS)
    cat = status_category(code)
    desc = table.get(code, ("", ""))[1]
    return f"{cat} 0x{code:04X}" + (f" ({desc})" if desc else "")


# Status codes the bridge's storage SCP answers with.
STORE_SUCCESS = 0x0000
STORE_NOT_AUTHORISED = 0x0124  # PS3.7 C.5: "Refused: Not Authorized" - nobody asked for it
STORE_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class not supported" - not on its context
STORE_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: no data set, or not a well-formed copy
STORE_OUT_OF_RESOURCES = 0xA700  # the cache is full
STORE_PROCESSING_FAILURE = 0x0110  # the sink failed for another reason
STORE_HANDLER_FAILED = 0xC211  # pynetdicom's answer when the C-STORE handler raises
