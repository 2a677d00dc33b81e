"""Protecting a clinical PACS: bulk windows, retrievals per minute, readers first.

The units drive :class:`mdm.retrieval.pacing.Pacer` with a controlled clock and calendar;
the end-to-end test runs a real mount whose site is outside its bulk window: a reader is
served at once, while the prefetch of the rest of the series waits, visibly, in
``mdm status``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
import trio

from mdm.config import load_config
from mdm.errors import ConfigError
from mdm.retrieval.pacing import Pacer, SitePacing, parse_window
from tests.conftest import PacsPair
from tests.mountutil import Mount, mdm
from tests.test_e2e_mount import same_dataset

MON_20H = dt.datetime(2026, 11, 30, 20, 0)  # a Monday evening
TUE_06H = dt.datetime(2026, 12, 1, 6, 0)
TUE_12H = dt.datetime(2026, 12, 1, 12, 0)
SAT_12H = dt.datetime(2026, 12, 5, 12, 0)


def test_windows_parse_and_cover_nights_and_weekends() -> None:
    night = parse_window("Mon-Fri 19:00-07:00")
    assert night.contains(MON_20H) and night.contains(TUE_06H)
    assert not night.contains(TUE_12H)
    assert not night.contains(dt.datetime(2026, 11, 30, 6, 0))  # Sunday night is not listed
    weekend = parse_window("Sat-Sun")
    assert weekend.contains(SAT_12H) and not weekend.contains(TUE_12H)
    daily = parse_window("22:00-06:00")
    assert daily.contains(dt.datetime(2026, 12, 5, 23, 0)) and not daily.contains(TUE_12H)
    for bad in ("Mon-Fry", "25:00-26:00", "soon", ""):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_config_names_the_bad_window(tmp_path: Path) -> None:
    cfg = tmp_path / "mdm.toml"
    cfg.write_text(
        f'[cache]\ndir = "{tmp_path}/c"\n[[site]]\nname = "A"\nae_title = "A"\nhost = "127.0.0.1"\n'
        'port = 104\nbulk_windows = ["Mon-Fri 19:00-07:00", "weekends"]\n'
    )
    with pytest.raises(ConfigError, match=r"site\[0\]\.bulk_windows"):
        load_config(cfg)


def run_pacer(
    pacer: Pacer, jobs: list[tuple[str, bool]], promote: set[str] | None = None
) -> list[str]:
    """Start ``jobs`` (name, bulk) in order; the order they are admitted in."""
    order: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            for name, bulk in jobs:

                async def one(name: str = name, bulk: bool = bulk) -> None:
                    await pacer.admit("A", bulk=bulk, promoted=lambda: name in (promote or set()))
                    order.append(name)

                n.start_soon(one)
                await trio.sleep(0.01)
            with trio.move_on_after(5):
                while len(order) < len(jobs):
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()

    trio.run(main)
    return order


def test_bulk_waits_for_its_window_but_a_reader_does_not() -> None:
    p = Pacer({"A": SitePacing(windows=(parse_window("Sat-Sun"),))}, now=lambda: TUE_12H)
    assert run_pacer(p, [("prefetch", True), ("reader", False)]) == ["reader"]
    # A reader that starts waiting for the bulk work's objects promotes it.
    p = Pacer({"A": SitePacing(windows=(parse_window("Sat-Sun"),))}, now=lambda: TUE_12H)
    assert run_pacer(p, [("prefetch", True)], promote={"prefetch"}) == ["prefetch"]
    p = Pacer({"A": SitePacing(windows=(parse_window("Sat-Sun"),))}, now=lambda: SAT_12H)
    assert run_pacer(p, [("prefetch", True)]) == ["prefetch"]


def test_retrievals_per_minute_and_readers_first() -> None:
    clock = [1000.0]
    p = Pacer({"A": SitePacing(per_minute=2)}, clock=lambda: clock[0])
    # Two slots in the minute: the third waits, and when the minute has passed a reader
    # queued after a bulk job goes first.
    order: list[str] = []

    async def main() -> None:
        async def one(name: str, bulk: bool) -> None:
            await p.admit("A", bulk=bulk)
            order.append(name)

        async with trio.open_nursery() as n:
            for name in ("a", "b"):
                n.start_soon(one, name, False)
            await trio.sleep(0.1)
            n.start_soon(one, "bulk", True)
            await trio.sleep(0.1)
            n.start_soon(one, "reader", False)
            await trio.sleep(0.3)
            assert sorted(order) == ["a", "b"]
            assert p.queued()["A"]["urgent"] == 1 and p.queued()["A"]["bulk"] == 1
            clock[0] += 61
            await trio.sleep(0.3)
            assert order[2:] == ["reader"]
            clock[0] += 61
            with trio.move_on_after(3):
                while len(order) < 4:
                    await trio.sleep(0.05)

    trio.run(main)
    assert order[2:] == ["reader", "bulk"]


@pytest.mark.e2e
def test_a_reader_is_served_while_the_prefetch_waits_for_the_window(
    orthanc_pair: PacsPair, tmp_path: Path
) -> None:
    pair = orthanc_pair
    # A window that is not now: the day of the week after tomorrow.
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[(dt.date.today().weekday() + 2) % 7]
    cfg = pair.write_config(
        tmp_path,
        sites=("SiteA",),
        site_options={"SiteA": {"bulk_windows": [day]}},
    )
    series = max(
        {i.series_uid for i in pair.instances if pair.sites_holding(i.sop_uid) == {"SiteA"}},
        key=lambda s: len(pair.series(s)),
    )
    members = pair.series(series)
    assert len(members) >= 3
    with Mount(cfg, tmp_path / "mnt") as m:
        base = m.mountpoint / "studies" / members[0].study_uid / series
        t0 = time.monotonic()
        for inst in members[:2]:  # the second cold open asks for the prefetch
            same_dataset((base / f"{inst.sop_uid}.dcm").read_bytes(), inst)
        assert time.monotonic() - t0 < 20
        deadline = time.monotonic() + 10
        paced: dict[str, int] = {}
        while time.monotonic() < deadline:
            doc = json.loads(mdm("status", "--json", "--config", str(cfg), check=False).stdout)
            paced = doc["sites"][0]["paced"]
            if paced.get("window"):
                break
            time.sleep(0.3)
        assert paced.get("bulk") == 1 and paced.get("window") == 1, paced
        doc = json.loads(mdm("status", "--json", "--config", str(cfg), check=False).stdout)
        assert doc["cache"]["objects"] == 2  # nothing of the prefetch has been retrieved
        # A reader that wants one of the held objects is served at once.
        same_dataset((base / f"{members[2].sop_uid}.dcm").read_bytes(), members[2])
