"""pyfuse3 operations over :class:`mdm.namespace.bridge.Bridge`: a protocol adapter only.

Inodes map to namespace paths; every handler turns the bridge's domain errors into an errno
through one table (:func:`_errno_of`), and only :class:`pyfuse3.FUSEError` leaves a handler —
anything else would stop the whole session loop. See docs/SEMANTICS.md.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pyfuse3
import trio

from mdm.errors import MdmError
from mdm.namespace.bridge import Bridge, Entry, OpenFile
from mdm.namespace.opening import RECHECK_SECONDS
from mdm.ops import metrics

log = logging.getLogger(__name__)

# Visibility can change with policy within seconds; keep the kernel's caches short.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
BLKSIZE = 128 * 1024
_OPEN, _READ, _READDIR, _RELEASE = (
    metrics.FUSE_OP[op] for op in ("open", "read", "readdir", "release")
)
_OPEN_HIT, _OPEN_MISS = (metrics.OPEN_SECONDS.labels(c) for c in ("hit", "miss"))
_SERVED = metrics.BYTES_SERVED


def _errno_of(exc: BaseException, strict: bool) -> int:
    """The one table from exceptions to errno (docs/SEMANTICS.md)."""
    if isinstance(exc, MdmError):
        return exc.errno
    if isinstance(exc, TimeoutError):
        return errno.ETIMEDOUT
    if strict:
        raise exc
    log.error("unexpected error in a filesystem operation", exc_info=exc)
    return errno.EIO


class MdmOperations(pyfuse3.Operations):
    """Read-only filesystem over the bridge's virtual tree."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, bridge: Bridge, *, strict: bool = False) -> None:
        super().__init__()
        self.bridge = bridge
        self.strict = strict
        self._paths: dict[int, tuple[str, ...]] = {pyfuse3.ROOT_INODE: ()}
        self._inodes: dict[tuple[str, ...], int] = {(): pyfuse3.ROOT_INODE}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._reported: dict[int, int] = {}
        # The kernel's lookup count of each inode we handed out (lookup and readdirplus
        # replies add one each; FORGET takes them away): at zero the inode is dropped, so a
        # long-running mount that walks millions of names does not keep them all.
        self._nlookup: dict[int, int] = {}
        self.forgotten = 0
        self._files: dict[int, tuple[int, OpenFile]] = {}
        self._dirs: dict[int, list[Entry]] = {}
        self._dir_paths: dict[int, tuple[str, ...]] = {}
        self._next_fh = itertools.count(1)
        self.uid = os.getuid()
        self.gid = os.getgid()

    # ------------------------------------------------------------------ helpers
    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        metrics.FUSE_OP[what].inc()
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise self._failure(what, e) from None

    def _failure(self, what: str, e: Exception) -> pyfuse3.FUSEError:
        """The errno a failed operation answers with (logged unless it is ENOENT)."""
        code = _errno_of(e, self.strict)
        metrics.fuse_error(what, code)
        if isinstance(e, MdmError) and code not in (errno.ENOENT,):
            log.info("%s: %s (%s)", what, e, errno.errorcode.get(code, code))
        return pyfuse3.FUSEError(code)

    def _inode(self, path: tuple[str, ...]) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = next(self._next_inode)
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _path(self, inode: int) -> tuple[str, ...]:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, path: tuple[str, ...], e: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        ino = self._inode(path)
        a.st_ino = ino
        a.generation = 0
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = BLKSIZE
        ns = int(e.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        if e.is_dir:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = e.size
            self._reported[ino] = e.size
        a.st_blocks = (a.st_size + 511) // 512
        # A size not yet known must be asked for again at every stat: once the object is
        # cached the exact size shows at once (rsync and cp fstat after open).
        a.attr_timeout = ATTR_TIMEOUT if e.exact else 0
        a.entry_timeout = ENTRY_TIMEOUT
        return a

    # ------------------------------------------------------------------ operations
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        async with self._guard("lookup"):
            sname = os.fsdecode(name)
            if sname in (".", ".."):
                raise pyfuse3.FUSEError(errno.ENOENT)
            path = (*self._path(parent_inode), sname)
            e = await self.bridge.lookup(path)
            attrs = self._attrs(path, e)
            self._referenced(attrs.st_ino)
            return attrs
        raise AssertionError("unreachable")

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        async with self._guard("getattr"):
            path = self._path(inode)
            if not path:
                return self._attrs(path, Entry("", True, mtime=self.bridge.started))
            e = await self.bridge.lookup(path)
            return self._attrs(path, e)
        raise AssertionError("unreachable")

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        async with self._guard("opendir"):
            path = self._path(inode)
            entries = await self.bridge.listdir(path)
            fh = next(self._next_fh)
            self._dirs[fh] = entries
            self._dir_paths[fh] = path
            return fh
        raise AssertionError("unreachable")

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        _READDIR.inc()
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        base = self._dir_path(fh)
        for i in range(start_id, len(entries)):
            e = entries[i]
            attrs = self._attrs((*base, e.name), e)
            if not pyfuse3.readdir_reply(token, os.fsencode(e.name), attrs, i + 1):
                break
            self._referenced(attrs.st_ino)

    def _dir_path(self, fh: int) -> tuple[str, ...]:
        return self._dir_paths[fh]

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_paths.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        _OPEN.inc()
        # Once per file: a plain try, as in read, instead of _guard's context manager.
        try:
            path = self._path(inode)
            started = time.monotonic()
            f = await self.bridge.open(path)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise self._failure("open", e) from None
        fh = next(self._next_fh)
        self._files[fh] = (inode, f)
        # A size the kernel was not told (0 until cached): direct I/O, so the whole object
        # is read whatever size the kernel holds, and every read reaches the re-check.
        direct = self._reported.get(inode) != f.size
        if f.reader is not None:
            took = time.monotonic() - started
            (_OPEN_HIT if f.exact_before else _OPEN_MISS).observe(took)
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=not direct)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        _READ.inc()
        entry = self._files.get(fh)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # The hottest operation: a plain try instead of _guard's context manager. pyfuse3
        # copies the reply into the kernel before it takes the next request: answer from the
        # file's reused span buffer, not a copy.
        try:
            view = entry[1].read_transient(off, size)
            _SERVED.inc(len(view))
            return view  # type: ignore[return-value]
        except Exception as e:
            raise self._failure("read", e) from None

    async def watch_open_files(self) -> None:
        """Every RECHECK_SECONDS, re-check each open file's grant; for one revoked, drop the
        kernel's cached pages and attributes of its inode, so that its next read reaches
        :meth:`read` and its re-check (EACCES) instead of the page cache (a file read once,
        or read ahead, would otherwise stay readable through the handles already open)."""
        dropped: set[int] = set()
        while True:
            await trio.sleep(RECHECK_SECONDS)
            revoked = set()
            for fh, (inode, f) in list(self._files.items()):
                if f.recheck is None or fh in dropped:
                    continue
                try:
                    f.recheck()
                except Exception:  # AccessDenied, or a token that no longer verifies
                    dropped.add(fh)
                    revoked.add(inode)
            dropped &= set(self._files)
            for inode in revoked:
                log.info("grant of an open file revoked: dropping its cached pages")
                try:
                    # A worker thread: the kernel may wait for a read in flight on the inode,
                    # which this loop must stay free to answer.
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
                except OSError as e:  # the kernel forgot the inode: nothing cached
                    log.debug("invalidate_inode(%d): %s", inode, e)

    async def release(self, fh: int) -> None:
        _RELEASE.inc()
        entry = self._files.pop(fh, None)
        if entry is not None:
            entry[1].release()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        metrics.FUSE_OP["statfs"].inc()
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = BLKSIZE
        st = self.bridge.store.stats()
        total = max(st.max_bytes, 1) // BLKSIZE
        used = st.bytes // BLKSIZE
        s.f_blocks = total
        s.f_bfree = s.f_bavail = max(total - used, 0)
        s.f_files = st.objects
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        async with self._guard("getxattr"):
            got = await self.bridge.xattrs(self._path(inode))
            value = got.get(os.fsdecode(name))
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value.encode("utf-8")
        raise AssertionError("unreachable")

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        async with self._guard("listxattr"):
            return [k.encode() for k in await self.bridge.xattrs(self._path(inode))]
        raise AssertionError("unreachable")

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    def _referenced(self, ino: int) -> None:
        self._nlookup[ino] = self._nlookup.get(ino, 0) + 1

    async def forget(self, inode_list: Any) -> None:
        """The kernel dropped ``nlookup`` references to each inode: at zero, forget it."""
        for ino, nlookup in inode_list:
            if ino == pyfuse3.ROOT_INODE:
                continue
            left = self._nlookup.get(ino, 0) - nlookup
            if left > 0:
                self._nlookup[ino] = left
                continue
            self._nlookup.pop(ino, None)
            self._reported.pop(ino, None)
            path = self._paths.pop(ino, None)
            if path is not None and self._inodes.get(path) == ino:
                del self._inodes[path]
            self.forgotten += 1
        log.debug("forgot %d inode(s); %d known", len(inode_list), len(self._paths))
