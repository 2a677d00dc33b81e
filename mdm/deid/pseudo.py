"""Keyed pseudonyms: patient IDs, UIDs and per-patient date offsets from one secret.

Everything is HMAC-SHA256 under the secret of a policy scope (e.g. one per trial), with a
distinct label per purpose so a patient ID and a UID that happen to be equal strings never map
to related outputs. Same secret, same outputs, on any machine and in any run: a series still
loads as a volume and references between objects still resolve. Another secret gives unrelated
outputs, so two scopes cannot link their patients. Without the secret a pseudonym cannot be
reversed; re-identification goes through the identified view, never through these functions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

MIN_SECRET_BYTES = 16
UID_ROOT = "2.25."
MAX_OFFSET_DAYS = 3652
"""Dates move back by 1..MAX_OFFSET_DAYS days (up to ten years): a year-wide range would
leave the year of most dates recognisable."""


class Pseudonymizer:
    """The keyed functions of one scope secret."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a pseudonym secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        # Never show the secret (it may end up in a log line or a traceback).
        return "Pseudonymizer(<secret>)"

    def _mac(self, label: bytes, value: str) -> bytes:
        return hmac.new(
            self._secret, label + b"\0" + value.encode("utf-8"), hashlib.sha256
        ).digest()

    def patient_id(self, pid: str) -> str:
        """``"P"`` + 16 base32 characters (80 bits) of HMAC(pid): fits LO (and SH)."""
        digest = self._mac(b"mdm-deid-patient-id", pid.strip())
        return "P" + base64.b32encode(digest[:10]).decode("ascii")

    def uid(self, uid: str) -> str:
        """``"2.25."`` + the integer of the first 16 bytes of HMAC(uid) (at most 44 chars)."""
        digest = self._mac(b"mdm-deid-uid", uid.strip().rstrip("\0"))
        return UID_ROOT + str(int.from_bytes(digest[:16], "big"))

    def date_offset(self, pid: str) -> int:
        """Days (in ``-MAX_OFFSET_DAYS..-1``) added to every date of this patient's objects."""
        digest = self._mac(b"mdm-deid-date-offset", pid.strip())
        return -1 - int.from_bytes(digest[:8], "big") % MAX_OFFSET_DAYS
