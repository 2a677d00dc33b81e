"""Reads: opening a file of the namespace for a principal, and re-checking it while it is read.

:class:`Reads` opens what :class:`~mdm.namespace.tree.Namespace` resolves: a ``.metadata.json``
document from memory, or an object from the encrypted store, retrieved first if it is not
cached in the principal's view. Every open is audited (allow, deny or error, with the key use
that serves it; fail closed: no byte is served without its record). An :class:`OpenFile`
re-checks the decision at most once a second while it is read, so a revoked grant or an
expired token stops reads of files already open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from mdm.access.gate import Gate, Who, audit_principal
from mdm.access.identity import Principal
from mdm.audit.log import AuditError
from mdm.errors import AccessDenied, NotFound
from mdm.namespace.names import is_uid
from mdm.namespace.naming import Names
from mdm.namespace.opening import open_audited, revocation_check
from mdm.namespace.tree import Namespace, Node
from mdm.ops import metrics
from mdm.retrieval.targets import Targets
from mdm.store.objects import ObjectReader, ObjectStore
from mdm.store.records import ObjectRef
from mdm.volume.service import SUFFIXES as VOLUME_SUFFIXES

_HIT, _MISS = (metrics.CACHE_LOOKUPS.labels(r) for r in ("hit", "miss"))


@dataclass
class OpenFile:
    """An open file: a pinned, decrypting reader, or a small in-memory document."""

    reader: ObjectReader | None = None
    data: bytes | None = None
    size: int = 0
    exact_before: bool = True
    released: bool = field(default=False)
    recheck: Callable[[], None] | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` (fewer at EOF)."""
        return bytes(self.read_view(offset, length))

    def read_view(self, offset: int, length: int) -> memoryview:
        """Like :meth:`read`, without copying what is already in memory."""
        if self.recheck is not None:
            self.recheck()
        if self.data is not None:
            return memoryview(self.data)[offset : offset + length]
        assert self.reader is not None
        return self.reader.read_view(offset, length)

    def read_transient(self, offset: int, length: int) -> memoryview:
        """Like :meth:`read_view`; the view is valid only until the next read of this file
        (see :meth:`~mdm.store.objects.ObjectReader.read_transient`)."""
        if self.recheck is not None:
            self.recheck()
        if self.data is not None:
            return memoryview(self.data)[offset : offset + length]
        assert self.reader is not None
        return self.reader.read_transient(offset, length)

    def release(self) -> None:
        """Unpin the object; idempotent."""
        if not self.released and self.reader is not None:
            self.reader.close()
        self.released = True


class Reads:
    """Open files of the namespace for a given principal (see the module docstring)."""

    def __init__(
        self, namespace: Namespace, gate: Gate, names: Names, store: ObjectStore, targets: Targets
    ) -> None:
        self.namespace = namespace
        self.gate = gate
        self.names = names
        self.store = store
        self.targets = targets

    async def open(self, who: Who, path: tuple[str, ...]) -> OpenFile:
        """Open a file for reading as ``who``; retrieves the object first if not cached."""
        try:
            node = await self.namespace.resolve(who, path)
        except (NotFound, AccessDenied) as e:
            # Audited too, with what the path names that is not PHI (a UID, never a name).
            stem = path[-1].removesuffix(".dcm") if path else ""
            res = {"sop_uid": stem} if path and path[-1].endswith(".dcm") and is_uid(stem) else {}
            with contextlib.suppress(AuditError):  # denied either way (and logged)
                self.gate.record(audit_principal(who), "open", "deny", res, reason=type(e).__name__)
            raise
        if node.kind == "metadata":
            data = self.namespace.metadata(who, node)
            return OpenFile(data=data, size=len(data))
        if node.kind in VOLUME_SUFFIXES and self.namespace.volumes is not None:
            reader, cached, check = await self.namespace.volumes.open(who, node)
            return OpenFile(reader=reader, size=reader.size, exact_before=cached, recheck=check)
        if node.kind != "instance":
            raise NotFound("not a file")
        assert node.decision and node.instance and node.series and node.study and node.view
        v = node.view
        if v.kind == "metadata":
            with contextlib.suppress(AuditError):  # denied either way (and logged)
                self._audit_open(audit_principal(who), node, "deny")
            raise AccessDenied(f"{who().label()} may see but not read {node.instance.uid}")
        principal = who()
        inst, study, series = node.instance, node.study, node.series
        store_view = v.store_view
        # A series read ahead moves its window with each open, cached or not.
        self.targets.opened(series.uid, store_view, inst.uid)

        async def get() -> tuple[ObjectReader, bool]:
            # One index lookup when the object is cached (the open itself); retrieve otherwise.
            try:
                reader = await self._open_cached(ObjectRef(inst.uid, store_view), principal)
                _HIT.inc()
                return reader, True
            except NotFound:
                _MISS.inc()
                info = await self.targets.fetch_instance(
                    study, series, inst, prefer=node.site, view=v
                )
                return await self._open_cached(info.ref, principal), False

        # One record per open: the decision, and the key use that serves it (fail closed:
        # no byte is served without it).
        reader, exact_before = await open_audited(
            get, lambda d, **kw: self._audit_open(principal, node, d, **kw), v
        )
        recheck = revocation_check(self.gate, self.names, who, study, series, v)
        return OpenFile(reader=reader, size=reader.size, exact_before=exact_before, recheck=recheck)

    async def _open_cached(self, ref: ObjectRef, principal: Principal) -> ObjectReader:
        """Open a cached object (NotFound if it is not cached)."""
        if self.store.keys.remote:
            # Key servers answer over the network: keep the trio thread free meanwhile.
            return await trio.to_thread.run_sync(self.store.open, ref, principal)
        # A local unwrap is one AES-GCM on a 32-byte key and an LMDB read (tens of µs); a
        # thread hand-off would cost more than that and delay the reader's open.
        return self.store.open(ref, principal)

    def _audit_open(self, principal: Principal, node: Node, decision: str, **extra: Any) -> None:
        assert node.instance and node.series and node.study and node.decision
        d = node.decision
        self.gate.record(
            principal,
            "open",
            decision,
            {
                "study_uid": node.study.uid,
                "series_uid": node.series.uid,
                "sop_uid": node.instance.uid,
            },
            rule=d.rule,
            policy=d.version,
            level=d.level.label,
            **extra,
        )
