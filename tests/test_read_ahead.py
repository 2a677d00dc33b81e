"""Read-ahead of a series too large for the cache (mdm.retrieval.targets).

A real Orthanc holds one series of ``COUNT`` instances; the mount's cache holds 45 % of
it, so the series is not prefetched whole. A reader going through it in order, in either
listing's order (by file name, as ``studies/`` lists it, or by InstanceNumber, as ``browse/``
does; forwards or backwards), gets its objects in a few retrievals of several objects each,
each object retrieved once (nothing read ahead is evicted before it is read). A reader
jumping about gets one retrieval per object read and nothing more.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from mdm_demo.localpacs import LocalOrthanc, free_port
from mdm_demo.synth import iter_series
from tests.conftest import write_one_site_config
from tests.mountutil import Mount, mdm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

COUNT = 60
SIDE = 128
AET = "MDMAHEAD"
PORT = free_port()


class Series:
    def __init__(self, pacs: LocalOrthanc) -> None:
        self.pacs = pacs
        self.number: dict[str, int] = {}
        self.study = self.uid = ""
        for inst in iter_series(None, count=COUNT, rows=SIDE, cols=SIDE, site_tag="ahead"):
            data = inst.read()
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            self.number[inst.sop_uid] = int(ds.InstanceNumber)
            self.study, self.uid = inst.study_uid, inst.series_uid
            pacs.upload([data])

    def by_name(self) -> list[str]:
        return sorted(self.number)

    def by_number(self) -> list[str]:
        return sorted(self.number, key=lambda u: (f"{self.number[u]:05d}", u))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Series]:
    tmp = tmp_path_factory.mktemp("ahead")
    pacs = LocalOrthanc(
        tmp / "orthanc",
        name="ahead",
        aet="AHEADPACS",
        tcp_nodelay=True,
        modalities={AET: (AET, "127.0.0.1", PORT)},
    ).start()
    try:
        yield Series(pacs)
    finally:
        pacs.stop()


def config(tmp: Path, s: Series, max_bytes: str = "1GiB") -> Path:
    return write_one_site_config(
        tmp, s.pacs, site="AHEAD", bridge_aet=AET, bridge_port=PORT, max_bytes=max_bytes
    )


def retrievals(log: str, series_uid: str) -> list[int]:
    """The size of each retrieval the mount made for the series (its 'retrieving N' lines)."""
    pat = re.compile(rf"retrieving (\d+) object\(s\) of series {re.escape(series_uid)} ")
    return [int(m.group(1)) for m in pat.finditer(log)]


def one_object_bytes(tmp: Path, s: Series) -> int:
    cfg = config(tmp, s)
    with Mount(cfg, tmp / "mnt") as m:
        (m.mountpoint / "studies" / s.study / s.uid / f"{s.by_name()[0]}.dcm").read_bytes()
    return int(json.loads(mdm("cache", "stats", "--json", "--config", str(cfg)).stdout)["bytes"])


@pytest.fixture(scope="module")
def cap(series: Series, tmp_path_factory: pytest.TempPathFactory) -> int:
    """A cache of 45 % of the series (a window of about COUNT / 9 objects): too small for it
    to be prefetched whole (more than half of it)."""
    return one_object_bytes(tmp_path_factory.mktemp("probe"), series) * COUNT * 45 // 100


def read_in(order: list[str], tmp: Path, s: Series, cap: int) -> str:
    with Mount(config(tmp, s, str(cap)), tmp / "mnt") as m:
        sdir = m.mountpoint / "studies" / s.study / s.uid
        for uid in order:
            ds = pydicom.dcmread(sdir / f"{uid}.dcm")
            assert ds.SOPInstanceUID == uid
            assert len(ds.PixelData) == SIDE * SIDE * 2
        return m.log_text()


@pytest.mark.parametrize("order", ["name", "number", "number-backwards", "name-twice"])
def test_a_reader_in_order_is_read_ahead(
    order: str, series: Series, cap: int, tmp_path: Path
) -> None:
    uids = series.by_number() if order.startswith("number") else series.by_name()
    if order.endswith("backwards"):
        uids.reverse()
    passes = 2 if order.endswith("twice") else 1  # a job's second epoch, in the same mount
    log = read_in(uids * passes, tmp_path, series, cap)
    sizes = retrievals(log, series.uid)
    assert "is read ahead" in log, log[-3000:]
    # Every object retrieved once a pass: nothing read ahead was evicted before its reader
    # came (in a second pass, what the first left cached is evicted before it is reached).
    if passes == 1:
        assert sum(sizes) == COUNT, sizes
    else:
        assert sum(sizes) <= 2 * COUNT, sizes
    # In windows of several objects, not one retrieval per object read.
    assert len(sizes) <= passes * COUNT // 2, sizes


def jumping(s: Series) -> list[str]:
    """Objects in an order never within 3 files of the one before, in either listing, in
    either direction."""
    pos = [{u: n for n, u in enumerate(o)} for o in (s.by_name(), s.by_number())]
    left = s.by_name()
    out = [left.pop(0)]
    while True:
        nxt = next(
            (u for u in left if all(abs(p[u] - p[out[-1]]) > 3 for p in pos)),
            None,
        )
        if nxt is None:
            return out
        left.remove(nxt)
        out.append(nxt)


def test_a_reader_jumping_about_gets_nothing_read_ahead(
    series: Series, cap: int, tmp_path: Path
) -> None:
    order = jumping(series)
    assert len(order) >= COUNT // 2
    log = read_in(order, tmp_path, series, cap)
    assert "is read ahead" in log  # the series is too large: a window is ready, unused
    assert retrievals(log, series.uid) == [1] * len(order)
