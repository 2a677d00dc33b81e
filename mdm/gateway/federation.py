"""The federation as each request's principal sees it: one shared core, a handle per principal.

The catalog, the store, the fetcher (with its per-site limits and single-flight retrieval)
and the policy are the gateway's, shared by every request; what a principal sees is decided
by the same namespace code a mount runs (:class:`mdm.namespace.bridge.Bridge`), bound to the
principal of the request's verified token. Any number of clients asking for one object cause
one retrieval from the PACS.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from mdm.access.identity import InvalidToken, Principal, TokenVerifier
from mdm.access.session import Session
from mdm.namespace.bridge import METADATA, NON_PHI, Bridge, OpenFile

MAX_HANDLES = 256
"""Principals whose handles (view cache, aliases) are kept; the oldest go first."""


@dataclass(frozen=True)
class Row:
    """One QIDO answer row: the name the principal's view gives it and what it shows."""

    uid: str
    attrs: dict[str, str]


class _Holder:
    """The principal of the latest request of one identity (its expiry checked on use)."""

    def __init__(self, p: Principal) -> None:
        self.p = p

    def __call__(self) -> Principal:
        if self.p.expires < time.time():
            raise InvalidToken("token expired", "expired")
        return self.p


class Federation:
    """Per-request access to the gateway's shared core."""

    def __init__(self, base: Bridge, verifier: TokenVerifier) -> None:
        self.base = base
        self.verifier = verifier
        self._handles: OrderedDict[tuple[str, ...], tuple[_Holder, Bridge]] = OrderedDict()

    def principal_of(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization: Bearer`` header; InvalidToken otherwise."""
        if not authorization:
            raise InvalidToken("no token (Authorization: Bearer) in the request", "missing")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("expected Authorization: Bearer <token>", "missing")
        return self.verifier.verify(token.strip())

    def bridge_for(self, p: Principal) -> Bridge:
        """The namespace as ``p`` sees it (shares the catalog, store and fetcher)."""
        key = (
            p.issuer,
            p.sub,
            ",".join(p.groups),
            json.dumps(p.claims, sort_keys=True, default=str),
        )
        got = self._handles.get(key)
        if got is not None:
            got[0].p = p
            self._handles.move_to_end(key)
            return got[1]
        b = self.base
        holder = _Holder(p)
        session = Session(holder, b.resolver, b.audit, False)
        bridge = Bridge(
            b.config, session, catalog=b.catalog, store=b.store, fetcher=b.fetcher, keys=b.keys
        )
        bridge.audit_state = b.audit_state
        self._handles[key] = (holder, bridge)
        while len(self._handles) > MAX_HANDLES:
            self._handles.popitem(last=False)
        return bridge

    async def _rows(self, b: Bridge, path: tuple[str, ...]) -> list[Row]:
        out = []
        for e in await b.listdir(path):
            if e.name == METADATA:
                continue
            node = await b.resolve((*path, e.name, METADATA))
            doc = json.loads(b.metadata(node))
            out.append(Row(e.name, dict(doc.get("attributes", {}))))
        return out

    async def studies(self, p: Principal) -> list[Row]:
        """Every study ``p`` may see, as its view shows it (``ls /studies``)."""
        return await self._rows(self.bridge_for(p), ("studies",))

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
        are streamed one by one; objects already cached are not asked again."""
        b = self.bridge_for(p)
        node = await b.resolve(("studies", study, series))
        assert node.study is not None and node.series is not None and node.view is not None
        b.fetcher.prefetch(await b.series_targets(node.study, node.series))
