"""FUSE adapter over :mod:`mdm.bridge` (pyfuse3 + trio). Never imports pynetdicom or lmdb."""
