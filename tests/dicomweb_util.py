"""DICOMweb test servers: a real Orthanc with its DICOMweb plugin, and a fault-injecting
reverse proxy in front of it (optionally over TLS, with a CA from tests.tlsutil).

The proxy forwards every request to the Orthanc unchanged, except WADO-RS requests
(``multipart/related`` answers) while ``mode`` asks for a fault: ``down`` is a stopped proxy
(connections refused), the others are

* ``wado-401``: 401 to WADO-RS, QIDO-RS still answered;
* ``truncate``: the multipart body cut in the middle of its last part (HTTP framing intact);
* ``fewer``: the last part left out (a well-formed answer with fewer objects);
* ``stall``: no answer until ``release()`` or the proxy stops;
* ``wrong-boundary``: the Content-Type names another boundary than the body uses.

``require_token``: every request without ``Authorization: Bearer <token>`` gets 401.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mdm_demo.localpacs import LOOPBACK

WADO_MODES = ("pass", "wado-401", "truncate", "fewer", "stall", "wrong-boundary")


class FaultProxy:
    """A reverse proxy to ``upstream_port`` (Orthanc's HTTP port) on a free loopback port."""

    def __init__(self, upstream_port: int, *, tls: tuple[Path, Path] | None = None) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.other_part: bytes | None = None
        """For ``other-object``: the Part-10 object sent in place of every part."""
        self.require_token: str | None = None
        self.auth_seen: list[str | None] = []
        self.wado_requests = 0
        self._release = threading.Event()
        self._conns: set[socket.socket] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                proxy._conns.add(self.connection)

            def do_GET(self) -> None:
                proxy._handle(self)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The DICOMweb base URL through this proxy."""
        return f"{self.scheme}://{LOOPBACK}:{self.port}/dicom-web"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def release(self) -> None:
        """End a ``stall``."""
        self._release.set()

    def stop(self) -> None:
        """Stop listening and cut every open connection (kept-alive ones too): a server
        that is gone."""
        self._release.set()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        auth = h.headers.get("Authorization")
        self.auth_seen.append(auth)
        if self.require_token is not None and auth != f"Bearer {self.require_token}":
            self._reply(h, 401, b"", "text/plain")
            return
        conn = http.client.HTTPConnection(LOOPBACK, self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept",)}
            conn.request("GET", h.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            ctype = resp.getheader("Content-Type", "")
            status = resp.status
        finally:
            conn.close()
        mode = self.mode
        if not ctype.startswith("multipart/related") or mode == "pass":
            if ctype.startswith("multipart/related"):
                self.wado_requests += 1
            self._reply(h, status, body, ctype)
            return
        self.wado_requests += 1
        boundary = ctype.split("boundary=")[1].split(";")[0].strip('"')
        delim = b"--" + boundary.encode()
        if mode == "wado-401":
            self._reply(h, 401, b"", "text/plain")
        elif mode == "stall":
            self._release.wait(120)
            self._reply(h, 503, b"", "text/plain")
        elif mode == "truncate":
            last = body.rindex(delim, 0, len(body) - len(delim) - 4)
            self._reply(h, status, body[: last + (len(body) - last) // 2], ctype)
        elif mode == "fewer":
            sep = b"\r\n" + delim
            parts = body.split(sep)  # first part (with its delimiter), ..., "--\r\n"
            body = sep.join(parts[:-2] + parts[-1:]) if len(parts) > 2 else delim + b"--\r\n"
            self._reply(h, status, body, ctype)
        elif mode == "other-object":
            # Every part replaced by ``other_part``: an object the server was not asked for.
            assert self.other_part is not None
            sep = b"\r\n" + delim
            n = len(body.split(sep)) - 1
            part = b"\r\nContent-Type: application/dicom\r\n\r\n" + self.other_part
            self._reply(h, status, delim + sep.join([part] * n) + sep + b"--\r\n", ctype)
        elif mode == "huge-length":
            # Announces 10 GB, sends the real body, then closes: the client must neither
            # reserve 10 GB nor wait for bytes that never come.
            try:
                h.send_response(status)
                h.send_header("Content-Type", ctype)
                h.send_header("Content-Length", str(10 * 10**9))
                h.end_headers()
                h.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            h.close_connection = True
        elif mode == "wrong-boundary":
            other = boundary[:-1] + ("x" if boundary[-1] != "x" else "y")
            self._reply(h, status, body, ctype.replace(boundary, other))
        else:
            raise AssertionError(mode)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        try:
            h.send_response(status)
            if ctype:
                h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
