"""``mdm audit verify|tail|query``: check, read and search the hash-chained audit log.

Registered in :mod:`mdm.cli.main` with ``main.add_command(audit)``.
``verify`` exits 0 when the chain
is intact and agrees with every anchor the key servers signed, and 1 when it does not, listing
every problem with its line number.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from mdm.audit.anchor import check_anchors, collect_anchors
from mdm.audit.log import follow, read_tail, summarize, verify_report
from mdm.audit.syslog import check_copy
from mdm.config import Config, load_config, parse_duration
from mdm.errors import UsageError, UserError


def _log_path(config_path: Path, log_path: Path | None) -> Path:
    if log_path is not None:
        return log_path
    config = load_config(config_path)
    if config.audit is None:
        raise UserError(f"{config.path}: no [audit] section (where is the log?)")
    return config.audit.log


_config = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", "mdm.toml"),
    show_default="mdm.toml or $MDM_CONFIG",
    help="The bridge configuration file ([audit] log).",
)
_log = click.option(
    "--log",
    "log_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Read this log file instead of [audit] log.",
)


@click.group()
def audit() -> None:
    """Check and read the audit log."""


@audit.command("verify")
@_config
@_log
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_TOKEN_FILE"),
    help="A JWT to ask the key servers for the log's anchors (also $MDM_TOKEN_FILE).",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Do not look for rotated files last anchored before this day (deleted by retention).",
)
@click.option(
    "--against",
    "copies",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    help="A copy of the records kept off this host (what [audit] syslog sent): each of its "
    "records must be in the log unchanged.",
)
def audit_verify(
    config_path: Path,
    log_path: Path | None,
    token_file: Path | None,
    since: datetime | None,
    copies: tuple[Path, ...],
) -> None:
    """Check the hash chain and the key servers' anchors; exit 1 naming each problem."""
    path = _log_path(config_path, log_path)
    config: Config | None = None
    if log_path is None or config_path.exists():
        config = load_config(config_path)
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"cannot read the token file {token_file}: {e.strerror}") from None
    # Anchors first, then the log: every anchor then refers to records already in the file.
    anchors = collect_anchors(path, config.keys if config else None, token)
    count, base = verify_report(path)
    problems = [(path, p) for p in base] + anchors.problems
    since_utc = since.replace(tzinfo=UTC) if since else None
    more, notes = check_anchors(path, anchors.anchors, since=since_utc)
    problems += more
    for copy in copies:
        more, copy_notes = check_copy(path, copy, since_utc)
        problems += more
        notes += copy_notes
    for note in anchors.notes + notes:
        click.echo(f"{path}: {note}")
    if not problems:
        caveat = f" (as far as local files show: {anchors.caveat})" if anchors.caveat else ""
        click.echo(f"{path}: {count} records, chain intact{caveat}")
        return
    for where, p in problems:
        click.echo(f"{where}: {p}")
    click.echo(f"{path}: {count} lines, {len(problems)} problem(s): chain NOT intact")
    sys.exit(1)


@dataclass(frozen=True)
class _Filter:
    """Which records ``tail`` and ``query`` print."""

    subs: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    uid: str | None = None
    since: str | None = None
    until: str | None = None

    def __call__(self, line: str) -> bool:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            return not self.active  # a damaged line shows only when nothing is filtered
        if not isinstance(r, dict):
            return not self.active
        if self.subs and r.get("sub") not in self.subs:
            return False
        if self.actions and r.get("action") not in self.actions:
            return False
        if self.decisions and r.get("decision") not in self.decisions:
            return False
        if self.rules and r.get("rule") not in self.rules:
            return False
        t = str(r.get("time", ""))
        if self.since and t < self.since:
            return False
        if self.until and t >= self.until:
            return False
        if self.uid:
            res = r.get("resource") or {}
            if self.uid not in {str(v) for k, v in res.items() if k.endswith("_uid")}:
                return False
        return True

    @property
    def active(self) -> bool:
        return any(
            (self.subs, self.actions, self.decisions, self.rules, self.uid, self.since, self.until)
        )


def _when(text: str | None, what: str) -> str | None:
    """``--since``/``--until``: an ISO date or time (UTC), or a duration ago (``2h``, ``1d``),
    as the log's own ``time`` text, so records compare as strings."""
    if not text:
        return None
    try:
        ago = parse_duration(text)
    except ValueError:
        ago = None
    if ago is not None and not text.strip().isdigit():
        t = datetime.now(UTC) - timedelta(seconds=ago)
    else:
        try:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"{what} {text!r}: expected 2025-01-31, 2025-01-31T12:00 or a duration (2h)"
            ) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option("--sub", "subs", multiple=True, help="Only this subject (repeatable)."),
            click.option(
                "--action", "actions", multiple=True, help="open, find, ... (repeatable)."
            ),
            click.option(
                "--decision", "decisions", multiple=True, help="allow, deny, ... (repeatable)."
            ),
            click.option("--rule", "rules", multiple=True, help="Deciding rule id (repeatable)."),
            click.option("--uid", help="Records about this study, series or SOP instance UID."),
            click.option("--since", help="From this time (UTC ISO date/time, or 2h, 1d ago)."),
            click.option("--until", help="Before this time (same forms)."),
        ]
    ):
        f = opt(f)
    return f


def _make_filter(kw: dict[str, Any]) -> _Filter:
    return _Filter(
        subs=tuple(kw["subs"]),
        actions=tuple(kw["actions"]),
        decisions=tuple(kw["decisions"]),
        rules=tuple(kw["rules"]),
        uid=kw["uid"],
        since=_when(kw["since"], "--since"),
        until=_when(kw["until"], "--until"),
    )


@audit.command("tail")
@_config
@_log
@click.option("-n", "count", default=20, show_default=True, help="How many records.")
@click.option("--follow", "-f", "follow_", is_flag=True, help="Keep printing new records.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
@_filters
def audit_tail(
    config_path: Path,
    log_path: Path | None,
    count: int,
    follow_: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Print the last records that match the filters (and, with --follow, new ones)."""
    path = _log_path(config_path, log_path)
    keep = _make_filter(kw)
    try:
        if keep.active:
            lines = [ln for ln in _all_lines(path) if keep(ln)][-count:] if count > 0 else []
        else:
            lines = read_tail(path, count) if count > 0 else []
    except FileNotFoundError:
        raise UserError(f"{path}: no such audit log") from None
    for line in lines:
        click.echo(line if as_json else summarize(line))
    if not follow_:
        return
    stop = threading.Event()
    try:
        for line in follow(path, stop):
            if keep(line):
                click.echo(line if as_json else summarize(line))
    except KeyboardInterrupt:
        stop.set()


@audit.command("query")
@_config
@_log
@click.option("--json", "as_json", is_flag=True, help="Print the matching JSON lines.")
@click.option("--count", "count_only", is_flag=True, help="Print only how many match.")
@_filters
def audit_query(
    config_path: Path, log_path: Path | None, as_json: bool, count_only: bool, **kw: Any
) -> None:
    """Print every record that matches the filters, oldest first (exit 1 if none)."""
    path = _log_path(config_path, log_path)
    keep = _make_filter(kw)
    n = 0
    try:
        for line in _all_lines(path):
            if keep(line):
                n += 1
                if not count_only:
                    click.echo(line if as_json else summarize(line))
    except FileNotFoundError:
        raise UserError(f"{path}: no such audit log") from None
    if count_only:
        click.echo(str(n))
    if n == 0:
        sys.exit(1)


def _all_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            if line:
                yield line.decode("utf-8", "replace")
