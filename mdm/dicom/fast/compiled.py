"""Whether the compiled receive loop (``_pdata``, built from ``_pdata.pyx`` by Cython) serves
inbound associations of the fast path.

It does when the extension was built (``scripts/setup``) and ``MDM_COMPILED_DICOM`` is not
``0``; otherwise the Python fast path reads every PDU, with one INFO line saying why. The
switch is read when an association starts, so a test (and every process it starts) can
turn it off through the environment.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

COMPILED_DICOM_ENV = "MDM_COMPILED_DICOM"

_module: ModuleType | None
try:
    from mdm.dicom.fast import _pdata as _module
except ImportError:  # not built: the Python fast path serves
    _module = None

_said = False


def available() -> bool:
    """True if the extension was built and imports."""
    return _module is not None


def enabled() -> bool:
    """True if the compiled loop is built and not switched off by ``MDM_COMPILED_DICOM=0``."""
    global _said
    value = os.environ.get(COMPILED_DICOM_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if _module is None:
        if not _said:
            _said = True
            log.info(
                "compiled DICOM receive loop not built (scripts/setup builds it): "
                "inbound associations use the Python fast path"
            )
        return False
    return True


def module() -> ModuleType:
    """The extension module (only when :func:`available`)."""
    assert _module is not None
    return _module
