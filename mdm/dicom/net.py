"""Shared DICOM plumbing: the bridge's application entities, association helpers, deadlines,
status names. The rest of ``mdm/dicom`` uses only this module's public names.

Two implementations sit behind :func:`new_ae` and :func:`start_server`, chosen by
``[bridge] fast_dicom``:

* the fast path (:mod:`mdm.dicom.fast`, the default) replaces pynetdicom's transport, DUL,
  DIMSE and association layers where their defaults do not suit a bridge: Nagle and 4 KiB
  reads, 1 ms polling reactors, a pydicom round trip per command set, and no bound on what
  a peer may announce (docs/DICOM.md, Performance and Limits);
* the stock path is pynetdicom as shipped, configured through its public API only, so a
  pynetdicom upgrade can ship before the fast path is re-verified against it.

Both share what this module adds on top: a stall timeout on every socket (through
``EVT_CONN_OPEN`` on the stock path), :class:`Watchdog` (a C-FIND/C-MOVE/C-GET waiting with
``dimse_timeout=None`` is never woken when the association dies, and a finite
``dimse_timeout`` cannot express "a deadline that resets while the peer makes progress"),
and no PHI in logs: pynetdicom logs request and response identifiers (patient names and IDs)
at INFO, and pydicom logs invalid values it decodes; both are switched off here,
process-wide, because no log line of the bridge may carry PHI.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from types import TracebackType
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer

from mdm.config import SiteSettings
from mdm.dicom import fast
from mdm.dicom.ae import BridgeAE
from mdm.dicom.fast import ProgressQueue, tune_socket
from mdm.dicom.limits import (
    ASSOCIATE_DEADLINE,
    DEFAULT_MAX_PDU,
    MAX_ASSOCIATE_PDU,
    MAX_MESSAGE_BYTES,
    MAX_UNAUTHENTICATED,
    PART10_PREFIX,
    PDU_SLACK,
    PeerViolation,
    max_pdu_of,
)
from mdm.dicom.status import (
    CANCEL,
    FAILURE,
    PENDING,
    STORE_CANNOT_UNDERSTAND,
    STORE_NOT_AUTHORISED,
    STORE_NOT_SUPPORTED,
    STORE_OUT_OF_RESOURCES,
    STORE_PROCESSING_FAILURE,
    STORE_SUCCESS,
    SUCCESS,
    WARNING,
    status_category,
    status_code,
    status_name,
)
from mdm.errors import RetrieveError, RetrieveTimeout

log = logging.getLogger(__name__)

# No PHI in any log line (pynetdicom would print whole identifiers at INFO), and no per-PDU
# debug handlers, which cost CPU on every PDU even when DEBUG is off.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"
# pydicom validates values as it decodes them and logs an invalid value verbatim (a malformed
# PatientName would land in the log): PACS answers are checked by our own code instead.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
# pydicom also warns (``warnings.warn``) with the offending value in the message, e.g. an
# unknown Specific Character Set as the PACS sent it; printed warnings end up in the logs.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class _NoPeerTracebacks(logging.Filter):
    """pynetdicom logs ``LOGGER.exception(exc)`` when a peer's message fails to decode: the
    traceback and the exception's text (which can quote the peer's bytes) become one line
    naming the exception type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = "%s (details withheld: they come from the peer)"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
        return True


class _NoPydicomValues(logging.Filter):
    """pydicom logs the values it cannot decode or validate word for word (``Unknown encoding
    'ISO_IR 1^A2'``), whatever level the application sets (its ``config.debug`` resets the
    level). Its warnings are dropped; an error keeps its level and loses its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return False
        record.msg = "pydicom reported an error (details withheld: they quote DICOM values)"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


for _name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pydicom"]:
    logging.getLogger(_name).addFilter(_NoPydicomValues())
logging.getLogger("pydicom").addFilter(_NoPydicomValues())

# A logger's filters see only the records logged on it, not its children's: every module
# logger of pynetdicom (all created by the imports above) gets one.
for _name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pynetdicom"]:
    logging.getLogger(_name).addFilter(_NoPeerTracebacks())


VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
# Uncompressed first: an SCP that picks the first syntax it supports should not be led into
# transcoding plain pixel data into a compressed syntax.
TRANSFER_SYNTAXES: list[str] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
]
QUERY_SYNTAXES: list[str] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE]

# pynetdicom refuses to request more than 128 presentation contexts (PS3.8: context IDs are
# odd numbers 1..255).
MAX_REQUESTED_CONTEXTS = 128


_previous_excepthook = threading.excepthook


def _reactor_failed(args: threading.ExceptHookArgs) -> None:
    """pynetdicom's reactor threads die on some malformed input from a peer (stock path: an
    empty PDV item is an IndexError in its DIMSE decoder): one error line naming the
    exception's type (its text and traceback can quote the peer's bytes) and the connection
    closed, instead of a traceback on stderr. The waiting exchange ends at its Watchdog."""
    thread = args.thread
    if not isinstance(thread, DULServiceProvider | Association):
        _previous_excepthook(args)
        return
    name = args.exc_type.__name__ if args.exc_type is not None else "error"
    kind = type(thread).__name__
    log.error("a DICOM association's %s thread failed (%s); closing it", kind, name)
    dul = thread if isinstance(thread, DULServiceProvider) else thread.dul
    sock = dul.socket
    if sock is not None:
        with contextlib.suppress(Exception):
            sock.close()


threading.excepthook = _reactor_failed


# --- application entities and servers --------------------------------------------------------


def new_ae(
    ae_title: str,
    timeout: float,
    max_pdu: int = 0,
    *,
    fast_path: bool,
    allowed_callers: Any = None,
) -> BridgeAE:
    """The bridge's application entity: on the fast path (:mod:`mdm.dicom.fast`) or on stock
    pynetdicom. ``allowed_callers``: see :class:`~mdm.dicom.ae.BridgeAE`."""
    cls = fast.FastAE if fast_path else BridgeAE
    return cls(ae_title, timeout, max_pdu, allowed_callers)


def is_fast(ae: BridgeAE) -> bool:
    """True if ``ae`` runs on the fast path."""
    return isinstance(ae, fast.FastAE)


def _stall_timeout(event: evt.Event, stall: float | None) -> None:
    """Stock path, on ``EVT_CONN_OPEN``: pynetdicom clears the socket timeout after connecting
    (and accepted sockets have none), so a peer that stops halfway through a PDU would block
    the reader thread forever. pynetdicom's reader turns the timeout into a closed
    connection (Evt17)."""
    sock = event.assoc.dul.socket
    raw = sock.socket if sock is not None else None
    if raw is not None:
        try:
            raw.settimeout(stall)
        except OSError:  # already closed
            pass


def _stock_handlers(ae: BridgeAE, evt_handlers: list[Any] | None) -> list[Any]:
    return [*(evt_handlers or []), (evt.EVT_CONN_OPEN, _stall_timeout, [ae.stall_timeout])]


def start_server(
    ae: BridgeAE,
    address: tuple[str, int],
    contexts: list[PresentationContext],
    evt_handlers: list[Any],
) -> ThreadedAssociationServer:
    """Start a non-blocking association server (on the fast path if ``ae`` is on it)."""
    if isinstance(ae, fast.FastAE):
        return fast.start_server(ae, address, contexts, evt_handlers)
    server = ae.start_server(
        address, block=False, evt_handlers=_stock_handlers(ae, evt_handlers), contexts=contexts
    )
    assert server is not None
    return server


# --- associations ------------------------------------------------------------------------


def _opened(event: evt.Event, flag: threading.Event) -> None:
    flag.set()


def open_association(
    ae: BridgeAE,
    site: SiteSettings,
    contexts: list[PresentationContext],
    *,
    max_pdu: int,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    """Open an association with ``site``; raise RetrieveTimeout/RetrieveError naming the site."""
    started = time.monotonic()
    connected = threading.Event()
    handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, _opened, [connected])]
    if not is_fast(ae):
        handlers = _stock_handlers(ae, handlers)
    try:
        assoc = ae.associate(
            site.host,
            site.port,
            contexts=contexts,
            ae_title=site.ae_title,
            max_pdu=max_pdu_of(max_pdu),
            ext_neg=ext_neg,
            evt_handlers=handlers,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise RetrieveError(f"site {site.name}: cannot open an association: {e}") from None
    assoc.mdm_site = site.name  # type: ignore[attr-defined]  # for the DUL's log lines
    if assoc.is_established:
        return assoc
    elapsed = time.monotonic() - started
    # Say what happened: refused (nothing listens), timed out, rejected (with the reason),
    # or aborted by the peer during negotiation.
    where = f"{site.host}:{site.port}"
    if not connected.is_set():
        if elapsed >= 0.9 * site.timeout:
            raise RetrieveTimeout(
                f"site {site.name}: cannot connect to {where}: timed out after {site.timeout:g}s"
            )
        raise RetrieveError(
            f"site {site.name}: cannot connect to {where}: connection refused or unreachable"
        )
    if assoc.is_rejected:
        raise RetrieveError(f"site {site.name}: association rejected ({_reject_reason(assoc)})")
    if elapsed >= 0.9 * site.timeout:
        raise RetrieveTimeout(
            f"site {site.name}: no answer to the association request within {site.timeout:g}s"
        )
    if assoc.is_aborted:
        raise RetrieveError(
            f"site {site.name}: association aborted by the peer during negotiation "
            "(an A-ABORT, a malformed answer, or the connection closed)"
        )
    raise RetrieveError(f"site {site.name}: the connection to {where} closed during negotiation")


def _reject_reason(assoc: Association) -> str:
    prim = assoc.acceptor.primitive
    if prim is None:
        return "no reason given"
    parts = [
        str(getattr(prim, name, "") or "") for name in ("result_str", "source_str", "reason_str")
    ]
    return ", ".join(p for p in parts if p) or "no reason given"


def close_association(assoc: Association | None) -> None:
    """Release an association politely if it is still up, else make sure it is gone."""
    if assoc is None:
        return
    try:
        if assoc.is_established:
            assoc.release()
        if assoc.is_established or assoc.is_alive():
            assoc.abort()
    except Exception:  # closing must never raise: the caller is already cleaning up
        log.debug("error while closing an association", exc_info=True)


def abort_association(assoc: Association | None) -> None:
    """Abort an association whose state we no longer trust (never raises)."""
    if assoc is None:
        return
    try:
        assoc.abort()
    except Exception:
        log.debug("error while aborting an association", exc_info=True)


def accepted(assoc: Association, abstract_syntax: str, *, as_scp: bool = False) -> bool:
    """True if a presentation context for ``abstract_syntax`` was accepted (in that role)."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract_syntax and (not as_scp or cx.as_scp):
            return True
    return False


def contexts_for(abstract_syntaxes: list[str], syntaxes: list[str]) -> list[PresentationContext]:
    """One requested presentation context per abstract syntax."""
    return [build_context(a, syntaxes) for a in abstract_syntaxes]


# --- deadlines -----------------------------------------------------------------------------


class Watchdog:
    """A progress deadline for one DIMSE exchange on one association.

    pynetdicom's response generators block on the association's message queue. The watchdog
    thread wakes such a wait (by queueing pynetdicom's own "no message" marker, which makes
    the generator yield an empty status) when either ``timeout`` seconds pass without
    :meth:`touch`, or the association dies underneath (peer abort, closed connection), which
    pynetdicom would otherwise never report to a waiter without a DIMSE timeout.
    """

    def __init__(self, assoc: Association, timeout: float, since: float | None = None) -> None:
        self.assoc = assoc
        self.timeout = timeout
        self._since = since
        """When the wait began (monotonic), if before entering: the first deadline counts
        from then (a request that first validated or opened an association)."""
        self.fired = False
        """The deadline passed: the peer went silent."""
        self.died = False
        """The association ended while we were waiting."""
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        """Record progress: the deadline starts again from now."""
        self._last = time.monotonic()

    @property
    def tripped(self) -> bool:
        """True if the watchdog woke the waiter (the association must not be reused)."""
        return self.fired or self.died

    def __enter__(self) -> Watchdog:
        self._last = time.monotonic() if self._since is None else self._since
        self._thread = threading.Thread(target=self._run, name="mdm-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        poll = min(0.05, self.timeout / 10)
        while not self._stop.wait(poll):
            died = not self.assoc.is_established
            fired = time.monotonic() - self._last > self.timeout
            if not (died or fired):
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self.died = died and not fired
                self.fired = fired
                # pynetdicom's marker for "no message": the generator aborts the association
                # (if still up) and yields an empty status.
                self.assoc.dimse.msg_queue.put((None, None))
            return


__all__ = [
    "ASSOCIATE_DEADLINE",
    "CANCEL",
    "DEFAULT_MAX_PDU",
    "FAILURE",
    "MAX_ASSOCIATE_PDU",
    "MAX_MESSAGE_BYTES",
    "MAX_UNAUTHENTICATED",
    "PART10_PREFIX",
    "PDU_SLACK",
    "PENDING",
    "STORE_CANNOT_UNDERSTAND",
    "STORE_NOT_AUTHORISED",
    "STORE_NOT_SUPPORTED",
    "STORE_OUT_OF_RESOURCES",
    "STORE_PROCESSING_FAILURE",
    "STORE_SUCCESS",
    "SUCCESS",
    "WARNING",
    "BridgeAE",
    "PeerViolation",
    "ProgressQueue",
    "Watchdog",
    "abort_association",
    "accepted",
    "close_association",
    "contexts_for",
    "is_fast",
    "max_pdu_of",
    "new_ae",
    "open_association",
    "start_server",
    "status_category",
    "status_code",
    "status_name",
    "tune_socket",
]
