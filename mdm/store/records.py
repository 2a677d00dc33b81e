"""The store's records: an object's reference (a SOP instance in one view) and its index
record (UIDs, sizes, the sealed key, times; never PHI)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field

from mdm.errors import IntegrityError
from mdm.store.keys import Scope

VIEWS = ("identified", "deidentified")
# A de-identified view of one pseudonym scope and one set of options (mdm.access.views.View).
_DEID_VIEW = re.compile(r"^deid/[A-Za-z0-9._-]{1,64}/[0-9a-f]{12}$")


@dataclass(frozen=True)
class ObjectRef:
    """One cached object: a SOP instance in one view."""

    sop_uid: str
    view: str = "identified"

    def __post_init__(self) -> None:
        if self.view not in VIEWS and not _DEID_VIEW.match(self.view):
            raise ValueError(
                f"view must be one of {VIEWS} or deid/SCOPE/OPTIONS, got {self.view!r}"
            )
        if not self.sop_uid or "\0" in self.sop_uid:
            raise ValueError("sop_uid must be non-empty and hold no NUL")

    def identity(self) -> bytes:
        """The bytes bound into every chunk and into the sealed key of this object."""
        return b"mdm-object-v1\0" + self.view.encode() + b"\0" + self.sop_uid.encode()

    def blob_name(self) -> str:
        """Hex SHA-256 of the identity: deterministic, uniform, reveals nothing about the UID."""
        name: str | None = self.__dict__.get("_blob_name")
        if name is None:
            name = hashlib.sha256(self.identity()).hexdigest()
            object.__setattr__(self, "_blob_name", name)  # computed once per ref
        return name


@dataclass
class ObjectInfo:
    """The index record of one cached object (UIDs, sizes, sealed key, times; never PHI)."""

    ref: ObjectRef
    scope: Scope
    size: int
    """Plaintext size."""
    stored_bytes: int
    """Size of the blob on disk."""
    sealed_key: bytes
    created: float
    last_access: float
    meta: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> bytes:
        """The LMDB value."""
        return json.dumps(
            {
                "v": 1,
                "uid": self.ref.sop_uid,
                "view": self.ref.view,
                "site": self.scope.site,
                "level": self.scope.level,
                "program": self.scope.program,
                "size": self.size,
                "stored": self.stored_bytes,
                "key": base64.b64encode(self.sealed_key).decode(),
                "created": self.created,
                "access": self.last_access,
                "meta": self.meta,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_record(cls, raw: bytes) -> ObjectInfo:
        """Parse an LMDB value; IntegrityError if it is malformed."""
        try:
            d = json.loads(raw)
            return cls(
                ref=ObjectRef(d["uid"], d["view"]),
                scope=Scope(d["site"], d["level"], d["program"]),
                size=int(d["size"]),
                stored_bytes=int(d["stored"]),
                sealed_key=base64.b64decode(d["key"], validate=True),
                created=float(d["created"]),
                last_access=float(d["access"]),
                meta={str(k): str(v) for k, v in d["meta"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"malformed object record ({type(e).__name__})") from None
