"""``mdm keys init|rotate`` and ``mdm keyserver``: the key service (docs/KEYSERVICE.md).

Registered in :mod:`mdm.cli.main` with ``main.add_command(keys)`` and
``main.add_command(keyserver)``; errors are :class:`UserError`, printed as one line with
their exit code (also when ``keyserver`` runs on its own).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from mdm.config import load_config
from mdm.errors import MdmError, UserError

DEFAULT_CONFIG = "mdm.toml"


@click.group()
def keys() -> None:
    """Key service: split object keys M-of-N across key servers."""


@keys.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", DEFAULT_CONFIG),
    help="The bridge configuration (its [identity], [policy] and sites are used).",
)
@click.option("--shares", "n", type=int, required=True, help="Number of key servers (N).")
@click.option("--threshold", "m", type=int, required=True, help="Servers needed to read (M).")
@click.option("--listen", required=True, help="HOST:PORT of each server, comma-separated.")
def keys_init(directory: Path, config_path: Path, n: int, m: int, listen: str) -> None:
    """Create a CA, N key servers' keys and DIRECTORY/server-K.toml files."""
    from mdm.keyservice.setup import init_deployment, parse_listen

    config = load_config(config_path)
    res = init_deployment(directory, config, n, m, parse_listen(listen))
    for c in res.server_configs:
        click.echo(f"server config  {c}   (run: mdm keyserver --config {c})")
    click.echo(f"CA certificate {res.ca}")
    click.echo(f"public keys    {res.public_file}")
    click.echo(f"admin key      {res.admin_file} (keep it private; used by 'mdm keys rotate')")
    click.echo("in mdm.toml:\n[keys]")
    click.echo("servers = [" + ", ".join(f'"{u}"' for u in res.urls) + "]")
    click.echo(f"threshold = {m}")
    click.echo(f'ca_file = "{res.ca}"')


@keys.command("rotate")
@click.argument("scope")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MDM_CONFIG", DEFAULT_CONFIG),
    help="The bridge configuration ([keys] and [cache]).",
)
@click.option(
    "--admin-key",
    type=click.Path(path_type=Path),
    default=None,
    help="The admin credential (default: admin.key beside [keys] ca_file).",
)
def keys_rotate(scope: str, config_path: Path, admin_key: Path | None) -> None:
    """Re-seal every share of SCOPE (site/level) under new key-server keys; resumable."""
    from mdm.keyservice.client import KeyServiceProvider
    from mdm.keyservice.rotate import rotate_scope
    from mdm.keyservice.setup import ADMIN_FILE
    from mdm.keyservice.wire import parse_scope
    from mdm.store.db import open_env
    from mdm.store.keys import check_secret_file
    from mdm.store.objects import ObjectStore

    config = load_config(config_path)
    ks = config.keys
    if not ks.servers or ks.ca_file is None:
        raise UserError(f"{config.path}: [keys] names no key servers: nothing to rotate")
    try:
        sc = parse_scope(scope)
    except ValueError as e:
        raise UserError(f"SCOPE: {e} (example: SiteA/identified)") from None
    admin_path = admin_key or ks.ca_file.parent / ADMIN_FILE
    try:
        check_secret_file(admin_path, admin_path.stat())
        admin = admin_path.read_text().strip()
    except OSError as e:
        raise UserError(f"{admin_path}: cannot read the admin key: {e.strerror}") from None
    env = open_env(config.cache.dir)
    try:
        provider = KeyServiceProvider.from_settings(ks)
        store = ObjectStore(
            config.cache.dir, env, provider, config.cache.max_bytes, fsync=config.cache.fsync
        )
        try:
            rep = rotate_scope(store, sc, ks, admin)
        finally:
            store.close()
            provider.close()
    finally:
        env.close()
    click.echo(
        f"rotated {rep.scope}: {rep.records} cached objects, {rep.resealed} re-sealed; "
        "old keys destroyed on every key server"
    )


@click.command("keyserver")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The key server's config (DIR/server-K.toml from 'mdm keys init').",
)
@click.option("--log-level", default="INFO", show_default=True)
def keyserver(config_path: Path, log_level: str) -> None:
    """Run one key server (HTTPS, hypercorn on trio) until interrupted."""
    from mdm.keyservice.server import load_server_config, serve

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        serve(load_server_config(config_path))
    except UserError as e:
        click.echo(f"mdm: error: {e}", err=True)
        sys.exit(e.exit_code)
    except MdmError as e:
        click.echo(f"mdm: error: {e}", err=True)
        sys.exit(1)
