"""The LMDB catalog of the federated tree: patients, studies, series, instances.

Each record holds the C-FIND attributes needed for listing and ``.metadata.json`` plus the
sites that hold the object (with the time each site last reported it). Keys are UIDs (not PHI
under the trust model) except for patients, whose key is a keyed hash of the Patient ID. Every
value is encrypted with the catalog key (AES-256-GCM, the LMDB key as associated data), so the
index on disk carries no names, IDs or dates in clear.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lmdb
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm.errors import IntegrityError

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_CODE: dict[str, bytes] = {"PATIENT": b"P", "STUDY": b"S", "SERIES": b"R", "IMAGE": b"I"}
ROOT = ""
CACHE_MAX = 200_000


@dataclass
class Record:
    """One node of the federated tree."""

    level: Level
    uid: str
    """StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, or the Patient ID at PATIENT level."""
    parent: str
    """The parent's uid ("" for patients; the Patient ID for studies)."""
    attrs: dict[str, str] = field(default_factory=dict)
    sites: dict[str, float] = field(default_factory=dict)
    """Site name -> time the site last reported this object."""

    def to_json(self) -> bytes:
        return json.dumps(
            {"l": self.level, "u": self.uid, "p": self.parent, "a": self.attrs, "s": self.sites},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        d = json.loads(raw)
        return cls(level=d["l"], uid=d["u"], parent=d["p"], attrs=d["a"], sites=d["s"])


class Catalog:
    """Encrypted catalog over a named database of the shared LMDB environment."""

    def __init__(
        self, env: lmdb.Environment, secret: bytes, ttl: float, *, owned: Path | None = None
    ) -> None:
        self.env = env
        # A private catalog (see ``private``): its directory, removed by ``close``.
        self._owned = owned
        self._owner_lock: int | None = None
        self.ttl = ttl
        self._db = env.open_db(b"catalog")
        self._aead = AESGCM(hashlib.sha256(b"mdm-catalog-enc\0" + secret).digest())
        self._mac_key = hashlib.sha256(b"mdm-catalog-mac\0" + secret).digest()
        # Decrypted records, in memory only (PHI never leaves memory in clear). Every path
        # resolution reads three or four records: decrypting them each time dominated the
        # cost of stat and open. Cleared on every write of this process; other processes
        # only add what listings find, which the TTL picks up.
        self._cache: dict[bytes, Record] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def private(cls, cache_dir: Path, ttl: float) -> Catalog:
        """A catalog of this process only, under a random key that never leaves memory.

        For shared nodes with key servers: the catalog caches C-FIND answers about every
        patient of the federation, more than any one principal is granted, so no key that
        opens it may outlive the process or be released to anyone. Its LMDB sits in
        ``cache.dir/catalogs/<random>/`` (encrypted like the shared one) and is removed at
        ``close``; directories of processes that died are removed by the next one (their
        ``owner.lock`` is no longer locked).
        """
        root = cache_dir / "catalogs"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in root.iterdir():
            _remove_if_abandoned(d)
        d = Path(tempfile.mkdtemp(prefix="c-", dir=root))
        fd = os.open(d / "owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env = lmdb.open(
            str(d / "index"), map_size=2**34, max_dbs=2, subdir=True, sync=False, mode=0o600
        )
        cat = cls(env, os.urandom(32), ttl, owned=d)
        cat._owner_lock = fd
        return cat

    def close(self) -> None:
        """Close and remove a private catalog (the shared one's environment is not ours)."""
        if self._owned is None:
            return
        self.env.close()
        shutil.rmtree(self._owned, ignore_errors=True)
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None
        self._owned = None

    # -- keys ---------------------------------------------------------------------------
    def _id(self, level: str, uid: str) -> bytes:
        if level == "PATIENT":
            return hmac.new(self._mac_key, uid.encode(), hashlib.sha256).hexdigest()[:32].encode()
        return uid.encode()

    def _parent_level(self, level: str) -> str | None:
        i = LEVELS.index(level)  # type: ignore[arg-type]
        return LEVELS[i - 1] if i > 0 else None

    def _rec_key(self, level: str, uid: str) -> bytes:
        return b"r" + _CODE[level] + self._id(level, uid)

    def _child_prefix(self, level: str, parent: str) -> bytes:
        plevel = self._parent_level(level)
        pid = self._id(plevel, parent) if plevel and parent else b""
        return b"c" + _CODE[level] + pid + b"\0"

    def _listed_key(self, what: str) -> bytes:
        return b"t" + hmac.new(self._mac_key, what.encode(), hashlib.sha256).digest()[:16]

    # -- encryption ---------------------------------------------------------------------
    def _seal(self, key: bytes, rec: Record) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, rec.to_json(), key)

    def _unseal(self, key: bytes, raw: bytes) -> Record:
        try:
            return Record.from_json(self._aead.decrypt(raw[:12], raw[12:], key))
        except Exception as e:  # InvalidTag, JSON errors: the index was tampered with
            raise IntegrityError("catalog record failed authentication") from e

    # -- reads --------------------------------------------------------------------------
    def get(self, level: Level, uid: str) -> Record | None:
        """The record of ``uid`` at ``level``, or None."""
        key = self._rec_key(level, uid)
        rec = self._cache.get(key)
        if rec is not None:
            return rec
        with self.env.begin(db=self._db) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        rec = self._unseal(key, bytes(raw))
        with self._cache_lock:
            if len(self._cache) > CACHE_MAX:
                self._cache.clear()
            self._cache[key] = rec
        return rec

    def children(self, level: Level, parent: str) -> list[Record]:
        """Records at ``level`` under ``parent`` ("" for all patients / all studies)."""
        prefix = self._child_prefix(level, parent)
        out: list[Record] = []
        with self.env.begin(db=self._db) as txn:
            cur = txn.cursor()
            keys: list[bytes] = []
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    kb = bytes(k)
                    if not kb.startswith(prefix):
                        break
                    keys.append(kb[len(prefix) :])
            for cid in keys:
                rk = b"r" + _CODE[level] + cid
                raw = txn.get(rk)
                if raw is not None:
                    out.append(self._unseal(rk, bytes(raw)))
        return out

    def listed_at(self, what: str) -> float:
        """When the listing named ``what`` last completed (0 if never)."""
        with self.env.begin(db=self._db) as txn:
            raw = txn.get(self._listed_key(what))
        return struct.unpack("<d", raw)[0] if raw else 0.0

    def fresh(self, what: str) -> bool:
        """True if the listing ``what`` completed within the TTL."""
        return time.time() - self.listed_at(what) < self.ttl

    # -- writes -------------------------------------------------------------------------
    def _invalidate(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def merge(
        self,
        records: Iterable[Record],
        *,
        replace_site: str | None = None,
        replace_scope: tuple[Level, str] | None = None,
        listed: str | None = None,
    ) -> None:
        """Add or update records; their ``sites`` are merged with what is known.

        With ``replace_site`` and ``replace_scope`` = (level, parent), the given records are all
        the children of ``parent`` at ``level`` held by that site: children of that parent
        that the site no longer reports lose the site. ``listed`` marks a listing as fresh.
        """
        self._invalidate()
        now = time.time()
        recs = list(records)
        seen = {r.uid for r in recs}
        with self.env.begin(db=self._db, write=True) as txn:
            for r in recs:
                self._put(txn, r, now)
            if replace_site and replace_scope:
                level, parent = replace_scope
                prefix = self._child_prefix(level, parent)
                cur = txn.cursor()
                stale: list[bytes] = []
                if cur.set_range(prefix):
                    for k in cur.iternext(values=False):
                        kb = bytes(k)
                        if not kb.startswith(prefix):
                            break
                        stale.append(kb[len(prefix) :])
                for cid in stale:
                    rk = b"r" + _CODE[level] + cid
                    raw = txn.get(rk)
                    if raw is None:
                        continue
                    old = self._unseal(rk, bytes(raw))
                    if old.uid not in seen and replace_site in old.sites:
                        del old.sites[replace_site]
                        txn.put(rk, self._seal(rk, old))
            if listed:
                txn.put(self._listed_key(listed), struct.pack("<d", now))

    def _put(self, txn: lmdb.Transaction, r: Record, now: float) -> None:
        rk = self._rec_key(r.level, r.uid)
        raw = txn.get(rk)
        if raw is not None:
            old = self._unseal(rk, bytes(raw))
            sites = dict(old.sites)
            attrs = dict(old.attrs)
            attrs.update({k: v for k, v in r.attrs.items() if v != ""})
            parent = r.parent or old.parent
        else:
            sites, attrs, parent = {}, dict(r.attrs), r.parent
        for s in r.sites:
            sites[s] = now
        new = Record(level=r.level, uid=r.uid, parent=parent, attrs=attrs, sites=sites)
        txn.put(rk, self._seal(rk, new))
        txn.put(self._child_prefix(r.level, parent) + self._id(r.level, r.uid), b"")
        if r.level == "STUDY":
            # All studies, whatever their patient: the /studies listing.
            txn.put(self._child_prefix("STUDY", ROOT) + self._id("STUDY", r.uid), b"")


def _remove_if_abandoned(d: Path) -> None:
    """Remove a private catalog directory whose owner process is gone."""
    try:
        fd = os.open(d / "owner.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # Being created right now, or torn down: judged by its age.
        try:
            if time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # held: its process is alive
    finally:
        os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
