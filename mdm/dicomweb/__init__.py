"""DICOMweb (PS3.18) sites: QIDO-RS queries and WADO-RS retrievals over HTTP(S).

A ``[[site]]`` with ``dicomweb = URL`` is served by this package instead of ``mdm.dicom``:
:mod:`~mdm.dicomweb.qido` answers the same C-FIND-shaped questions (a level and an identifier
Dataset) with pydicom Datasets, :mod:`~mdm.dicomweb.wado` streams objects into the same sink
as the storage SCP (check, de-identify, encrypt, store), :mod:`~mdm.dicomweb.dicomjson`
converts between DICOM JSON and Datasets, :mod:`~mdm.dicomweb.transport` holds the per-site
HTTP clients, the bearer token and the mapping of HTTP failures to the bridge's errors.
Everything here is blocking and thread-safe, like ``mdm.dicom``: trio calls it through
``trio.to_thread.run_sync`` under the site's limiter (docs/DICOMWEB.md).
"""
