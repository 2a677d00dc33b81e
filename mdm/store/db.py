"""The LMDB environment shared by the catalog and the object store (``cache.dir/index.lmdb``)."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

MAP_SIZE = 8 * 2**30  # sparse; LMDB only uses what it writes
MAX_DBS = 32


def open_env(cache_dir: Path, *, readonly: bool = False) -> lmdb.Environment:
    """Open (creating if needed) the index environment under ``cache_dir``.

    The directory is created with mode 0700: nothing under ``cache.dir`` is for other users.
    """
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(cache_dir, 0o700)
    path = cache_dir / "index.lmdb"
    # LMDB would create this directory with ``mode`` (0600, no search bit): only root could
    # then open the index. Create it searchable by its owner alone.
    if not readonly:
        path.mkdir(exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    return lmdb.open(
        str(path),
        map_size=MAP_SIZE,
        max_dbs=MAX_DBS,
        subdir=True,
        readonly=readonly,
        lock=True,
        # One writer at a time; readers run in threads of the same process.
        max_readers=256,
        mode=0o600,
        # No fsync per commit: the store writes each blob before its record is committed,
        # start-up recovery drops records whose blob is missing or short and removes blobs
        # without a record, and a blob that fails authentication is dropped when read
        # (docs/STORE.md, Power cut). A power loss can undo the last commits (LMDB stays
        # consistent), which recovery turns into at most a few re-fetches; a killed process
        # loses nothing, the commits are in the page cache.
        sync=False,
        metasync=False,
    )
