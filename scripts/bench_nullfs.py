"""The floor under the bridge's warm re-read: a pyfuse3 filesystem that serves from memory.

Mounts a read-only pyfuse3 filesystem of COUNT files of SIZE bytes (one shared random buffer,
no policy, no crypto, no index), reads every file the way ``scripts/bench`` reads a series
(``ls``, then each file in 1 MiB reads), and prints the time and throughput. The daemon runs
in a child process, so the reader and the filesystem use separate cores as with the bridge.

    .venv/bin/python scripts/bench_nullfs.py [--count 300] [--size 526068] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import stat
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _serve(
    mountpoint: str, count: int, size: int, ready: multiprocessing.synchronize.Event
) -> None:
    import pyfuse3
    import trio

    data = os.urandom(size)

    class NullOps(pyfuse3.Operations):  # type: ignore[misc]
        def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_size = stat.S_IFDIR | 0o555, 0
            else:
                a.st_mode, a.st_size = stat.S_IFREG | 0o444, size
            a.attr_timeout = a.entry_timeout = 1.0
            return a

        async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            return self._attrs(inode)

        async def lookup(
            self, parent: int, name: bytes, ctx: object = None
        ) -> pyfuse3.EntryAttributes:
            return self._attrs(int(name.split(b".")[0]) + pyfuse3.ROOT_INODE + 1)

        async def opendir(self, inode: int, ctx: object) -> int:
            return inode

        async def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
            for i in range(start, count):
                name = f"{i:06d}.dcm".encode()
                attrs = self._attrs(i + pyfuse3.ROOT_INODE + 1)
                if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                    break

        async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size_: int) -> bytes:
            return data[off : off + size_]

    opts = set(pyfuse3.default_options)
    opts.add("fsname=mdm-nullfs")
    opts.discard("default_permissions")
    pyfuse3.init(NullOps(), mountpoint, opts)
    ready.set()
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


def _read_all(mnt: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    for n in sorted(os.listdir(mnt)):
        with open(mnt / n, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return time.perf_counter() - t0, total


def read_ahead_knob(mnt: Path) -> Path:
    """The sysfs file of the kernel's read-ahead (KiB) of the filesystem mounted at ``mnt``."""
    st = os.stat(mnt)
    return Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")


def set_read_ahead(mnt: Path, kb: int) -> None:
    """The kernel's read-ahead of the filesystem mounted at ``mnt`` (root only)."""
    read_ahead_knob(mnt).write_text(f"{kb}\n")


def measure(count: int, size: int, rounds: int = 3, read_ahead_kb: int = 0) -> list[float]:
    """Seconds to read the null filesystem's COUNT files, once per fresh mount; with
    ``read_ahead_kb``, at that kernel read-ahead (as ``[bridge] read_ahead`` gives the mount)
    instead of the kernel's default (128 KiB)."""
    times = []
    with tempfile.TemporaryDirectory(prefix="mdm-nullfs-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        ctx = multiprocessing.get_context("spawn")
        for _ in range(rounds):
            ready = ctx.Event()
            proc = ctx.Process(target=_serve, args=(str(mnt), count, size, ready))
            proc.start()
            try:
                if not ready.wait(30):
                    raise RuntimeError("the null filesystem did not start")
                time.sleep(0.5)
                if read_ahead_kb:
                    set_read_ahead(mnt, read_ahead_kb)
                t, total = _read_all(mnt)
                assert total == count * size, total
                times.append(t)
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", type=int, default=526068, help="bytes per file")
    ap.add_argument("--rounds", type=int, default=3, help="fresh mounts; the median is printed")
    ap.add_argument(
        "--read-ahead-kb", type=int, default=0, help="kernel read-ahead (root; 0: the default)"
    )
    args = ap.parse_args()
    times = measure(args.count, args.size, args.rounds, args.read_ahead_kb)
    med = statistics.median(times)
    mb = args.count * args.size / 1e6
    print(
        f"null pyfuse3 filesystem: {args.count} files, {mb:.0f} MB read in {med:.3f} s "
        f"({mb / med:.0f} MB/s; rounds: {' '.join(f'{t:.3f}' for t in times)})"
    )


if __name__ == "__main__":
    main()
