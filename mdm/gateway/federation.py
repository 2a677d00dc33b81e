"""The federation as each request's principal sees it: one shared core, a handle per principal.

The catalog, the store, the fetcher (with its per-site limits and single-flight retrieval),
the view cache, the alias table and the policy are the gateway's, shared by every request;
what a principal sees is decided by the same namespace services a mount runs
(:meth:`mdm.namespace.bridge.Services.as_principal`), bound to the principal of the request's
verified token. Any number of clients asking for one object cause one retrieval from the
PACS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from mdm.access.identity import InvalidToken, Principal, TokenVerifier
from mdm.access.views import NON_PHI
from mdm.errors import AccessDenied
from mdm.namespace.bridge import Acting, Bridge, OpenFile
from mdm.namespace.naming import METADATA


@dataclass(frozen=True)
class Row:
    """One QIDO answer row: the name the principal's view gives it and what it shows."""

    uid: str
    attrs: dict[str, str]


class _Holder:
    """The principal of one request (its expiry checked on use, as a mount's token is)."""

    def __init__(self, p: Principal) -> None:
        self.p = p

    def __call__(self) -> Principal:
        if self.p.expires < time.time():
            raise AccessDenied("no valid token: token expired")
        return self.p


class Federation:
    """Per-request access to the gateway's shared core."""

    def __init__(self, base: Bridge, verifier: TokenVerifier) -> None:
        self.base = base
        self.verifier = verifier

    def principal_of(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization: Bearer`` header; InvalidToken otherwise."""
        if not authorization:
            raise InvalidToken("no token (Authorization: Bearer) in the request", "missing")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("expected Authorization: Bearer <token>", "missing")
        return self.verifier.verify(token.strip())

    def bridge_for(self, p: Principal) -> Acting:
        """The namespace as ``p`` sees it: a handle on the shared services (cheap)."""
        return self.base.as_principal(_Holder(p))

    async def _rows(self, b: Acting, path: tuple[str, ...]) -> list[Row]:
        out = []
        for e in await b.listdir(path):
            if e.name == METADATA or not e.is_dir:  # files beside directories: volumes
                continue
            node = await b.resolve((*path, e.name, METADATA))
            doc = json.loads(b.metadata(node))
            out.append(Row(e.name, dict(doc.get("attributes", {}))))
        return out

    async def studies(self, p: Principal) -> list[Row]:
        """Every study ``p`` may see, as its view shows it (``ls /studies``)."""
        return await self._rows(self.bridge_for(p), ("studies",))

    async def study(self, p: Principal, study: str) -> Row:
        """One study as ``p``'s view shows it (NotFound when ``p`` may not see it), without
        listing the federation."""
        b = self.bridge_for(p)
        doc = json.loads(b.metadata(await b.resolve(("studies", study, METADATA))))
        return Row(study, dict(doc.get("attributes", {})))

    async def series(self, p: Principal, study: str) -> list[Row]:
        """The series of one study (NotFound when ``p`` may not see it)."""
        return await self._rows(self.bridge_for(p), ("studies", study))

    async def instances(self, p: Principal, study: str, series: str) -> list[Row]:
        """The instances of one series, with the instance-level attributes its view shows."""
        b = self.bridge_for(p)
        out = []
        for e in await b.listdir(("studies", study, series)):
            if e.name == METADATA:
                continue
            node = await b.resolve(("studies", study, series, e.name))
            assert node.instance is not None and node.view is not None
            attrs = {**node.instance.attrs, "SOPInstanceUID": node.instance.uid}
            shown = node.view.attrs("IMAGE", attrs, NON_PHI)
            out.append(Row(e.name.removesuffix(".dcm"), shown))
        return out

    async def open(self, p: Principal, study: str, series: str, sop: str) -> OpenFile:
        """Open one instance as ``p`` may read it (retrieved once, however many ask)."""
        return await self.bridge_for(p).open(("studies", study, series, sop + ".dcm"))

    async def warm(self, p: Principal, study: str, series: str) -> None:
        """Start retrieving a whole series for ``p`` (one C-MOVE/C-GET) before its objects
        are streamed one by one; objects already cached are not asked again. A series of
        more than half the cache is read ahead as it streams instead
        (:meth:`~mdm.retrieval.targets.Targets.warm_series`)."""
        b = self.bridge_for(p)
        node = await b.resolve(("studies", study, series))
        assert node.study is not None and node.series is not None and node.view is not None
        await self.base.services.targets.warm_series(
            await b.series_targets(node.study, node.series)
        )
