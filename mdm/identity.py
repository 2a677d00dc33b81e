"""Who a mount runs as: the principal, verified from a JWT (or the local administrator)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Principal:
    """A verified identity. ``admin`` is the local administrator of a single-user workstation."""

    sub: str
    issuer: str
    groups: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    admin: bool = False

    def label(self) -> str:
        """``sub@issuer``, for logs and audit records (never contains PHI)."""
        return f"{self.sub}@{self.issuer}"


LOCAL_ADMIN = Principal(sub="local-admin", issuer="local", admin=True)
