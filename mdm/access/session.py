"""Who a mount (or a command) runs as, what it may see, and where decisions are audited.

``open_session`` builds the three from ``mdm.toml`` and fails closed:
- without ``[identity]``: the local administrator of a single-user workstation (full access),
  said in the log; a token given anyway is an error;
- with ``[identity]``: a valid token is mandatory and ``[policy]`` is required; the policy is
  loaded at once (a broken policy refuses to start) and hot-reloaded afterwards;
- with ``[audit]``: every open, retrieval and key use is recorded; with ``[keys] servers`` too,
  the log is anchored at the key servers (mdm.audit.anchor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdm.access.decide import AccessResolver, LocalAdminResolver
from mdm.access.identity import LOCAL_ADMIN, InvalidToken, Principal, TokenFile, TokenVerifier
from mdm.audit.anchor import AuditAnchorer, anchorer_for
from mdm.audit.log import AuditLog
from mdm.config import Config
from mdm.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The principal source, the access resolver and the audit log of one mount or command."""

    principal: Callable[[], Principal]
    """Returns the current principal; raises InvalidToken once the token is no longer valid."""
    resolver: AccessResolver
    audit: AuditLog | None
    local_admin: bool
    token_file: Path | None = None
    anchor: AuditAnchorer | None = None
    """Sends the audit log's checkpoints to the key servers (with ``[keys] servers``)."""

    def close(self) -> None:
        """Anchor the last records, then flush and close the audit log."""
        if self.anchor is not None:
            self.anchor.close()
        if self.audit is not None:
            self.audit.close()


def open_session(config: Config, token_file: Path | None, *, audit: bool = True) -> Session:
    """Build the session of ``config``; raise a UserError (clear message, exit code) if not."""
    from mdm.dicomweb.transport import use_token_file

    # DICOMweb sites get the mount's own token (re-read per request), or none without it.
    use_token_file(token_file if config.identity is not None else None)
    audit_log = None
    if audit and config.audit is not None:
        from mdm.audit.syslog import SyslogSink

        sink = SyslogSink(config.audit.syslog) if config.audit.syslog else None
        audit_log = AuditLog(config.audit.log, sink=sink)
    if config.identity is None:
        if token_file is not None:
            raise ConfigError(
                config.path, "identity", "a token was given but [identity] is not configured"
            )
        # Said once at mount start (WARNING, by the mount); every other command: INFO.
        log.info(
            "no [identity] in %s: running as the local administrator of a single-user "
            "workstation (full access, identified view)",
            config.path,
        )
        return Session(lambda: LOCAL_ADMIN, LocalAdminResolver(), audit_log, True)
    if token_file is None:
        raise UserError(
            f"{config.path}: [identity] is configured, so a token is required "
            "(--token-file FILE or MDM_TOKEN_FILE)"
        )
    if config.policy is None:
        raise ConfigError(
            config.path, "policy", "missing: with [identity], a [policy] dir is required"
        )
    from mdm.policy import PolicyResolver

    verifier = TokenVerifier(config.identity)
    tokens = TokenFile(token_file, verifier)
    principal = tokens.current()  # refuse to start on a bad token (InvalidToken, exit 3)
    resolver = PolicyResolver(config.policy.dir, known_sites=[s.name for s in config.sites])
    log.info(
        "running as %s (groups: %s); policy %s version %s",
        principal.label(),
        ", ".join(principal.groups) or "-",
        config.policy.dir,
        resolver.version(),
    )
    anchor = None
    if audit_log is not None and config.audit is not None:
        anchor = anchorer_for(audit_log, config.keys, token_file, config.audit.anchor_interval)
    return Session(tokens.current, resolver, audit_log, False, token_file, anchor)


def _no_principal() -> Principal:
    raise InvalidToken("a service session has no principal of its own: each request brings one")


def open_service_session(
    config: Config, token_file: Path | None = None
) -> tuple[Session, TokenVerifier]:
    """The session of a process that serves many principals (the gateway): the policy, the
    audit log and the verifier of the tokens requests bring. ``[identity]`` and ``[policy]``
    are required: a service never runs as the local administrator. ``token_file``: the
    service's own token, for the key servers (``[keys] servers``): they release the cache's
    keys to the service and sign its audit anchors; each request is decided here."""
    if config.identity is None:
        raise ConfigError(
            config.path,
            "identity",
            "missing: the gateway serves many principals and verifies each request's token",
        )
    if config.policy is None:
        raise ConfigError(
            config.path, "policy", "missing: with [identity], a [policy] dir is required"
        )
    from mdm.policy import PolicyResolver

    audit_log = None
    if config.audit is not None:
        from mdm.audit.syslog import SyslogSink

        sink = SyslogSink(config.audit.syslog) if config.audit.syslog else None
        audit_log = AuditLog(config.audit.log, sink=sink)
    resolver = PolicyResolver(config.policy.dir, known_sites=[s.name for s in config.sites])
    log.info("serving many principals; policy %s version %s", config.policy.dir, resolver.version())
    verifier = TokenVerifier(config.identity)
    anchor = None
    if config.keys.servers:
        if token_file is None:
            raise UserError(
                f"{config.path}: [keys] servers: the gateway needs its own token for the key "
                "servers (--token-file FILE or MDM_TOKEN_FILE)"
            )
        service = TokenFile(token_file, verifier).current()  # refuse to start on a bad one
        log.info("key servers: the gateway's cache keys are released to %s", service.label())
        if audit_log is not None and config.audit is not None:
            anchor = anchorer_for(audit_log, config.keys, token_file, config.audit.anchor_interval)
    session = Session(_no_principal, resolver, audit_log, False, token_file, anchor)
    return session, verifier
