"""The bridge's application entity on pynetdicom's public API (no private name is touched
here: the stock path, ``[bridge] fast_dicom = false``, runs exactly this)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pynetdicom.ae import ApplicationEntity

from mdm.dicom.limits import max_pdu_of

log = logging.getLogger(__name__)

# An AE title can never contain a backslash: a calling-AE list holding only this can match
# no peer (pynetdicom treats an empty list as "accept anyone").
NOBODY = "\\"


class BridgeAE(ApplicationEntity):
    """An :class:`ApplicationEntity` with the bridge's timeouts and PDU limit.

    ``allowed_callers``, if given, is asked for the calling AE titles that may associate at
    each association request (a configuration reload takes effect at once); nobody may when
    it returns nothing or fails.
    """

    fast = False
    """True on the fast path's subclass (:class:`mdm.dicom.fast.FastAE`)."""

    def __init__(
        self,
        ae_title: str,
        timeout: float,
        max_pdu: int = 0,
        allowed_callers: Callable[[], set[str]] | None = None,
    ) -> None:
        # Before the base constructor, which assigns require_calling_aet.
        self.allowed_callers = allowed_callers
        super().__init__(ae_title)
        self.stall_timeout: float | None = timeout
        """Seconds a started PDU may stall before the connection counts as broken."""
        self.acse_timeout = timeout
        self.connection_timeout = timeout
        # Waits for DIMSE messages are bounded by a Watchdog (progress-based), and idle pooled
        # associations are closed by their pool: neither pynetdicom timer fits those rules.
        self.dimse_timeout = None
        self.network_timeout = None
        self.maximum_pdu_size = max_pdu_of(max_pdu)

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        allowed = self.allowed_callers
        if allowed is None:
            return list(ApplicationEntity.require_calling_aet.fget(self))  # type: ignore[attr-defined]
        try:
            titles = sorted({a.strip() for a in allowed() if a.strip()})
        except Exception:
            log.exception("the list of allowed AE titles could not be read; refusing everyone")
            titles = []
        return titles or [NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        if self.allowed_callers is None:
            ApplicationEntity.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]
        # Otherwise the list always comes from ``allowed_callers``.
