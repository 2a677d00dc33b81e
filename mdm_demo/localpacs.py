"""Real PACS servers on loopback, for tests, ``mdm demo`` and the benchmark.

:class:`LocalOrthanc` runs the Debian ``Orthanc`` binary with a generated configuration under a
work directory; :class:`DcmtkStoreSCP` runs dcmtk's ``storescp``; :func:`movescu` drives
dcmtk's C-MOVE client. Every server listens on 127.0.0.1 only, on free ports, and is stopped
(terminate, then kill) by ``stop()`` or by leaving its ``with`` block.

Debian builds dcmtk (and so Orthanc's DICOM stack) with Nagle's algorithm left on unless the
environment holds ``TCP_NODELAY=1``; with Nagle every C-STORE waits for a delayed ACK (about
40 ms). The servers here set it by default so that the PACS is not the bottleneck we measure.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
"""Debian's ``orthanc-dicomweb``: QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web/``."""
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _env(tcp_nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait until something accepts TCP connections on ``port`` (or the process dies)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """Terminate ``proc`` (resuming it first if it was stopped), kill it after ``grace``."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    try:
        # A SIGSTOPped process would not act on SIGTERM until resumed.
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _PortInUse(Exception):
    """Orthanc exited during start-up (in practice: one of its ports was taken)."""


class LocalOrthanc:
    """One Orthanc server on loopback: a "hospital PACS" for tests and demos.

    ``modalities`` maps a modality name to ``(AET, host, port)``; Orthanc only performs C-MOVE
    to destinations it knows, so the bridge's storage SCP must be listed here or added later
    with :meth:`add_modality`. All DICOM operations are allowed from any calling AE.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str,
        aet: str,
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        tcp_nodelay: bool = True,
        max_pdu: int = 16384,
        dicom_threads: int = 4,
        scp_timeout: int = 30,
        die_with_parent: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        dicomweb: bool = False,
    ) -> None:
        """Prepare (not start) the server; ports default to free loopback ports.

        ``dicomweb``: load the DICOMweb plugin (``orthanc-dicomweb``), served at
        :attr:`dicomweb_url`.

        ``die_with_parent`` asks the kernel to SIGKILL Orthanc if the thread that started it
        exits (PR_SET_PDEATHSIG): use it only when starting from the main thread, as pytest
        fixtures do, so a killed test run leaves no server behind.
        """
        self.workdir = Path(workdir)
        self.name = name
        self.aet = aet
        self.host = LOOPBACK
        self._auto_dicom = dicom_port is None
        self._auto_http = http_port is None
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.tcp_nodelay = tcp_nodelay
        self.die_with_parent = die_with_parent
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.storage_dir = self.workdir / "storage"
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: http.client.HTTPConnection | None = None
        self.config: dict[str, Any] = {
            "Name": name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            # Test data is disposable: fsync per instance would only slow uploads down.
            "SyncStorageArea": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "LuaScripts": [],
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomScpTimeout": scp_timeout,
            "DicomScuTimeout": scp_timeout,
            "DicomThreadsCount": dicom_threads,
            "MaximumPduLength": max_pdu,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "SaveJobs": False,
            "DeidentifyLogs": True,
        }
        if dicomweb:
            self.config["Plugins"] = [DICOMWEB_PLUGIN]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Ssl": False}
        if extra_config:
            self.config.update(extra_config)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Write the configuration, start Orthanc and wait until its REST API answers.

        A port picked here (not given by the caller) may be taken by someone else between
        picking and binding; Orthanc then exits at once and we retry with fresh ports.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self
        for attempt in range(3):
            try:
                return self._launch(timeout)
            except _PortInUse:
                if not (self._auto_dicom or self._auto_http) or attempt == 2:
                    raise RuntimeError(
                        f"Orthanc {self.name} exited during start-up (port taken?); "
                        f"see {self.log_path}"
                    ) from None
                if self._auto_dicom:
                    self.dicom_port = self.config["DicomPort"] = free_port()
                if self._auto_http:
                    self.http_port = self.config["HttpPort"] = free_port()
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                [ORTHANC_BINARY, "--no-jobs", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_env(self.tcp_nodelay),
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_pdeathsig if self.die_with_parent else None,
            )
        log.info(
            "starting Orthanc %s (pid %d, DICOM %d, HTTP %d)",
            self.aet,
            self.proc.pid,
            self.dicom_port,
            self.http_port,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc.wait()
                # Orthanc exits at start-up mostly because a port is taken.
                raise _PortInUse
            try:
                system = self.get("/system", timeout=1.0)
                # Make sure it is our Orthanc answering, not a stranger on a reused port.
                if system.get("DicomPort") == self.dicom_port and system.get("Name") == self.name:
                    break
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Orthanc {self.name} did not answer within {timeout}s")
            time.sleep(0.05)
        # The REST server can come up a moment before the DICOM listener.
        _wait_port(self.dicom_port, self.proc, max(1.0, deadline - time.monotonic()), "Orthanc")
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
        self._close_conn()
        _stop_process(self.proc, grace)

    def stop_hard(self) -> None:
        """SIGKILL Orthanc at once: a PACS that died (connections refused from now on)."""
        self._close_conn()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP Orthanc: a silent PACS (the kernel still accepts connections, no answers)."""
        self._close_conn()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    @property
    def pid(self) -> int | None:
        """The Orthanc process id (None before start)."""
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        """Whether the Orthanc process exists and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- REST ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb service (with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    def instance_file(self, sop_uid: str) -> bytes:
        """The stored file of an instance, byte for byte (``/instances/{id}/file``)."""
        answer = self.request(
            "POST",
            "/tools/lookup",
            sop_uid.encode(),
            "text/plain",
        )
        ids = [a["ID"] for a in answer if a.get("Type") == "Instance"]
        if not ids:
            raise KeyError(sop_uid)
        with urllib.request.urlopen(f"{self.url}/instances/{ids[0]}/file", timeout=60) as r:  # noqa: S310
            return bytes(r.read())

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=60)
        return self._conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> Any:
        """One REST call on the kept-alive connection; the decoded JSON answer (or None)."""
        headers = {"Content-Type": content_type} if content_type else {}
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (ConnectionError, http.client.HTTPException):
                # A kept-alive connection the server closed: reconnect once.
                self._close_conn()
                if attempt:
                    raise
                continue
            if resp.status >= 400:
                raise RuntimeError(
                    f"Orthanc {self.name}: {method} {path} -> HTTP {resp.status}: {payload[:300]!r}"
                )
            return json.loads(payload) if payload.strip() else None
        raise AssertionError("unreachable")

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` on a fresh connection (works before and after a pause)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read())

    def upload(self, items: Iterable[bytes | Path | Any]) -> list[str]:
        """POST each instance to ``/instances``; return Orthanc's instance ids.

        An item is Part-10 bytes, a path, or anything with a ``read() -> bytes`` method
        (such as :class:`mdm_demo.synth.GeneratedInstance`).
        """
        ids: list[str] = []
        for item in items:
            if isinstance(item, bytes | bytearray):
                data = bytes(item)
            elif isinstance(item, Path):
                data = item.read_bytes()
            else:
                data = item.read()
            answer = self.request("POST", "/instances", data, "application/dicom")
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc {self.name} refused an instance: {answer!r}")
            ids.append(str(answer["ID"]))
        return ids

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics`` (counts of patients, studies, series, instances; disk size)."""
        return dict(self.request("GET", "/statistics"))

    def instances_count(self) -> int:
        """How many instances the server holds."""
        return int(self.statistics()["CountInstances"])

    def sop_uids(self) -> set[str]:
        """SOPInstanceUIDs of every stored instance."""
        answer = self.request(
            "POST",
            "/tools/find",
            json.dumps({"Level": "Instance", "Query": {}, "Expand": True}).encode(),
            "application/json",
        )
        return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in answer}

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer (a C-MOVE destination) while the server runs."""
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        self.request("PUT", f"/modalities/{name}", body, "application/json")
        self.modalities[name] = (aet, host, port)

    def clear(self) -> None:
        """Delete every patient (and so every instance) from the server."""
        for pid in self.request("GET", "/patients"):
            self.request("DELETE", f"/patients/{pid}")


def _pdeathsig() -> None:
    """In the child before exec: be SIGKILLed when the parent thread exits."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class DcmtkStoreSCP:
    """dcmtk ``storescp`` receiving into ``directory`` (files named ``<modality>.<SOP UID>``).

    Files are written as received (``--bit-preserving``), so they compare byte for byte
    with what the sender stored.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        tcp_nodelay: bool = True,
        max_pdu: int = 16384,
        extra_args: Iterable[str] = (),
    ) -> None:
        """Prepare (not start) a storage SCP on ``port`` (free by default)."""
        self.directory = Path(directory)
        self.aet = aet
        self.host = LOOPBACK
        self.port = port or free_port()
        self.tcp_nodelay = tcp_nodelay
        self.max_pdu = max_pdu
        self.extra_args = list(extra_args)
        self.log_path = self.directory.parent / f"storescp-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The storescp command line."""
        return [
            "storescp",
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.directory),
            "--bit-preserving",
            "--disable-host-lookup",
            "--max-pdu",
            str(self.max_pdu),
            "--promiscuous",
            *self.extra_args,
            str(self.port),
        ]

    def start(self, timeout: float = 10.0) -> Self:
        """Start storescp and wait until it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_env(self.tcp_nodelay),
                start_new_session=True,
            )
        _wait_port(self.port, self.proc, timeout, "storescp")
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop storescp and reap it."""
        _stop_process(self.proc, grace)

    def files(self) -> list[Path]:
        """The files received so far (sorted)."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    @property
    def pid(self) -> int | None:
        """The storescp process id (None before start)."""
        return None if self.proc is None else self.proc.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def movescu_command(
    host: str,
    port: int,
    *,
    called_aet: str,
    dest_aet: str,
    study_uid: str,
    series_uid: str | None = None,
    calling_aet: str = "MOVESCU",
    timeout: float | None = None,
    max_pdu: int = 16384,
) -> list[str]:
    """The ``movescu`` command line for a Study Root C-MOVE of a study or one series."""
    cmd = [
        "movescu",
        "--study",
        "--aetitle",
        calling_aet,
        "--call",
        called_aet,
        "--move",
        dest_aet,
        "--max-pdu",
        str(max_pdu),
    ]
    if timeout is not None:
        cmd += ["--dimse-timeout", str(max(1, int(timeout)))]
    cmd += ["-k", f"StudyInstanceUID={study_uid}"]
    if series_uid is None:
        cmd += ["-k", "QueryRetrieveLevel=STUDY"]
    else:
        cmd += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series_uid}"]
    return [*cmd, host, str(port)]


def movescu(
    host: str,
    port: int,
    *,
    called_aet: str,
    dest_aet: str,
    study_uid: str,
    series_uid: str | None = None,
    calling_aet: str = "MOVESCU",
    timeout: float = 120.0,
    tcp_nodelay: bool = True,
    max_pdu: int = 16384,
) -> subprocess.CompletedProcess[str]:
    """Run dcmtk ``movescu`` (study, or series if ``series_uid``) to ``dest_aet``; wait.

    Raises ``subprocess.CalledProcessError`` if movescu fails and ``TimeoutExpired`` after
    ``timeout`` seconds. Note that movescu exits 0 even when the PACS reports failed
    sub-operations: check what arrived.
    """
    cmd = movescu_command(
        host,
        port,
        called_aet=called_aet,
        dest_aet=dest_aet,
        study_uid=study_uid,
        series_uid=series_uid,
        calling_aet=calling_aet,
        timeout=timeout,
        max_pdu=max_pdu,
    )
    return subprocess.run(
        cmd,
        env=_env(tcp_nodelay),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        stdin=subprocess.DEVNULL,
    )


def stop_all(servers: Iterable[LocalOrthanc | DcmtkStoreSCP], grace: float = 10.0) -> None:
    """Stop several servers at once: signal all of them, then wait (Orthanc takes ~2 s)."""
    procs = []
    for s in servers:
        if isinstance(s, LocalOrthanc):
            s._close_conn()
        if s.proc is not None and s.proc.poll() is None:
            try:
                s.proc.send_signal(signal.SIGCONT)
                s.proc.terminate()
            except ProcessLookupError:
                pass
        procs.append(s.proc)
    for proc in procs:
        _stop_process(proc, grace)


def echoscu(host: str, port: int, *, called_aet: str, timeout: float = 10.0) -> bool:
    """C-ECHO with dcmtk ``echoscu``; True if the peer answered within ``timeout``."""
    t = str(max(1, int(timeout)))
    res = subprocess.run(
        [
            "echoscu",
            "--call",
            called_aet,
            # Bound every phase: a stopped peer accepts the TCP connection but never answers.
            *("--timeout", t, "--acse-timeout", t, "--dimse-timeout", t),
            host,
            str(port),
        ],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return res.returncode == 0
