"""What the federation holds: C-FIND answers (``attrs``) kept as records (``records``), listed
and looked up by ``sync`` with single-flight refreshes (``flight``)."""
