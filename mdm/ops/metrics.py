"""Prometheus metrics of the mount and the key servers (``[metrics] listen = "HOST:PORT"``).

One registry per process. The counters are always kept (an increment costs well under a
microsecond); they are served over HTTP only when ``[metrics] listen`` is configured, by
``prometheus_client``'s own server in a daemon thread, so a scrape never touches the trio
thread that serves the filesystem.

Labels are a closed set: site names (from mdm.toml), results and error kinds, access levels,
operation names, key server indexes, endpoint paths of the key service. No label ever carries
a UID, a name, a patient identifier or a principal: ``tests/test_metrics.py`` scrapes a real
mount after reads of a sentinel patient and checks that none of it appears.

The gateway (not built yet) is to serve the same names for what it shares with the mount
(retrievals, objects, bytes, cache, policy decisions, audit) under its own ``[metrics]``.
"""

from __future__ import annotations

import errno as errno_
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The *_created series double the output and serve no alert.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# -- retrieval (mount) ------------------------------------------------------------------------
RETRIEVALS = Counter(
    "mdm_retrievals",
    "Retrievals (one C-MOVE/C-GET exchange of a series or of objects) by site and result "
    "(ok, incomplete, timeout, error).",
    ["site", "result"],
    registry=REGISTRY,
)
RETRIEVAL_SECONDS = Histogram(
    "mdm_retrieval_seconds",
    "Duration of a retrieval from one site, from request to the last object stored.",
    ["site"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
OBJECTS = Counter(
    "mdm_objects",
    "Objects retrieved by site and result (stored, failed).",
    ["site", "result"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "mdm_bytes_received",
    "Bytes of objects received from each site and stored (object sizes).",
    ["site"],
    registry=REGISTRY,
)
# -- reads (FUSE) -------------------------------------------------------------------------------
FUSE_OPS = Counter(
    "mdm_fuse_operations", "Filesystem operations by operation.", ["op"], registry=REGISTRY
)
FUSE_ERRORS = Counter(
    "mdm_fuse_errors",
    "Filesystem operations answered with an error, by operation and errno name.",
    ["op", "errno"],
    registry=REGISTRY,
)
BYTES_SERVED = Counter("mdm_bytes_served", "Bytes returned by reads.", registry=REGISTRY)
OPEN_SECONDS = Histogram(
    "mdm_open_seconds",
    "Time to open a file (a cache miss includes its retrieval), by cache result.",
    ["cache"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "mdm_cache_lookups",
    "Opens of an object served from the cache (hit) or retrieved first (miss).",
    ["result"],
    registry=REGISTRY,
)
# -- policy, keys, audit (mount and key servers) -----------------------------------------------
POLICY_DECISIONS = Counter(
    "mdm_policy_decisions",
    "Access decisions by resource level (study, series, object) and result (the access level "
    "granted: none, metadata, deidentified, identified).",
    ["level", "result"],
    registry=REGISTRY,
)
KEYSERVER_CALLS = Counter(
    "mdm_keyserver_requests",
    "Requests from this process to each key server, by server index and result (ok, refused, "
    "timeout, error).",
    ["server", "result"],
    registry=REGISTRY,
)
AUDIT_WRITES = Counter(
    "mdm_audit_writes",
    "Audit records written (ok) or that could not be written (failed).",
    ["result"],
    registry=REGISTRY,
)
# -- key server -------------------------------------------------------------------------------
KS_REQUESTS = Counter(
    "mdm_keyserver_served_requests",
    "Requests served by this key server, by endpoint and HTTP status.",
    ["endpoint", "status"],
    registry=REGISTRY,
)
KS_SECONDS = Histogram(
    "mdm_keyserver_request_seconds",
    "Time this key server took to answer, by endpoint.",
    ["endpoint"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
UP = Gauge(
    "mdm_up", "1 while this process serves (mount or key server).", ["role"], registry=REGISTRY
)

_FUSE_OPS = (
    "lookup",
    "getattr",
    "opendir",
    "readdir",
    "open",
    "read",
    "release",
    "statfs",
    "getxattr",
    "listxattr",
)
FUSE_OP = {op: FUSE_OPS.labels(op) for op in _FUSE_OPS}
"""Pre-bound children: a read counts without a label lookup."""
_KS_ENDPOINTS = frozenset(
    {
        "/v1/health",
        "/v1/public-key",
        "/v1/open",
        "/v1/pseudonym",
        "/v1/admin/rotate/begin",
        "/v1/admin/rotate/reseal",
        "/v1/admin/rotate/finish",
        "/v1/anchor",
        "/v1/anchor/list",
    }
)


def fuse_error(op: str, code: int) -> None:
    """Count an operation answered with ``code``."""
    FUSE_ERRORS.labels(op, errno_.errorcode.get(code, "other")).inc()


def endpoint_label(path: str) -> str:
    """A key service path as a label: one of the known endpoints, or ``other`` (a client may
    send any path; labels stay a closed set)."""
    return path if path in _KS_ENDPOINTS else "other"


class _CacheCollector(Collector):
    """Cache occupancy, read from the store at scrape time (any process may have changed it)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        try:
            st = self._stats()
        except Exception:  # a store closing at shutdown: no sample rather than a failed scrape
            log.debug("cache stats unavailable for a scrape", exc_info=True)
            return
        yield GaugeMetricFamily("mdm_cache_bytes", "Bytes stored in the cache.", value=st.bytes)
        yield GaugeMetricFamily(
            "mdm_cache_max_bytes", "The cache's cap (cache.max_bytes).", value=st.max_bytes
        )
        yield GaugeMetricFamily("mdm_cache_objects", "Objects in the cache.", value=st.objects)
        yield GaugeMetricFamily(
            "mdm_cache_pinned_objects", "Objects held open by readers.", value=st.pinned
        )
        yield GaugeMetricFamily(
            "mdm_cache_pinned_bytes", "Bytes of the objects held open.", value=st.pinned_bytes
        )
        yield CounterMetricFamily(
            "mdm_cache_evictions",
            "Objects evicted to stay within cache.max_bytes (every process of this cache).",
            value=st.evicted,
        )


class MetricsServer:
    """The HTTP endpoint of one process; ``close`` stops it."""

    def __init__(self, host: str, port: int, role: str) -> None:
        self.server, self.thread = start_http_server(port, host, registry=REGISTRY)
        self.host, self.port = host, self.server.server_port
        self._collectors: list[Collector] = []
        UP.labels(role).set(1)
        self.role = role
        log.info("metrics served on http://%s:%d/metrics", host, self.port)

    def add_cache(self, stats: Callable[[], Any]) -> None:
        """Export the cache occupancy gauges from ``stats`` (``ObjectStore.stats``)."""
        c = _CacheCollector(stats)
        REGISTRY.register(c)
        self._collectors.append(c)

    def close(self) -> None:
        for c in self._collectors:
            REGISTRY.unregister(c)
        self._collectors.clear()
        UP.labels(self.role).set(0)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


_lock = threading.Lock()


def serve(listen: tuple[str, int] | None, role: str) -> MetricsServer | None:
    """Start the endpoint at ``listen`` (None: metrics off). A port already in use (another
    mount of the same configuration on this node) is logged and the process goes on without
    it: metrics never stop a mount."""
    if listen is None:
        return None
    host, port = listen
    with _lock:
        try:
            return MetricsServer(host, port, role)
        except OSError as e:
            log.warning(
                "metrics: cannot listen on %s:%d (%s); going on without a metrics endpoint",
                host,
                port,
                e.strerror,
            )
            return None


def retrieval(site: str, result: str, seconds: float) -> None:
    """Count one retrieval from ``site`` and its duration."""
    RETRIEVALS.labels(site, result).inc()
    RETRIEVAL_SECONDS.labels(site).observe(seconds)
