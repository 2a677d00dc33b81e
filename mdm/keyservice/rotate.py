"""``mdm keys rotate SCOPE``: re-seal every share of a scope under new server keys.

No data is re-encrypted and no share leaves its server in clear: each server re-seals its own
shares (``/v1/admin/rotate/reseal``) from its old scope key to a new one. The steps:

1. ``begin`` on every server: each adds a pending key (idempotent: a crashed rotation finds the
   same pending key again). The new public keys go into ``public-keys.json`` at once, so a
   running mount seals new objects to them.
2. :func:`rotate_records`: for every record of the scope in the store's LMDB index, every share
   whose key id is not the new one is re-sealed by its server and the record rewritten (one
   txn per record, only if it did not change meanwhile). Shares already re-sealed are skipped,
   so a re-run after a crash resumes where it stopped.
3. ``finish`` on every server: the pending key becomes current and the old keys are deleted.

The journal ``<cache>/keyservice-rotate.json`` names the rotation in progress (scope and new
key ids) until step 3 is done; ``rotate`` refuses to start a different scope while it exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdm.config import KeySettings
from mdm.errors import IntegrityError, KeyUnavailable, UserError
from mdm.keyservice.client import PUBLIC_FILE, HttpsPool, ServerError, write_public_keys
from mdm.keyservice.wire import SealedKey, SealedShare, b64d, b64e
from mdm.store.index import OBJECTS_DB
from mdm.store.keys import Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo

log = logging.getLogger(__name__)

JOURNAL = "keyservice-rotate.json"


@dataclass(frozen=True)
class RotateReport:
    """What a rotation did."""

    scope: str
    records: int
    resealed: int
    kids: dict[int, str]


def _all(
    pool: HttpsPool, calls: dict[int, Callable[[float], Any]], timeout: float, what: str
) -> dict[int, Any]:
    results, errors = pool.gather(calls, time.monotonic() + timeout, len(calls))
    if len(results) < len(calls):
        raise KeyUnavailable(
            f"{what}: every key server must answer, {len(results)} of {len(calls)} did "
            f"({'; '.join(errors[i] for i in sorted(errors))}); nothing lost, run it again"
        )
    return results


def rotate_records(
    store: ObjectStore,
    scope: Scope,
    pool: HttpsPool,
    admin: str,
    kids: dict[int, str],
    timeout: float = 10.0,
) -> tuple[int, int]:
    """Re-seal (server-side) every share of ``scope`` not yet under ``kids``; rewrite records.

    Returns ``(records of the scope, records rewritten)``. Resumable: shares already under the
    new key ids are left alone.
    """
    label = scope.label()
    db = store.env.open_db(OBJECTS_DB)
    todo: list[tuple[bytes, bytes, bytes]] = []
    with store.env.begin() as txn, txn.cursor(db=db) as cur:
        for k, v in cur:
            try:
                info = ObjectInfo.from_record(bytes(v))
            except IntegrityError:
                continue
            if info.scope == scope:
                todo.append((bytes(k), info.ref.identity(), info.sealed_key))
    rewritten = 0
    for name, identity, sealed in todo:
        try:
            sk = SealedKey.decode(sealed)
        except IntegrityError:
            log.warning("record %s is not key-service material; left alone", name[:16].decode())
            continue
        stale = [s for s in sk.shares if kids.get(s.index) not in (None, s.kid)]
        if not stale:
            continue

        def reseal(s: SealedShare, identity: bytes = identity) -> Callable[[float], SealedShare]:
            def call(t: float) -> SealedShare:
                body = {
                    "identity": b64e(identity),
                    "scope": label,
                    "index": s.index,
                    "kid": s.kid,
                    "sealed": b64e(s.sealed),
                }
                a = pool.post(s.index, "/v1/admin/rotate/reseal", body, admin, t)
                if a.get("kid") != kids[s.index]:
                    raise ServerError(f"key server {s.index}: re-sealed to an unexpected key")
                return SealedShare(s.index, kids[s.index], s.commitment, b64d(a["sealed"]))

            return call

        got = _all(pool, {s.index: reseal(s) for s in stale}, timeout, f"re-sealing {label}")
        new = sk
        for s in got.values():
            new = new.replace(s)
        with store.env.begin(write=True) as txn:
            raw = txn.get(name, db=db)
            if raw is None:
                continue  # evicted meanwhile: nothing to rewrite
            info = ObjectInfo.from_record(bytes(raw))
            if info.sealed_key != sealed:
                continue  # rewritten meanwhile (another rotate run): it will be seen again
            info.sealed_key = new.encode()
            txn.put(name, info.to_record(), db=db)
        rewritten += 1
    return len(todo), rewritten


def rotate_scope(
    store: ObjectStore,
    scope: Scope,
    settings: KeySettings,
    admin: str,
    *,
    public_file: Path | None = None,
) -> RotateReport:
    """The whole rotation of ``scope`` (begin, re-seal records, finish); resumable."""
    if not settings.servers or settings.ca_file is None:
        raise UserError("[keys] names no key servers: there is nothing to rotate")
    label = scope.label()
    journal = store.root / JOURNAL
    if journal.exists():
        j = json.loads(journal.read_text())
        if j.get("scope") != label:
            raise UserError(
                f"a rotation of {j.get('scope')} is in progress ({journal}); "
                f"run 'mdm keys rotate {j.get('scope')}' first"
            )
        log.info("resuming the rotation of %s", label)
    pool = HttpsPool(settings.servers, settings.ca_file)
    timeout = max(settings.timeout, 10.0)
    try:

        def begin(i: int) -> Callable[[float], tuple[str, str, bytes]]:
            def call(t: float) -> tuple[str, str, bytes]:
                a = pool.post(i, "/v1/admin/rotate/begin", {"scope": label}, admin, t)
                return str(a["old"]), str(a["kid"]), b64d(a["public"])

            return call

        n = len(settings.servers)
        started = _all(pool, {i: begin(i) for i in range(1, n + 1)}, timeout, f"rotating {label}")
        kids = {i: v[1] for i, v in started.items()}
        tmp = journal.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scope": label, "kids": kids}))
        os.replace(tmp, journal)
        pf = public_file or settings.ca_file.parent / PUBLIC_FILE
        _update_public(pf, label, {i: (v[1], v[2]) for i, v in started.items()})
        records, rewritten = rotate_records(store, scope, pool, admin, kids, timeout)

        def finish(i: int) -> Callable[[float], str]:
            def call(t: float) -> str:
                a = pool.post(i, "/v1/admin/rotate/finish", {"scope": label}, admin, t)
                return str(a["kid"])

            return call

        done = _all(pool, {i: finish(i) for i in range(1, n + 1)}, timeout, f"finishing {label}")
        if done != kids:
            raise KeyUnavailable(f"rotation of {label}: servers finished on unexpected keys")
        journal.unlink(missing_ok=True)
        log.info("rotated %s: %d records, %d rewritten", label, records, rewritten)
        return RotateReport(label, records, rewritten, kids)
    finally:
        pool.close()


def _update_public(path: Path, label: str, keys: dict[int, tuple[str, bytes]]) -> None:
    if not path.exists():
        log.warning("%s does not exist: mounts will fetch the new public keys", path)
        return
    doc = json.loads(path.read_bytes())
    doc.setdefault("scopes", {})[label] = {
        str(i): {"kid": kid, "public": b64e(pub)} for i, (kid, pub) in sorted(keys.items())
    }
    write_public_keys(path, doc)
