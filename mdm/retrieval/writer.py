"""The writer loop for received objects: de-identify (for a de-identified view), encrypt and
put in the store, then report; the same in the mount's process (C-GET, and C-MOVE with
``receiver = "thread"``) and in the receiver process (C-MOVE).

Objects arrive in pynetdicom's threads, which must keep receiving: a storage SCP's sink
only queues them (:meth:`Writer.submit`). The queue is bounded, so a disk that falls behind
slows the sender down instead of filling memory (docs/CONCURRENCY.md).

What and where to store travels as a *store spec*, a plain dict (it crosses the pipe to the
receiver process): ``site``, ``level`` (``identified`` or ``deidentified``), ``program``
(pseudonym scope), ``view``, ``deid`` (secret and options, or None), ``meta`` (catalog
attributes: ``study_uid``, ``series_uid``, ``site``) and ``resource`` (policy attributes, or
None); see :func:`store_spec`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from mdm.access.decide import Resource
from mdm.deid import DeidOptions, deidentify
from mdm.dicom.receiver import ReceivedObject
from mdm.errors import MdmError
from mdm.store.keys import Scope
from mdm.store.objects import ObjectStore
from mdm.store.records import ObjectInfo, ObjectRef

log = logging.getLogger(__name__)

WRITERS = 2
"""Writer threads per process: encryption and disk writes overlap with receiving."""
WRITE_QUEUE = 48
"""Objects (about 25 MB of 512x512 CT) waiting to be written, at most, per process."""
WRITE_QUEUE_BYTES = 32 << 20
"""Bytes of objects queued or being written, at most, per process (larger objects fill it
with fewer): one object larger than this is taken alone."""

Report = Callable[[ReceivedObject, ObjectInfo | None, MdmError | None], None]
"""Called once per submitted object, in a writer thread: the stored object, or why not
(already logged, once, by the writer)."""


def store_spec(
    *,
    site: str,
    level: str,
    program: str,
    view: str,
    deid: dict[str, Any] | None,
    meta: Mapping[str, str],
    resource: Resource | None,
) -> dict[str, Any]:
    """A store spec (see the module's docstring)."""
    return {
        "site": site,
        "level": level,
        "program": program,
        "view": view,
        "deid": deid,
        "meta": dict(meta),
        "resource": resource,
    }


def store_object(store: ObjectStore, obj: ReceivedObject, spec: Mapping[str, Any]) -> ObjectInfo:
    """De-identify ``obj`` if ``spec`` asks for it, then encrypt and store it.

    A de-identified view is de-identified here, before anything is stored: no identified
    copy is ever written for it.
    """
    meta = dict(spec.get("meta", {}))
    meta.update(sop_class_uid=obj.sop_class_uid, transfer_syntax=obj.transfer_syntax)
    data = obj.data
    deid = spec.get("deid")
    if deid is not None:
        data = deidentify(data, secret=deid["secret"], options=DeidOptions(**deid["options"]))
    return store.put(
        ObjectRef(obj.sop_uid, spec.get("view", "identified")),
        Scope(spec["site"], spec.get("level", "identified"), spec.get("program", "")),
        data,
        meta,
        resource=spec.get("resource"),
    )


_Job = tuple[ReceivedObject, Mapping[str, Any], Report]


class Writer:
    """``threads`` writer threads storing what the sinks submit, in a bounded queue."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        threads: int = WRITERS,
        depth: int = WRITE_QUEUE,
        max_bytes: int = WRITE_QUEUE_BYTES,
    ) -> None:
        self.store = store
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=depth)
        self.max_bytes = max_bytes
        self._held = 0
        """Bytes of the objects queued or being written."""
        self._room = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"mdm-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, obj: ReceivedObject, spec: Mapping[str, Any], report: Report) -> None:
        """Queue ``obj`` for storing (any thread; blocks while the queue is full, in objects
        or in bytes). ``report`` is called exactly once, from a writer thread."""
        n = len(obj.data)
        with self._room:
            while self._held and self._held + n > self.max_bytes:
                self._room.wait()
            self._held += n
        self._queue.put((obj, spec, report))

    @property
    def held_bytes(self) -> int:
        """Bytes of the objects queued or being written (for tests and status output)."""
        return self._held

    def close(self) -> None:
        """Stop the writer threads after they have stored what is queued. Idempotent."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(60)
        self._threads = []

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            obj, spec, report = job
            n = len(obj.data)
            info: ObjectInfo | None = None
            error: MdmError | None = None
            try:
                info = store_object(self.store, obj, spec)
            except MdmError as e:  # the store's refusals (full, integrity, de-identification)
                site = spec.get("site", "?")
                log.warning("object %s from site %s not stored: %s", obj.sop_uid, site, e)
                error = e
            except Exception as e:  # a bug must not kill the writer; readers get EIO
                log.error("storing object %s failed", obj.sop_uid, exc_info=True)
                error = MdmError(f"cannot store object: {e}")
            try:
                report(obj, info, error)
            except Exception:
                log.exception("reporting a stored object failed")
            # A 200 MB object must not stay alive while this thread waits for the next one.
            del obj, job, spec, report
            with self._room:
                self._held -= n
                self._room.notify_all()
