"""Benchmark the hospital gateway: a worker's cold read of a series through ``mdm gateway``,
against dcmtk ``movescu`` and against ``curl`` fetching the same series by WADO-RS straight
from Orthanc's DICOMweb plugin; then the same read by 2 and 4 workers at once.

One tuned Orthanc (TCP_NODELAY=1, the DICOMweb plugin) holds a generated CT series. Each
round starts a gateway on a fresh cache and fresh worker mounts (their own caches), so both
hops are cold; the catalog is listed before the clock starts (a job that knows its UIDs).
The tools take turns, ROUNDS times, medians reported. Goals (issue 13): through the gateway
<= 2x the direct WADO-RS fetch; 4 workers together <= 1.5x one worker (the gateway retrieves
once). ``--write-readme`` writes the table into README.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mdm_demo.localpacs import DcmtkStoreSCP, LocalOrthanc, free_port  # noqa: E402
from mdm_demo.synth import iter_series  # noqa: E402
from scripts.bench import read_series, run_movescu  # noqa: E402
from tests.mountutil import Mount, mdm  # noqa: E402
from tests.test_gateway import start_gateway, stop_gateway  # noqa: E402

ROUNDS = 3
ISS, AUD = "https://idp.bench.example", "mdm-bench"
GW_AET = "MDMGW"
POLICY = """
[[allow]]
id = "bench"
description = "the benchmark's job: identified access to the bench PACS"
principals = { groups = ["bench"] }
resources = { sites = ["@SITE@"] }
access = "identified"
"""


def identity(d: Path, idp: Path, site: str) -> str:
    (d / "policies").mkdir(parents=True, exist_ok=True)
    (d / "policies" / "main.toml").write_text(POLICY.replace("@SITE@", site))
    return (
        f'[identity]\nissuer = "{ISS}"\naudience = "{AUD}"\npublic_keys = "{idp / "jwks.json"}"\n'
        f'[policy]\ndir = "{d / "policies"}"\n'
    )


def gateway_config(d: Path, idp: Path, pacs: LocalOrthanc, bridge_port: int, port: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "{GW_AET}"\nport = {bridge_port}\nmax_pdu = 0\n'
        f'[cache]\ndir = "{d / "cache"}"\nmax_bytes = "4GiB"\n'
        f'[keys]\nkeyring = "{d / "keyring.json"}"\n'
        f'[[site]]\nname = "BENCH"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
        f'port = {pacs.dicom_port}\ntimeout = "60s"\nretrieve = "auto"\n'
        + identity(d, idp, "BENCH")
        + f'[gateway]\nlisten = "127.0.0.1:{port}"\n'
    )
    return cfg


def worker_config(d: Path, idp: Path, url: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "mdm.toml"
    cfg.write_text(
        f'[bridge]\nae_title = "WORKER"\nport = {free_port()}\n'
        f'[cache]\ndir = "{d / "cache"}"\nmax_bytes = "4GiB"\n'
        f'[keys]\nkeyring = "{d / "keyring.json"}"\n'
        f'[[site]]\nname = "NORTH"\ndicomweb = "{url}"\ntimeout = "60s"\n'
        + identity(d, idp, "NORTH")
    )
    return cfg


def curl_series(pacs: LocalOrthanc, study: str, series: str) -> float:
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies/{study}/series/{series}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "-H",
            'Accept: multipart/related; type="application/dicom"; transfer-syntax=*',
            url,
        ],
        check=True,
    )
    return time.perf_counter() - t0


def workers_read(
    work: Path, idp: Path, tok: Path, url: str, n: int, study: str, series: str, tag: str
) -> float:
    """Mount ``n`` fresh workers, list the series in each, then read it in all at once."""
    mounts = []
    try:
        for k in range(n):
            d = work / f"{tag}-w{k}"
            m = Mount(worker_config(d, idp, url), d / "mnt", token_file=tok, strict=False)
            m.__enter__()
            mounts.append(m)
            (m.mountpoint / "studies" / study / series).stat()
            list((m.mountpoint / "studies" / study / series).iterdir())
        times: list[float] = []
        t0 = time.perf_counter()
        threads = [
            threading.Thread(
                target=lambda m=m: times.append(
                    read_series(m.mountpoint / "studies" / study / series)[0]
                )
            )
            for m in mounts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0
    finally:
        for m in mounts:
            m.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=300, help="instances in the series")
    ap.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mdm-bench-gw-"))
    try:
        files = list(iter_series(work / "series", count=args.count))
        study, series = files[0].study_uid, files[0].series_uid
        mb = sum(len(f.read()) for f in files) / 1e6
        idp = work / "idp"
        mdm("token", "init", str(idp))
        tok = work / "bench.jwt"
        tok.write_text(
            mdm(
                "token",
                "issue",
                "--key",
                str(idp / "signing-key.pem"),
                "--issuer",
                ISS,
                "--audience",
                AUD,
                "--sub",
                "bench-job",
                "--groups",
                "bench",
                "--ttl",
                "2h",
            ).stdout.strip()
            + "\n"
        )
        tok.chmod(0o600)
        scp = DcmtkStoreSCP(work / "storescp", aet="STORESCP", tcp_nodelay=True).start()
        bridge_port = free_port()
        pacs = LocalOrthanc(
            work / "orthanc",
            name="bench-gw",
            aet="BENCHPACS",
            tcp_nodelay=True,
            dicomweb=True,
            modalities={
                GW_AET: (GW_AET, "127.0.0.1", bridge_port),
                "STORESCP": ("STORESCP", "127.0.0.1", scp.port),
            },
        ).start()
        rows: dict[str, list[float]] = {k: [] for k in ("movescu", "curl", "gw1", "gw2", "gw4")}
        try:
            pacs.upload(files)
            run_movescu(pacs, study, series, None, True)  # Orthanc's disk cache warm for all
            for r in range(ROUNDS):
                for p in (work / "storescp").iterdir():
                    p.unlink()
                rows["movescu"].append(run_movescu(pacs, study, series, None, True))
                rows["curl"].append(curl_series(pacs, study, series))
                for n in (1, 2, 4):
                    gd = work / f"gw-{r}-{n}"
                    port = free_port()
                    cfg = gateway_config(gd, idp, pacs, bridge_port, port)
                    proc = start_gateway(cfg, port, gd / "gateway.log")
                    try:
                        url = f"http://127.0.0.1:{port}/dicom-web"
                        rows[f"gw{n}"].append(
                            workers_read(work, idp, tok, url, n, study, series, f"r{r}n{n}")
                        )
                    finally:
                        stop_gateway(proc)
                        shutil.rmtree(gd, ignore_errors=True)
                print(
                    f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items()),
                    flush=True,
                )
        finally:
            pacs.stop()
            scp.stop()
        med = {k: statistics.median(v) for k, v in rows.items()}
        text = (
            f"Series: {args.count} CT instances ({mb:.0f} MB), one tuned Orthanc with its DICOMweb "
            f"plugin on loopback, 2-core machine; gateway and workers on the same host; "
            f"`scripts/bench_gateway.py --count {args.count}`, medians of {ROUNDS} rounds.\n\n"
            "| movescu | curl WADO-RS from Orthanc | 1 worker via gateway | via gateway / curl "
            "| 2 workers at once | 4 workers at once | 4 workers / 1 worker |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {med['movescu']:.2f} s | {med['curl']:.2f} s | {med['gw1']:.2f} s | "
            f"{med['gw1'] / med['curl']:.2f}x | {med['gw2']:.2f} s | {med['gw4']:.2f} s | "
            f"{med['gw4'] / med['gw1']:.2f}x |\n"
        )
        print(text)
        if args.write_readme:
            readme = ROOT / "README.md"
            body = readme.read_text()
            new = f"<!-- bench-gateway:start -->\n{text}<!-- bench-gateway:end -->"
            body, n = re.subn(
                r"<!-- bench-gateway:start -->.*?<!-- bench-gateway:end -->", new, body, flags=re.S
            )
            if n == 0:
                raise SystemExit("README.md has no bench-gateway markers")
            readme.write_text(body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
