"""The protocol-neutral namespace both front ends use: names and views (``naming``), path
resolution, listings and metadata (``tree``), opens and reads (``reads``), ``find``, and the
wiring of the core services with the mount's facade (``bridge``)."""
