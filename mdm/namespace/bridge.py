"""The bridge: the core services of the federation, wired together, and the mount's facade.

The core is a set of services, each in the package of its concern, each with a public API that
names the principal it acts for (so one process can serve many principals):

==============================  =====================  ===================================
module                          class                  job
==============================  =====================  ===================================
``mdm.access.gate``             ``Gate``               decisions (``resource_of``) + audit
``mdm.catalog.sync``            ``CatalogSync``        C-FIND -> catalog records, TTL,
                                                       negative cache, single-flight
``mdm.namespace.naming``        ``Names``              views per decision, alias table,
                                                       readable names, name -> record
``mdm.namespace.tree``          ``Namespace``          resolve / lookup / listdir / metadata
``mdm.namespace.reads``         ``Reads``              open, re-check on read, audit of opens
``mdm.retrieval.targets``       ``Targets``            retrieval targets, prefetch
``mdm.volume.service``          ``Volumes``            NIfTI files beside series, built
                                                       from cached instances
==============================  =====================  ===================================

:class:`Services` holds one of each, shared: the catalog, store, fetcher, view cache and alias
table are the same whoever asks. Two front ends sit on it:

- :class:`Bridge`, the facade of a mount (``mdm_fuse``) and of the CLI (``mdm fetch``): one
  principal, the session's, read anew at every operation (its token may expire or change);
- :meth:`Services.as_principal` (or :meth:`Bridge.as_principal`): a cheap handle that acts for
  a principal given explicitly, e.g. the bearer of one HTTP request of a DICOMweb gateway.

:func:`open_bridge` starts the store, the storage SCP and the fetcher, and wires the services.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from mdm.access.decide import AccessResolver
from mdm.access.gate import Gate, SessionPrincipal, Who, fixed
from mdm.access.identity import Principal
from mdm.access.session import Session
from mdm.audit.log import AuditLog
from mdm.catalog.records import Catalog, Record
from mdm.catalog.sync import CatalogSync
from mdm.config import Config, SiteSettings
from mdm.dicom.procscp import ProcessStorageSCP, StoreParams
from mdm.dicom.receiver import StorageSCP
from mdm.dicom.retrieve import Retriever
from mdm.errors import UserError
from mdm.namespace.collections import Plan
from mdm.namespace.naming import Names
from mdm.namespace.reads import OpenFile, Reads
from mdm.namespace.tree import Entry, Namespace, Node
from mdm.ops.status import AuditState
from mdm.retrieval.fetcher import Fetcher, Target
from mdm.retrieval.targets import Targets
from mdm.store.db import open_env
from mdm.store.keys import KeyProvider, LocalKeyring
from mdm.store.objects import ObjectStore
from mdm.volume.service import Volumes

log = logging.getLogger(__name__)

ACCESS_FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class Services:
    """The core services of one process, shared by every principal it serves."""

    config: Config
    gate: Gate
    sync: CatalogSync
    names: Names
    namespace: Namespace
    reads: Reads
    targets: Targets
    store: ObjectStore
    fetcher: Fetcher
    keys: KeyProvider

    @classmethod
    def build(
        cls,
        config: Config,
        resolver: AccessResolver,
        audit: AuditLog | None,
        *,
        catalog: Catalog,
        store: ObjectStore,
        fetcher: Fetcher,
        keys: KeyProvider,
    ) -> Services:
        """Wire the services over an open catalog, store and fetcher."""
        fail_open = config.audit is not None and config.audit.fail_open
        gate = Gate(resolver, audit, fail_open=fail_open)
        sync = CatalogSync(
            config,
            catalog,
            limiter=fetcher.limiter,
            nursery=fetcher.nursery,
            policy_version=resolver.version,
        )
        names = Names(sync, gate, keys.secret)
        targets = Targets(config, sync, gate, names, store, fetcher)
        volumes = Volumes(config, sync, gate, names, store, targets)
        namespace = Namespace(config, sync, gate, names, store, targets, volumes=volumes)
        reads = Reads(namespace, gate, names, store, targets)
        return cls(config, gate, sync, names, namespace, reads, targets, store, fetcher, keys)

    def as_principal(self, principal: Principal | Who) -> Acting:
        """A handle acting for ``principal`` (a verified one, or a callable giving it)."""
        return Acting(self, principal if callable(principal) else fixed(principal))


class Acting:
    """The federation as one principal sees it: the namespace, reads and retrieval targets
    of :class:`Services`, bound to a :data:`~mdm.access.gate.Who`. Cheap: make one per
    request; every cache it uses is shared."""

    def __init__(self, services: Services, who: Who) -> None:
        self.services = services
        self.who = who

    async def resolve(self, path: tuple[str, ...]) -> Node:
        """The node at ``path`` if the principal may see it; NotFound otherwise."""
        return await self.services.namespace.resolve(self.who, path)

    async def lookup(self, path: tuple[str, ...]) -> Entry:
        """Attributes of ``path`` (no retrieval, unless ``bridge.exact_sizes``)."""
        return await self.services.namespace.lookup(self.who, path)

    async def listdir(self, path: tuple[str, ...]) -> list[Entry]:
        """The visible entries of the directory at ``path``."""
        return await self.services.namespace.listdir(self.who, path)

    def metadata(self, node: Node) -> bytes:
        """The ``.metadata.json`` document of a resolved metadata node."""
        return self.services.namespace.metadata(self.who, node)

    async def collection_plan(self, name: str) -> Plan:
        """The objects of collection ``name`` the principal may read, as retrieval targets
        (NotFound if it may not use it)."""
        return await self.services.namespace.collections.plan(self.who, name)

    async def xattrs(self, path: tuple[str, ...]) -> dict[str, str]:
        """``user.dicom.<Keyword>`` -> value of ``path``, as the principal's view shows it."""
        return await self.services.namespace.xattrs(self.who, path)

    async def open(self, path: tuple[str, ...]) -> OpenFile:
        """Open a file for reading; retrieves the object first if it is not cached."""
        return await self.services.reads.open(self.who, path)

    async def targets_for(self, uid: str) -> list[Target]:
        """What to retrieve for a study, series or instance UID the principal may see."""
        return await self.services.targets.targets_for(self.who(), uid)

    async def series_targets(self, study: Record, series: Record) -> list[Target]:
        """What retrieving a whole series means in the principal's view (AccessDenied at
        the metadata level): one target per listed instance."""
        return await self.services.targets.series_targets(self.who(), study, series)


class Bridge(Acting):
    """The facade of a mount and of the CLI: the services, acting for the session's principal.

    The session's principal is read anew at every operation: an expired token is an
    AccessDenied (EACCES), said once in the log."""

    def __init__(self, services: Services, session: Session) -> None:
        self._principal = SessionPrincipal(session)
        super().__init__(services, self._principal)
        self.session = session
        self.config = services.config
        self.store = services.store
        self.fetcher = services.fetcher
        self.keys = services.keys
        self.resolver = services.gate.resolver
        self.audit = services.gate.audit
        self.started = services.namespace.started

    @property
    def audit_state(self) -> AuditState:
        """The audit writer's health since the mount started (``mdm status``)."""
        return self.services.gate.audit_state

    @property
    def principal(self) -> Principal:
        """The mount's principal now; AccessDenied (EACCES) once its token is not valid."""
        return self._principal()

    def as_principal(self, principal: Principal | Who) -> Acting:
        """A handle on the same services acting for another principal."""
        return self.services.as_principal(principal)

    def record(
        self,
        action: str,
        decision: str,
        resource: dict[str, str],
        *,
        principal: Principal | None = None,
        **extra: Any,
    ) -> None:
        """One audit record in ``principal``'s name, by default the session's (the fetcher's
        retrievals)."""
        who = principal if principal is not None else self._principal.for_audit()
        self.services.gate.record(who, action, decision, resource, **extra)


@asynccontextmanager
async def open_bridge(
    config: Config,
    session: Session,
    *,
    keys: KeyProvider | None = None,
    get_if_port_busy: bool = False,
) -> AsyncIterator[Bridge]:
    """Start the store, the storage SCP and the fetcher; yield a :class:`Bridge`; stop them.

    ``get_if_port_busy``: if the storage SCP's port is taken (a mount of the same
    configuration is running), go on without a listener and retrieve everything by C-GET,
    which needs none (``mdm fetch`` beside a running mount).
    """
    if keys is None:
        from mdm.keyservice.client import provider_for

        keys = provider_for(config.keys, session.token_file) or LocalKeyring.load(
            config.keys.keyring, create=True
        )
    env = open_env(config.cache.dir)
    try:
        store = ObjectStore(
            config.cache.dir,
            env,
            keys,
            config.cache.max_bytes,
            config.cache.chunk_size,
            fsync=config.cache.fsync,
        )
        report = store.recover()
        log.info("cache recovered: %s", report)
        if keys.remote or any(s.dicomweb for s in config.sites):
            # Shared nodes: no key that opens the catalog outlives this process. And a
            # DICOMweb site (a hospital gateway) answers each token with what that token may
            # see: its listings are this principal's, never to be reused by the next mount
            # of the same cache.
            catalog = Catalog.private(config.cache.dir, config.cache.catalog_ttl)
        else:
            catalog = Catalog(env, keys.secret("catalog"), config.cache.catalog_ttl)
        scp: StorageSCP
        allowed = {s.ae_title for s in config.sites}
        if config.bridge.receiver == "process":
            scp = ProcessStorageSCP(
                config.bridge,
                allowed,
                StoreParams(
                    config.cache.dir,
                    config.keys.keyring,
                    config.cache.max_bytes,
                    config.cache.chunk_size,
                    config.keys,
                    session.token_file,
                    config.cache.fsync,
                ),
                log_level=logging.getLogger().getEffectiveLevel(),
            )
        else:
            scp = StorageSCP(config.bridge, allowed)
        try:
            scp.start()
        except OSError as e:
            if not (get_if_port_busy and e.errno == errno.EADDRINUSE):
                raise UserError(
                    f"{config.path}: bridge.port: cannot listen on "
                    f"{config.bridge.host}:{config.bridge.port}: {e.strerror} "
                    "(is a mount or fetch with this configuration already running?)"
                ) from None
            log.info(
                "%s:%d is in use (a mount of this configuration is running?): retrieving by "
                "C-GET, which needs no listener",
                config.bridge.host,
                config.bridge.port,
            )
            config = dataclasses.replace(
                config,
                sites=tuple(dataclasses.replace(s, retrieve="get") for s in config.sites),
            )
            scp = StorageSCP(config.bridge, allowed)  # routes our C-GETs' objects; no listener
        retriever = Retriever(config.bridge, scp)
        try:
            async with trio.open_nursery() as nursery:
                fetcher = Fetcher(config, store, retriever, nursery)
                services = Services.build(
                    config,
                    session.resolver,
                    session.audit,
                    catalog=catalog,
                    store=store,
                    fetcher=fetcher,
                    keys=keys,
                )
                bridge = Bridge(services, session)
                fetcher.audit = bridge.record
                for site in config.sites:
                    if not site.dicomweb:  # no association to open ahead of time
                        nursery.start_soon(_warm, fetcher, retriever, site)
                nursery.start_soon(_flush_access_times, store)
                if not session.local_admin:
                    nursery.start_soon(_refresh_policy, session.resolver.refresh)
                yield bridge
                nursery.cancel_scope.cancel()
            await trio.to_thread.run_sync(fetcher.close)
        finally:
            await trio.to_thread.run_sync(retriever.close)
            await trio.to_thread.run_sync(scp.stop)
            store.close()
            catalog.close()
    finally:
        env.close()


async def _warm(fetcher: Fetcher, retriever: Retriever, site: SiteSettings) -> None:
    """Open an association with each site in the background at start."""
    await trio.to_thread.run_sync(retriever.warm, site, limiter=fetcher.limiter(site.name))


async def _flush_access_times(store: ObjectStore) -> None:
    """Move the cache's access times (LRU order) to the index every few seconds, in a worker
    thread: a write transaction over a few hundred records takes milliseconds, which the
    thread serving the filesystem should not spend."""
    while True:
        await trio.sleep(ACCESS_FLUSH_SECONDS)
        try:
            await trio.to_thread.run_sync(store.flush_access_times)
        except Exception:
            log.exception("writing access times to the cache index failed")


async def _refresh_policy(refresh: Callable[[], object]) -> None:
    """Reload an edited policy off the FUSE thread, so decisions never wait for file I/O."""
    while True:
        await trio.sleep(1.0)
        try:
            await trio.to_thread.run_sync(refresh)
        except Exception:
            log.exception("policy reload check failed")


__all__ = ["Acting", "Bridge", "Entry", "Node", "OpenFile", "Services", "open_bridge"]
