"""The answers of one C-FIND or QIDO-RS query, and whether they are all there."""

from __future__ import annotations

from pydicom.dataset import Dataset


class Matches(list[Dataset]):
    """Query answers; ``truncated`` when the PACS (or the bridge's own bound) cut the answer
    off: the site holds more matches than it gave, and a listing built on it is partial."""

    truncated: bool = False
