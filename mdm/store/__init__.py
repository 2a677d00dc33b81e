"""The encrypted local store: per-object keys wrapped by scope keys (``keys``, ``crypto``),
objects and their LMDB index (``objects``, ``db``)."""
