"""The namespace services in-process, without a kernel mount (as S3QL's ``t3_fs_api``).

Drives :class:`mdm.namespace.bridge.Bridge` (the facade a mount uses) and
:meth:`~mdm.namespace.bridge.Bridge.as_principal` handles (what a multi-principal front end
uses) against two real local PACS: path resolution under /studies, /patients, /sites and
/browse, ``.metadata.json``, remapped UIDs of de-identified views, metadata-only views, hidden
objects, and principals sharing one process's caches. Runs where /dev/fuse is missing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
import trio

from mdm.access.identity import Principal, TokenVerifier
from mdm.access.session import open_session
from mdm.config import Config, load_config
from mdm.deid import map_uid, pseudonym
from mdm.errors import AccessDenied, NotFound
from mdm.namespace.bridge import Bridge, open_bridge
from mdm.ops import metrics
from mdm.store.keys import LocalKeyring
from mdm_demo.synth import TRIAL_PROTOCOL
from tests.conftest import PacsPair
from tests.test_e2e_deid import POLICY as DEID_POLICY
from tests.test_e2e_policy import identity_config, token

pytestmark = pytest.mark.service

# The de-identification test's rules (scopes "nant" for group grid, "other" for group other;
# radiologists identified at SiteA), and a metadata-only grant.
POLICY = (
    DEID_POLICY
    + f"""
[[allow]]
id = "cohort-meta"
description = "a researcher: the trial, metadata only"
principals = {{ subjects = ["asmith"] }}
resources = {{ trial = "{TRIAL_PROTOCOL}" }}
access = "metadata"
"""
)

T = TypeVar("T")


def counter(name: str, **labels: str) -> float:
    """A counter's value in the process's metrics registry (0 before its first use)."""
    return metrics.REGISTRY.get_sample_value(name + "_total", labels) or 0.0


def run_as(cfg: Path, token_file: Path | None, fn: Callable[[Bridge], Awaitable[T]]) -> T:
    """``fn(bridge)`` on a bridge of ``cfg`` opened for the session of ``token_file``."""
    config = load_config(cfg)
    session = open_session(config, token_file)

    async def go() -> T:
        async with open_bridge(config, session, get_if_port_busy=True) as bridge:
            return await fn(bridge)

    try:
        return trio.run(go)
    finally:
        session.close()


def principal(config: Config, token_file: Path) -> Principal:
    """The verified principal of a token file (what a gateway gets from a bearer token)."""
    assert config.identity is not None
    return TokenVerifier(config.identity).verify(token_file.read_text().strip())


def names(entries: list[object]) -> set[str]:
    return {e.name for e in entries if e.name != ".metadata.json"}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- identified
def test_identified_tree(orthanc_pair: PacsPair, tmp_path: Path) -> None:
    """The local administrator: /studies, /patients, /sites, /browse and .metadata.json show
    the originals; a file reads back byte-exact, retrieved once, then from the cache."""
    pair = orthanc_pair
    cfg = pair.write_config(tmp_path)
    inst = pair.instances[0]

    async def go(b: Bridge) -> None:
        assert names(await b.listdir(())) == {"studies", "patients", "sites", "browse"}
        assert names(await b.listdir(("studies",))) == {i.study_uid for i in pair.instances}
        assert names(await b.listdir(("patients",))) == {i.patient_id for i in pair.instances}
        assert names(await b.listdir(("sites",))) == {"SiteA", "SiteB"}
        assert names(await b.listdir(("sites", "SiteA"))) == pair.a.patient_ids
        series = names(await b.listdir(("studies", inst.study_uid)))
        uids = {i.series_uid for i in pair.instances if i.study_uid == inst.study_uid}
        # Each series directory, and its NIfTI view beside it (tests/test_volumes.py).
        assert series == {u + sfx for u in uids for sfx in ("", ".nii.gz", ".json")}
        files = names(await b.listdir(("studies", inst.study_uid, inst.series_uid)))
        assert files == {i.sop_uid + ".dcm" for i in pair.series(inst.series_uid)}
        path = ("patients", inst.patient_id, inst.study_uid, inst.series_uid, inst.sop_uid + ".dcm")
        entry = await b.lookup(path)
        assert not entry.is_dir and not entry.exact  # not cached: no retrieval for a stat
        meta = json.loads(
            (await b.open(("studies", inst.study_uid, ".metadata.json"))).read(0, 1 << 20)
        )
        assert meta["access"] == "identified"
        assert meta["attributes"]["PatientID"] == inst.patient_id
        # A hidden or missing name: NotFound, and so is a site that holds nothing of it.
        other = next(s for s in ("SiteA", "SiteB") if s not in pair.sites_holding(inst.study_uid))
        for missing in (
            ("studies", "1.2.3.4.5.6"),
            ("sites", other, inst.patient_id),
            ("nope",),
            (*path, ".metadata.json"),  # a file has no metadata document: ENOENT, not EIO
        ):
            with pytest.raises(NotFound):
                await b.lookup(missing)
        misses = counter("mdm_cache_lookups", result="miss")
        hits = counter("mdm_cache_lookups", result="hit")
        retrievals = b.fetcher.stats.retrievals
        f = await b.open(path)
        got = pydicom.dcmread(io.BytesIO(f.read(0, f.size + 1)))
        want = pydicom.dcmread(io.BytesIO(inst.read()))
        assert got.SOPInstanceUID == inst.sop_uid and got.PixelData == want.PixelData
        assert not f.exact_before
        f.release()
        g = await b.open(("studies", inst.study_uid, inst.series_uid, inst.sop_uid + ".dcm"))
        assert g.exact_before and g.size == f.size
        g.release()
        assert counter("mdm_cache_lookups", result="miss") == misses + 1
        assert counter("mdm_cache_lookups", result="hit") == hits + 1
        assert b.fetcher.stats.retrievals == retrievals + 1
        assert (await b.lookup(path)).exact
        # /browse: readable names ending with the UID; only the exact name resolves.
        studies = names(await b.listdir(("browse", inst.patient_id)))
        (sname,) = [n for n in studies if n.endswith("_" + inst.study_uid)]
        sers = names(await b.listdir(("browse", inst.patient_id, sname)))
        (sename,) = [n for n in sers if n.endswith("_" + inst.series_uid)]
        fnames = names(await b.listdir(("browse", inst.patient_id, sname, sename)))
        (fname,) = [n for n in fnames if n.endswith(f"_{inst.sop_uid}.dcm")]
        bf = await b.open(("browse", inst.patient_id, sname, sename, fname))
        assert bf.read(0, 132)[128:] == b"DICM"
        bf.release()
        with pytest.raises(NotFound):
            await b.lookup(("browse", inst.patient_id, "forged_" + inst.study_uid))

    run_as(cfg, None, go)


# ---------------------------------------------------------------------------- views
@pytest.fixture(scope="module")
def policy_config(
    orthanc_pair: PacsPair, idp: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return identity_config(orthanc_pair, tmp_path_factory.mktemp("ns"), idp, POLICY)


def test_deidentified_view_and_its_aliases(
    orthanc_pair: PacsPair, idp: Path, policy_config: Path, tmp_path: Path
) -> None:
    """A de-identified principal sees pseudonyms and remapped UIDs only; a remapped path
    resolves without a listing first (the lookup teaches the aliases); originals are NotFound."""
    pair = orthanc_pair
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    secret = LocalKeyring.load(policy_config.parent / "keyring.json").secret("pseudonym:nant")
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    i = trial[-1]
    path = ("studies", map_uid(i.study_uid, secret=secret), map_uid(i.series_uid, secret=secret))
    fpath = (*path, map_uid(i.sop_uid, secret=secret) + ".dcm")

    async def go(b: Bridge) -> None:
        f = await b.open(fpath)  # no listing before: resolved through the aliases it learns
        ds = pydicom.dcmread(io.BytesIO(f.read(0, f.size)))
        f.release()
        assert ds.SOPInstanceUID == fpath[-1][:-4] and ds.PatientIdentityRemoved == "YES"
        assert names(await b.listdir(("studies",))) == {
            map_uid(u, secret=secret) for u in {t.study_uid for t in trial}
        }
        assert names(await b.listdir(("patients",))) == {
            pseudonym(p, secret=secret) for p in {t.patient_id for t in trial}
        }
        meta = json.loads(b.metadata(await b.resolve((*path, ".metadata.json"))))
        assert meta["access"] == "deidentified"
        assert i.patient_id not in json.dumps(meta)
        # /browse shows the view's date and no description, then the remapped UID.
        pname = pseudonym(i.patient_id, secret=secret)
        (sname,) = [n for n in names(await b.listdir(("browse", pname))) if path[1] in n]
        assert sname.endswith("_" + path[1]) and sname.count("_") == 1
        assert (await b.lookup(("browse", pname, sname))).is_dir
        for original in (
            ("studies", i.study_uid),
            ("patients", i.patient_id),
            (*path[:2], i.series_uid),
            (*path, i.sop_uid + ".dcm"),
        ):
            with pytest.raises(NotFound):
                await b.lookup(original)

    run_as(policy_config, grid, go)


def test_metadata_only_and_hidden(
    orthanc_pair: PacsPair, idp: Path, policy_config: Path, tmp_path: Path
) -> None:
    """A metadata-only principal lists and reads .metadata.json but may not open a file
    (AccessDenied, counted as a decision at its level); what no grant covers is NotFound."""
    pair = orthanc_pair
    asmith = token(idp, tmp_path / "asmith.jwt", "asmith")
    trial = [i for i in pair.instances if i.trial == TRIAL_PROTOCOL]
    hidden = next(i for i in pair.instances if i.trial != TRIAL_PROTOCOL)
    i = trial[0]

    async def go(b: Bridge) -> None:
        assert names(await b.listdir(("studies",))) == {t.study_uid for t in trial}
        pname = next(iter(names(await b.listdir(("patients",)))))
        assert pname not in {t.patient_id for t in pair.instances}  # a keyed pseudonym
        before = counter("mdm_policy_decisions", level="series", result="metadata")
        fpath = ("studies", i.study_uid, i.series_uid, i.sop_uid + ".dcm")
        assert not (await b.lookup(fpath)).is_dir
        with pytest.raises(AccessDenied):
            await b.open(fpath)
        assert counter("mdm_policy_decisions", level="series", result="metadata") > before
        meta = json.loads(
            (await b.open(("studies", i.study_uid, ".metadata.json"))).read(0, 1 << 16)
        )
        assert meta["access"] == "metadata" and "PatientName" not in meta["attributes"]
        with pytest.raises(NotFound):
            await b.lookup(("studies", hidden.study_uid))
        with pytest.raises(AccessDenied):
            await b.targets_for(i.series_uid)
        with pytest.raises(NotFound):
            await b.targets_for(hidden.study_uid)

    run_as(policy_config, asmith, go)


def test_principals_sharing_a_process_never_resolve_each_others_names(
    orthanc_pair: PacsPair, idp: Path, policy_config: Path, tmp_path: Path
) -> None:
    """Principal A lists a de-identified study (the shared alias table learns its remapped
    names); B, in another scope, and C, granted nothing, act through the same services: A's
    names are NotFound for both (lookup, listdir and open), while B's own names resolve."""
    pair = orthanc_pair
    config = load_config(policy_config)
    grid = token(idp, tmp_path / "grid.jwt", "svc-grid", "grid")
    other = principal(config, token(idp, tmp_path / "other.jwt", "svc-other", "other"))
    nobody = principal(config, token(idp, tmp_path / "nobody.jwt", "nobody"))
    radiologist = principal(config, token(idp, tmp_path / "rad.jwt", "drx", "radiologists"))
    keyring = LocalKeyring.load(policy_config.parent / "keyring.json")
    nant, oth = keyring.secret("pseudonym:nant"), keyring.secret("pseudonym:other")
    i = next(
        t
        for t in pair.instances
        if t.trial == TRIAL_PROTOCOL and "SiteA" in pair.sites_holding(t.sop_uid)
    )

    def remapped(secret: bytes) -> tuple[str, ...]:
        return (
            "studies",
            map_uid(i.study_uid, secret=secret),
            map_uid(i.series_uid, secret=secret),
            map_uid(i.sop_uid, secret=secret) + ".dcm",
        )

    a_path = remapped(nant)

    async def go(a: Bridge) -> None:
        assert a_path[1] in names(await a.listdir(("studies",)))
        assert a_path[3] in names(await a.listdir(a_path[:3]))
        aliases = len(a.services.names.aliases)
        assert aliases >= 3
        b, c, r = a.as_principal(other), a.as_principal(nobody), a.as_principal(radiologist)
        for who in (b, c, r):
            for n in range(2, 5):
                with pytest.raises(NotFound):
                    await who.lookup(a_path[:n])
            with pytest.raises(NotFound):
                await who.listdir(a_path[:2])
            with pytest.raises(NotFound):
                await who.open(a_path)
        # Their failures are theirs: A's names still resolve for A (no shared "hidden" cache).
        assert not (await a.lookup(a_path)).is_dir
        # B's own view of the same object resolves (another scope, other names) ...
        b_path = remapped(oth)
        assert b_path[1] != a_path[1]
        assert not (await b.lookup(b_path)).is_dir
        # ... and A, through the facade, still cannot use B's names.
        with pytest.raises(NotFound):
            await a.lookup(b_path[:2])
        # The radiologist sees the SiteA original, identified; C sees nothing at all.
        assert (await r.lookup(("studies", i.study_uid))).is_dir
        assert names(await c.listdir(("studies",))) == set()
        with pytest.raises(NotFound):
            await c.targets_for(i.study_uid)

    run_as(policy_config, grid, go)
