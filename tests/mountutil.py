"""Run a real ``mdm mount --foreground`` daemon in a subprocess for end-to-end tests."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


def mdm(
    *args: str, check: bool = True, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run the ``mdm`` command as a user would."""
    res = subprocess.run(
        [sys.executable, "-m", "mdm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        **kw,  # type: ignore[arg-type]
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"mdm {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        )
    return res


class Mount:
    """A mount daemon in a subprocess; always unmounted and reaped on exit."""

    def __init__(
        self,
        config: Path,
        mountpoint: Path,
        *,
        log: Path | None = None,
        strict: bool = True,
        token_file: Path | None = None,
        log_level: str = "INFO",
    ):
        self.token_file = token_file
        self.log_level = log_level
        self.config = config
        self.mountpoint = mountpoint
        self.log = log or mountpoint.parent / f"{mountpoint.name}.log"
        self.strict = strict
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Mount:
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a dead mount left by a crash: the mount clears it
            if e.errno != errno.ENOTCONN:
                raise
        env = dict(os.environ)
        if self.strict:
            env["MDM_STRICT"] = "1"
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mdm",
                "--log-level",
                self.log_level,
                "mount",
                str(self.mountpoint),
                "--config",
                str(self.config),
                "--foreground",
                *(["--token-file", str(self.token_file)] if self.token_file else []),
            ],
            stdout=out,
            stderr=out,
            env=env,
            cwd=ROOT,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mount daemon exited {self.proc.returncode}:\n{self.log_text()}"
                )
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"mount did not come up:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """Kill the daemon hard (leaves a stale mount behind)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Whatever happened, leave no mount behind.
        for _ in range(2):
            r = subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
            )
            if r.returncode != 0:
                break
        self.proc = None
        # No PHI in the daemon's log, whatever the test was about.
        from tests.phi import phi_in

        found = phi_in(self.log_text())
        assert not found, f"PHI {found} in the mount log {self.log}"

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
