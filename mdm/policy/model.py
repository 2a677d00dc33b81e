"""The compiled form of an ACL policy: rules, problems, the policy error.

A rule is compiled once at load time into frozensets so that a decision (made for every
directory entry a reader lists) is a handful of set lookups. ``None`` in a condition means the
rule does not constrain it ("any"); an empty set never occurs (the loader rejects it as a rule
that can never match).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from mdm.access.decide import AccessLevel
from mdm.errors import UserError

Effect = Literal["allow", "deny"]


@dataclass(frozen=True)
class Problem:
    """One validation finding, located at ``file:line``."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        # line 0: the problem is about the file (or directory) as a whole.
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Advice(Problem):
    """A warning of the lint (``policy check``): the rule is valid but likely not meant.
    Running mounts log it at INFO only; ``policy check`` prints it."""


class PolicyError(UserError):
    """A policy directory (or its test cases) failed validation; lists every problem found."""

    exit_code = 2

    def __init__(self, where: object, problems: Sequence[Problem]) -> None:
        self.where = str(where)
        # By file and line, each once: a reviewer reads them top to bottom.
        self.problems = tuple(sorted(set(problems), key=lambda p: (p.file, p.line, p.message)))
        n = len(self.problems)
        head = f"{self.where}: {n} policy error{'s' if n != 1 else ''}"
        super().__init__("\n  ".join([head, *(str(p) for p in self.problems)]))


@dataclass(frozen=True)
class Rule:
    """One compiled ``[[allow]]`` or ``[[deny]]`` rule.

    Principal conditions (``subjects``, ``groups``, ``issuers``, ``claims``) AND together; the
    values listed for one condition OR together. The same holds for the resource conditions.
    ``expires`` is the first instant (timezone-aware, UTC if the file gave none) at which the
    rule no longer applies.
    """

    id: str
    effect: Effect
    access: AccessLevel
    file: str
    line: int
    description: str = ""
    subjects: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    issuers: frozenset[str] | None = None
    claims: tuple[tuple[str, frozenset[str]], ...] = ()
    sites: frozenset[str] | None = None
    patient_ids: frozenset[str] | None = None
    study_uids: frozenset[str] | None = None
    trials: frozenset[str] | None = None
    modalities: frozenset[str] | None = None
    study_dates: tuple[date, date] | None = None
    expires: datetime | None = None
    expires_text: str = ""
    deid: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """``file:line`` of the rule's header."""
        return f"{self.file}:{self.line}"

    @property
    def has_principals(self) -> bool:
        """Whether the rule names whom it applies to (a deny without principals hits everyone)."""
        return bool(self.subjects or self.groups or self.issuers or self.claims)

    def expired(self, now: datetime) -> bool:
        """Whether ``now`` is at or past the rule's expiry."""
        return self.expires is not None and now >= self.expires
