"""``mdm status``: one screen for a running mount, asked over its control socket."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", "mdm.toml"),
    show_default="mdm.toml or $MDM_CONFIG",
    help="The bridge configuration file.",
)
@click.option(
    "--mountpoint",
    type=click.Path(path_type=Path),
    help="Which mount, when several mounts of this configuration run on this host.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
def status(config_path: Path, mountpoint: Path | None, as_json: bool) -> None:
    """Ask a running mount what it is doing: each site's state, round trip, in-flight and
    queued retrievals; cache use against the cap; key servers reachable (M of N); policy
    version and last reload; token subject and expiry; audit chain health.

    Exit codes: 0 healthy; 1 degraded (a site down, key servers missing, a failed policy
    reload, an invalid token, audit failures: listed as PROBLEM lines); 2 usage or
    configuration error (also: several mounts run and no --mountpoint); 4 no running mount of
    this configuration (at that mount point).
    """
    from mdm.config import load_config
    from mdm.ops.status import find_status, render

    config = load_config(config_path)
    doc = find_status(config, mountpoint.resolve() if mountpoint is not None else None)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in render(doc):
            click.echo(line)
    if not doc["healthy"]:
        sys.exit(1)
