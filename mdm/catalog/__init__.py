"""What the federation holds: C-FIND answers kept as records (``records``), with single-flight
refreshes (``flight``)."""
