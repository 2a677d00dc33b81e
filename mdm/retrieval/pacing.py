"""Protecting a clinical PACS: retrievals per minute, bulk windows, and work a reader waits for
served first.

Every retrieval (one C-MOVE or C-GET request, or one WADO-RS request) asks :class:`Pacer`
for a slot of its site first, after the site's association limit. Two kinds of work:

- **urgent**: an object a reader (a file open, a gateway request) waits for. It is never held
  by a bulk window, and it goes before any bulk work queued at the same site;
- **bulk**: prefetch, ``mdm fetch`` and series-wide requests of at least ``bulk_min_objects``
  objects. Outside the site's ``bulk_windows`` (when it has any) it waits for the next window.
  A reader that starts waiting for an object of queued bulk work promotes it to urgent.

``retrievals_per_minute`` bounds both kinds together (a sliding minute); 0 is no bound.
The queue is visible in ``mdm status``, in the gateway's ``/status`` and as a metric.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from mdm.config import SiteSettings

log = logging.getLogger(__name__)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?:(?P<d1>[A-Za-z]{3})(?:-(?P<d2>[A-Za-z]{3}))?)?\s*"
    r"(?:(?P<t1>\d{1,2}:\d{2})-(?P<t2>\d{1,2}:\d{2}))?\s*$"
)
POLL = 1.0
"""Seconds between checks of a waiting retrieval (rate, window, promotion)."""


@dataclasses.dataclass(frozen=True)
class Window:
    """Days of the week (0 = Monday) and a time range; ``end < start`` runs past midnight
    (the night belongs to the day it starts)."""

    days: frozenset[int]
    start: dt.time
    end: dt.time

    def contains(self, now: dt.datetime) -> bool:
        """True when ``now`` (local time) is inside the window."""
        t, day = now.time(), now.weekday()
        if self.start <= self.end:
            return day in self.days and self.start <= t < self.end
        # Over midnight: the evening of a listed day, or the morning after one.
        return (day in self.days and t >= self.start) or (
            (day - 1) % 7 in self.days and t < self.end
        )


def parse_window(text: str) -> Window:
    """``"Mon-Fri 19:00-07:00"``, ``"Sat-Sun"``, ``"22:00-06:00"``; ValueError otherwise."""
    m = _WINDOW.match(text)
    if m is None or not (m.group("d1") or m.group("t1")):
        raise ValueError(
            f'expected "Mon-Fri 19:00-07:00", "Sat-Sun" or "22:00-06:00", got {text!r}'
        )
    days = set(range(7))
    if m.group("d1"):
        try:
            a = DAYS.index(m.group("d1").lower())
            b = DAYS.index((m.group("d2") or m.group("d1")).lower())
        except ValueError:
            raise ValueError(f"{text!r}: days are Mon, Tue, Wed, Thu, Fri, Sat, Sun") from None
        days = {(a + k) % 7 for k in range((b - a) % 7 + 1)}
    start, end = dt.time(0, 0), dt.time(0, 0)
    if m.group("t1"):
        try:
            start = dt.time.fromisoformat(m.group("t1").zfill(5))
            end = dt.time.fromisoformat(m.group("t2").zfill(5))
        except ValueError:
            raise ValueError(f"{text!r}: times are HH:MM") from None
    if start == end:  # a whole day
        start, end = dt.time(0, 0), dt.time.max
    return Window(frozenset(days), start, end)


@dataclasses.dataclass
class SitePacing:
    """What one site allows: retrievals per minute (0: unbounded), bulk windows, and the
    size from which a request is bulk."""

    per_minute: int = 0
    windows: tuple[Window, ...] = ()
    bulk_min_objects: int = 1


class _Site:
    def __init__(self, rules: SitePacing) -> None:
        self.rules = rules
        self.started: deque[float] = deque()
        self.waiting = {"urgent": 0, "bulk": 0, "window": 0}


class Pacer:
    """The per-site slots of retrievals (see the module docstring)."""

    def __init__(
        self,
        rules: dict[str, SitePacing],
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self._sites = {name: _Site(r) for name, r in rules.items()}
        self._clock = clock
        self._now = now

    def is_bulk(self, site: str, objects: int, bulk: bool) -> bool:
        """Whether a request of ``objects`` objects is bulk work at ``site``."""
        s = self._sites.get(site)
        return bulk and s is not None and objects >= s.rules.bulk_min_objects

    def in_window(self, site: str) -> bool:
        """True when bulk work may run at ``site`` now (always, without windows)."""
        s = self._sites.get(site)
        if s is None or not s.rules.windows:
            return True
        now = self._now()
        return any(w.contains(now) for w in s.rules.windows)

    def _rate_ok(self, s: _Site) -> bool:
        if s.rules.per_minute <= 0:
            return True
        cutoff = self._clock() - 60.0
        while s.started and s.started[0] <= cutoff:
            s.started.popleft()
        return len(s.started) < s.rules.per_minute

    async def admit(
        self, site: str, *, bulk: bool, promoted: Callable[[], bool] = lambda: False
    ) -> None:
        """Wait for a slot of ``site``: urgent work first, bulk work inside its windows.
        ``promoted()`` turns waiting bulk work urgent (a reader now waits for it)."""
        s = self._sites.get(site)
        if s is None:
            return
        said = False
        kind = "bulk" if bulk else "urgent"
        s.waiting[kind] += 1
        try:
            while True:
                urgent = not bulk or promoted()
                if urgent and kind == "bulk":
                    s.waiting["bulk"] -= 1
                    kind = "urgent"
                    s.waiting["urgent"] += 1
                window = urgent or self.in_window(site)
                first = urgent or s.waiting["urgent"] == 0
                if window and first and self._rate_ok(s):
                    s.started.append(self._clock())
                    return
                if not said:
                    said = True
                    why = "outside its bulk windows" if not window else "its retrievals per minute"
                    log.info("retrieval from site %s queued: %s", site, why)
                if not window:
                    s.waiting["window"] += 1
                    try:
                        await trio.sleep(POLL)
                    finally:
                        s.waiting["window"] -= 1
                else:
                    await trio.sleep(POLL if bulk else 0.05)
        finally:
            s.waiting[kind] -= 1

    def queued(self) -> dict[str, dict[str, int]]:
        """Retrievals waiting per site: urgent, bulk, and bulk held by a window."""
        return {name: dict(s.waiting) for name, s in self._sites.items()}


def pacer_for(sites: Sequence[SiteSettings]) -> Pacer:
    """The pacer of the configured sites."""
    return Pacer(
        {
            s.name: SitePacing(
                per_minute=s.retrievals_per_minute,
                windows=tuple(parse_window(w) for w in s.bulk_windows),
                bulk_min_objects=s.bulk_min_objects,
            )
            for s in sites
        }
    )
