"""The hospital gateway: the federation served as DICOMweb (PS3.18) over HTTPS, to worker
mounts and viewers, with the same policy, views, audit and store as a mount (docs/GATEWAY.md).

``qido`` parses and answers searches, ``wado`` streams objects, metadata, bulk data and
frames, ``federation`` binds each request's principal to the shared core, ``app`` routes
(Starlette on trio under hypercorn) and ``serve`` runs it.
"""
