"""The floor under the bridge's warm re-read: a pyfuse3 filesystem that serves from memory.

Mounts a read-only pyfuse3 filesystem of COUNT files of SIZE bytes (one shared random buffer,
no policy, no crypto, no index), reads every file the way ``scripts/bench`` reads a series
(``ls``, then each file in 1 MiB reads), and prints the time and throughput. The daemon runs
in a child process, so the reader and the filesystem use separate cores as with the bridge.

    .venv/bin/python scripts/bench_nullfs.py [--count 300] [--size 526068] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Reading:
    """One read of every file of a directory: the whole time, and its open and read parts."""

    seconds: float
    total: int
    """Bytes read."""
    files: int
    opening: float
    """Seconds in ``open`` (the kernel's lookup, if any, and the filesystem's open)."""
    reading: float
    """Seconds in ``read`` (every read of every file, to EOF)."""

    def per_file_us(self) -> tuple[float, float]:
        """(open, read) per file, in µs."""
        n = max(self.files, 1)
        return 1e6 * self.opening / n, 1e6 * self.reading / n


def read_files(d: Path) -> Reading:
    """``ls`` ``d``, then read each of its ``.dcm`` files in name order in 1 MiB reads (as
    a job reads a series), timing the opens and the reads apart."""
    t0 = time.perf_counter()
    names = sorted(n for n in os.listdir(d) if n.endswith(".dcm"))
    total = 0
    opening = reading = 0.0
    for n in names:
        a = time.perf_counter()
        fd = os.open(d / n, os.O_RDONLY)
        b = time.perf_counter()
        try:
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
        finally:
            c = time.perf_counter()
            os.close(fd)
        opening += b - a
        reading += c - b
    return Reading(time.perf_counter() - t0, total, len(names), opening, reading)


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
    return [r.seconds for r in measure_readings(count, size, rounds, read_ahead_kb)]


def measure_readings(
    count: int, size: int, rounds: int = 3, read_ahead_kb: int = 0
) -> list[Reading]:
    """:func:`measure`, with the open and read parts of each round."""
    times: list[Reading] = []
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
                got = read_files(mnt)
                assert got.total == count * size, got.total
                times.append(got)
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
