"""``mdm gateway``: the federation of ``[[site]]`` served as DICOMweb, in the foreground.

One process: the shared core (catalog, encrypted store, fetcher with its per-site limits,
storage SCP), the policy and the audit log of a mount, and hypercorn serving the routes of
:mod:`mdm.gateway.app` on trio, over TLS unless it listens on loopback. SIGTERM or SIGINT
stops it: requests in flight get a second to finish, then the core is closed.
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path

import trio

from mdm.access.session import open_service_session
from mdm.config import Config
from mdm.errors import ConfigError, UserError
from mdm.gateway.app import Gateway
from mdm.gateway.federation import Federation
from mdm.gateway.wado import StreamAborted
from mdm.keyservice.client import provider_for
from mdm.namespace.bridge import open_bridge
from mdm.store.keys import LocalKeyring

log = logging.getLogger(__name__)


class _OneLineAborts(logging.Filter):
    """hypercorn logs an app's exception with its traceback; a streamed answer the gateway
    aborted on purpose (:class:`StreamAborted`, already logged in one line) needs neither."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen: list[BaseException] = [exc] if exc is not None else []
        while seen:
            e = seen.pop()
            if isinstance(e, StreamAborted):
                return False
            if isinstance(e, BaseExceptionGroup):
                seen.extend(e.exceptions)
        return True


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("gateway: %s received, stopping", signal.Signals(sig).name)
            return


async def run_gateway(
    config: Config,
    token_file: Path | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation); ``task_status`` gets the bound port."""
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    g = config.gateway
    if g is None:
        raise ConfigError(config.path, "gateway", 'missing: [gateway] listen = "HOST:PORT"')
    for f in (g.tls_cert, g.tls_key):
        if f is not None and not f.is_file():
            raise ConfigError(config.path, "gateway", f"TLS file {f} does not exist")
    session, verifier = open_service_session(config, token_file)
    logging.getLogger("hypercorn.error").addFilter(_OneLineAborts())
    try:
        keys = provider_for(config.keys, token_file) or LocalKeyring.load(
            config.keys.keyring, create=True
        )
        async with open_bridge(config, session, keys=keys) as base:
            app = Gateway(Federation(base, verifier), g).app()
            hc = HyperConfig()
            host = f"[{g.listen[0]}]" if ":" in g.listen[0] else g.listen[0]
            hc.bind = [f"{host}:{g.listen[1]}"]
            if g.tls_cert is not None and g.tls_key is not None:
                hc.certfile, hc.keyfile = str(g.tls_cert), str(g.tls_key)
            hc.accesslog = None
            hc.graceful_timeout = 1.0
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    partial(
                        hyper_serve,
                        app,  # type: ignore[arg-type]
                        hc,
                        mode="asgi",
                        shutdown_trigger=_until_signalled,
                    )
                )
                port = int(str(binds[0]).rsplit(":", 1)[1]) if binds else g.listen[1]
                log.info(
                    "gateway serving DICOMweb at %s://%s:%d/dicom-web",
                    "https" if g.tls_cert else "http",
                    g.listen[0],
                    port,
                )
                task_status.started(port)
    except OSError as e:
        raise UserError(f"gateway: cannot serve on {g.listen[0]}:{g.listen[1]}: {e}") from None
    finally:
        session.close()


def serve(config: Config, token_file: Path | None = None) -> None:
    """Run the gateway in the foreground until SIGTERM or SIGINT."""
    trio.run(run_gateway, config, token_file)
