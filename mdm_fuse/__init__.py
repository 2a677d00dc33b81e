"""FUSE adapter over :mod:`mdm.namespace.bridge` (pyfuse3 + trio).

Never imports pynetdicom or lmdb."""
