"""CPU cost of the received-object check (``mdm.dicom.validate.check_object``), per object.

Checks generated CT and MR instances (512x512, the benchmark's size) as the receiver does
(file meta written by us, data set offset known) in each uncompressed transfer syntax and
deflated, plus a 200 MiB object; prints microseconds per object (median of rounds).

    .venv/bin/python scripts/bench_validate.py [--rounds 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import time
import zlib

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from mdm.dicom.part10 import part10
from mdm.dicom.validate import check_object
from mdm_demo.synth import generate

SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "deflated": "1.2.840.10008.1.2.1.99",
}


def encode(ds: pydicom.Dataset, syntax: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax == SYNTAXES["implicit"]
    write_dataset(buf, ds)
    body = buf.getvalue()
    if syntax == SYNTAXES["deflated"]:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = c.compress(body) + c.flush()
        body += b"\0" * (len(body) & 1)
    return body


def per_object(data: bytes, uid: str, cls: str, syntax: str, n: int, rounds: int) -> float:
    # The receiver knows where the data set starts: after the file meta it wrote.
    meta_len = struct.unpack_from("<I", data, 140)[0]
    off = 144 + meta_len
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            check_object(
                data, uid, "S", dataset_offset=off, transfer_syntax=syntax, sop_class_uid=cls
            )
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    gen = generate(None, patients=1, seed=7, ct_slices=1, mr_slices=1, rows=512, cols=512)
    for g in gen:
        ds = pydicom.dcmread(io.BytesIO(g.read()))
        for name, syntax in SYNTAXES.items():
            body = encode(ds, syntax)
            data = part10(g.sop_class_uid, g.sop_uid, syntax, body)
            n = args.n if name != "deflated" else max(10, args.n // 50)
            t = per_object(data, g.sop_uid, g.sop_class_uid, syntax, n, args.rounds)
            print(
                f"{g.modality} 512x512 {name:9s} {len(ds):3d} elements {len(data):8d} bytes:"
                f" {t * 1e6:8.1f} us"
            )
    big = gen[0]
    ds = pydicom.dcmread(io.BytesIO(big.read()))
    ds.Rows = ds.Columns = 10240
    ds.PixelData = bytes(10240 * 10240 * 2)
    syntax = SYNTAXES["explicit"]
    data = part10(big.sop_class_uid, big.sop_uid, syntax, encode(ds, syntax))
    t = per_object(data, big.sop_uid, big.sop_class_uid, syntax, args.n, args.rounds)
    print(f"CT 10240x10240 explicit  {len(data) / 2**20:.0f} MiB: {t * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
