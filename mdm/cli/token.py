"""``mdm token``: a local token issuer for demos and development.

Registered in :mod:`mdm.cli.main` with ``main.add_command(token)``; errors are :class:`UserError`,
which the ``mdm`` group prints as one line with its exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from mdm.access.identity import InvalidToken, TokenVerifier
from mdm.access.tokens import decode_unverified, human_delta, init_issuer, issue_token, parse_claim
from mdm.config import load_config, parse_duration
from mdm.errors import UserError


@click.group()
def token() -> None:
    """Local token issuer for demos and development (production uses its own IdP)."""


@token.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing signing key.")
def token_init(directory: Path, force: bool) -> None:
    """Write DIRECTORY/signing-key.pem (Ed25519, 0600) and DIRECTORY/jwks.json."""
    files = init_issuer(directory, force=force)
    click.echo(f"signing key  {files.key} (Ed25519, EdDSA; keep it private)")
    click.echo(f"public JWKS  {files.jwks} (kid {files.kid})")
    click.echo(f'in mdm.toml: [identity] public_keys = "{files.jwks}"')


@token.command("issue")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path))
@click.option("--issuer", required=True, help="The iss claim ([identity] issuer).")
@click.option("--audience", required=True, help="The aud claim ([identity] audience).")
@click.option("--sub", required=True, help="The subject (user or service account).")
@click.option("--groups", multiple=True, help="Groups, comma-separated or repeated.")
@click.option(
    "--claim", "claims", multiple=True, help="NAME=VALUE (a string) or NAME:=JSON; repeatable."
)
@click.option("--ttl", default="8h", show_default=True, help="Lifetime (30m, 8h, 1h30m, 2d).")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    help="Write the token to this file (mode 0600, as mounts require) instead of stdout.",
)
def token_issue(
    key_path: Path,
    issuer: str,
    audience: str,
    sub: str,
    groups: tuple[str, ...],
    claims: tuple[str, ...],
    ttl: str,
    out: Path | None,
) -> None:
    """Print a signed token on stdout, or write it to --out FILE (0600)."""
    try:
        seconds = parse_duration(ttl)
    except ValueError as e:
        raise UserError(f"--ttl: {e}") from None
    extra = dict(parse_claim(c) for c in claims)
    tok = issue_token(
        key_path,
        issuer=issuer,
        audience=audience,
        sub=sub,
        groups=[g.strip() for gs in groups for g in gs.split(",") if g.strip()],
        claims=extra,
        ttl=seconds,
    )
    if out is None:
        click.echo(tok)
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: set it
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(tok + "\n")
    except OSError as e:
        raise UserError(f"--out {out}: {e.strerror or e}") from None
    click.echo(f"token written to {out} (0600)", err=True)


@token.command("show")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also verify against [identity] of this mdm.toml (exit 1 when invalid).",
)
def token_show(file: Path, config_path: Path | None) -> None:
    """Print a token's header and claims (FILE may be '-' for stdin); no verification
    unless --config is given."""
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read token file {file}: {e}") from None
    header, claims = decode_unverified(text.strip())
    out: dict[str, object] = {"header": header, "claims": claims}
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        left = exp - time.time()
        when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        out["expires"] = (
            f"{when} (in {human_delta(left)})"
            if left > 0
            else f"{when} (expired {human_delta(left)} ago)"
        )
    click.echo(json.dumps(out, indent=2, sort_keys=False))
    if config_path is None:
        return
    config = load_config(config_path)
    if config.identity is None:
        raise UserError(f"{config.path}: no [identity] section to verify against")
    try:
        p = TokenVerifier(config.identity).verify(text)
    except InvalidToken as e:
        click.echo(f"invalid: {e}")
        sys.exit(1)
    click.echo(f"valid: {p.label()}" + (f" groups {','.join(p.groups)}" if p.groups else ""))
