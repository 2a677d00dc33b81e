"""The protocol-neutral namespace both front ends use: names and views, path resolution,
listings, metadata, opens and reads, ``find``."""
