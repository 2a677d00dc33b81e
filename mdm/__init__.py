"""MDM bridge core: federated PACS as an encrypted, read-on-demand object namespace.

This package never imports pyfuse3; ``mdm_fuse`` is the thin FUSE adapter over it.
"""

__version__ = "0.1.0"
