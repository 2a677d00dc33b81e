"""``mdm collection status|wait`` and the warm-up of ``mdm fetch --collection``.

A collection's objects are those its listing shows the principal (docs/COLLECTIONS.md); its
state is computed from the listing and the cache, plus the failures the last ``mdm fetch
--collection`` recorded under ``<cache dir>/collections/<name>.json`` (UIDs and reasons, no
PHI). ``pin = true`` collections are kept out of eviction when they are fetched.

Exit codes of ``mdm collection wait`` (also in docs/COLLECTIONS.md):

== ==========================================================================================
0  complete: every object of the collection you may read is cached
1  an error: no site answered, the token is not valid, the cache cannot be opened
2  usage or configuration error, or no collection of that name that you may use
3  timed out, still incomplete
4  timed out, and every missing object failed in the last ``mdm fetch --collection``
== ==========================================================================================
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import trio

from mdm.config import Config, load_config, parse_duration
from mdm.errors import MdmError, NotFound, UsageError
from mdm.retrieval.fetcher import Target
from mdm.store.records import ObjectRef

EXIT_COMPLETE = 0
EXIT_TIMEOUT = 3
EXIT_FAILED = 4


@dataclass
class State:
    """Objects and bytes of a collection for one principal."""

    listed: int = 0
    cached: int = 0
    cached_bytes: int = 0
    missing: int = 0
    failed: int = 0
    not_readable_series: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    incomplete_listing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.missing == 0 and not self.errors and not self.incomplete_listing

    def as_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "cached": self.cached,
            "cached_bytes": self.cached_bytes,
            "missing": self.missing,
            "failed": self.failed,
            "not_readable_series": self.not_readable_series,
            "failure_reasons": dict(self.failures),
            "incomplete_listing": self.incomplete_listing,
            "errors": self.errors,
            "complete": self.complete,
        }


def failures_path(config: Config, name: str) -> Path:
    """Where ``mdm fetch --collection`` records what failed."""
    return config.cache.dir / "collections" / f"{name}.json"


def read_failures(config: Config, name: str) -> dict[str, str]:
    """SOP UID -> reason, as the last fetch of collection ``name`` recorded them."""
    try:
        doc = json.loads(failures_path(config, name).read_text())
        return {str(k): str(v) for k, v in doc.get("failed", {}).items()}
    except (OSError, ValueError):
        return {}


def write_failures(config: Config, name: str, failed: dict[str, str]) -> None:
    """Record the failures of a fetch (atomically: temp, rename)."""
    p = failures_path(config, name)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"at": time.time(), "failed": failed}, indent=1))
    os.replace(tmp, p)


async def collection_state(bridge: Any, name: str) -> State:
    """The state of collection ``name`` as ``bridge``'s principal sees it."""
    plan = await bridge.collection_plan(name)
    failed = read_failures(bridge.config, name)
    st = State(listed=len(plan.targets), not_readable_series=plan.not_readable)
    st.errors = list(plan.errors)
    members = bridge.services.namespace.cohorts.cached(name)
    if members is not None:
        st.incomplete_listing = list(members.incomplete)
    for t in plan.targets:
        info = bridge.store.info(ObjectRef(t.sop_uid, t.view))
        if info is not None:
            st.cached += 1
            st.cached_bytes += info.size
            continue
        st.missing += 1
        reason = failed.get(t.sop_uid)
        if reason is not None:
            st.failed += 1
            st.failures[reason] += 1
    return st


async def warm(bridge: Any, name: str, *, quiet: bool) -> tuple[bool, list[str]]:
    """Retrieve collection ``name`` (``mdm fetch --collection``): progress and ETA on
    stderr, one retrieval per series, as many at once as the sites' limits and bulk windows
    allow; record the failures; keep a ``pin = true`` collection out of eviction.
    Returns (all cached, summary lines)."""
    from tqdm import tqdm

    plan = await bridge.collection_plan(name)
    targets: list[Target] = plan.targets
    if plan.collection.pin:
        await trio.to_thread.run_sync(bridge.store.keep, sorted({t.sop_uid for t in targets}), name)
    else:  # no longer pinned (pin = false now): what it kept may be evicted again
        await trio.to_thread.run_sync(bridge.store.release, name)
    have = [t for t in targets if bridge.store.info(ObjectRef(t.sop_uid, t.view)) is not None]
    bar = tqdm(
        total=len(targets),
        unit="obj",
        desc=name,
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    bar.update(len(have))
    keys = {t.sop_uid for t in targets}
    bridge.fetcher.on_stored = lambda info: bar.update(1) if info.ref.sop_uid in keys else None
    by_series: dict[tuple[str, str], list[Target]] = {}
    for t in targets:
        by_series.setdefault((t.series_uid, t.view), []).append(t)
    failed: dict[str, str] = {}
    started = time.monotonic()

    async def one(group: list[Target]) -> None:
        try:
            await bridge.fetcher.fetch_many(group, bulk=True)
        except MdmError as e:
            reason = type(e).__name__ + ": " + str(e).split(":")[0][:80]
            for t in group:
                if bridge.store.info(ObjectRef(t.sop_uid, t.view)) is None:
                    failed[t.sop_uid] = reason

    try:
        async with trio.open_nursery() as nursery:
            for group in by_series.values():
                nursery.start_soon(one, group)
    finally:
        bar.close()
    await trio.to_thread.run_sync(write_failures, bridge.config, name, failed)
    took = time.monotonic() - started
    lines = [
        f"{name}: {len(targets)} object(s) listed, {len(have)} already cached, "
        f"{len(targets) - len(have) - len(failed)} retrieved, {len(failed)} failed "
        f"({took:.1f}s)"
    ]
    for reason, n in Counter(failed.values()).most_common():
        lines.append(f"  {n} object(s): {reason}")
    if plan.not_readable:
        lines.append(f"  {plan.not_readable} series you may list but not read (metadata only)")
    lines += [f"  {e}" for e in plan.errors]
    members = bridge.services.namespace.cohorts.cached(name)
    if members is not None and members.incomplete:
        lines.append(
            "  the listing hit a result cap at " + ", ".join(members.incomplete) + ": incomplete"
        )
    ok = not failed and not plan.errors
    return ok, lines


@click.group()
def collection() -> None:
    """Collections (cohorts): their state, and waiting for one to be cached."""


def _session_run(config_path: Path, token_file: Path | None, fn: Any) -> Any:
    from mdm.access.session import open_session
    from mdm.namespace.bridge import open_bridge

    config = load_config(config_path)
    session = open_session(config, token_file)

    async def go() -> Any:
        async with open_bridge(config, session, get_if_port_busy=True) as bridge:
            try:
                return await fn(bridge)
            except NotFound:
                raise UsageError("no collection of that name that you may use") from None

    try:
        return trio.run(go)
    finally:
        session.close()


_token = click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_TOKEN_FILE"),
    help="The JWT to act as (also $MDM_TOKEN_FILE).",
)


_config = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", "mdm.toml"),
    show_default="mdm.toml or $MDM_CONFIG",
    help="The bridge configuration file.",
)


@collection.command("status")
@_config
@_token
@click.option("--json", "as_json", is_flag=True)
@click.argument("name")
def status(config_path: Path, token_file: Path | None, as_json: bool, name: str) -> None:
    """Objects and bytes of collection NAME: listed, cached, missing, failed."""
    st: State = _session_run(config_path, token_file, lambda b: collection_state(b, name))
    if as_json:
        click.echo(json.dumps(st.as_dict()))
        return
    click.echo(f"listed:  {st.listed} object(s)")
    click.echo(f"cached:  {st.cached} object(s), {st.cached_bytes} bytes")
    click.echo(f"missing: {st.missing} object(s)")
    click.echo(f"failed:  {st.failed} object(s) (last mdm fetch --collection)")
    for reason, n in st.failures.most_common():
        click.echo(f"  {n}: {reason}")
    if st.not_readable_series:
        click.echo(f"metadata only: {st.not_readable_series} series")
    if st.incomplete_listing:
        click.echo("incomplete listing (result cap) at: " + ", ".join(st.incomplete_listing))
    for e in st.errors:
        click.echo(f"error: {e}")


@collection.command("wait")
@_config
@_token
@click.option("--timeout", "timeout_text", default="1h", show_default=True, help="e.g. 2h, 30m")
@click.option("--interval", "interval_text", default="30s", show_default=True)
@click.argument("name")
def wait(
    config_path: Path, token_file: Path | None, timeout_text: str, interval_text: str, name: str
) -> None:
    """Wait until every object of collection NAME you may read is cached. Exit codes: 0
    complete, 1 error, 2 usage or no such collection, 3 timed out, 4 timed out with every
    missing object failed in the last `mdm fetch --collection`."""
    try:
        timeout = parse_duration(timeout_text)
        interval = parse_duration(interval_text)
    except ValueError as e:
        raise UsageError(str(e)) from None

    async def loop(bridge: Any) -> State:
        deadline = time.monotonic() + timeout
        while True:
            st = await collection_state(bridge, name)
            if st.complete or time.monotonic() + interval > deadline:
                return st
            await trio.sleep(interval)

    st = _session_run(config_path, token_file, loop)
    click.echo(f"{name}: {st.cached}/{st.listed} object(s) cached, {st.missing} missing")
    if st.complete:
        sys.exit(EXIT_COMPLETE)
    if st.missing and st.failed == st.missing:
        sys.exit(EXIT_FAILED)
    sys.exit(EXIT_TIMEOUT)
