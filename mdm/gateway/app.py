"""The gateway's HTTP routes (Starlette), their errors and their audit.

Status codes: 400 a malformed query; 401 no or invalid token (``WWW-Authenticate: Bearer``);
403 content the principal may see but not read (metadata-level access); 404 anything it may
not see, exactly as for what does not exist; 406 no acceptable representation; 413 a query or
retrieval too broad to send to a clinical PACS; 503 with ``Retry-After`` when a retrieval
timed out or the audit cannot be written (fail closed); 502 when the PACS failed. A failure
after a streamed answer has started aborts the connection, so a client never takes a cut
answer for a whole one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mdm.access.identity import InvalidToken, Principal
from mdm.audit.log import AuditError
from mdm.config import GatewaySettings
from mdm.dicomweb.dicomjson import dataset_to_json
from mdm.errors import (
    AccessDenied,
    KeyUnavailable,
    MdmError,
    NotFound,
    RetrieveError,
    RetrieveTimeout,
)
from mdm.gateway import qido, wado
from mdm.gateway.federation import Federation, Row
from mdm.namespace.bridge import OpenFile
from mdm.namespace.names import is_uid

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
EVRLE = "1.2.840.10008.1.2.1"
RETRY_AFTER = "30"
BULK_THRESHOLD = 1024

Handler = Callable[[Request, Principal], Awaitable[Response]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Gateway:
    """The routes over one :class:`Federation`."""

    def __init__(self, fed: Federation, settings: GatewaySettings) -> None:
        self.fed = fed
        self.settings = settings

    # ------------------------------------------------------------------ plumbing
    def _audit(self, request: Request, p: Principal | None, status: int, **extra: Any) -> None:
        res = {
            _UID_PARAMS[k]: str(v)
            for k, v in request.path_params.items()
            if k in _UID_PARAMS and is_uid(str(v))
        }
        self.fed.base.record(
            "dicomweb",
            "allow" if status < 400 else "deny" if status in (401, 403, 404) else "error",
            res,
            principal=p or Principal(sub="(no valid token)", issuer=""),
            route=request.scope.get("route_name", ""),
            status=status,
            **extra,
        )

    def endpoint(self, name: str, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``fn`` with authentication, UID checks, error mapping and one audit record."""

        async def run(request: Request) -> Response:
            request.scope["route_name"] = name
            p: Principal | None = None
            try:
                p = self.fed.principal_of(request.headers.get("authorization"))
                for k, v in request.path_params.items():
                    if k in _UID_PARAMS and not is_uid(str(v)):
                        raise NotFound(str(v))
                resp = await fn(request, p)
            except InvalidToken as e:
                log.info("dicomweb request refused: %s", e)
                resp = _error(401, "no valid token", {"WWW-Authenticate": 'Bearer realm="mdm"'})
            except qido.QueryError as e:
                resp = _error(400, str(e))
            except wado.NotAcceptable as e:
                resp = _error(406, str(e))
            except TooBroad as e:
                resp = _error(413, str(e))
            except NotFound:
                resp = _error(404, "not found")
            except AccessDenied as e:
                if "no valid token" in str(e):
                    resp = _error(401, "no valid token", {"WWW-Authenticate": "Bearer"})
                else:
                    resp = _error(403, "not readable with this token's access")
            except AuditError:
                resp = _error(503, "audit unavailable", {"Retry-After": RETRY_AFTER})
            except KeyUnavailable as e:
                log.warning("dicomweb %s: %s", name, e)
                resp = _error(503, "keys unavailable", {"Retry-After": RETRY_AFTER})
            except RetrieveTimeout as e:
                log.warning("dicomweb %s: retrieval timed out: %s", name, e)
                resp = _error(503, "the PACS did not answer in time", {"Retry-After": RETRY_AFTER})
            except (RetrieveError, MdmError) as e:
                log.warning("dicomweb %s: %s", name, e)
                resp = _error(502, "the PACS failed")
            try:
                self._audit(request, p, resp.status_code)
            except (AuditError, OSError, MdmError):
                if not isinstance(resp, StreamingResponse):
                    return _error(503, "audit unavailable", {"Retry-After": RETRY_AFTER})
                raise
            return resp

        return run

    # ------------------------------------------------------------------ QIDO-RS
    def _search(self, request: Request, rows: list[Row], level: str) -> Response:
        q = qido.parse(list(request.query_params.multi_items()), self.settings.max_results)
        full = []
        for r in rows:
            a = dict(r.attrs)
            full.append(a)
        body, more = qido.answer(full, q, level)
        headers = {}
        warnings = list(q.warnings)
        if more:
            warnings.append('299 gateway "the answer was cut at limit; ask again with offset"')
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return Response(json.dumps(body), media_type=DICOM_JSON, headers=headers)

    async def search_studies(self, request: Request, p: Principal) -> Response:
        return self._search(request, await self.fed.studies(p), "STUDY")

    async def search_series(self, request: Request, p: Principal) -> Response:
        study = request.path_params.get("study")
        if study is None:
            study = self._required_study(request)
        rows: list[Row] = []
        for uid in study.split("\\"):
            st = await self.fed.study(p, uid)
            for r in await self.fed.series(p, uid):
                rows.append(Row(r.uid, {**_study_part(st), **r.attrs}))
        return self._search(request, rows, "SERIES")

    async def search_instances(self, request: Request, p: Principal) -> Response:
        study = request.path_params.get("study") or self._required_study(request)
        series = request.path_params.get("series")
        rows: list[Row] = []
        for st_uid in study.split("\\"):
            st = await self.fed.study(p, st_uid)
            names = [series] if series else [r.uid for r in await self.fed.series(p, st_uid)]
            for se in names:
                got = await self.fed.instances(p, st_uid, se)
                if len(rows) + len(got) > self.settings.max_series_instances:
                    raise TooBroad("too many instances for one query: name a series")
                rows += [Row(r.uid, {**_study_part(st), **r.attrs}) for r in got]
        return self._search(request, rows, "IMAGE")

    def _required_study(self, request: Request) -> str:
        v = request.query_params.get("StudyInstanceUID") or request.query_params.get("0020000D")
        if not v or "*" in v or "?" in v:
            raise TooBroad(
                "a search of all series or instances of the federation is too broad for a "
                "clinical PACS: give StudyInstanceUID, or search /studies first"
            )
        return v

    # ------------------------------------------------------------------ WADO-RS
    async def _instances(
        self, p: Principal, study: str, series: str | None
    ) -> list[tuple[str, str]]:
        names = [series] if series else [r.uid for r in await self.fed.series(p, study)]
        out: list[tuple[str, str]] = []
        for se in names:
            out += [(se, r.uid) for r in await self.fed.instances(p, study, se)]
            if len(out) > self.settings.max_series_instances:
                raise TooBroad(
                    f"more than {self.settings.max_series_instances} instances in one request: "
                    "retrieve series by series"
                )
        return out

    async def retrieve(self, request: Request, p: Principal) -> Response:
        study = request.path_params["study"]
        series = request.path_params.get("series")
        sop = request.path_params.get("sop")
        wanted = wado.parse_accept(request.headers.get("accept"), "application/dicom", EVRLE)
        if sop is not None:
            assert series is not None
            members = [(series, sop)]
        else:
            members = await self._instances(p, study, series)
            if not members:
                raise NotFound(series or study)
            for se in dict.fromkeys(s for s, _ in members):
                await self.fed.warm(p, study, se)
        first = await self.fed.open(p, study, members[0][0], members[0][1])
        try:
            have = wado.stored_syntax(first)
            if wanted.syntax not in ("*", have) and (
                have not in wado.NATIVE or wanted.syntax not in wado.NATIVE
            ):
                raise wado.NotAcceptable(
                    f"objects stored as {have} cannot be served as {wanted.syntax}; "
                    "ask for transfer-syntax=*"
                )
        except BaseException:
            first.release()
            raise
        fed = self.fed

        async def opened() -> AsyncIterator[OpenFile]:
            yield first
            for se, uid in members[1:]:
                yield await fed.open(p, study, se, uid)

        bnd = wado.boundary()
        return StreamingResponse(
            wado.dicom_parts(opened(), wanted, bnd),
            media_type=f'multipart/related; type="application/dicom"; boundary={bnd}',
        )

    async def _dataset(self, p: Principal, study: str, series: str, sop: str, pixels: bool) -> Any:
        f = await self.fed.open(p, study, series, sop)
        try:
            return dcmread(wado.OpenFileIO(f), stop_before_pixels=not pixels)
        finally:
            f.release()

    def _base(self, request: Request) -> str:
        # The Host header names the gateway as the client reached it; some clients leave
        # the port out of it (dicomweb-client does), so the port we listen on fills it in.
        scheme = request.url.scheme
        server = request.scope.get("server") or ("localhost", 443 if scheme == "https" else 80)
        host = request.headers.get("host") or str(server[0])
        if not host.endswith("]") and ":" not in host.rsplit("]", 1)[-1]:
            if int(server[1]) != (443 if scheme == "https" else 80):
                host = f"{host}:{server[1]}"
        return f"{scheme}://{host}/dicom-web"

    async def metadata(self, request: Request, p: Principal) -> Response:
        study = request.path_params["study"]
        series = request.path_params.get("series")
        sop = request.path_params.get("sop")
        if sop is not None:
            assert series is not None
            members = [(series, sop)]
        else:
            members = await self._instances(p, study, series)
            for se in dict.fromkeys(s for s, _ in members):
                await self.fed.warm(p, study, se)
        base = self._base(request)
        out = []
        for se, uid in members:
            ds = await self._dataset(p, study, se, uid, pixels=False)
            url = f"{base}/studies/{study}/series/{se}/instances/{uid}/bulk/"

            def bulk(elem: Any, url: str = url) -> str:
                return f"{url}{elem.tag:08X}"

            doc = dataset_to_json(ds, bulk_data_threshold=BULK_THRESHOLD, bulk_data_uri=bulk)
            ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            encapsulated = ts not in wado.NATIVE
            doc["7FE00010"] = {
                "vr": "OB" if encapsulated else "OW",
                "BulkDataURI": f"{url}7FE00010",
            }
            doc["00020010"] = {"vr": "UI", "Value": [ts]}
            out.append(doc)
        return Response(json.dumps(out), media_type=DICOM_JSON)

    async def bulk(self, request: Request, p: Principal) -> Response:
        pp = request.path_params
        try:
            tag = Tag(int(pp["tag"], 16))
        except ValueError:
            raise NotFound(pp["tag"]) from None
        ds = await self._dataset(p, pp["study"], pp["series"], pp["sop"], pixels=True)
        if tag not in ds:
            raise NotFound(pp["tag"])
        wado.parse_accept(request.headers.get("accept"), "application/octet-stream", "*")
        value = ds[tag].value
        data = value if isinstance(value, bytes) else bytes(value or b"")
        bnd = wado.boundary()
        body = wado.part_header(bnd, "application/octet-stream") + data + wado.closing(bnd)
        return Response(
            body, media_type=f'multipart/related; type="application/octet-stream"; boundary={bnd}'
        )

    async def frames(self, request: Request, p: Principal) -> Response:
        pp = request.path_params
        try:
            numbers = [int(x) for x in pp["frames"].split(",")]
        except ValueError:
            raise qido.QueryError("frame numbers are integers separated by commas") from None
        wanted = wado.parse_accept(request.headers.get("accept"), "application/octet-stream", EVRLE)
        ds = await self._dataset(p, pp["study"], pp["series"], pp["sop"], pixels=True)
        try:
            frames, ts = wado.frames_of(ds, numbers)
        except LookupError:
            raise NotFound(pp["frames"]) from None
        if wanted.syntax not in ("*", ts) and not (
            ts in wado.NATIVE and wanted.syntax in wado.NATIVE
        ):
            raise wado.NotAcceptable(f"frames stored as {ts}; ask for transfer-syntax=*")
        bnd = wado.boundary()
        parts = []
        for fr in frames:
            parts.append(
                wado.part_header(bnd, f"application/octet-stream; transfer-syntax={ts}") + fr
            )
        body = b"\r\n".join(parts) + wado.closing(bnd)
        return Response(
            body, media_type=f'multipart/related; type="application/octet-stream"; boundary={bnd}'
        )

    # ------------------------------------------------------------------ operations
    async def status(self, request: Request, p: Principal) -> Response:
        """The gateway's status (sites, queued work, cache, keys, audit), as ``mdm status``
        prints a mount's: for the ``[policy] officers`` groups only."""
        from pathlib import Path

        from mdm.ops.status import snapshot

        pol = self.fed.base.config.policy
        officers = set(pol.officers) if pol is not None else set()
        if not officers & set(p.groups):
            raise AccessDenied("status is for [policy] officers")
        doc = await snapshot(self.fed.base, Path("-"), self.fed.base.started)
        return JSONResponse(doc)

    # ------------------------------------------------------------------ the app
    def app(self) -> Starlette:
        """The ASGI app: routes under ``/dicom-web``, CORS for browser viewers."""
        e = self.endpoint
        base = "/dicom-web"
        st = base + "/studies/{study}"
        se = st + "/series/{series}"
        inst = se + "/instances/{sop}"
        routes = [
            Route(base + "/studies", e("qido-studies", self.search_studies)),
            Route(base + "/series", e("qido-series", self.search_series)),
            Route(base + "/instances", e("qido-instances", self.search_instances)),
            Route(st + "/series", e("qido-series", self.search_series)),
            Route(st + "/instances", e("qido-instances", self.search_instances)),
            Route(se + "/instances", e("qido-instances", self.search_instances)),
            Route(st, e("wado-study", self.retrieve)),
            Route(se, e("wado-series", self.retrieve)),
            Route(inst, e("wado-instance", self.retrieve)),
            Route(st + "/metadata", e("metadata-study", self.metadata)),
            Route(se + "/metadata", e("metadata-series", self.metadata)),
            Route(inst + "/metadata", e("metadata-instance", self.metadata)),
            Route(inst + "/frames/{frames}", e("frames", self.frames)),
            Route(inst + "/bulk/{tag}", e("bulk", self.bulk)),
            Route("/status", e("status", self.status)),
        ]
        cors = Middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["GET", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Warning", "Content-Type", "Retry-After"],
            max_age=600,
        )
        return Starlette(routes=routes, middleware=[cors])


class TooBroad(Exception):
    """A request too broad to send to a clinical PACS (413)."""


_UID_PARAMS = {"study": "study_uid", "series": "series_uid", "sop": "sop_uid"}


def _study_part(st: Row) -> dict[str, str]:
    keep = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID")
    return {k: v for k, v in st.attrs.items() if k in keep}
