"""The bridge's storage SCP: the one listener that C-MOVE destinations deliver to.

Nobody can push data into the bridge: an association is accepted only from the calling AE
title of a configured site, and a C-STORE is accepted only for a SOP Instance UID that a
retrieval registered with :meth:`StorageSCP.expect` beforehand. Accepted objects are never
decoded: the sink gets the Part-10 bytes exactly as the PACS encoded them (no transcoding).
The same routing serves C-GET, where the objects arrive on the retriever's own association
(:meth:`StorageSCP.handle_store`).
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer

from mdm.config import BridgeSettings
from mdm.dicom.fast import accepted_context
from mdm.dicom.net import (
    PART10_PREFIX,
    STORE_CANNOT_UNDERSTAND,
    STORE_NOT_AUTHORISED,
    STORE_NOT_SUPPORTED,
    STORE_OUT_OF_RESOURCES,
    STORE_PROCESSING_FAILURE,
    STORE_SUCCESS,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    BridgeAE,
    is_fast,
    max_pdu_of,
    new_ae,
    start_server,
)
from mdm.dicom.part10 import part10
from mdm.dicom.validate import check_object, printable_uid
from mdm.errors import IntegrityError, StoreFull

log = logging.getLogger(__name__)

# Inbound associations idle this long are aborted by pynetdicom (PACS keep them open for
# reuse, which is welcome, but not forever).
_INBOUND_IDLE = 120.0


@dataclass(frozen=True, slots=True)
class ReceivedObject:
    """One C-STORE'd instance, as received."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    data: bytes | memoryview
    """The Part-10 file: preamble, ``DICM``, file meta information and the dataset as sent
    (a view of the receive buffer when the data set was received straight after its
    Part-10 header: the object is held once, however large)."""
    calling_aet: str
    dataset_offset: int = 0
    """Where the dataset starts in ``data`` (0: unknown)."""


@dataclass(frozen=True, slots=True)
class StoredNotice:
    """An object the receiver process already stored (or failed to): see ``procscp``."""

    sop_uid: str
    info: Any
    """The store's ObjectInfo (None on failure)."""
    error: Exception | None


Sink = Callable[[Any], None]
"""Called with a :class:`ReceivedObject` (or a :class:`StoredNotice` from a receiver process)."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where the objects of a retrieval may come from: the site it was asked of."""

    ae_title: str
    addresses: frozenset[str]
    """The site's host and the addresses it resolves to."""

    def matches(self, calling_aet: str, address: str) -> bool:
        """True for an association from this AE title and one of these addresses."""
        return calling_aet == self.ae_title and address in self.addresses


@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    out = {host}
    for info in infos:
        addr = str(info[4][0])
        out.add(addr)
        if addr.startswith("::ffff:"):
            out.add(addr.removeprefix("::ffff:"))
    return frozenset(out)


def source_of(site: Any) -> Source:
    """The :class:`Source` of a configured site (anything with ae_title and host)."""
    return Source(str(site.ae_title).strip(), _addresses(str(site.host)))


class RetrievalEnded(Exception):
    """Raised by a sink for an object that arrived after its retrieval stopped waiting for
    objects (its C-STORE is refused with 0x0124, as one arriving after the cancellation)."""


class Expectation:
    """A registration of SOP Instance UIDs that one retrieval is waiting for."""

    def __init__(
        self,
        scp: StorageSCP,
        sop_uids: frozenset[str],
        sink: Sink,
        source: Source | None = None,
        site: str = "",
    ) -> None:
        self._scp = scp
        self.sop_uids = sop_uids
        self.sink = sink
        self.source = source
        """Only objects from this site are accepted (None: from any allowed AE, for tests)."""
        self.site = site
        """The name of the site retrieving (for log lines; empty if unknown)."""
        self._lock = threading.Lock()
        self._received: set[str] = set()
        self._claimed: set[str] = set()
        self.refused = 0
        """C-STOREs of these UIDs that the sink raised for."""
        self.cancelled = False

    @property
    def received(self) -> set[str]:
        """The UIDs delivered to the sink so far (a copy)."""
        with self._lock:
            return set(self._received)

    def cancel(self) -> None:
        """Stop routing these UIDs here; later C-STOREs of them are refused. Idempotent."""
        if not self.cancelled:
            self.cancelled = True
            self._scp.unregister(self)

    def _claim(self, sop_uid: str) -> bool:
        """Claim a UID for delivery: True once, False for a duplicate (even one arriving on
        another association while the first copy is still in the sink)."""
        with self._lock:
            if sop_uid in self._claimed:
                return False
            self._claimed.add(sop_uid)
            return True

    def _unclaim(self, sop_uid: str) -> None:
        """The claimed copy could not be delivered: a resent copy may be."""
        with self._lock:
            self._claimed.discard(sop_uid)

    def mark_delivered(self, sop_uid: str) -> None:
        """Count ``sop_uid`` as delivered (by this process's sink, or by a receiver process
        that stored it)."""
        with self._lock:
            self._claimed.add(sop_uid)
            self._received.add(sop_uid)

    def __enter__(self) -> Expectation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


@dataclass
class ReceiverStats:
    """Counters of the storage SCP (for `mdm` status output and tests)."""

    stored: int = 0
    duplicates: int = 0
    refused_unexpected: int = 0
    refused_wrong_site: int = 0
    refused_malformed: int = 0
    refused_sink_error: int = 0
    rejected_associations: int = 0


def _is_empty(data: BytesIO, prefix: int) -> bool:
    with data.getbuffer() as view:
        return view.nbytes <= prefix


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, each with every transfer syntax."""
    cxs = [
        build_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts
    ]
    cxs.append(build_context(VERIFICATION))
    return cxs


class StorageSCP:
    """The bridge's long-lived storage SCP (one listener, pynetdicom threads).

    ``allowed_aets`` is the set of calling AE titles that may associate (the configured sites),
    or a callable returning it (consulted on every association request, so a configuration
    reload takes effect at once). Sinks run in pynetdicom's threads, possibly concurrently.
    """

    def __init__(
        self, bridge: BridgeSettings, allowed_aets: Callable[[], set[str]] | set[str]
    ) -> None:
        self.bridge = bridge
        if callable(allowed_aets):
            self._allowed: Callable[[], set[str]] = allowed_aets
        else:
            fixed = set(allowed_aets)
            self._allowed = lambda: fixed
        self._lock = threading.Lock()
        self._routes: dict[str, list[Expectation]] = {}
        self._server: ThreadedAssociationServer | None = None
        self._ae: BridgeAE | None = None
        self.stats = ReceiverStats()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start listening on ``bridge.host:bridge.port`` (port 0 picks a free one)."""
        if self._server is not None:
            return
        b = self.bridge
        ae = new_ae(
            b.ae_title, b.timeout, b.max_pdu, fast_path=b.fast_dicom, allowed_callers=self._allowed
        )
        ae.maximum_pdu_size = max_pdu_of(self.bridge.max_pdu)
        ae.network_timeout = _INBOUND_IDLE
        ae.maximum_associations = 64
        # An association addressed to another AE title is a misconfigured PACS: say so early.
        ae.require_called_aet = True
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = start_server(ae, (b.host, b.port), storage_contexts(), handlers)
        self._ae = ae
        log.info(
            "storage SCP %s listening on %s:%d", self.bridge.ae_title, self.bridge.host, self.port
        )

    def stop(self) -> None:
        """Stop listening and abort inbound associations. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        for assoc in list(server.active_associations):
            try:
                assoc.abort()
            except Exception:
                log.debug("error aborting an inbound association", exc_info=True)
        server.shutdown()
        log.info("storage SCP %s stopped", self.bridge.ae_title)

    @property
    def fast_path(self) -> bool:
        """True if the listener runs on the DICOM fast path (``bridge.fast_dicom``)."""
        return self._ae is not None and is_fast(self._ae)

    @property
    def port(self) -> int:
        """The TCP port actually listened on (useful with ``port = 0``)."""
        if self._server is None:
            raise RuntimeError("the storage SCP is not running")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    @property
    def ae_title(self) -> str:
        """Our AE title: the C-MOVE destination the PACS must know."""
        return self.bridge.ae_title

    # --- routing -----------------------------------------------------------------------

    def expect(
        self,
        sop_uids: Iterable[str],
        sink: Sink,
        spec: Mapping[str, Any] | None = None,
        *,
        inbound: bool = True,
        source: Any = None,
    ) -> Expectation:
        """Accept C-STOREs of these SOP Instance UIDs and hand them to ``sink``.

        Register *before* sending the C-MOVE/C-GET. ``sink`` runs in a pynetdicom thread; if it
        raises, the PACS gets a failure status for that instance. Call ``cancel()`` (or use
        the expectation as a context manager) when the retrieval is over. ``spec`` tells a
        receiver that stores objects itself where to store them (ignored here). ``inbound``
        False: the objects come on our own association (C-GET), never to the listener.
        ``source``: the site asked (a :class:`Source`, or settings with ``ae_title`` and
        ``host``): objects from any other calling AE title or address are refused.
        """
        if source is not None and not isinstance(source, Source):
            source = source_of(source)
        site = str((spec or {}).get("site") or "")
        exp = Expectation(self, frozenset(sop_uids), sink, source, site)
        with self._lock:
            for uid in exp.sop_uids:
                self._routes.setdefault(uid, []).append(exp)
        return exp

    def sync(self, exp: Expectation) -> None:
        """Wait until every object received for ``exp`` reached its sink (here: at once)."""
        return None

    def unregister(self, exp: Expectation) -> None:
        """Stop routing the UIDs of ``exp`` (called by ``Expectation.cancel``)."""
        with self._lock:
            for uid in exp.sop_uids:
                lst = self._routes.get(uid)
                if not lst:
                    continue
                try:
                    lst.remove(exp)
                except ValueError:
                    pass
                if not lst:
                    del self._routes[uid]

    def pending(self) -> int:
        """Number of SOP Instance UIDs currently expected (for tests and status output)."""
        with self._lock:
            return len(self._routes)

    def count(self, counter: str) -> None:
        """Add one to the counter ``counter`` of :attr:`stats`."""
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler (also bound on C-GET associations): route, check, never decode.

        Every C-STORE gets a status: an unexpected instance, or one from another site than
        the one asked, 0x0124; one on a presentation context that was not accepted for its
        class (or not in the SCP role) 0x0122; one with no data set or a data set that is not
        a well-formed copy of the instance (:func:`~mdm.dicom.validate.check_object`) 0xC000;
        each with one log line.
        """
        req = event.request
        assert isinstance(req, C_STORE)
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        assoc = event.assoc
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        calling = str(peer.ae_title or "").strip()
        address = str(getattr(peer, "address", "") or "")
        with self._lock:
            exps = self._routes.get(sop_uid) or []
            exp = next(
                (e for e in exps if e.source is None or e.source.matches(calling, address)), None
            )
        if exp is None and exps:
            self.count("refused_wrong_site")
            log.warning(
                "refused C-STORE from %r at %s: SOP instance %s was requested from another site",
                calling,
                address,
                printable_uid(sop_uid),
            )
            return STORE_NOT_AUTHORISED
        if exp is None:
            self.count("refused_unexpected")
            log.warning(
                "refused C-STORE from %r: SOP instance %s (class %s) was not requested",
                calling,
                printable_uid(sop_uid),
                printable_uid(sop_class),
            )
            return STORE_NOT_AUTHORISED
        who = f"site {exp.site}" if exp.site else f"AE {calling!r}"
        # pynetdicom serves a C-STORE on our own C-GET association under any accepted
        # context of its class when the one it came on was never accepted (and the data set
        # would then be labelled with that other context's transfer syntax).
        cx = accepted_context(assoc, req)
        if (
            cx is None
            or str(cx.abstract_syntax) != sop_class
            or (assoc.is_requestor and not cx.as_scp)
            or cx.context_id != event.context.context_id
        ):
            return self._refuse(
                exp,
                "refused_malformed",
                STORE_NOT_SUPPORTED,
                "%s: C-STORE of %s refused: on a presentation context not accepted for its class",
                who,
                sop_uid,
            )
        if req.DataSet is None or _is_empty(req.DataSet, getattr(req, PART10_PREFIX, 0)):
            return self._refuse(
                exp,
                "refused_malformed",
                STORE_CANNOT_UNDERSTAND,
                "%s: C-STORE of %s refused: no data set",
                who,
                sop_uid,
            )
        transfer_syntax = str(event.context.transfer_syntax)
        data: bytes | memoryview
        try:
            prefixed = getattr(req, PART10_PREFIX, 0)
            if prefixed:
                # The DIMSE layer wrote this request's Part-10 header ahead of its data set
                # (mdm.dicom.fast.FastMessage): the receive buffer is the file, nothing is copied.
                data = req.DataSet.getbuffer()
                dataset_offset = prefixed
            else:
                with req.DataSet.getbuffer() as dataset:
                    data = part10(sop_class, sop_uid, transfer_syntax, dataset)
                    dataset_offset = len(data) - dataset.nbytes
        except ValueError:
            return self._refuse(
                exp,
                "refused_sink_error",
                STORE_PROCESSING_FAILURE,
                "%s: C-STORE of %s refused: unusable UID in the request",
                who,
                sop_uid,
            )
        try:
            check_object(
                data,
                sop_uid,
                exp.site or calling,
                dataset_offset=dataset_offset,
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class,
            )
        except IntegrityError as e:
            return self._refuse(exp, "refused_malformed", STORE_CANNOT_UNDERSTAND, "%s", e)
        if not exp._claim(sop_uid):
            # A PACS may resend after a lost response: acknowledge, do not store twice.
            self.count("duplicates")
            return STORE_SUCCESS
        obj = ReceivedObject(
            sop_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax=transfer_syntax,
            data=data,
            calling_aet=calling,
            dataset_offset=dataset_offset,
        )
        try:
            exp.sink(obj)
        except RetrievalEnded:
            exp._unclaim(sop_uid)
            self.count("refused_unexpected")
            log.warning(
                "%s: C-STORE of %s refused: it arrived after its retrieval ended",
                who,
                printable_uid(sop_uid),
            )
            return STORE_NOT_AUTHORISED
        except StoreFull:
            exp._unclaim(sop_uid)
            return self._refuse(
                exp,
                "refused_sink_error",
                STORE_OUT_OF_RESOURCES,
                "%s: C-STORE of %s refused: cache full",
                who,
                sop_uid,
            )
        except Exception:
            exp._unclaim(sop_uid)
            self.count("refused_sink_error")
            exp.refused += 1
            log.exception("C-STORE of %s from %r failed in the sink", sop_uid, calling)
            return STORE_PROCESSING_FAILURE
        exp.mark_delivered(sop_uid)
        self.count("stored")
        return STORE_SUCCESS

    def _refuse(self, exp: Expectation, counter: str, status: int, msg: str, *args: object) -> int:
        self.count(counter)
        exp.refused += 1
        log.warning(msg, *args)
        return status

    def _on_accepted(self, event: Event) -> None:
        # A PACS that proposes a storage class only in syntaxes we do not accept cannot send
        # those objects as stored: say which, rather than leave a count that does not add up
        # (we never ask for a transcoding).
        rq = event.assoc.requestor
        for cx in event.assoc.rejected_contexts:
            log.warning(
                "site AE %r proposed SOP class %s only in transfer syntax(es) %s, which the "
                "bridge does not accept: such objects cannot be received as stored",
                str(rq.ae_title or "").strip(),
                cx.abstract_syntax,
                ", ".join(str(ts) for ts in cx.transfer_syntax) or "(none)",
            )

    def _on_rejected(self, event: Event) -> None:
        self.count("rejected_associations")
        rq = event.assoc.requestor
        log.warning(
            "refused association from AE %r at %s (not a configured site, or wrong called AE)",
            str(rq.ae_title or "").strip(),
            getattr(rq, "address", "?"),
        )
