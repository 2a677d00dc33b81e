"""The access gate: the one place where the bridge decides and audits for a principal.

Every front end (the FUSE mount, the CLI's ``fetch``, the coming DICOMweb gateway) asks the
same :class:`Gate`: ``decide`` a principal's access to a catalog study or series (through
:func:`mdm.access.decide.resource_of`, the one "attributes -> policy Resource"), and
``record`` what happened in the audit log, fail closed. The gate holds no principal: each
call names its own, so one gate serves many principals in one process.

:class:`SessionPrincipal` is how a mount (one principal per process) names its principal: the
session's token, read anew at every operation, its expiry an AccessDenied (EACCES).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from mdm.access.decide import (
    AccessLevel,
    AccessResolver,
    Decision,
    LocalAdminResolver,
    Resource,
    resource_of,
)
from mdm.access.identity import InvalidToken, Principal
from mdm.access.session import Session
from mdm.audit.log import AuditError, AuditLog
from mdm.catalog.records import Record
from mdm.errors import AccessDenied, MdmError
from mdm.ops import metrics
from mdm.ops.status import AuditState
from mdm.policy.pushdown import Narrowing, narrowing

log = logging.getLogger(__name__)

DECISION_TTL = 1.0
"""Seconds a decision is given again for the same principal and records (Gate.decide)."""
_RECENT_MAX = 4096
_Recent = tuple[float, str, Principal, Record, Record | None, Decision]


@functools.cache
def _decision_counter(kind: str, level: str) -> Any:
    """The decisions counter of (kind, level): labelled children looked up once, not per
    decision (``labels()`` costs more than the increment)."""
    return metrics.POLICY_DECISIONS.labels(kind, level)


Who = Callable[[], Principal]
"""Who a service acts for: called when a decision needs the principal (not before, so a
mount whose token expired still shows its root), raising AccessDenied if there is none."""

NO_PRINCIPAL = Principal(sub="(invalid token)", issuer="")
"""Who an audit record names when the principal's token is no longer valid."""


class SessionPrincipal:
    """The principal of a mount's session, as a callable: AccessDenied once its token is not
    valid (said once in the log per distinct reason)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._token_error = ""

    def __call__(self) -> Principal:
        """The principal now; AccessDenied (EACCES) once its token is not valid."""
        try:
            p = self.session.principal()
        except InvalidToken as e:
            if str(e) != self._token_error:
                self._token_error = str(e)
                log.warning("access refused: %s", e)
            raise AccessDenied(f"no valid token: {e}") from None
        self._token_error = ""
        return p

    def for_audit(self) -> Principal:
        """The principal an audit record names: the session's, or :data:`NO_PRINCIPAL`."""
        try:
            return self.session.principal()
        except InvalidToken:
            return NO_PRINCIPAL


def fixed(principal: Principal) -> Who:
    """A :data:`Who` for a principal already verified (one request of a gateway)."""
    return lambda: principal


def audit_principal(who: Who) -> Principal:
    """Who an audit record names: ``who()``, or :data:`NO_PRINCIPAL` if it has no valid token."""
    try:
        return who()
    except (AccessDenied, InvalidToken):
        return NO_PRINCIPAL


class Gate:
    """Access decisions and audit records for any principal (see the module docstring)."""

    def __init__(
        self, resolver: AccessResolver, audit: AuditLog | None, *, fail_open: bool = False
    ) -> None:
        self.resolver = resolver
        self.audit = audit
        self.fail_open = fail_open
        """``[audit] fail_open``: a record that cannot be written is logged, not refused."""
        self.audit_state = AuditState()
        # Recent decisions, re-used for DECISION_TTL seconds when they were taken on the very
        # same principal and records under the same policy version: opening each file of a
        # series would otherwise decide twice per file (study, series) for nothing new.
        self._recent: dict[tuple[int, str, str], _Recent] = {}

    @staticmethod
    def resource(study: Record, series: Record | None = None) -> Resource:
        """The policy attributes of a catalog study (or one of its series)."""
        sattrs = None
        if series is not None:
            sattrs = {**series.attrs, "SeriesInstanceUID": series.uid}
        return resource_of(
            series.sites if series is not None else study.sites,
            study.attrs,
            sattrs,
            patient_id=study.parent or None,
            study_uid=study.uid,
        )

    def decide(self, principal: Principal, study: Record, series: Record | None = None) -> Decision:
        """``principal``'s access decision on a study (or one of its series).

        A decision taken less than :data:`DECISION_TTL` seconds ago on the same principal and
        the same catalog records, under the same policy version, is given again: a reloaded
        policy, a new token or a refreshed record decide anew at once, and an open file's
        once-a-second re-check (RECHECK_SECONDS) sees a revocation within the same bound."""
        now = time.monotonic()
        key = (id(principal), study.uid, series.uid if series is not None else "")
        version = self.resolver.version()
        hit = self._recent.get(key)
        if (
            hit is not None
            and now - hit[0] < DECISION_TTL
            and hit[1] == version
            and hit[2] is principal
            and hit[3] is study
            and hit[4] is series
            and time.time() < principal.expires
        ):
            d = hit[5]
        else:
            d = self.resolver.decide(principal, self.resource(study, series))
            if len(self._recent) >= _RECENT_MAX:
                self._recent.clear()
            self._recent[key] = (now, version, principal, study, series, d)
        _decision_counter("study" if series is None else "series", d.level.label).inc()
        return d

    def narrowing(self, principal: Principal) -> Narrowing:
        """What ``principal``'s grants bound its listings to, as C-FIND keys
        (:mod:`mdm.policy.pushdown`); unbounded for a resolver that cannot say."""
        if principal.admin:
            return Narrowing()
        grants = getattr(self.resolver, "grants", None)
        if grants is None:
            if isinstance(self.resolver, LocalAdminResolver):
                return Narrowing(nothing=True)
            return Narrowing()
        return narrowing(grants(principal))

    @staticmethod
    def visible(d: Decision) -> bool:
        """Whether a decision shows the object at all (metadata or more)."""
        return d.level >= AccessLevel.METADATA

    def record(
        self,
        principal: Principal,
        action: str,
        decision: str,
        resource: dict[str, str],
        *,
        rule: str = "",
        policy: str = "",
        **extra: Any,
    ) -> None:
        """One audit record (no-op without [audit]); UIDs only, never PHI.

        Fails closed: a record that cannot be written raises AuditError (EIO) after one log
        line, unless ``[audit] fail_open = true`` (then the log line only)."""
        if self.audit is None:
            return
        try:
            self.audit.record(
                principal=principal,
                action=action,
                decision=decision,
                resource={k: v for k, v in resource.items() if v},
                rule=rule,
                policy=policy or self.resolver.version(),
                **extra,
            )
            self.audit_state.written()
        except (OSError, MdmError) as e:
            self.audit_state.failed(str(e))
            if self.fail_open:
                log.error("audit record could not be written (audit.fail_open: going on): %s", e)
                return
            log.error("audit record could not be written; %s refused: %s", action, e)
            raise AuditError(f"audit record could not be written: {e}") from None
