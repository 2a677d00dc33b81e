"""The audit trail: one record per access decision (``log``), its hash-chain anchors
(``anchor``) and the syslog copy (``syslog``)."""
