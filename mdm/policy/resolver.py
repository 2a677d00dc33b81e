"""The hot-reloading :class:`~mdm.access.decide.AccessResolver` over a policy directory.

Protocol. The policy in force is one immutable :class:`Policy` object behind a single
reference; a reload builds a complete new one and swaps the reference, so a concurrent
``decide`` sees either the old or the new policy, never a mix, and takes no lock. At most once
per ``reload_interval`` a ``decide`` call stats the directory (names, mtimes, sizes of
``*.toml``); only a changed snapshot triggers a reload, and only one thread does it (the others
keep deciding with the policy in force). A snapshot that failed to load is remembered, so a
broken edit is logged once, not on every check, and the last good policy stays in force until
the files change again. Nothing else touches the disk on the decision path.

Half-written files. An editor (or ``git checkout``) that rewrites a file in place can be caught
between truncating and writing; a cut-off file may still be valid TOML that lacks its last
rules, a deny among them. So a changed snapshot is loaded only once it has settled (its newest
mtime at least ``settle`` seconds old, or unchanged since the previous check), and the load is
discarded if the snapshot changed while it ran. The cost is ``settle`` extra seconds of latency.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.policy.evaluate import Policy, PolicyDecision
from mdm.policy.load import load_policy, snapshot
from mdm.policy.model import Advice, PolicyError, Rule

log = logging.getLogger("mdm.policy")


class PolicyResolver:
    """Decides with the policy files of ``directory``; picks up edits without a remount.

    Construction loads the directory and raises :class:`PolicyError` if it is broken (a mount
    must refuse to start: fail closed).
    """

    def __init__(
        self,
        directory: Path,
        *,
        reload_interval: float = 1.0,
        settle: float = 0.25,
        known_sites: Collection[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.reload_interval = reload_interval
        self.settle = settle
        # A changed snapshot seen but not yet settled, and when it was first seen.
        self._pending: tuple[tuple[str, int, int], ...] | None = None
        self._pending_since = 0.0
        self._known_sites = known_sites
        self._lock = threading.Lock()
        self._snapshot = snapshot(self.directory)
        self._policy = load_policy(self.directory, known_sites=known_sites)
        self._failed: tuple[tuple[str, int, int], ...] | None = None
        self._next_check = time.monotonic() + reload_interval
        self.loaded_at = time.time()
        """When the policy in force was loaded (seconds since the epoch)."""
        self.last_reload: tuple[float, str] | None = None
        """(when, "" if it loaded, else its first problem) of the last reload (mdm status)."""
        log.info(
            "policy %s: version %s, %d rules in %d files",
            self.directory,
            self._policy.version,
            len(self._policy.rules),
            len(self._policy.files),
        )
        self._log_warnings(self._policy)

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    def decide(self, principal: Principal, resource: Resource) -> PolicyDecision:
        """The decision of the policy in force (checking for edits at most every interval)."""
        if time.monotonic() >= self._next_check:
            self.refresh()
        return self._policy.decide(principal, resource)

    def version(self) -> str:
        """The version (hash) of the policy in force."""
        return self._policy.version

    def deid_of(self, rule_id: str) -> Mapping[str, Any] | None:
        """The ``[allow.deid]`` table of a rule of the policy in force."""
        rule = self._policy.rule(rule_id)
        return rule.deid if rule is not None else None

    def grants(self, principal: Principal) -> tuple[Rule, ...]:
        """The unexpired allow rules whose principal conditions ``principal`` meets."""
        if time.monotonic() >= self._next_check:
            self.refresh()
        return self._policy.grants(principal)

    def refresh(self) -> bool:
        """Check the directory now and reload it if it changed; True if a new policy is in force.

        Never raises on a broken edit: the error is logged (once per edit) and the last good
        policy stays in force.
        """
        if not self._lock.acquire(blocking=False):
            return False  # another thread is checking right now; its result will do
        try:
            self._next_check = time.monotonic() + self.reload_interval
            snap = snapshot(self.directory)
            if snap == self._snapshot or snap == self._failed:
                self._pending = None
                return False
            now = time.monotonic()
            if snap != self._pending:
                self._pending, self._pending_since = snap, now
            newest = max((m for _, m, _ in snap), default=0) / 1e9
            # Settled: the newest mtime is old enough, or (a clock skewed into the future on a
            # network filesystem) the snapshot has not changed for that long.
            if time.time() - newest < self.settle and now - self._pending_since < self.settle:
                self._next_check = min(self._next_check, now + self.settle)
                return False
            self._pending = None
            try:
                policy = load_policy(self.directory, known_sites=self._known_sites)
            except PolicyError as e:
                if snapshot(self.directory) != snap:
                    return False  # written to while loading: judge the next snapshot instead
                self._failed = snap
                self.last_reload = (time.time(), str(e.problems[0]) if e.problems else str(e))
                log.error(
                    "policy %s: reload failed, version %s stays in force:\n  %s",
                    self.directory,
                    self._policy.version,
                    "\n  ".join(str(p) for p in e.problems),
                )
                return False
            if snapshot(self.directory) != snap:
                return False  # written to while loading: this may be a half-written file
            old = self._policy.version
            self._snapshot, self._failed, self._policy = snap, None, policy
            self.loaded_at = time.time()
            self.last_reload = (self.loaded_at, "")
            log.info(
                "policy %s: reloaded, version %s -> %s (%d rules)",
                self.directory,
                old,
                policy.version,
                len(policy.rules),
            )
            self._log_warnings(policy)
            return True
        finally:
            self._lock.release()

    @staticmethod
    def _log_warnings(policy: Policy) -> None:
        for w in policy.warnings:
            # The lint's advice is for `mdm policy check`; here it would be noise on every start.
            level = logging.INFO if isinstance(w, Advice) else logging.WARNING
            log.log(level, "policy warning: %s", w)
