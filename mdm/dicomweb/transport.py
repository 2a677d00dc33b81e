"""Per-site HTTP clients for DICOMweb sites, the bearer token, and HTTP failures as errors.

One ``httpx.Client`` per site, shared by every thread (httpx clients are thread-safe): it
keeps at most ``max_associations`` connections open and reuses them, verifies TLS against the
site's ``ca_file`` (or the system trust store), and gives every wait (connect, each read, each
write, a free pooled connection) the site's ``timeout``. Proxies and CA bundles named in the
environment are not used: what the bridge talks to is what mdm.toml says.

The token is the session's token file (:func:`use_token_file`), read again for every request,
so a renewed token is used at once; it is never logged. Without a token file (a mount without
``[identity]``) no ``Authorization`` header is sent.

Errors name the site and what was asked, never the token, a URL query (it can hold a patient
name) or anything the server sent back:

* 401/403: :class:`~mdm.errors.AccessDenied` (EACCES); 404: :class:`~mdm.errors.NotFound`;
* a wait that passed ``timeout``: :class:`~mdm.errors.RetrieveTimeout` (ETIMEDOUT);
* anything else (refused connection, TLS failure, 5xx, a malformed answer):
  :class:`~mdm.errors.RetrieveError` (EIO).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Generator
from pathlib import Path

import httpx

from mdm import __version__
from mdm.config import SiteSettings
from mdm.errors import AccessDenied, MdmError, NotFound, RetrieveError, RetrieveTimeout

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and a QIDO-RS URL can carry a matching key (a
# patient's name from `mdm find`): its records and httpcore's stop below WARNING here.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_lock = threading.Lock()
_token_file: Path | None = None
_clients: dict[SiteSettings, httpx.Client] = {}


def use_token_file(path: Path | None) -> None:
    """Send the token in ``path`` (re-read per request) to every DICOMweb site of this process;
    None: send none. Called once by :func:`mdm.access.session.open_session`."""
    global _token_file
    with _lock:
        _token_file = path


def token_file() -> Path | None:
    """The token file DICOMweb requests carry (None: no Authorization header)."""
    return _token_file


class _Bearer(httpx.Auth):
    """``Authorization: Bearer`` from the session's token file, read for each request."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = _token_file
        if path is not None:
            try:
                token = path.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise AccessDenied(f"cannot read the token file {path}: {e.strerror}") from None
            if token:
                request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _verify(site: SiteSettings) -> ssl.SSLContext | bool:
    if site.ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(site.ca_file))
    except (OSError, ssl.SSLError) as e:
        raise RetrieveError(f"site {site.name}: cannot use ca_file {site.ca_file}: {e}") from None


def client_for(site: SiteSettings) -> httpx.Client:
    """The shared HTTP client of ``site`` (made at first use).

    Keyed by the whole settings: a variant of a site (``mdm status`` echoes with a shorter
    timeout) gets its own client, and a client in use by another thread is never closed here.
    """
    with _lock:
        client = _clients.get(site)
        if client is None:
            client = _clients[site] = httpx.Client(
                base_url=site.dicomweb + "/",
                verify=_verify(site),
                timeout=httpx.Timeout(site.timeout),
                limits=httpx.Limits(
                    max_connections=site.max_associations,
                    max_keepalive_connections=site.max_associations,
                ),
                auth=_Bearer(),
                headers={"User-Agent": f"mdm-bridge/{__version__}"},
                follow_redirects=False,
                trust_env=False,
            )
        return client


def close_clients() -> None:
    """Close every site's client (their pooled connections). Idempotent."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for c in clients:
        c.close()


def request_error(site: SiteSettings, what: str, exc: Exception) -> MdmError:
    """The bridge's error for an exception httpx raised while doing ``what`` at ``site``."""
    where = f"{site.host}:{site.port}"
    if isinstance(exc, MdmError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        kind = {
            httpx.ConnectTimeout: "connecting to " + where,
            httpx.PoolTimeout: "waiting for a free connection",
            httpx.WriteTimeout: "sending the request",
        }.get(type(exc), "waiting for the answer")
        return RetrieveTimeout(
            f"site {site.name}: {what}: timed out after {site.timeout:g}s {kind}"
        )
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__context__ or exc.__cause__
        text = str(exc)
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            reason = getattr(cause, "verify_message", "") or "certificate verify failed"
            return RetrieveError(
                f"site {site.name}: {what}: the TLS certificate of {where} is not trusted "
                f"({reason}; check ca_file)"
            )
        if isinstance(cause, ssl.SSLError) or "SSL" in text:
            return RetrieveError(f"site {site.name}: {what}: TLS with {where} failed")
        return RetrieveError(
            f"site {site.name}: {what}: cannot connect to {where}: connection refused or "
            "unreachable"
        )
    if isinstance(exc, httpx.RemoteProtocolError):
        return RetrieveError(
            f"site {site.name}: {what}: the server closed the connection or broke HTTP"
        )
    if isinstance(exc, httpx.HTTPError):
        return RetrieveError(f"site {site.name}: {what} failed ({type(exc).__name__})")
    return RetrieveError(f"site {site.name}: {what} failed ({type(exc).__name__})")


def status_error(site: SiteSettings, what: str, status: int) -> MdmError:
    """The bridge's error for an HTTP answer ``status`` (not 2xx) to ``what`` at ``site``."""
    if status in (401, 403):
        return AccessDenied(
            f"site {site.name}: {what} refused (HTTP {status}): the site does not accept this "
            "mount's token" + ("" if _token_file is not None else " (none was sent)")
        )
    if status == 404:
        return NotFound(f"site {site.name}: {what}: not found (HTTP 404)")
    if status in (408, 504):
        return RetrieveTimeout(f"site {site.name}: {what}: the server timed out (HTTP {status})")
    return RetrieveError(f"site {site.name}: {what} failed (HTTP {status})")
