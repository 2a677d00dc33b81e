"""``mdm status``: what a running mount is doing, asked over its local control socket.

The mount serves one Unix socket, ``cache.dir/run/mount<tag>.sock`` (``<tag>`` from the mount
point, as for its log), in a directory of mode 0700, the socket itself 0600 and owned by the
mounting user; a peer of another uid (root aside) is refused by its credentials. The protocol
is one line: the client sends ``status\\n``, the mount answers one JSON document and closes.

The document (also ``mdm status --json``) has the sections ``mount``, ``sites``, ``cache``,
``keys``, ``policy``, ``token``, ``audit``, and ``problems`` and ``warnings``: lists of one-line
strings. Problems make ``mdm status`` exit 1 (degraded); warnings do not. Nothing in it is
patient data: site names, counts, sizes, hashes, the principal's subject.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mdm.errors import MdmError, UserError
from mdm.ops import metrics

if TYPE_CHECKING:
    from mdm.config import Config, KeySettings
    from mdm.namespace.bridge import Bridge

log = logging.getLogger(__name__)

ECHO_TIMEOUT = 5.0
"""At most this long for each site's C-ECHO (sites are asked in parallel)."""
KEYS_TIMEOUT = 3.0
TOKEN_WARNING = 3600.0
"""A token that expires within this many seconds is a warning."""
AUDIT_VERIFY_MAX = 64 * 2**20
"""A log up to this size is verified whole at each status; a larger one is left to
``mdm audit verify`` (the writer's state is still shown)."""
CLIENT_TIMEOUT = 30.0
REQUEST = b"status\n"
EXIT_NO_MOUNT = 4
"""``mdm status``: no mount of this configuration (at this mount point) is running."""
_MAX_SUN_PATH = 100


class NoRunningMount(UserError):
    """No live control socket: no mount of this configuration is running (there)."""

    exit_code = EXIT_NO_MOUNT


# ---------------------------------------------------------------------------- names
def path_tag(path: Path) -> str:
    """A file-name-safe tag of a mount point: ``/scratch/job 7/mnt`` -> ``-scratch-job_7-mnt``."""
    return "".join(c if c.isalnum() or c in "._" else "-" if c == "/" else "_" for c in str(path))


def run_dir(config: Config) -> Path:
    """Where the control sockets of a configuration's mounts are."""
    return config.cache.dir / "run"


def socket_path(config: Config, mountpoint: Path) -> Path:
    """The control socket of the mount at ``mountpoint`` (absolute)."""
    tag = path_tag(mountpoint)
    if len(tag) > 80:  # file names stay short; the hash keeps them distinct
        tag = tag[:60] + "-" + hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return run_dir(config) / f"mount{tag}.sock"


@contextlib.contextmanager
def _addressable(path: Path) -> Any:
    """A name for ``path`` that fits in a sockaddr_un (108 bytes): the path itself, or the
    path through ``/proc/self/fd`` of its directory when it is longer."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- mount side
class AuditState:
    """The audit writer's health as the bridge sees it (counts since the mount started)."""

    def __init__(self) -> None:
        self.writes = 0
        self.failures = 0
        self.last_error = ""
        self.last_error_at = 0.0

    def written(self) -> None:
        self.writes += 1
        metrics.AUDIT_WRITES.labels("ok").inc()

    def failed(self, error: str) -> None:
        self.failures += 1
        self.last_error, self.last_error_at = error, time.time()
        metrics.AUDIT_WRITES.labels("failed").inc()


class ControlServer:
    """The control socket of one mount: bound at construction, served by :meth:`run`."""

    def __init__(self, bridge: Bridge, mountpoint: Path) -> None:
        self.bridge = bridge
        self.mountpoint = mountpoint
        self.path = socket_path(bridge.config, mountpoint)
        self.started = time.time()
        d = self.path.parent
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _addressable(self.path) as name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # a dead daemon's (this mount point is ours now)
                # No umask change (it is the whole process's): the 0700 directory already
                # keeps others out until the chmod.
                sock.bind(name)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = trio.socket.from_stdlib_socket(sock)
        log.info("control socket %s", self.path)

    async def run(self) -> None:
        """Answer status requests until cancelled; then remove the socket."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await self._sock.accept()
                    nursery.start_soon(self._serve, conn)
        finally:
            self.close()

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                creds = conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                _pid, uid, _gid = struct.unpack("3i", creds)
                if uid not in (os.getuid(), 0):
                    log.warning("control socket: refused a client of uid %d", uid)
                    return
                with trio.move_on_after(5):
                    request = b""
                    while not request.endswith(b"\n") and len(request) < 64:
                        chunk = await conn.recv(64)
                        if not chunk:
                            break
                        request += chunk
                if request != REQUEST:
                    await conn.send(b'{"error": "unknown request"}\n')
                    return
                doc = await snapshot(self.bridge, self.mountpoint, self.started)
                data = (json.dumps(doc, indent=None, sort_keys=False) + "\n").encode()
                with trio.move_on_after(10):
                    view = memoryview(data)
                    while view:
                        n = await conn.send(view)
                        view = view[n:]
            except OSError as e:
                log.info("control socket: a client went away: %s", e)
            except Exception:  # one bad request must not take the mount down
                log.exception("control socket: status failed")


async def snapshot(bridge: Bridge, mountpoint: Path, started: float) -> dict[str, Any]:
    """The status document of a running mount (see the module docstring)."""
    from mdm import __version__

    problems: list[str] = []
    warnings: list[str] = []
    doc: dict[str, Any] = {
        "mount": {
            "mountpoint": str(mountpoint),
            "config": str(bridge.config.path),
            "pid": os.getpid(),
            "version": __version__,
            "started": _iso(started),
            "uptime_s": round(time.time() - started, 1),
            "retrieve_by_get_only": not bridge.fetcher.retriever.scp.running,
        }
    }
    sites: list[dict[str, Any]] = []
    keys: dict[str, Any] = {}
    audit_check: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for s in bridge.config.sites:
            row: dict[str, Any] = {"name": s.name}
            sites.append(row)
            nursery.start_soon(_echo, bridge, s, row)
        nursery.start_soon(_keys, bridge.config.keys, keys)
        nursery.start_soon(_audit_check, bridge, audit_check)
    pending = bridge.fetcher.pending_objects()
    for row in sites:
        lim = bridge.fetcher.limiter(row["name"])
        pool = bridge.fetcher.retriever.pool_stats(row["name"])
        row["in_flight"] = int(lim.borrowed_tokens)
        row["queued"] = lim.statistics().tasks_waiting
        row["associations"] = {"in_use": pool.in_use, "idle": pool.idle, "opened": pool.opened}
        row["objects_received"] = bridge.fetcher.stats.by_site.get(row["name"], 0)
        # Retrievals held by the site's pace (mdm.retrieval.pacing): readers', bulk, and
        # bulk waiting for a window.
        row["paced"] = bridge.fetcher.pacer.queued().get(row["name"], {})
        if row["state"] != "up":
            problems.append(f"site {row['name']}: {row['state']}: {row['error']}")
    doc["sites"] = sites
    doc["retrievals"] = {
        "objects_pending": pending,
        "retrievals": bridge.fetcher.stats.retrievals,
        "objects_received": bridge.fetcher.stats.objects_received,
        "objects_failed": bridge.fetcher.stats.objects_failed,
    }
    st = bridge.store.stats()
    doc["cache"] = {
        "dir": str(bridge.config.cache.dir),
        "objects": st.objects,
        "bytes": st.bytes,
        "max_bytes": st.max_bytes,
        "used_pct": round(100.0 * st.bytes / st.max_bytes, 1) if st.max_bytes else 0.0,
        "pinned_objects": st.pinned,
        "pinned_bytes": st.pinned_bytes,
        "evicted_objects": st.evicted,
    }
    doc["keys"] = keys
    if keys.get("servers"):
        if keys["reachable"] < keys["threshold"]:
            problems.append(
                f"key servers: {keys['reachable']} of {len(keys['servers'])} reachable, "
                f"{keys['threshold']} needed: cached objects cannot be read"
            )
        elif keys["reachable"] < len(keys["servers"]):
            problems.append(
                f"key servers: {keys['reachable']} of {len(keys['servers'])} reachable "
                f"({keys['threshold']} needed)"
            )
    doc["policy"] = _policy(bridge, problems)
    doc["token"] = _token(bridge, problems, warnings)
    doc["audit"] = _audit(bridge, audit_check, problems)
    doc["problems"] = problems
    doc["warnings"] = warnings
    doc["healthy"] = not problems
    return doc


async def _echo(bridge: Bridge, site: Any, row: dict[str, Any]) -> None:
    from mdm.dicom.query import c_echo

    quick = dataclasses.replace(site, timeout=min(site.timeout, ECHO_TIMEOUT))
    try:
        rtt = await trio.to_thread.run_sync(c_echo, quick, bridge.config.bridge)
        row.update(state="up", rtt_ms=round(rtt * 1000, 1), error=None)
    except MdmError as e:
        row.update(state="down", rtt_ms=None, error=str(e))
    except Exception as e:  # a status must answer whatever a site does
        row.update(state="down", rtt_ms=None, error=f"{type(e).__name__}: {e}")


async def _keys(settings: KeySettings, out: dict[str, Any]) -> None:
    if not settings.servers:
        out.update(mode="local keyring", keyring=str(settings.keyring))
        return
    out.update(mode="key servers", threshold=settings.threshold)
    out["servers"] = await trio.to_thread.run_sync(check_key_servers, settings)
    out["reachable"] = sum(1 for s in out["servers"] if s["reachable"])


def check_key_servers(settings: KeySettings) -> list[dict[str, Any]]:
    """``GET /v1/health`` on every key server in parallel (TLS checked against the CA)."""
    from mdm.keyservice.client import check_server_url

    assert settings.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(settings.ca_file))
    timeout = min(settings.timeout, KEYS_TIMEOUT)
    rows: list[dict[str, Any]] = [{"url": u} for u in settings.servers]

    def one(i: int) -> None:
        host, port = check_server_url(settings.servers[i])
        t0 = time.perf_counter()
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
        try:
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            body = json.loads(resp.read(4096) or b"null")
            ok = resp.status == 200 and isinstance(body, dict) and body.get("index") == i + 1
            rows[i].update(
                reachable=ok,
                rtt_ms=round((time.perf_counter() - t0) * 1000, 1),
                error=None if ok else f"HTTP {resp.status}, answered as {body!r:.60}",
            )
        except (OSError, ValueError, http.client.HTTPException) as e:
            rows[i].update(reachable=False, rtt_ms=None, error=f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1)
    for r in rows:
        r.setdefault("reachable", False)
        r.setdefault("error", "no answer within the deadline")
    return rows


def _policy(bridge: Bridge, problems: list[str]) -> dict[str, Any]:
    from mdm.policy import PolicyResolver

    r = bridge.resolver
    if not isinstance(r, PolicyResolver):
        return {"mode": "local administrator (no [identity]): no policy files"}
    out: dict[str, Any] = {
        "dir": str(r.directory),
        "version": r.version(),
        "rules": len(r.policy.rules),
        "files": len(r.policy.files),
        "loaded_at": _iso(r.loaded_at),
    }
    last = r.last_reload
    if last is None:
        out["last_reload"] = None
    else:
        when, error = last
        out["last_reload"] = {"time": _iso(when), "result": "failed" if error else "ok"}
        if error:
            out["last_reload"]["error"] = error
            problems.append(
                f"policy: the last reload failed ({error}); version {r.version()} stays in force"
            )
    return out


def _token(bridge: Bridge, problems: list[str], warnings: list[str]) -> dict[str, Any]:
    from mdm.access.identity import InvalidToken

    if bridge.session.local_admin:
        return {"subject": "local-admin", "mode": "local administrator (no [identity])"}
    out: dict[str, Any] = {"file": str(bridge.session.token_file)}
    try:
        p = bridge.session.principal()
    except InvalidToken as e:
        out.update(valid=False, error=str(e))
        problems.append(f"token: {e} (every open fails with EACCES)")
        return out
    left = p.expires - time.time()
    out.update(
        valid=True,
        subject=p.sub,
        issuer=p.issuer,
        groups=list(p.groups),
        expires=_iso(p.expires),
        expires_in_s=round(left),
    )
    if left < TOKEN_WARNING:
        warnings.append(
            f"token of {p.sub} expires in {_duration(left)}: refresh {out['file']} in place"
        )
    return out


async def _audit_check(bridge: Bridge, out: dict[str, Any]) -> None:
    """Verify the audit chain when the log is small enough; retried once, as a record being
    appended meanwhile looks like a torn last line."""
    from mdm.audit.log import verify_report

    if bridge.audit is None:
        return
    path = bridge.audit.path
    try:
        size = path.stat().st_size
    except OSError as e:
        out.update(chain="unreadable", error=e.strerror)
        return
    if size > AUDIT_VERIFY_MAX:
        out.update(chain="not checked", note=f"{size} bytes: run mdm audit verify")
        return
    for attempt in range(3):
        with trio.move_on_after(20):
            lines, found = await trio.to_thread.run_sync(verify_report, path)
            if not found or attempt == 2:
                out.update(
                    chain="ok" if not found else "broken",
                    records=lines,
                    problems=[str(p) for p in found[:5]],
                )
                return
        await trio.sleep(0.2)
    out.update(chain="not checked", note="verification took too long")


def _audit(bridge: Bridge, check: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    if bridge.audit is None:
        return {"log": None}
    a = bridge.audit_state
    out: dict[str, Any] = {
        "log": str(bridge.audit.path),
        "writes": a.writes,
        "failures": a.failures,
        **check,
    }
    if a.failures:
        out["last_error"] = a.last_error
        out["last_error_at"] = _iso(a.last_error_at)
        problems.append(f"audit: {a.failures} record(s) could not be written: {a.last_error}")
    if check.get("chain") == "broken":
        problems.append(f"audit: chain broken: {'; '.join(check['problems'][:2])}")
    anchor = bridge.session.anchor
    if anchor is not None:
        out["anchor"] = anchor.state()
        if out["anchor"]["failing"]:
            problems.append("audit: checkpoints are not reaching the key servers")
    return out


def _iso(t: float) -> str:
    if t == float("inf"):
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _duration(s: float) -> str:
    if s <= 0:
        return "0s (expired)"
    if s < 120:
        return f"{int(s)}s"
    if s < 7200:
        return f"{int(s // 60)}m"
    return f"{s / 3600:.1f}h"


# ---------------------------------------------------------------------------- client side
def ask(path: Path, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any] | None:
    """The status document of the mount serving ``path``; None if nothing listens there (no
    file, or a dead daemon's socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _addressable(path) as name:
                s.connect(name)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            raise UserError(f"control socket {path}: {e.strerror}") from None
        s.sendall(REQUEST)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise UserError(f"the mount did not answer on {path} within {timeout:.0f}s") from None
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise UserError(f"the mount answered garbage on {path}") from None
    if not isinstance(doc, dict) or "error" in doc:
        raise UserError(f"the mount refused the status request on {path}")
    return doc


def find_status(config: Config, mountpoint: Path | None) -> dict[str, Any]:
    """The status of the one running mount of ``config`` (at ``mountpoint`` if given).

    NoRunningMount (exit 4) if none; a UserError of exit code 2 naming the mount points if
    several run and none was chosen."""
    if mountpoint is not None:
        path = socket_path(config, mountpoint)
        doc = ask(path)
        if doc is None:
            raise NoRunningMount(
                f"no running mount of {config.path} at {mountpoint} (no live control socket {path})"
            )
        return doc
    d = run_dir(config)
    docs = [doc for p in sorted(d.glob("*.sock")) if (doc := ask(p)) is not None]
    if not docs:
        raise NoRunningMount(f"no running mount of {config.path} (no live control socket in {d})")
    if len(docs) > 1:
        points = "\n  ".join(doc["mount"]["mountpoint"] for doc in docs)
        err = UserError(
            f"{len(docs)} mounts of {config.path} are running; choose one with "
            f"--mountpoint:\n  {points}"
        )
        err.exit_code = 2
        raise err
    return docs[0]


def render(doc: dict[str, Any]) -> list[str]:
    """The one screen of ``mdm status``."""
    m = doc["mount"]
    out = [
        f"mount     {m['mountpoint']}  (pid {m['pid']}, up {_duration(m['uptime_s'])}, "
        f"mdm {m['version']})",
        f"config    {m['config']}",
        "",
        "SITE".ljust(16)
        + "STATE".ljust(8)
        + "RTT ms".rjust(8)
        + "IN FLIGHT".rjust(11)
        + "QUEUED".rjust(8)
        + "ASSOC".rjust(7)
        + "RECEIVED".rjust(10),
    ]
    for s in doc["sites"]:
        rtt = "" if s.get("rtt_ms") is None else f"{s['rtt_ms']}"
        assoc = s["associations"]
        out.append(
            s["name"][:15].ljust(16)
            + s["state"].ljust(8)
            + rtt.rjust(8)
            + str(s["in_flight"]).rjust(11)
            + str(s["queued"]).rjust(8)
            + f"{assoc['in_use']}/{assoc['in_use'] + assoc['idle']}".rjust(7)
            + str(s["objects_received"]).rjust(10)
        )
    r = doc["retrievals"]
    out.append(
        f"objects waiting for a retrieval: {r['objects_pending']}; since start "
        f"{r['objects_received']} received, {r['objects_failed']} failed"
    )
    c = doc["cache"]
    out += [
        "",
        f"cache     {_size(c['bytes'])} of {_size(c['max_bytes'])} ({c['used_pct']}%), "
        f"{c['objects']} objects, {c['pinned_objects']} open ({_size(c['pinned_bytes'])}), "
        f"{c['evicted_objects']} evicted",
    ]
    k = doc["keys"]
    if k.get("servers"):
        out.append(
            f"keys      {k['reachable']} of {len(k['servers'])} key servers reachable "
            f"({k['threshold']} needed)"
        )
        for s in k["servers"]:
            mark = f"ok {s['rtt_ms']} ms" if s["reachable"] else f"UNREACHABLE: {s['error']}"
            out.append(f"          {s['url']}: {mark}")
    else:
        out.append(f"keys      {k.get('mode', '?')} {k.get('keyring', '')}".rstrip())
    p = doc["policy"]
    if "version" in p:
        last = p["last_reload"]
        reload = (
            "no reload since start"
            if last is None
            else (
                f"last reload {last['time']}: {last['result']}"
                + (f" ({last['error']})" if last.get("error") else "")
            )
        )
        out.append(
            f"policy    {p['dir']}  version {p['version']}, {p['rules']} rules, loaded "
            f"{p['loaded_at']}; {reload}"
        )
    else:
        out.append(f"policy    {p['mode']}")
    t = doc["token"]
    if t.get("valid"):
        out.append(
            f"token     {t['subject']} ({t['issuer']}), expires {t['expires']} "
            f"(in {_duration(t['expires_in_s'])})"
        )
    elif "error" in t:
        out.append(f"token     INVALID: {t['error']}")
    else:
        out.append(f"token     {t.get('mode', '')}")
    a = doc["audit"]
    if a.get("log"):
        chain = a.get("chain", "?")
        if a.get("records") is not None:
            chain += f" ({a['records']} records)"
        line = f"audit     {a['log']}: chain {chain}; {a['writes']} written, {a['failures']} failed"
        if "anchor" in a:
            an = a["anchor"]
            line += f"; anchored up to {an['anchored_seq']}"
            if an["failing"]:
                line += " (anchoring FAILING)"
        out.append(line)
    else:
        out.append("audit     off")
    out.append("")
    for w in doc["warnings"]:
        out.append(f"WARNING: {w}")
    for p_ in doc["problems"]:
        out.append(f"PROBLEM: {p_}")
    out.append("healthy" if doc["healthy"] else f"degraded: {len(doc['problems'])} problem(s)")
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
