"""Crash recovery and verification of the store: what a start-up sweeps away (temporaries,
orphan blobs, records whose blob is missing or short) and the full check of every chunk."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mdm.access.identity import Principal
from mdm.errors import IntegrityError, KeyUnavailable, NotFound
from mdm.store.records import ObjectRef

if TYPE_CHECKING:
    from mdm.store.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`ObjectStore.recover` cleaned up."""

    tmp_removed: int
    orphans_removed: int
    records_dropped: int
    objects: int
    bytes: int
    exclusive: bool
    """False if another process had the store open, so tmp/ and orphans were left alone."""


@dataclass(frozen=True)
class VerifyProblem:
    """One object that failed :meth:`ObjectStore.verify`."""

    ref: ObjectRef
    reason: str


def sweep(store: ObjectStore, exclusive: bool) -> RecoveryReport:
    """The clean-up of :meth:`ObjectStore.recover` (the store lock held; ``exclusive``: no
    other process has the store open, so its temporaries and orphans may go too)."""
    tmp_removed = orphans_removed = 0
    if exclusive:
        for entry in os.scandir(store.tmp_dir):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                os.unlink(entry.path)
                tmp_removed += 1
    with store.env.begin(write=True) as txn:
        store.index.flush_touched(txn)
        records = store.index.records(txn)
        dropped = 0
        total = 0
        for name, info in records.items():
            path = store.blob_path(name)
            try:
                size: int | None = path.stat().st_size
            except FileNotFoundError:
                size = None
            if info is not None and size == info.stored_bytes:
                total += info.stored_bytes
                continue
            store.index.drop(txn, name, info)
            if size is not None:
                path.unlink(missing_ok=True)
            dropped += 1
        # Recompute the sum (and drop stray LRU entries) so accounting cannot drift.
        store.index.set_committed(txn, total)
        store.index.drop_stray_lru(txn, records)
        kept = {n for n, i in records.items() if i is not None} if exclusive else set()
    if exclusive:
        for sub in os.scandir(store.objects_dir):
            if not sub.is_dir(follow_symlinks=False):
                os.unlink(sub.path)
                orphans_removed += 1
                continue
            for entry in os.scandir(sub.path):
                if entry.name not in kept or entry.name[:2] != sub.name:
                    if entry.is_dir(follow_symlinks=False):
                        log.warning("unexpected directory in the store: %s", entry.path)
                        continue
                    os.unlink(entry.path)
                    orphans_removed += 1
    return RecoveryReport(
        tmp_removed=tmp_removed,
        orphans_removed=orphans_removed,
        records_dropped=dropped,
        objects=len(records) - dropped,
        bytes=total,
        exclusive=exclusive,
    )


def verify(store: ObjectStore, principal: Principal) -> list[VerifyProblem]:
    """Authenticate every chunk of every object and check its sizes; list the failures
    (each damaged object is dropped, as any read that meets it does: ObjectStore.corrupt).

    Does not count as an access for the LRU order.
    """
    problems: list[VerifyProblem] = []
    for ref in store.list_refs():
        try:
            reader = store.open_untouched(ref, principal)
        except NotFound:
            continue  # evicted meanwhile
        except (IntegrityError, KeyUnavailable) as e:
            problems.append(VerifyProblem(ref, str(e)))
            continue
        with reader:
            try:
                # Chunk by chunk, so memory stays bounded by the chunk size.
                step = reader.chunk_size
                if reader.size == 0:
                    reader.read(0, 0)
                for off in range(0, reader.size, step):
                    reader.read(off, step)
            except IntegrityError as e:
                problems.append(VerifyProblem(ref, str(e)))
    return problems
