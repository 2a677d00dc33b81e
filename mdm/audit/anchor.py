"""Audit anchors: the audit log's checkpoints, signed by the key servers (docs/AUDIT.md).

The hash chain of :mod:`mdm.audit.log` has no secret: whoever can write the log and its ``.head``
can rewrite them consistently. With ``[keys] servers``, the process writing the log
(:class:`AuditAnchorer`, started by :func:`mdm.access.session.open_session`) sends every key
server a checkpoint of the log every ``interval`` seconds while it grows, and on close; each
server keeps it and returns its signature (mdm.keyservice.anchor). The writer appends the
signed anchors to ``<log>.anchors``. The signing keys never leave the servers, so nobody on
the writing host can make an anchor for a history that was not the log's when it was anchored.

``mdm audit verify`` (:func:`collect_anchors`, :func:`check_anchors`) gathers the anchors of
the log from ``<log>.anchors`` and from the servers, checks each signature against
``public-keys.json``, and checks the log and its rotated files against every anchor: a record
at an anchored seq must have the anchored hash (the chain makes that hash commit to every record
before it), no file may end before an anchor, and every anchored chain must be found.

A failure to anchor (servers down) never stops the writer: one log line, retried at the next
interval. Anchors carry hashes, sequence numbers and times only: no PHI.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mdm.audit.log import AuditLog, AuditProblem, line_digest, record_seq, verify_report
from mdm.config import KeySettings
from mdm.keyservice.anchor import Anchor
from mdm.keyservice.client import PUBLIC_FILE, HttpsPool, ServerError
from mdm.keyservice.wire import b64d

log = logging.getLogger(__name__)

ANCHORS_SUFFIX = ".anchors"
DEFAULT_INTERVAL = 5.0
_MAX_LIST_ANSWER = 16 * 2**20
_NOT_ROTATED = (".head", ANCHORS_SUFFIX, ".tmp", ".lock")


def anchors_path(path: Path) -> Path:
    """The writer's signed anchors beside a log: ``audit.jsonl`` -> ``audit.jsonl.anchors``."""
    return path.with_name(path.name + ANCHORS_SUFFIX)


def log_id(path: Path) -> str:
    """The name the key servers know a log by: a hash of this host's name and the log's path.

    Derived, not stored, so that deleting files cannot make ``verify`` ask for another log.
    """
    real = os.path.realpath(path)
    data = b"mdm-audit-log\0" + socket.gethostname().encode() + b"\0" + real.encode()
    return hashlib.sha256(data).hexdigest()[:32]


def load_anchor_keys(public_file: Path) -> dict[int, Ed25519PublicKey]:
    """Each server's public anchor key from ``public-keys.json`` (empty if it has none)."""
    try:
        doc = json.loads(public_file.read_bytes())
        return {
            int(i): Ed25519PublicKey.from_public_bytes(b64d(v))
            for i, v in (doc.get("anchor") or {}).items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.error("cannot read the anchor keys of %s: %s", public_file, e)
        return {}


def _public_file(keys: KeySettings) -> Path:
    assert keys.ca_file is not None
    return Path(keys.ca_file).parent / PUBLIC_FILE


class AuditAnchorer:
    """Sends the log's checkpoints to the key servers and keeps their signed anchors.

    A background thread checks the log every ``interval`` seconds and anchors it when its last
    record changed; :meth:`close` anchors once more. ``token`` returns the JWT the servers
    verify (re-read each time, so a renewed token file is used).
    """

    def __init__(
        self,
        audit: AuditLog,
        keys: KeySettings,
        token: Callable[[], str],
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if not keys.servers or keys.ca_file is None:
            raise ValueError("[keys] names no key servers")
        self.audit = audit
        self.interval = interval
        self.timeout = keys.timeout
        self.path = anchors_path(audit.path)
        self.log_id = log_id(audit.path)
        self._public_file = _public_file(keys)
        self._token = token
        self._http = HttpsPool(keys.servers, keys.ca_file)
        self._n = len(keys.servers)
        self._lock = threading.Lock()
        self._last: tuple[str, int, str] | None = None
        self._down = False
        self._failing: frozenset[int] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mdm-audit-anchor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.anchor_now()
            except Exception:
                log.exception("audit anchor: unexpected error (retrying)")

    def state(self) -> dict[str, object]:
        """What ``mdm status`` shows: the last seq anchored, whether anchoring is failing, and
        which servers did not sign the last checkpoint. Read without the lock (a call in flight
        holds it for up to the key servers' timeout)."""
        last = self._last
        return {
            "anchored_seq": last[1] if last is not None else 0,
            "failing": self._down,
            "servers_silent": sorted(self._failing),
        }

    def anchor_now(self) -> int:
        """Anchor the log as it is now, if it changed; how many servers signed (0 if none)."""
        with self._lock:
            cp = self.audit.checkpoint()
            if cp is None or cp == self._last:
                return 0
            chain, seq, head = cp
            try:
                bearer = self._token().strip()
            except Exception as e:
                self._failed(seq, f"no token: {e}")
                return 0
            body = {"log": self.log_id, "chain": chain, "seq": seq, "head": head}
            keys = load_anchor_keys(self._public_file)

            def ask(i: int) -> Callable[[float], Anchor]:
                def call(timeout: float) -> Anchor:
                    a = self._http.post(i, "/v1/anchor", body, bearer, timeout)
                    anchor = Anchor.from_dict(a["anchor"])
                    if (anchor.log, anchor.chain, anchor.seq, anchor.head) != (
                        self.log_id,
                        chain,
                        seq,
                        head,
                    ) or anchor.server != i:
                        raise ServerError(f"key server {i}: signed another checkpoint")
                    pub = keys.get(i)
                    if pub is not None and not anchor.verify(pub):
                        raise ServerError(f"key server {i}: signature does not verify")
                    return anchor

                return call

            deadline = time.monotonic() + self.timeout
            calls = {i: ask(i) for i in range(1, self._n + 1)}
            results, errors = self._http.gather(calls, deadline, self._n)
            if not results:
                why = "; ".join(errors[i] for i in sorted(errors))
                if "HTTP 409" in why:
                    # Not an outage: the log now differs from what the servers anchored.
                    log.error("audit anchor: the key servers refuse seq %d: %s", seq, why)
                    self._last = cp
                    return 0
                self._failed(seq, why)
                return 0
            data = b"".join(
                json.dumps(results[i].to_dict(), separators=(",", ":")).encode() + b"\n"
                for i in sorted(results)
            )
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._last = cp
            if self._down:
                log.info("audit anchor: key servers reachable again; anchored seq %d", seq)
                self._down = False
            failing = frozenset(errors)
            if failing != self._failing:  # one line when the set of silent servers changes
                if errors:
                    log.warning("audit anchor of seq %d: %s", seq, "; ".join(errors.values()))
                self._failing = failing
            return len(results)

    def _failed(self, seq: int, why: str) -> None:
        # One line per outage, not one per attempt.
        if not self._down:
            log.warning(
                "audit anchor: no key server signed seq %d (%s); retrying every %.0f s",
                seq,
                why,
                self.interval,
            )
            self._down = True

    def close(self) -> None:
        """Stop the thread and anchor the last records (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self.timeout + 5)
        try:
            self.anchor_now()
        except Exception:
            log.exception("audit anchor: final checkpoint failed")
        self._http.close()


def anchorer_for(
    audit: AuditLog,
    keys: KeySettings,
    token_file: Path | None,
    interval: float = DEFAULT_INTERVAL,
) -> AuditAnchorer | None:
    """The anchorer of a log under ``[keys] servers`` (None without servers or a token)."""
    if not keys.servers:
        return None
    if token_file is None:
        log.warning("audit anchor: no token, so the audit log is not anchored at the key servers")
        return None
    tf = token_file
    return AuditAnchorer(audit, keys, lambda: tf.read_text(encoding="utf-8"), interval=interval)


# -- verification -----------------------------------------------------------------------------
@dataclass
class FileChain:
    """What one log file holds, for checking against anchors."""

    path: Path
    chain: str | None
    """SHA-256 of the first line (None if the file is empty)."""
    hashes: dict[int, tuple[int, str]] = field(default_factory=dict)
    """seq -> (line number, SHA-256 of the line), first occurrence."""
    last_seq: int = 0
    count: int = 0


def read_chain(path: Path) -> FileChain | None:
    """The chain of a log file (plain or ``.gz``), or None if it cannot be read."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    fc = FileChain(path, line_digest(lines[0]) if lines else None, count=len(lines))
    for n, line in enumerate(lines, 1):
        seq = record_seq(line)
        if seq is None:
            continue
        fc.hashes.setdefault(seq, (n, line_digest(line)))
        fc.last_seq = max(fc.last_seq, seq)
    return fc


def rotated_files(path: Path) -> list[Path]:
    """The log's rotated files beside it (``audit.jsonl.1``, ``audit.jsonl.2.gz``, ...)."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    prefix = path.name + "."
    return sorted(
        path.parent / n
        for n in names
        if n.startswith(prefix) and not n.endswith(_NOT_ROTATED) and (path.parent / n).is_file()
    )


@dataclass
class Anchors:
    """The anchors of a log, where they came from, and what could not be checked."""

    anchors: list[Anchor] = field(default_factory=list)
    problems: list[tuple[Path, AuditProblem]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    caveat: str = ""
    """Why the verdict rests on local files only (key servers configured but not asked, or
    none answered); empty when they were asked, or when there are none."""


def _list_server(
    pool: HttpsPool, index: int, lids: list[str], bearer: str, timeout: float
) -> tuple[list[dict[str, Any]], bytes | None]:
    """All the anchors server ``index`` holds for the logs ``lids``, and its anchor key."""
    out: list[dict[str, Any]] = []
    public: bytes | None = None
    for lid in lids:
        got, public = _list_one(pool, index, lid, bearer, timeout)
        out.extend(got)
    return out, public


def _list_one(
    pool: HttpsPool, index: int, lid: str, bearer: str, timeout: float
) -> tuple[list[dict[str, Any]], bytes | None]:
    host, port = pool.addrs[index - 1]
    out: list[dict[str, Any]] = []
    public: bytes | None = None
    after: int | None = 0
    while after is not None:
        conn = http.client.HTTPSConnection(host, port, context=pool.ssl, timeout=timeout)
        try:
            conn.request(
                "POST",
                "/v1/anchor/list",
                body=json.dumps({"log": lid, "after": after}).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"},
            )
            resp = conn.getresponse()
            raw = resp.read(_MAX_LIST_ANSWER + 1)
        except (OSError, http.client.HTTPException, ssl.SSLError) as e:
            raise ServerError(f"{pool.label(index)}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if resp.status != 200 or not isinstance(answer, dict):
            err = answer.get("error", "") if isinstance(answer, dict) else "not JSON"
            raise ServerError(f"{pool.label(index)}: refused (HTTP {resp.status}): {err}")
        public = b64d(answer["public"])
        out.extend(answer["anchors"])
        nxt = answer.get("next")
        after = nxt if isinstance(nxt, int) and nxt > after else None
    return out, public


def collect_anchors(path: Path, keys: KeySettings | None, token: str | None) -> Anchors:
    """The log's anchors from ``<log>.anchors`` and (with servers and a token) the servers.

    Every anchor's signature is checked against ``public-keys.json`` (or, for a server missing
    there, the key it sent over verified TLS); one that does not verify, or that names no known
    server, is a problem (a forged or damaged anchor) and is not used.
    """
    res = Anchors()
    pubkeys = load_anchor_keys(_public_file(keys)) if keys and keys.ca_file else {}
    seen: set[tuple[str, str, int, str, int]] = set()

    def add(a: Anchor, where: Path, line_no: int) -> None:
        pub = pubkeys.get(a.server)
        if pub is None and pubkeys:
            why = f"anchor of seq {a.seq} names key server {a.server}, which does not exist"
        elif pub is not None and not a.verify(pub):
            why = (
                f"anchor of seq {a.seq} does not carry key server {a.server}'s signature "
                "(forged or damaged)"
            )
        else:
            key = (a.log, a.chain, a.seq, a.head, a.server)
            if key not in seen:
                seen.add(key)
                res.anchors.append(a)
            return
        res.problems.append((where, AuditProblem(line_no, why)))

    ap = anchors_path(path)
    local = _read_local(ap, res)
    if keys is None or not keys.servers or keys.ca_file is None:
        res.notes.append(
            "no key servers configured: the log is not anchored, and a rewrite of the whole "
            "file and its .head is not detected (docs/AUDIT.md)"
        )
    elif not token:
        res.notes.append(
            "the key servers were not asked (no --token-file): checked against "
            f"{ap.name} only, which whoever can write the log can delete"
        )
        res.caveat = "key servers not asked"
    else:
        # The log's name here, and any other under which it was anchored (moved, host renamed).
        lid = log_id(path)
        lids = [lid, *sorted({a.log for a, _ in local} - {lid})]
        for i, a in _ask_servers(keys, lids, token, pubkeys, res):
            add(a, Path(f"key server {i}"), 0)
        if res.caveat:
            res.notes.append(
                f"no key server answered: checked against {ap.name} only, which whoever can "
                "write the log can delete"
            )
    if keys is not None and keys.servers and not pubkeys:
        res.notes.append(f"{_public_file(keys)} holds no anchor keys: signatures not checked")
    for a, n in local:  # after the servers: they may have supplied a missing public key
        add(a, ap, n)
    return res


def _read_local(ap: Path, res: Anchors) -> list[tuple[Anchor, int]]:
    try:
        lines = ap.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        res.notes.append(f"cannot read {ap}: {e.strerror}")
        return []
    out: list[tuple[Anchor, int]] = []
    for n, line in enumerate(lines, 1):
        try:
            out.append((Anchor.from_dict(json.loads(line)), n))
        except (ValueError, TypeError, AttributeError):
            res.problems.append((ap, AuditProblem(n, "not a valid anchor (garbled or edited)")))
    return out


def _ask_servers(
    keys: KeySettings,
    lids: list[str],
    token: str,
    pubkeys: dict[int, Ed25519PublicKey],
    res: Anchors,
) -> list[tuple[int, Anchor]]:
    """Every anchor the servers hold for ``lids``; fills in missing public keys; notes."""
    assert keys.ca_file is not None
    pool = HttpsPool(keys.servers, keys.ca_file)
    workers = cf.ThreadPoolExecutor(max_workers=len(keys.servers))
    out: list[tuple[int, Anchor]] = []
    answered: list[int] = []
    failed: list[str] = []
    try:
        futures = {
            workers.submit(_list_server, pool, i, lids, token, keys.timeout): i
            for i in range(1, len(keys.servers) + 1)
        }
        for f in cf.as_completed(futures):
            i = futures[f]
            try:
                entries, public = f.result()
            except ServerError as e:
                failed.append(str(e))
                continue
            except (ValueError, KeyError, TypeError) as e:
                failed.append(f"{pool.label(i)}: unusable answer ({e})")
                continue
            answered.append(i)
            if i not in pubkeys and public is not None:
                # An older public-keys.json: trust the key this server sent over verified TLS.
                pubkeys[i] = Ed25519PublicKey.from_public_bytes(public)
            for entry in entries:
                try:
                    a = Anchor.from_dict(entry)
                except ValueError:
                    failed.append(f"{pool.label(i)}: sent a malformed anchor")
                    continue
                if a.server != i or a.log not in lids:
                    failed.append(f"{pool.label(i)}: sent another server's or log's anchor")
                    continue
                out.append((i, a))
    finally:
        workers.shutdown(wait=False, cancel_futures=True)
        pool.close()
    if answered:
        res.notes.append(
            f"key servers asked: {len(answered)} of {len(keys.servers)} answered "
            f"({', '.join(str(i) for i in sorted(answered))})"
        )
    else:
        res.caveat = "no key server answered"
    res.notes.extend(failed)
    return out


def _parse_time(t: str) -> datetime:
    try:
        return datetime.fromisoformat(t)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)


def _age(t: str, now: datetime) -> str:
    s = (now - _parse_time(t)).total_seconds()
    if s < 0:
        return "in the future"
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def _servers(group: list[Anchor], seq: int) -> str:
    ks = sorted({a.server for a in group if a.seq == seq})
    return ("key server " if len(ks) == 1 else "key servers ") + ", ".join(map(str, ks))


def _hash_at(fc: FileChain, seq: int) -> str:
    return fc.hashes.get(seq, (0, ""))[1]


def check_anchors(
    path: Path,
    anchors: list[Anchor],
    now: datetime | None = None,
    since: datetime | None = None,
) -> tuple[list[tuple[Path, AuditProblem]], list[str]]:
    """Check the log and its rotated files against every anchor; ``(problems, notes)``.

    A chain last anchored before ``since`` (a rotated file deleted after its retention) is not
    looked for; one that is found is checked all the same.
    """
    now = now or datetime.now(UTC)
    retired = 0
    problems: list[tuple[Path, AuditProblem]] = []
    notes: list[str] = []
    live = read_chain(path)
    files = {fc.chain: fc for fc in (read_chain(p) for p in rotated_files(path)) if fc and fc.chain}
    if live is not None and live.chain is not None:
        files[live.chain] = live
    groups: dict[str, list[Anchor]] = {}
    for a in anchors:
        groups.setdefault(a.chain, []).append(a)
    for chain, group in sorted(groups.items(), key=lambda kv: max(a.time for a in kv[1])):
        newest = max(group, key=lambda a: (a.seq, a.time))
        who = f"{_servers(group, newest.seq)} anchored seq {newest.seq} at {newest.time}"
        fc = files.get(chain)
        if fc is None and since is not None and _parse_time(newest.time) < since:
            retired += 1
            continue
        if fc is None:
            if live is None or live.count == 0:
                state = "missing" if live is None else "empty"
                why = f"the log is {state}, but {who}: it was emptied, deleted or replaced"
            else:
                why = (
                    f"no file holds the chain of which {who} (first record {chain[:16]}...): "
                    "the log was replaced or its first record edited, or a rotated file is gone"
                )
            problems.append((path, AuditProblem(0, why)))
            continue
        if fc is not live:
            base = verify_report(fc.path)[1]
            problems.extend((fc.path, p) for p in base)
        bad = sorted(
            (a for a in group if a.seq <= fc.last_seq and _hash_at(fc, a.seq) != a.head),
            key=lambda a: a.seq,
        )
        if bad:
            a = bad[0]
            line_no = fc.hashes.get(a.seq, (0, ""))[0]
            later = sorted({b.seq for b in bad} - {a.seq})
            more = ""
            if later:
                seqs = ", ".join(map(str, later[:3])) + (", ..." if len(later) > 3 else "")
                more = f" (and the anchors of seq {seqs})"
            problems.append(
                (
                    fc.path,
                    AuditProblem(
                        line_no,
                        f"rewritten: record seq {a.seq} is not the one {_servers(group, a.seq)} "
                        f"anchored at {a.time}{more}: it or a record before it was edited, "
                        "removed or inserted, and the chain recomputed",
                    ),
                )
            )
        if newest.seq > fc.last_seq:
            problems.append(
                (
                    fc.path,
                    AuditProblem(
                        fc.count + 1,
                        f"{newest.seq - fc.last_seq} record(s) removed from the end: {who}, "
                        f"the file ends at seq {fc.last_seq}",
                    ),
                )
            )
        if fc is live:
            after = max(live.last_seq - newest.seq, 0)
            notes.append(
                f"last anchor: seq {newest.seq}, signed by {_servers(group, newest.seq)} at "
                f"{newest.time} ({_age(newest.time, now)}); {after} record(s) after it are not "
                "anchored yet (whoever can write the log could have appended or changed them)"
            )
    if retired:
        notes.append(f"{retired} chain(s) last anchored before {since:%Y-%m-%d} not looked for")
    if live is not None and live.chain is not None and live.chain not in groups and anchors:
        notes.append("no anchor covers this file yet (a new or rotated log)")
    return problems, notes
