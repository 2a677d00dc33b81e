"""DICOM JSON (PS3.18 Annex F) to and from pydicom Datasets, with pydicom doing the decoding.

A QIDO-RS answer is untrusted input: :func:`datasets_from_json` accepts only a JSON array of
objects and turns each into a Dataset with :meth:`pydicom.dataset.Dataset.from_json`; an item
that does not convert is skipped and counted (the caller logs the count, never a value). Bulk
data given by reference (``BulkDataURI``) is not fetched: such elements are left empty (a
listing never needs pixel data). :func:`dataset_to_json` is the reverse, for a DICOMweb
server of the bridge's own objects (metadata with bulk data as ``BulkDataURI``), and
:func:`attrs_to_json` of the attributes a view shows (QIDO-RS answers of the gateway).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 256 << 20
"""Largest QIDO-RS answer (one page) parsed."""


class JsonAnswerError(ValueError):
    """The answer is not a DICOM JSON array of objects."""


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    return None


def dataset_from_json(item: dict[str, Any]) -> Dataset:
    """One DICOM JSON object as a Dataset (BulkDataURI values left empty); ValueError etc.
    on a malformed object."""
    ds = Dataset.from_json(item, bulk_data_uri_handler=_no_bulk_data)
    for elem in ds:  # from_json is lazy about nothing but let a broken PN or number pass
        _ = elem.value
    return ds


def parse_json_array(raw: bytes) -> list[Any]:
    """The decoded JSON array of a QIDO-RS answer; JsonAnswerError otherwise."""
    if len(raw) > MAX_JSON_BYTES:
        raise JsonAnswerError(f"answer larger than {MAX_JSON_BYTES >> 20} MiB")
    if not raw.strip():
        return []
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise JsonAnswerError("answer is not JSON") from None
    if not isinstance(doc, list):
        raise JsonAnswerError("answer is not a JSON array")
    return doc


def datasets_from_json(items: list[Any]) -> tuple[list[Dataset], int]:
    """(the Datasets of ``items``, how many items were skipped as malformed)."""
    out: list[Dataset] = []
    bad = 0
    for item in items:
        if not isinstance(item, dict):
            bad += 1
            continue
        try:
            out.append(dataset_from_json(item))
        except Exception:  # pydicom raises many types on malformed input
            bad += 1
    return out, bad


def dataset_to_json(
    ds: Dataset,
    *,
    bulk_data_threshold: int = 1024,
    bulk_data_uri: Callable[[DataElement], str] | None = None,
) -> dict[str, Any]:
    """``ds`` as a DICOM JSON object. With ``bulk_data_uri``, binary values longer than
    ``bulk_data_threshold`` bytes are given as ``BulkDataURI`` (the URI it returns) instead of
    inline base64."""
    if bulk_data_uri is None:
        return ds.to_json_dict(bulk_data_threshold=2**31)
    return ds.to_json_dict(
        bulk_data_threshold=bulk_data_threshold, bulk_data_element_handler=bulk_data_uri
    )


def keyword_of(key: str) -> str | None:
    """A QIDO key (keyword or ``GGGGEEEE``) as a keyword; None when it names no attribute."""
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        kw = keyword_for_tag(int(key, 16))
        return kw or None
    return key if tag_for_keyword(key) is not None else None


def attrs_to_json(attrs: Mapping[str, str], keep: Iterable[str] | None = None) -> dict[str, Any]:
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
