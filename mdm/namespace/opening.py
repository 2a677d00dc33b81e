"""What every open of a served file shares, instances and volumes alike: the audit record that
must be written before a byte is served, and the once-a-second re-check that lets a revoked
grant or an expired token stop reads of files already open."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

from mdm.access.decide import AccessLevel
from mdm.access.gate import Gate, Who
from mdm.access.views import View
from mdm.audit.log import AuditError
from mdm.catalog.records import Record
from mdm.errors import AccessDenied, MdmError
from mdm.namespace.naming import Names
from mdm.store.objects import ObjectReader

RECHECK_SECONDS = 1.0


async def open_audited(
    get: Callable[[], Awaitable[tuple[ObjectReader, bool]]],
    audit: Callable[..., None],
    view: View,
) -> tuple[ObjectReader, bool]:
    """``get()`` -> (reader, was cached), with its audit: an error is recorded (and raised);
    a success is recorded with the key use that serves it, and fails closed (the reader is
    closed and AuditError raised) when the record cannot be written."""
    try:
        reader, cached = await get()
    except MdmError as e:
        with contextlib.suppress(AuditError):  # failed either way (and logged)
            audit("error", view=view.kind, reason=type(e).__name__)
        raise
    scope = reader.info.scope
    try:
        audit(
            "allow",
            view=view.kind,
            key_site=scope.site,
            key_level=scope.level,
            cached=cached,
        )
    except AuditError:
        reader.close()
        raise
    return reader, cached


def revocation_check(
    gate: Gate, names: Names, who: Who, study: Record, series: Record, view: View
) -> Callable[[], None]:
    """A check for each read of a file opened in ``view``: at most once a second, the decision
    is taken again; AccessDenied once it no longer grants that view."""
    last = [time.monotonic()]
    revoked = [False]  # the answer of the last check holds until the next one

    def recheck() -> None:
        now = time.monotonic()
        if now - last[0] < RECHECK_SECONDS:
            if revoked[0]:
                raise AccessDenied("access revoked")
            return
        last[0] = now
        revoked[0] = True  # until this check says otherwise (fail closed if it raises)
        d = gate.decide(who(), study, series)
        nv = names.view(d)
        if d.level < AccessLevel.DEIDENTIFIED or (nv.kind, nv.store_view) != (
            view.kind,
            view.store_view,
        ):
            raise AccessDenied("access revoked")
        revoked[0] = False

    return recheck


__all__ = ["RECHECK_SECONDS", "open_audited", "revocation_check"]
