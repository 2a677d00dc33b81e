"""A C-GET SCP (run as a separate process by tests/test_large_object.py) that answers any
C-GET with one 200 MiB CT object sent as raw DIMSE, so that its memory is not the test's.

    python -m tests.bigget_peer PORT UID
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from tests.fuzzdicom import CT_CLASS, EXPLICIT
from tests.test_large_object import big_body


def main() -> None:
    port, uid = int(sys.argv[1]), sys.argv[2]
    body = big_body(uid)

    def on_get(event: evt.Event) -> Iterator[Any]:
        yield 1
        assoc = event.assoc
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT_CLASS)
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CT_CLASS
        req.AffectedSOPInstanceUID = uid
        req.Priority = 2
        req.DataSet = io.BytesIO(body)
        assoc.dimse.send_msg(req, cx.context_id)
        assoc.dimse.get_msg(block=True)
        yield 0x0000, None

    ae = AE("BIGGET")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CT_CLASS, EXPLICIT, scu_role=True, scp_role=True)
    ae.dimse_timeout = 60
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)]
    )
    print("ready", flush=True)
    try:
        sys.stdin.read()  # until the test closes our stdin
    finally:
        server.shutdown()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
