"""Safe file names from PACS-supplied strings.

A hostile PACS must never be able to shape a path: no '/', NUL, '.' or '..', no control
characters, bounded length. A string that had to be changed gets a short keyed-free hash suffix
so two different originals never collide (``A/B`` and ``A_B`` map to different names).
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_BAD = re.compile(r"[\x00-\x1f\x7f/\\]")
MAX_NAME = 128


def _suffix(original: str) -> str:
    return "~" + hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def safe_name(original: str) -> str:
    """A file name for ``original`` that is safe and distinct from that of any other string."""
    s = _BAD.sub("_", original).strip()
    if len(s) > MAX_NAME:
        s = s[:MAX_NAME]
    if s in ("", ".", "..") or s.startswith("."):
        s = "_" + s
    # The "~" suffix is reserved for changed names, so an original containing "~" that looks
    # like a changed name is itself changed: the mapping stays injective.
    if s != original or "~" in original:
        s = s + _suffix(original)
    return s


def is_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return len(value) <= 64 and bool(_UID_RE.match(value))


def uid_name(uid: str) -> str:
    """The directory or file stem for a UID (UIDs pass unchanged when valid)."""
    return uid if is_uid(uid) else safe_name(uid)
