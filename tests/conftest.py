"""Shared fixtures: synthetic DICOM data and real Orthanc "hospitals" on loopback.

``synth_small``            a few small instances as files (session scope).
``orthanc_pair``           two Orthancs, SiteA and SiteB, with data (module scope; do not pause
                           or kill them - use ``orthanc_pair_private`` for fault tests).
``orthanc_pair_private``   the same, started for one test only.
``dicom_mode``             ``"fast"``, ``"python"`` (fast, compiled loop off) or ``"stock"``.

Data layout of a pair (6 patients, each one study of a 4-slice CT and a 3-slice MR series):
patients 0 and 1 only on SiteA, 2 and 3 only on SiteB, patient 4's study on both, patient 5's CT
series on both and its MR series only on SiteB. Even patients are in trial NANT-2007-01.
Nothing here imports pyfuse3.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mdm.config import FAST_DICOM_ENV, fast_dicom_default
from mdm.dicom.fast.compiled import COMPILED_DICOM_ENV
from mdm_demo.localpacs import LOOPBACK, LocalOrthanc, free_port, stop_all
from mdm_demo.synth import GeneratedInstance, by_series, generate
from tests.phi import phi_in, remember_phi

BRIDGE_AET = "MDMTEST"


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> list[GeneratedInstance]:
    """Two patients, each a study of a 5-slice CT and a 4-slice MR series, 64x64, as files."""
    root = tmp_path_factory.mktemp("synth_small")
    return generate(root, patients=2, seed=1234, ct_slices=5, mr_slices=4, rows=64, cols=64)


@dataclass
class Site:
    """One PACS of the pair: its config name, the server, and what it holds."""

    name: str
    server: LocalOrthanc
    instances: list[GeneratedInstance] = field(default_factory=list)

    @property
    def sop_uids(self) -> set[str]:
        return {i.sop_uid for i in self.instances}

    @property
    def series_uids(self) -> set[str]:
        return {i.series_uid for i in self.instances}

    @property
    def study_uids(self) -> set[str]:
        return {i.study_uid for i in self.instances}

    @property
    def patient_ids(self) -> set[str]:
        return {i.patient_id for i in self.instances}


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_table(header: str, values: Mapping[str, object]) -> str:
    lines = [header] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_one_site_config(
    directory: Path,
    pacs: LocalOrthanc,
    *,
    site: str,
    bridge_aet: str,
    bridge_port: int,
    max_bytes: str = "1GiB",
    timeout: str = "30s",
) -> Path:
    """Write ``directory/mdm.toml`` for a bridge on one Orthanc (named ``site``), its cache and
    keyring under ``directory``; return its path. The two-PACS fixture has
    :meth:`PacsPair.write_config`."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "mdm.toml"
    cfg.write_text(
        _toml_table("[bridge]", {"ae_title": bridge_aet, "host": LOOPBACK, "port": bridge_port})
        + _toml_table("[cache]", {"dir": directory / "cache", "max_bytes": max_bytes})
        + _toml_table("[keys]", {"keyring": directory / "keyring.json"})
        + _toml_table(
            "[[site]]",
            {
                "name": site,
                "ae_title": pacs.aet,
                "host": LOOPBACK,
                "port": pacs.dicom_port,
                "timeout": timeout,
            },
        )
    )
    return cfg


@dataclass
class PacsPair:
    """Two running Orthancs and the inventory of which generated UIDs are where."""

    a: Site
    b: Site
    instances: list[GeneratedInstance]
    """Every distinct generated instance (each SOP once)."""
    bridge_aet: str
    bridge_port: int
    """Free port reserved for the bridge's storage SCP, known to both PACS as ``bridge_aet``."""
    only_a_patients: list[str]
    only_b_patients: list[str]
    shared_series: list[str]
    """Series held by both sites (fail-over candidates)."""
    split_study: str
    """A study whose CT series is on both sites and whose MR series is only on SiteB."""

    @property
    def sites(self) -> tuple[Site, Site]:
        return (self.a, self.b)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def sites_holding(self, uid: str) -> set[str]:
        """Names of the sites holding a SOP, series or study UID (or patient ID)."""
        return {
            s.name
            for s in self.sites
            if uid in s.sop_uids
            or uid in s.series_uids
            or uid in s.study_uids
            or uid in s.patient_ids
        }

    def series(self, series_uid: str) -> list[GeneratedInstance]:
        """The generated instances of one series, in slice order."""
        return by_series(self.instances)[series_uid]

    def add_destination(self, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Declare another C-MOVE destination (modality name = AET) on both PACS."""
        for s in self.sites:
            s.server.add_modality(aet, aet, host, port)

    def write_config(
        self,
        directory: Path,
        *,
        sites: Sequence[str] = ("SiteA", "SiteB"),
        retrieve: str = "move",
        timeout: str = "10s",
        max_bytes: str = "1GiB",
        bridge_options: Mapping[str, object] | None = None,
        site_options: Mapping[str, Mapping[str, object]] | None = None,
        extra: str = "",
    ) -> Path:
        """Write ``directory/mdm.toml`` for a bridge federating the pair; return its path.

        ``sites`` picks and orders the sites (fail-over follows this order);
        ``bridge_options`` adds ``[bridge]`` keys, ``site_options[name]`` adds keys to one
        ``[[site]]``; ``extra`` is raw TOML appended at the end (``[identity]``, ``[policy]``,
        ``[audit]``, a bogus ``[[site]]`` ...). Cache and keyring live under ``directory``.
        """
        directory.mkdir(parents=True, exist_ok=True)
        bridge: dict[str, object] = {
            "ae_title": self.bridge_aet,
            "host": LOOPBACK,
            "port": self.bridge_port,
            "retrieve": retrieve,
        }
        bridge.update(bridge_options or {})
        parts = [
            _toml_table("[bridge]", bridge),
            _toml_table("[cache]", {"dir": directory / "cache", "max_bytes": max_bytes}),
            _toml_table("[keys]", {"keyring": directory / "keyring.json"}),
        ]
        for name in sites:
            srv = self.site(name).server
            values: dict[str, object] = {
                "name": name,
                "ae_title": srv.aet,
                "host": LOOPBACK,
                "port": srv.dicom_port,
                "retrieve": retrieve,
                "timeout": timeout,
            }
            values.update((site_options or {}).get(name, {}))
            parts.append(_toml_table("[[site]]", values))
        if extra:
            parts.append(extra.rstrip("\n") + "\n")
        path = directory / "mdm.toml"
        path.write_text("\n".join(parts))
        return path


def start_pair(root: Path) -> PacsPair:
    """Start SiteA and SiteB under ``root`` and upload the pair's data (see module docstring).

    The caller must call :func:`stop_pair`, even if this raises half-way (servers already
    started are stopped here on failure).
    """
    instances = generate(None, patients=6, seed=2007, ct_slices=4, mr_slices=3, rows=64, cols=64)
    remember_phi(instances)
    patients: list[str] = []
    for inst in instances:
        if inst.patient_id not in patients:
            patients.append(inst.patient_id)
    on_a: list[GeneratedInstance] = []
    on_b: list[GeneratedInstance] = []
    for inst in instances:
        p = patients.index(inst.patient_id)
        if p in (0, 1):
            on_a.append(inst)
        elif p in (2, 3):
            on_b.append(inst)
        elif p == 4:
            on_a.append(inst)
            on_b.append(inst)
        else:  # p == 5: CT on both, MR only on B
            on_b.append(inst)
            if inst.modality == "CT":
                on_a.append(inst)
    bridge_port = free_port()
    dests = {BRIDGE_AET: (BRIDGE_AET, LOOPBACK, bridge_port)}
    # die_with_parent: a test run killed hard must not leave Orthancs behind. Fixtures run in
    # the main thread, so the parent "thread" lives as long as the test session.
    a = LocalOrthanc(
        root / "site_a", name="SiteA", aet="SITEA", modalities=dests, die_with_parent=True
    )
    b = LocalOrthanc(
        root / "site_b", name="SiteB", aet="SITEB", modalities=dests, die_with_parent=True
    )
    try:
        a.start()
        b.start()
        a.upload(on_a)
        b.upload(on_b)
    except BaseException:
        stop_all([a, b])
        raise
    shared = sorted({i.series_uid for i in on_a} & {i.series_uid for i in on_b})
    split = next(i.study_uid for i in instances if i.patient_id == patients[5])
    return PacsPair(
        a=Site("SiteA", a, on_a),
        b=Site("SiteB", b, on_b),
        instances=instances,
        bridge_aet=BRIDGE_AET,
        bridge_port=bridge_port,
        only_a_patients=patients[0:2],
        only_b_patients=patients[2:4],
        shared_series=shared,
        split_study=split,
    )


def stop_pair(pair: PacsPair) -> None:
    """Stop both servers (in parallel) and reap them."""
    stop_all([pair.a.server, pair.b.server])


@pytest.fixture(scope="module")
def orthanc_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsPair]:
    """SiteA and SiteB with data, shared by a test module. Do not pause, kill or modify."""
    pair = start_pair(tmp_path_factory.mktemp("orthanc_pair"))
    try:
        yield pair
    finally:
        stop_pair(pair)


@pytest.fixture
def orthanc_pair_private(tmp_path: Path) -> Iterator[PacsPair]:
    """SiteA and SiteB with data, for one test: pause, kill or modify them freely."""
    pair = start_pair(tmp_path / "pacs")
    try:
        yield pair
    finally:
        stop_pair(pair)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local token issuer (``mdm token init``) for the tests of one module."""
    from tests.mountutil import mdm

    d = tmp_path_factory.mktemp("idp")
    mdm("token", "init", str(d))
    return d


# ---------------------------------------------------------------------------- no PHI in logs
@pytest.fixture(autouse=True)
def no_phi_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail any test whose in-process log records carry a sentinel PHI value (the mount
    daemons' logs are checked by tests.mountutil.Mount when it stops)."""
    yield
    for when in ("setup", "call", "teardown"):
        for rec in caplog.get_records(when):  # type: ignore[arg-type]
            try:
                text = rec.getMessage()
            except Exception:
                text = str(rec.msg)
            found = phi_in(text)
            assert not found, f"PHI {found} logged by {rec.name}: {text[:200]}"


# ---------------------------------------------------------------------------- test tiers
SERVICE_MODULES = frozenset(
    {
        "test_audit_anchor",
        "test_audit_syslog",
        "test_dicom_net",
        "test_dicomweb",
        "test_fetch_hostile",
        "test_fuzz_receiver",
        "test_keyservice",
        "test_large_object",
        "test_localpacs",
        "test_peer_limits",
        "test_receiver_process",
        "test_retrieval_faults",
        "test_store",
    }
)
"""Modules whose tests start real servers or processes but mount nothing."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in one tier: ``-m unit`` runs where nothing may listen or mount, ``-m
    "not e2e"`` where /dev/fuse is missing."""
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("service"):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        item.add_marker(pytest.mark.service if module in SERVICE_MODULES else pytest.mark.unit)
    # A fast-only test run where the stock path is the default (MDM_FAST_DICOM=0, outside
    # the modules that run both) would test nothing: it is deselected, not skipped.
    if not fast_dicom_default():
        keep = [i for i in items if not _fast_only_on_stock(i)]
        if len(keep) != len(items):
            dropped = [i for i in items if _fast_only_on_stock(i)]
            items[:] = keep
            config = dropped[0].config
            config.hook.pytest_deselected(items=dropped)


def _fast_only_on_stock(item: pytest.Item) -> bool:
    if item.get_closest_marker("fast_only") is None:
        return False
    callspec = getattr(item, "callspec", None)
    mode = callspec.params.get("dicom_mode") if callspec is not None else None
    return mode not in ("fast", "python")


# ---------------------------------------------------------------------- DICOM fast path
DICOM_MODULES = frozenset(
    {
        "test_as_stored",
        "test_dicom_net",
        "test_fetch_hostile",
        "test_find_limit",
        "test_hostile_pacs",
        "test_large_object",
        "test_peer_limits",
        "test_receiver_process",
        "test_retrieval_faults",
    }
)
"""DICOM service modules whose tests run twice: on the fast path and on stock pynetdicom
(``[bridge] fast_dicom = false``). A test of a protection only the fast path has is marked
``fast_only`` and runs once, on the fast path (docs/DICOM.md, The fast path)."""
COMPILED_MODULES = frozenset(
    {
        "test_dicom_net",
        "test_hostile_pacs",
        "test_large_object",
        "test_peer_limits",
        "test_receiver_process",
    }
)
"""Of DICOM_MODULES, those whose tests also run on the fast path with the compiled receive
loop switched off (``dicom_mode = "python"``, ``MDM_COMPILED_DICOM=0``): the byte-level and
limit tests of inbound associations, where the compiled loop replaces the Python one. In
``"fast"`` mode the compiled loop serves (it is built by scripts/setup)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module not in DICOM_MODULES or "dicom_mode" not in metafunc.fixturenames:
        return
    fast_only = metafunc.definition.get_closest_marker("fast_only") is not None
    modes = ["fast"] if fast_only else ["fast", "stock"]
    if module in COMPILED_MODULES:
        modes.insert(1, "python")
    metafunc.parametrize("dicom_mode", modes, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def dicom_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """The DICOM path this module's tests run on, set as the default of ``[bridge]
    fast_dicom`` through ``MDM_FAST_DICOM`` (so every ``BridgeSettings`` built in the test,
    and every process it starts, takes it). Module fixtures that build settings depend on
    it, so they are built again for each mode. Outside DICOM_MODULES: the environment's."""
    mode = getattr(request, "param", None)
    if mode is None:
        yield "fast" if fast_dicom_default() else "stock"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAST_DICOM_ENV, "0" if mode == "stock" else "1")
        mp.setenv(COMPILED_DICOM_ENV, "0" if mode == "python" else "1")
        yield str(mode)
