"""DICOM JSON (PS3.18 F.2) of the attributes the bridge shows, through pydicom."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def keyword_of(key: str) -> str | None:
    """A QIDO key (keyword or ``GGGGEEEE``) as a keyword; None when it names no attribute."""
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        kw = keyword_for_tag(int(key, 16))
        return kw or None
    return key if tag_for_keyword(key) is not None else None


def to_json(attrs: Mapping[str, str], keep: Iterable[str] | None = None) -> dict[str, Any]:
    """The DICOM JSON object of ``attrs`` (keyword -> shown value, multi-values joined by
    ``\\``), restricted to ``keep`` when given. A value pydicom cannot hold in its VR is
    left out (logged at DEBUG with its keyword only, never the value)."""
    ds = Dataset()
    wanted = set(keep) if keep is not None else None
    for k, v in attrs.items():
        if wanted is not None and k not in wanted:
            continue
        if tag_for_keyword(k) is None or dictionary_VR(k) == "SQ":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(ds, k, v.split("\\") if "\\" in v else v)
        except (ValueError, TypeError, OverflowError):
            log.debug("attribute %s left out of a DICOM JSON answer: not a valid value", k)
    try:
        return ds.to_json_dict()
    except (ValueError, TypeError):
        out: dict[str, Any] = {}
        for elem in ds:
            try:
                out.update(Dataset({elem.tag: elem}).to_json_dict())
            except (ValueError, TypeError):
                log.debug("attribute %s left out of a DICOM JSON answer", elem.keyword)
        return out
