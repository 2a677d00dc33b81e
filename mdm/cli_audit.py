"""``mdm audit verify|tail``: check and read the hash-chained audit log.

Registered in :mod:`mdm.cli` with ``main.add_command(audit)``. ``verify`` exits 0 when the chain
is intact and agrees with every anchor the key servers signed, and 1 when it does not, listing
every problem with its line number.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import click

from mdm.audit import follow, read_tail, summarize, verify_report
from mdm.audit_anchor import check_anchors, collect_anchors
from mdm.audit_syslog import check_copy
from mdm.config import Config, load_config
from mdm.errors import UserError


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


@audit.command("tail")
@_config
@_log
@click.option("-n", "count", default=20, show_default=True, help="How many records.")
@click.option("--follow", "-f", "follow_", is_flag=True, help="Keep printing new records.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
def audit_tail(
    config_path: Path, log_path: Path | None, count: int, follow_: bool, as_json: bool
) -> None:
    """Print the last records (and, with --follow, new ones as they come)."""
    path = _log_path(config_path, log_path)
    try:
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
            click.echo(line if as_json else summarize(line))
    except KeyboardInterrupt:
        stop.set()
