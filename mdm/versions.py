"""What ``mdm --version`` prints: the bridge's version and those of the stack under it.

The core never imports pyfuse3: its version comes from the installed distribution, and
libfuse's from the shared library itself (``fuse_pkgversion()`` of ``libfuse3.so.3``, the
library pyfuse3 is linked against), else from ``fusermount3 -V``.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from importlib import metadata

UNKNOWN = "not found"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def libfuse_version() -> str:
    """The version of the libfuse 3 library on this machine, or ``not found``."""
    try:
        lib = ctypes.CDLL("libfuse3.so.3")
        fn = lib.fuse_pkgversion
        fn.restype = ctypes.c_char_p
        raw = fn()
        if raw:
            return str(raw.decode())
    except (OSError, AttributeError):
        pass
    tool = shutil.which("fusermount3")
    if tool:
        try:
            out = subprocess.run([tool, "-V"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
        if m:
            return f"{m.group(1)} (fusermount3)"
    return UNKNOWN


def versions() -> list[tuple[str, str]]:
    """``(component, version)`` pairs, the bridge first."""
    return [
        ("mdm-bridge", _dist("mdm-bridge")),
        ("pynetdicom", _dist("pynetdicom")),
        ("pydicom", _dist("pydicom")),
        ("pyfuse3", _dist("pyfuse3")),
        ("libfuse", libfuse_version()),
    ]
