"""Mount and unmount: run the pyfuse3 session on trio over an open bridge."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from mdm.access.session import Session
from mdm.config import Config
from mdm.errors import UserError
from mdm.namespace.bridge import open_bridge
from mdm.ops import metrics
from mdm.ops.status import ControlServer
from mdm_fuse.ops import MdmOperations

log = logging.getLogger(__name__)

# Enough worker tasks that ls, stat and cached reads answer while retrievals block others.
MAX_TASKS = 64
SWITCH_INTERVAL = 0.0005


def is_stale_mount(mountpoint: Path) -> bool:
    """True if ``mountpoint`` is a FUSE mount whose daemon died (ENOTCONN)."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount with fusermount3 (or umount as root); raise UserError on failure.

    A dead mount (its daemon crashed or was killed: ENOTCONN) is detached lazily, as
    nothing can be busy on it any more."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] if tool else ["umount"]
    if lazy or is_stale_mount(mountpoint):
        cmd.append("-z" if tool else "-l")
    res = subprocess.run([*cmd, str(mountpoint)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise UserError(f"cannot unmount {mountpoint}: {res.stderr.strip() or res.stdout.strip()}")


def prepare_mountpoint(mountpoint: Path) -> None:
    """Check the mount point; clear a stale mount left by a killed daemon."""
    if is_stale_mount(mountpoint):
        log.warning("%s is a stale mount of a dead daemon; unmounting it", mountpoint)
        unmount(mountpoint, lazy=True)
    if not mountpoint.is_dir():
        raise UserError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"{mountpoint} is already a mount point")


def mount_device(mountpoint: Path) -> str | None:
    """The ``major:minor`` of the filesystem mounted at ``mountpoint`` (the last mount there),
    read from /proc/self/mountinfo: a ``stat`` of our own mount point would wait for this very
    process to answer it."""
    want = os.fsencode(os.path.abspath(mountpoint))
    found = None
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split(b" ")
        # mountinfo escapes space, tab, newline and backslash in paths as octal (\040 ...)
        if len(f) > 4 and f[4].decode("unicode_escape").encode("latin-1") == want:
            found = f[2].decode()
    return found


def set_read_ahead(mountpoint: Path, nbytes: int) -> bool:
    """Set the kernel's read-ahead of the mount at ``mountpoint`` (``[bridge] read_ahead``);
    False, with one log line saying how to set it, when this process may not (not root)."""
    if nbytes <= 0:
        return False
    dev = mount_device(mountpoint)
    knob = Path("/sys/class/bdi") / (dev or "?") / "read_ahead_kb"
    kb = max(4, nbytes // 1024)
    try:
        if dev is None:
            raise FileNotFoundError("mount not found in /proc/self/mountinfo")
        knob.write_text(f"{kb}\n")
    except OSError as e:
        log.info(
            "kernel read-ahead of %s stays at its default (%s); as root: echo %d > %s",
            mountpoint,
            getattr(e, "strerror", None) or e,
            kb,
            knob,
        )
        return False
    log.debug("kernel read-ahead of %s set to %d KiB (%s)", mountpoint, kb, knob)
    return True


async def tune_read_ahead(mountpoint: Path, nbytes: int) -> None:
    """:func:`set_read_ahead` once the kernel's FUSE_INIT is answered (it resets the knob):
    as soon as a ``stat`` of the mount point, from a worker thread, gets its answer."""
    if nbytes <= 0:
        return
    with trio.move_on_after(30):
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        await trio.to_thread.run_sync(set_read_ahead, mountpoint, nbytes)


async def serve(
    config: Config,
    mountpoint: Path,
    session: Session,
    *,
    strict: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount the federation at ``mountpoint`` and serve until unmounted or signalled."""
    # Several jobs on one node may mount the same configuration: the first one listens on
    # the storage port (C-MOVE), the others retrieve by C-GET into the same cache.
    async with open_bridge(config, session, get_if_port_busy=True) as bridge:
        ops = MdmOperations(bridge, strict=strict)
        options = set(pyfuse3.default_options)
        options |= {"fsname=mdm", "subtype=mdm", "ro", "noatime"}
        # Both before the mount appears: whoever sees the mount can ask it at once. Neither
        # stops a mount: without them it serves the same files, and says so.
        control: ControlServer | None = None
        try:
            control = ControlServer(bridge, mountpoint)
        except OSError as e:
            log.warning("no control socket (mdm status will not find this mount): %s", e)
        exporter = metrics.serve(config.metrics.listen if config.metrics else None, "mount")
        if exporter is not None:
            exporter.add_cache(bridge.store.stats)
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except BaseException as e:
            if control is not None:
                control.close()
            if exporter is not None:
                exporter.close()
            if isinstance(e, RuntimeError):
                # libfuse (or fusermount3) said why on stderr, just before: one line here.
                raise UserError(
                    f"cannot mount {mountpoint}: {e} (see the FUSE message above; "
                    "docs/INSTALL.md: running without root)"
                ) from None
            raise
        log.info(
            "mounted %s as %s (%d site(s): %s)",
            mountpoint,
            bridge.principal.label(),
            len(config.sites),
            ", ".join(s.name for s in config.sites),
        )
        clean = False
        try:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                        async for sig in sigs:
                            log.info("signal %s: unmounting", signal.Signals(sig).name)
                            pyfuse3.terminate()
                            return

                nursery.start_soon(on_signal)
                nursery.start_soon(tune_read_ahead, mountpoint, config.bridge.read_ahead)
                nursery.start_soon(ops.watch_open_files)
                if control is not None:
                    nursery.start_soon(control.run)
                task_status.started()
                await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
            clean = True
        finally:
            # Only a clean end (a signal, or an unmount from outside) unmounts. After a
            # crash the mount point stays a dead mount (ENOTCONN) until `mdm umount` or the
            # next `mdm mount` clears it: a job must see an error, never an empty directory
            # it could take for an empty federation.
            if not clean:
                log.error(
                    "the mount daemon failed; %s is left as a dead mount (ENOTCONN) until "
                    "`mdm umount %s` or the next `mdm mount`",
                    mountpoint,
                    mountpoint,
                )
            if control is not None:
                control.close()
            if exporter is not None:
                exporter.close()
            try:
                pyfuse3.close(unmount=clean)
            except Exception:  # already unmounted from outside
                log.debug("pyfuse3.close failed", exc_info=True)
        log.info("unmounted %s", mountpoint)


def run(config: Config, mountpoint: Path, session: Session, *, strict: bool = False) -> None:
    """Blocking entry point of ``mdm mount --foreground``."""
    prepare_mountpoint(mountpoint)
    # The FUSE loop shares the GIL with the threads receiving and storing objects; the
    # default 5 ms switch interval would let them hold it for that long while a reader
    # waits for an answer to ls, stat or read. Switch more often.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        trio.run(lambda: serve(config, mountpoint, session, strict=strict))
    finally:
        session.close()
