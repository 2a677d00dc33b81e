"""DICOMweb sites without a server: configuration, query mapping, DICOM JSON, multipart parts."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mdm.config import load_config
from mdm.dicomweb import wado
from mdm.dicomweb.dicomjson import dataset_to_json, datasets_from_json
from mdm.dicomweb.qido import query_of, query_string
from mdm.dicomweb.wado import _Parts, file_meta_uids
from mdm.errors import ConfigError, IntegrityError

BASE = '[cache]\ndir = "cache"\n'


def cfg(tmp_path: Path, site: str) -> Path:
    p = tmp_path / "mdm.toml"
    p.write_text(BASE + '[[site]]\nname = "WEB"\n' + site)
    return p


def test_a_dicomweb_site(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    c = load_config(
        cfg(
            tmp_path,
            'dicomweb = "https://gw.example.org:8443/dicom-web/"\nca_file = "ca.pem"\n'
            'timeout = "5s"\nmax_associations = 4\n',
        )
    )
    s = c.site("WEB")
    assert s.dicomweb == "https://gw.example.org:8443/dicom-web"
    assert (s.host, s.port, s.ae_title, s.retrieve) == ("gw.example.org", 8443, "", "wado")
    assert s.ca_file == tmp_path / "ca.pem" and s.timeout == 5 and s.max_associations == 4
    assert (
        load_config(cfg(tmp_path, 'dicomweb = "http://127.0.0.1:8042/dicom-web"\n'))
        .site("WEB")
        .port
        == 8042
    )
    assert load_config(cfg(tmp_path, 'dicomweb = "http://[::1]/dw"\n')).site("WEB").port == 80
    # The PACS protection of a site applies to a DICOMweb one as well.
    paced = load_config(
        cfg(
            tmp_path,
            'dicomweb = "https://gw/dw"\nretrievals_per_minute = 30\nbulk_windows = ["Sat-Sun"]\n',
        )
    ).site("WEB")
    assert paced.retrievals_per_minute == 30 and paced.bulk_windows == ("Sat-Sun",)


@pytest.mark.parametrize(
    ("site", "key", "message"),
    [
        ('dicomweb = "http://gw.example.org/dicom-web"\n', "site[0].dicomweb", "loopback"),
        ('dicomweb = "ftp://gw/dicom-web"\n', "site[0].dicomweb", "https://"),
        ('dicomweb = "https://u:p@gw/dicom-web"\n', "site[0].dicomweb", "no query or user"),
        ('dicomweb = "https://gw/dw"\nae_title = "X"\n', "site[0].ae_title", "not used"),
        ('dicomweb = "https://gw/dw"\nca_file = "none.pem"\n', "site[0].ca_file", "no such"),
        ('dicomweb = "http://127.0.0.1/dw"\nca_file = "x.pem"\n', "site[0].ca_file", "https"),
        ('ae_title = "A"\nhost = "h"\nport = 104\nca_file = "x"\n', "site[0].ca_file", "only"),
        ('dicomweb = "https://gw/dw"\ntimeout = 0\n', "site[0].timeout", "positive"),
    ],
)
def test_dicomweb_config_errors(tmp_path: Path, site: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as ei:
        load_config(cfg(tmp_path, site))
    assert f"mdm.toml: {key}" in str(ei.value)


def ds(**keys: object) -> Dataset:
    d = Dataset()
    for k, v in keys.items():
        setattr(d, k, v)
    return d


def test_query_mapping() -> None:
    path, params, in_path = query_of(
        "SERIES", ds(StudyInstanceUID="1.2.3", SeriesInstanceUID="", Modality="CT")
    )
    assert path == "studies/1.2.3/series" and in_path == {"StudyInstanceUID": "1.2.3"}
    assert params == [("Modality", "CT"), ("includefield", "SeriesInstanceUID")]
    path, params, _ = query_of("STUDY", ds(StudyInstanceUID="1.2\\1.3", StudyDate="2020-"))
    assert path == "studies"
    assert ("StudyInstanceUID", "1.2,1.3") in params and ("StudyDate", "2020-") in params
    assert query_of("IMAGE", ds(SOPInstanceUID=""))[0] == "instances"
    assert query_of("IMAGE", ds(StudyInstanceUID="1.2", SeriesInstanceUID="1.3"))[0] == (
        "studies/1.2/series/1.3/instances"
    )
    assert query_of("PATIENT", ds(PatientName="DOE*"))[1] == [
        ("PatientName", "DOE*"),
        ("includefield", "PatientID"),
    ]
    # Wildcards and ranges stay as written; what would break the query is encoded.
    assert query_string([("PatientName", "DO?^J*"), ("X", "a&b=c d")]) == (
        "PatientName=DO?^J*&X=a%26b%3Dc%20d"
    )


def test_dicom_json_both_ways() -> None:
    d = ds(PatientName="Doe^Jane", StudyInstanceUID="1.2.3", NumberOfStudyRelatedInstances=7)
    d.PixelData = b"\0" * 2048
    d["PixelData"].VR = "OW"
    doc = dataset_to_json(d, bulk_data_uri=lambda e: "https://x/bulk/1")
    assert doc["7FE00010"] == {"vr": "OW", "BulkDataURI": "https://x/bulk/1"}
    back, bad = datasets_from_json(
        [doc, "junk", {"zzzz": {}}, {"00280010": {"vr": "US", "Value": ["abc"]}}]
    )
    assert bad == 3 and len(back) == 1
    assert str(back[0].PatientName) == "Doe^Jane"
    assert back[0].NumberOfStudyRelatedInstances == 7


def part10() -> bytes:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return Path(path).read_bytes()


def body(parts: list[bytes], boundary: str = "b0und") -> bytes:
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_parts_byte_by_byte_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = part10()
    got: list[bytes] = []
    parts = _Parts("b0und", lambda h, b: got.append(bytes(b)))
    raw = body([obj, obj[:200] + b"--b0un" + obj[200:]])
    for i in range(len(raw)):
        parts.feed(raw[i : i + 1])
    assert parts.complete and got == [obj, obj[:200] + b"--b0un" + obj[200:]]
    truncated = _Parts("b0und", lambda h, b: got.append(bytes(b)))
    got.clear()
    truncated.feed(raw[: len(raw) // 2 + 100])
    assert not truncated.complete and got == [obj]
    monkeypatch.setattr(wado, "MAX_OBJECT", 1000)
    with pytest.raises(wado._TooLarge):
        _Parts("b0und", lambda h, b: None).feed(body([obj]))


def test_file_meta_uids() -> None:
    obj = part10()
    d = pydicom.dcmread(io.BytesIO(obj))
    assert file_meta_uids(obj) == (
        str(d.SOPClassUID),
        str(d.SOPInstanceUID),
        str(d.file_meta.TransferSyntaxUID),
    )
    for junk in (b"", obj[:130], b"\0" * 128 + b"DICM" + b"\x02\x00" * 20):
        with pytest.raises(IntegrityError):
            file_meta_uids(junk)
