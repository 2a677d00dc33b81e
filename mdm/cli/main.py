"""The ``mdm`` command: mount, query, fetch and manage the cache.

User errors (:class:`~mdm.errors.UserError`) are printed as one line without a traceback and
exit with their documented code (2 for configuration errors).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import click

from mdm.access.identity import Principal
from mdm.config import Config, load_config
from mdm.errors import MdmError, NotFound, UsageError, UserError

log = logging.getLogger("mdm")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "mdm.toml"


def _setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log at ``level`` to stderr or ``log_file``, in the format of ``mdm --log-format``."""
    from mdm.ops import logs

    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    logs.configure(level, handler, logs.current_format())


def config_option(f: F) -> F:
    """``--config FILE`` (default ``./mdm.toml`` or ``$MDM_CONFIG``)."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=lambda: os.environ.get("MDM_CONFIG", DEFAULT_CONFIG),
        show_default="mdm.toml or $MDM_CONFIG",
        help="The bridge configuration file.",
    )(f)


def token_file_option(help: str) -> Callable[[F], F]:
    """``--token-file FILE`` (default ``$MDM_TOKEN_FILE``), described by ``help``."""
    return click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        default=lambda: os.environ.get("MDM_TOKEN_FILE"),
        help=help,
    )


def _load(config_path: Path) -> Config:
    return load_config(config_path)


def _principal(config: Config, token_file: Path | None) -> Principal:
    """The principal a command runs as (verified token, or the local administrator)."""
    from mdm.access.session import open_session

    return open_session(config, token_file, audit=False).principal()


class MdmGroup(click.Group):
    """Turns bridge errors into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"mdm: error: {e}", err=True)
            sys.exit(e.exit_code)
        except MdmError as e:
            click.echo(f"mdm: error: {e}", err=True)
            sys.exit(1)
        except BaseExceptionGroup as eg:
            # trio reports a task's error as a group: one bridge error is still one line.
            first = _bridge_error(eg)
            if first is None:
                raise
            click.echo(f"mdm: error: {first}", err=True)
            sys.exit(first.exit_code if isinstance(first, UserError) else 1)


def _bridge_error(eg: BaseExceptionGroup[BaseException]) -> MdmError | None:
    """The bridge error of a group whose every leaf is one (None otherwise)."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [eg]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        else:
            leaves.append(e)
    if not leaves or not all(isinstance(e, MdmError) for e in leaves):
        return None
    return leaves[-1]  # type: ignore[return-value]


def _print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from mdm.versions import versions

    for name, version in versions():
        click.echo(f"{name} {version}")
    ctx.exit()


@click.group(cls=MdmGroup)
@click.option("--log-level", default="WARNING", show_default=True, help="DEBUG, INFO, WARNING.")
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default="human",
    show_default=True,
    envvar="MDM_LOG_FORMAT",
    help="json: one object per line for log shippers (also $MDM_LOG_FORMAT).",
)
@click.option(
    "--version",
    "-V",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_versions,
    help="Print the versions of the bridge, pynetdicom, pydicom, pyfuse3 and libfuse.",
)
def main(log_level: str, log_format: str) -> None:
    """MDM bridge: federated PACS mounted as files, retrieved on read, encrypted at rest."""
    # Kept in the environment: the mount daemon and the receiver process inherit it.
    os.environ["MDM_LOG_FORMAT"] = log_format
    _setup_logging(log_level)


# ---------------------------------------------------------------------------- mount
@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@config_option
@token_file_option("The JWT the mount runs as (also $MDM_TOKEN_FILE).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option("--log-file", type=click.Path(path_type=Path), help="Where the daemon logs.")
@click.option("--mount-timeout", default=60.0, show_default=True, help="Seconds to wait for it.")
def mount(
    mountpoint: Path,
    config_path: Path,
    token_file: Path | None,
    foreground: bool,
    log_file: Path | None,
    mount_timeout: float,
) -> None:
    """Mount the federation at MOUNTPOINT."""
    from mdm.access.session import open_session
    from mdm_fuse.mount import prepare_mountpoint, run

    config = _load(config_path)
    mountpoint = mountpoint.resolve()
    if foreground:
        if log_file is not None:
            _setup_logging(logging.getLevelName(logging.getLogger().level), log_file)
        session = open_session(config, token_file)
        if session.local_admin:
            log.warning(
                "no [identity] in %s: this mount runs as the local administrator of a "
                "single-user workstation (full access, identified view)",
                config.path,
            )
        if config.audit is not None and config.audit.default:
            log.info(
                "no [audit] in %s: decisions are recorded in %s", config.path, config.audit.log
            )
        strict = os.environ.get("MDM_STRICT") == "1"
        run(config, mountpoint, session, strict=strict)
        return
    # Check token, policy and mount point here, so a bad one is refused with its message
    # and exit code before any daemon starts.
    open_session(config, token_file, audit=False)
    prepare_mountpoint(mountpoint)
    # One log per mount point: jobs sharing a cache do not share (or quote) each other's log.
    log_file = log_file or config.cache.dir / "logs" / f"mount{_path_tag(mountpoint)}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    level = logging.getLevelName(logging.getLogger().level)
    # -P and cwd "/": nothing of the caller's directory on the daemon's sys.path. From the
    # parent of a mount point named "mdm" (`cd ~ && mdm mount ~/mdm`), an import would look
    # into the mount it serves itself, and hang there.
    log_file = log_file.resolve()
    cmd = [sys.executable, "-P", "-m", "mdm"]
    cmd += ["--log-level", "INFO" if level == "WARNING" else level]
    cmd += ["mount", str(mountpoint), "--config", str(config_path.resolve()), "--foreground"]
    cmd += ["--log-file", str(log_file)]
    if token_file is not None:
        cmd += ["--token-file", str(token_file.resolve())]
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=devnull,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    deadline = time.monotonic() + mount_timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            click.echo(f"mounted {mountpoint} (daemon pid {proc.pid}, log {log_file})")
            return
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").splitlines()[-5:]
            raise UserError("the mount daemon exited:\n  " + "\n  ".join(tail))
        time.sleep(0.1)
    proc.terminate()
    raise UserError(f"the mount did not come up within {mount_timeout:.0f}s (see {log_file})")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", "-z", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT (the daemon then exits)."""
    from mdm_fuse.mount import unmount

    unmount(mountpoint.resolve(), lazy=lazy)


# ---------------------------------------------------------------------------- sites / find
@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--check-retrieve",
    is_flag=True,
    help="Also retrieve one instance from each site by its retrieve mode (proves that the "
    "PACS can reach the bridge's storage SCP, or serves C-GET); nothing is stored.",
)
@token_file_option("With [identity]: the JWT sent to DICOMweb sites (also $MDM_TOKEN_FILE).")
def sites(config_path: Path, as_json: bool, check_retrieve: bool, token_file: Path | None) -> None:
    """C-ECHO every site (a QIDO-RS query for a DICOMweb site): status and round-trip time
    (and, with --check-retrieve, a real retrieval of one instance, naming the likely cause
    when it fails)."""
    from mdm.dicom.query import c_echo
    from mdm.dicomweb.transport import use_token_file

    config = _load(config_path)
    use_token_file(token_file if config.identity is not None else None)

    def echo(s: Any) -> dict[str, Any]:
        try:
            rtt = c_echo(s, config.bridge)
            return {"site": s.name, "status": "up", "rtt_ms": round(rtt * 1000, 1), "error": None}
        except MdmError as e:
            return {"site": s.name, "status": "down", "rtt_ms": None, "error": str(e)}

    with ThreadPoolExecutor(max_workers=max(1, len(config.sites))) as pool:
        rows = list(pool.map(echo, config.sites))
    for r, s in zip(rows, config.sites, strict=True):
        r["ae_title"], r["address"] = s.ae_title, s.dicomweb or f"{s.host}:{s.port}"
    if check_retrieve:
        _check_retrieve(config, rows)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _table(
            ["SITE", "AE TITLE", "ADDRESS", "STATUS", "RTT (ms)", "ERROR"],
            [
                [
                    r["site"],
                    r["ae_title"],
                    r["address"],
                    r["status"],
                    r["rtt_ms"] or "",
                    r["error"] or "",
                ]
                for r in rows
            ],
        )
        for r in rows:
            for c in r.get("retrieve", []):
                mark = "ok" if c["ok"] else "FAILED"
                took = f" in {c['ms']} ms" if c["ok"] else ""
                how = "WADO-RS" if c["mode"] == "wado" else f"C-{c['mode'].upper()}"
                click.echo(f"{r['site']}: {how} {mark}{took}: {c['detail']}")
    if any(r["status"] != "up" for r in rows):
        sys.exit(1)


def _check_retrieve(config: Config, rows: list[dict[str, Any]]) -> None:
    """Add each up site's retrieval check to its row; a failed check marks it ``retrieve
    failed``. One site at a time: they share the bridge's storage port."""
    import errno as errno_
    import socket

    from mdm.dicom.check import check_retrieve

    listen = True
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((config.bridge.host, config.bridge.port))
        except OSError as e:
            listen = e.errno != errno_.EADDRINUSE
    for r, s in zip(rows, config.sites, strict=True):
        if r["status"] != "up":
            continue
        checks = check_retrieve(s, config.bridge, listen=listen)
        r["retrieve"] = [
            {"mode": c.mode, "ok": c.ok, "detail": c.detail, "ms": c.elapsed_ms} for c in checks
        ]
        if not all(c.ok for c in checks):
            r["status"] = "retrieve failed"


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@main.command()
@config_option
@click.option(
    "--level",
    type=click.Choice(["patient", "study", "series", "image"], case_sensitive=False),
    default="study",
    show_default=True,
)
@click.option("--site", "only_sites", multiple=True, help="Query only this site (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@token_file_option(
    "With [identity]: the JWT whose policy filters the answers (also $MDM_TOKEN_FILE)."
)
@click.argument("filters", nargs=-1)
def find(
    config_path: Path,
    level: str,
    only_sites: tuple[str, ...],
    as_json: bool,
    token_file: Path | None,
    filters: tuple[str, ...],
) -> None:
    """Federated C-FIND. FILTERS are KEY=VALUE with DICOM keywords (wildcards * and ?,
    date ranges A-B). Under [identity], answers and filters are those of your mount's view.

    Example: mdm find --level series Modality=CT PatientID='MDM*'
    """
    from mdm.access.session import open_session
    from mdm.namespace.find import find as run_find
    from mdm.namespace.find import parse_filters

    config = _load(config_path)
    wanted = parse_filters(filters)
    session = open_session(config, token_file)
    try:
        res = run_find(
            config, session, _secrets(config, token_file), level, wanted, list(only_sites)
        )
    finally:
        session.close()
    for e in res.errors:
        click.echo(f"mdm: warning: {e}", err=True)
    for n in res.notes:
        click.echo(f"mdm: note: {n}", err=True)
    if as_json:
        rows = [{k: _json_value(k, v) for k, v in r.items()} for r in res.rows]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        _table(
            [*res.keys, "sites"],
            [[*(r.get(k, "") for k in res.keys), ",".join(r["sites"])] for r in res.rows],
        )
    if res.errors and not res.rows:
        sys.exit(1)


def _path_tag(path: Path) -> str:
    """A file-name-safe tag of a mount point (its log and control socket are named by it)."""
    from mdm.ops.status import path_tag

    return path_tag(path)


def _json_value(keyword: str, value: Any) -> Any:
    """Numbers of numeric VRs as JSON numbers (``"NumberOfSeriesRelatedInstances": 24``)."""
    from pydicom.datadict import dictionary_VR

    if not isinstance(value, str) or not value or "\\" in value:
        return value
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        return value
    try:
        if vr in ("IS", "US", "UL", "SS", "SL", "UV", "SV"):
            return int(value)
        if vr in ("DS", "FL", "FD"):
            return float(value)
    except ValueError:
        pass
    return value


def _secrets(config: Any, token_file: Path | None) -> Callable[[str], bytes]:
    """The pseudonym keys of the principal's views, fetched on first use (key servers, or the
    local keyring)."""
    keys: list[Any] = []

    def secret(name: str) -> bytes:
        if not keys:
            from mdm.keyservice.client import provider_for
            from mdm.store.keys import LocalKeyring

            keys.append(
                provider_for(config.keys, token_file)
                or LocalKeyring.load(config.keys.keyring, create=True)
            )
        return keys[0].secret(name)  # type: ignore[no-any-return]

    return secret


# ---------------------------------------------------------------------------- fetch
@main.command()
@config_option
@click.argument("uids", nargs=-1)
@click.option(
    "--collection",
    "collections",
    multiple=True,
    help="Fetch every object of this collection you may read (repeatable).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@token_file_option("The JWT to fetch as (also $MDM_TOKEN_FILE).")
def fetch(
    config_path: Path,
    uids: tuple[str, ...],
    collections: tuple[str, ...],
    quiet: bool,
    token_file: Path | None,
) -> None:
    """Warm the cache with the studies, series or instances named by UID, as your view shows
    them (the remapped 2.25. UIDs of a de-identified view included). UIDS may be '-': read
    them from stdin (whitespace-separated, e.g. from `mdm find --json | jq`). One line per
    UID; exit 1 if any failed.

    --collection NAME fetches a collection: progress and ETA, then a summary of what failed
    and why (also for `mdm collection status`); a `pin = true` collection is kept out of
    eviction."""
    if collections:
        if uids:
            raise UsageError("give UIDs or --collection, not both")
        _fetch_collections(config_path, collections, quiet, token_file)
        return
    import trio
    from tqdm import tqdm

    from mdm.access.session import open_session
    from mdm.namespace.bridge import Bridge, open_bridge
    from mdm.namespace.find import original_of
    from mdm.retrieval.fetcher import Target
    from mdm.store.records import ObjectRef

    wanted: list[str] = []
    for u in uids:
        wanted += sys.stdin.read().split() if u == "-" else [u]
    if not wanted:
        raise UsageError("no UIDs to fetch (or --collection NAME)")
    config = _load(config_path)
    session = open_session(config, token_file)

    async def resolve(bridge: Bridge, uid: str) -> list[Target]:
        try:
            return await bridge.targets_for(uid)
        except NotFound:
            if not uid.startswith("2.25.") or session.local_admin:
                raise
        # A name of the principal's de-identified view: its original, found through the view.
        found = await trio.to_thread.run_sync(
            lambda: original_of(
                config, session.resolver, bridge.principal, bridge.keys.secret, None, bare=uid
            )
        )
        if found is None:
            raise NotFound(uid)
        return await bridge.targets_for(found[1] or found[0])

    async def go() -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        async with open_bridge(config, session, get_if_port_busy=True) as bridge:
            plans: list[tuple[str, list[Target] | None, str]] = []
            for uid in wanted:
                try:
                    plans.append((uid, await resolve(bridge, uid), ""))
                except NotFound:
                    # Hidden and missing alike: nothing about which.
                    plans.append((uid, None, "no study, series or instance you may see"))
                except MdmError as e:
                    plans.append((uid, None, str(e)))
            total = sum(len(t or []) for _, t, _ in plans)
            quiet_bar = quiet or not sys.stderr.isatty()
            bar = tqdm(total=total, unit="obj", disable=quiet_bar, file=sys.stderr)
            keys = {t.sop_uid for _, ts, _ in plans for t in ts or []}
            bridge.fetcher.on_stored = lambda info: (
                bar.update(1) if info.ref.sop_uid in keys else None
            )
            try:
                for uid, targets, err in plans:
                    if targets is None:
                        out.append((uid, f"error: {err}", False))
                        continue
                    had = sum(
                        1
                        for t in targets
                        if bridge.store.info(ObjectRef(t.sop_uid, t.view)) is not None
                    )
                    bar.update(had)
                    try:
                        await bridge.fetcher.fetch_many(targets, bulk=True)
                    except MdmError as e:
                        out.append((uid, f"error: {e}", False))
                        continue
                    out.append((uid, f"{len(targets)} object(s) cached ({had} already)", True))
            finally:
                bar.close()
        return out

    try:
        results = trio.run(go)
    finally:
        session.close()
    for uid, what, _ok in results:
        click.echo(f"{uid}: {what}")
    if not all(ok for _, _, ok in results):
        sys.exit(1)


def _fetch_collections(
    config_path: Path, names: tuple[str, ...], quiet: bool, token_file: Path | None
) -> None:
    import trio

    from mdm.access.session import open_session
    from mdm.cli.collection import warm
    from mdm.namespace.bridge import open_bridge

    config = _load(config_path)
    for n in names:
        if not any(c.name == n for c in config.collections):
            raise UsageError(f"{config.path}: no [[collection]] named {n!r}")
    session = open_session(config, token_file)

    async def go() -> list[tuple[bool, list[str]]]:
        out: list[tuple[bool, list[str]]] = []
        async with open_bridge(config, session, get_if_port_busy=True) as bridge:
            for n in names:
                try:
                    out.append(await warm(bridge, n, quiet=quiet))
                except NotFound:
                    out.append((False, [f"{n}: no collection of that name that you may use"]))
        return out

    try:
        results = trio.run(go)
    finally:
        session.close()
    for _ok, lines in results:
        for line in lines:
            click.echo(line)
    if not all(ok for ok, _ in results):
        sys.exit(1)


# ---------------------------------------------------------------------------- cache
@main.group()
def cache() -> None:
    """Inspect and manage the encrypted local cache."""


def _open_store(config: Config, token_file: Path | None = None) -> Any:
    from mdm.keyservice.client import provider_for
    from mdm.store.db import open_env
    from mdm.store.keys import LocalKeyring
    from mdm.store.objects import ObjectStore

    keys = provider_for(config.keys, token_file) or LocalKeyring.load(
        config.keys.keyring, create=True
    )
    env = open_env(config.cache.dir)
    c = config.cache
    return ObjectStore(c.dir, env, keys, c.max_bytes, c.chunk_size, fsync=c.fsync)


@cache.command("stats")
@config_option
@click.option("--json", "as_json", is_flag=True)
def cache_stats(config_path: Path, as_json: bool) -> None:
    """Objects and bytes in the cache, against max_bytes."""
    store = _open_store(_load(config_path))
    st = store.stats()
    kept, kept_bytes = store.kept_stats()
    d = {
        "objects": st.objects,
        "bytes": st.bytes,
        "max_bytes": st.max_bytes,
        "evicted": st.evicted,
        "pinned_objects": kept,
        "pinned_bytes": kept_bytes,
    }
    if as_json:
        click.echo(json.dumps(d))
    else:
        pct = 100.0 * st.bytes / st.max_bytes if st.max_bytes else 0.0
        click.echo(f"objects:   {st.objects}")
        click.echo(f"bytes:     {st.bytes} ({_human(st.bytes)})")
        click.echo(f"max_bytes: {st.max_bytes} ({_human(st.max_bytes)}, {pct:.1f}% used)")
        click.echo(f"pinned:    {kept} object(s), {kept_bytes} bytes ({_human(kept_bytes)})")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@cache.command("verify")
@config_option
@token_file_option("With a key service or [identity]: the JWT whose keys are released.")
def cache_verify(config_path: Path, token_file: Path | None) -> None:
    """Decrypt and authenticate every chunk of every cached object; a damaged one is dropped
    (the next open retrieves it again)."""
    config = _load(config_path)
    store = _open_store(config, token_file)
    n = store.stats().objects
    problems = store.verify(_principal(config, token_file))
    for p in problems:
        click.echo(f"CORRUPT {p.ref.sop_uid}: {p.reason} (dropped)")
    click.echo(f"{n} object(s) checked, {len(problems)} corrupt")
    if problems:
        sys.exit(1)


@cache.command("evict")
@config_option
@click.option("--all", "evict_all", is_flag=True, help="Evict every object not in use.")
@click.argument("uids", nargs=-1)
def cache_evict(config_path: Path, evict_all: bool, uids: tuple[str, ...]) -> None:
    """Evict cached objects by SOP Instance UID (every view of them), or all of them."""
    from mdm.store.records import ObjectRef

    if not evict_all and not uids:
        raise UserError("name SOP Instance UIDs to evict, or --all")
    store = _open_store(_load(config_path))
    wanted = set(uids)
    # Every view of a named instance (identified and de-identified copies alike).
    refs: list[ObjectRef] = [r for r in store.list_refs() if evict_all or r.sop_uid in wanted]
    n = store.evict(refs)
    click.echo(f"{n} object(s) evicted")


# ---------------------------------------------------------------------------- reidentify
@main.command()
@config_option
@token_file_option("Your JWT: you need identified access to the object (also $MDM_TOKEN_FILE).")
@click.option("--scope", required=True, help="The pseudonym scope ([allow.deid] scope or rule id).")
@click.argument("values", nargs=-1, required=True)
def reidentify(
    config_path: Path, token_file: Path | None, scope: str, values: tuple[str, ...]
) -> None:
    """Map pseudonymous Patient IDs or remapped UIDs of a de-identified view back (audited)."""
    from mdm.access.reidentify import reidentify as run
    from mdm.access.session import open_session
    from mdm.keyservice.client import provider_for
    from mdm.store.keys import LocalKeyring

    config = _load(config_path)
    session = open_session(config, token_file)
    try:
        keys = provider_for(config.keys, token_file) or LocalKeyring.load(
            config.keys.keyring, create=False
        )
        secret = keys.secret("pseudonym:" + scope)
        for value in values:
            for m in run(config, session, secret, value):
                click.echo(f"{value}\t{m.kind}\t{m.original}")
    finally:
        session.close()


# ---------------------------------------------------------------------------- gateway
@main.command()
@config_option
@token_file_option("The gateway's own JWT, for [keys] servers only (also $MDM_TOKEN_FILE).")
def gateway(config_path: Path, token_file: Path | None) -> None:
    """Serve the federation as DICOMweb to worker mounts and viewers ([gateway] in the config).

    Runs in the foreground (for systemd) until SIGTERM or SIGINT; each request brings its own
    token (Authorization: Bearer), decided and audited as a mount's reads are."""
    from mdm.gateway.serve import serve

    serve(_load(config_path), token_file)


# ---------------------------------------------------------------------------- subgroups
def _register() -> None:
    from mdm.cli.audit import audit
    from mdm.cli.collection import collection
    from mdm.cli.keys import keys, keyserver
    from mdm.cli.policy import policy
    from mdm.cli.status import status
    from mdm.cli.token import token

    main.add_command(token)
    main.add_command(keys)
    main.add_command(keyserver)
    main.add_command(audit)
    main.add_command(policy)
    main.add_command(status)
    main.add_command(collection)


_register()


# ---------------------------------------------------------------------------- demo
@main.command()
@click.option(
    "--dir", "workdir", type=click.Path(path_type=Path), default=Path("demo"), show_default=True
)
@click.option("--patients", default=4, show_default=True, help="Generated patients per site.")
@click.option("--foreground/--background", default=False, help="Keep the demo in the foreground.")
@click.option("--stop", is_flag=True, help="Unmount the demo and stop its PACS.")
def demo(workdir: Path, patients: int, foreground: bool, stop: bool) -> None:
    """Start two local PACS with generated patients, write a config and mount the federation."""
    from mdm_demo.demo import run_demo, stop_demo

    if stop:
        stop_demo(workdir.resolve())
        return
    run_demo(workdir.resolve(), patients=patients, foreground=foreground)
