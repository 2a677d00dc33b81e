"""Time a series' NIfTI volume through a real mount against dcm2niix on the same files.

One Orthanc holds a generated series (default 300 slices of 512x512 CT). Reported:
  dcm2niix     dcm2niix -z y (and -z n) on the series' DICOM files in a local directory (a
               user who already has the files)
  cached       the volume read through a mount whose cache holds the instances but no volume
               (the build: decrypt, parse, stack, compress, encrypt)
  cold         the volume read through a fresh mount with an empty cache (retrieval + build)
  warm         the volume read again after a remount (the bridge's encrypted cache)
and the daemon's peak memory (VmHWM) in the cold run.

    .venv/bin/python scripts/bench_volume.py [--count 300] [--rows 512]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdm_demo.localpacs import LocalOrthanc, free_port  # noqa: E402
from mdm_demo.synth import generate_series  # noqa: E402
from scripts.bench import peak_rss_mb  # noqa: E402
from tests.mountutil import Mount  # noqa: E402

AET = "MDMVOL"


def read_volume(mnt: Path, study: str, series: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = len((mnt / "studies" / study / f"{series}.nii.gz").read_bytes())
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdm-bench-volume-") as tmp:
        d = Path(tmp)
        files = generate_series(None, count=args.count, rows=args.rows, cols=args.rows)
        study, series = files[0].study_uid, files[0].series_uid
        src, out = d / "dicom", d / "nifti"
        src.mkdir()
        out.mkdir()
        for f in files:
            (src / f"{f.sop_uid}.dcm").write_bytes(f.read())
        t0 = time.perf_counter()
        subprocess.run(
            ["dcm2niix", "-z", "y", "-o", str(out), str(src)], check=True, capture_output=True
        )
        t_ref = time.perf_counter() - t0
        shutil.rmtree(out)
        out.mkdir()
        t0 = time.perf_counter()
        subprocess.run(
            ["dcm2niix", "-z", "n", "-o", str(out), str(src)], check=True, capture_output=True
        )
        t_raw = time.perf_counter() - t0
        port = free_port()
        pacs = LocalOrthanc(
            d / "orthanc",
            name="bench-volume",
            aet="VOLPACS",
            modalities={AET: (AET, "127.0.0.1", port)},
        ).start()
        try:
            pacs.upload(files)
            cfg = d / "mdm.toml"
            cfg.write_text(
                f"""[bridge]
ae_title = "{AET}"
host = "127.0.0.1"
port = {port}
[cache]
dir = "{d / "cache"}"
max_bytes = "4GiB"
[keys]
keyring = "{d / "keyring.json"}"
[[site]]
name = "BENCH"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
timeout = "60s"
"""
            )
            with Mount(cfg, d / "mnt", strict=False) as m:
                assert m.proc is not None
                t_cold, size = read_volume(d / "mnt", study, series)
                peak = peak_rss_mb(m.proc.pid)
            with Mount(cfg, d / "mnt", strict=False):
                t_warm, _ = read_volume(d / "mnt", study, series)
            # The instances cached, the volume evicted: the build alone (plus the reads).
            shutil.rmtree(d / "cache")
            with Mount(cfg, d / "mnt", strict=False):
                for f in files:
                    (d / "mnt" / "studies" / study / series / f"{f.sop_uid}.dcm").read_bytes()
            cached_only = None
            with Mount(cfg, d / "mnt", strict=False):
                cached_only, _ = read_volume(d / "mnt", study, series)
        finally:
            pacs.stop()
        mb = sum(len(f.read()) for f in files) / 1e6
        shape = f"{args.count} x {args.rows}x{args.rows}"
        print(f"series: {shape} ({mb:.0f} MB DICOM); volume {size / 1e6:.0f} MB")
        print(f"dcm2niix -z y on local files     {t_ref:6.2f} s")
        print(f"dcm2niix -z n (no compression)   {t_raw:6.2f} s")
        print(f"bridge, instances cached (build) {cached_only:6.2f} s")
        print(f"bridge, cold (retrieve + build)  {t_cold:6.2f} s   peak RSS {peak:.0f} MB")
        print(f"bridge, warm (cached volume)     {t_warm:6.2f} s")


if __name__ == "__main__":
    main()
