"""Load and validate ``mdm.toml`` into frozen, typed settings.

Every error names the file and the key (``mdm.toml: site[1].port: expected an integer``); the
CLI turns :class:`~mdm.errors.ConfigError` into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdm.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1..16 chars
RETRIEVE_MODES = ("move", "get", "auto")


def parse_size(value: object) -> int:
    """Parse ``"50GiB"``, ``"500 MB"`` or an integer number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 50GiB")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 500MB, 50GiB)")
    unit = (m.group(2) or "B").upper()
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """Parse ``"30s"``, ``"10m"``, ``"8h"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s")
    m = _DURATION_RE.match(value)
    if m:
        return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    # Compound forms: 1h30m, 2d12h, 1m30s.
    text = value.strip()
    parts = _DURATION_PART_RE.findall(text)
    if parts and "".join(n + u for n, u in parts) == text.replace(" ", ""):
        return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(f"not a duration: {value!r} (examples: 500ms, 30s, 10m, 8h, 1h30m)")


FAST_DICOM_ENV = "MDM_FAST_DICOM"


def fast_dicom_default() -> bool:
    """The default of ``[bridge] fast_dicom``: true unless ``MDM_FAST_DICOM`` is ``0``,
    ``false`` or ``no`` (so a test run, and every process it starts, can run stock)."""
    value = os.environ.get(FAST_DICOM_ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class BridgeSettings:
    """``[bridge]``: the bridge's own DICOM application entity."""

    ae_title: str = "MDMBRIDGE"
    host: str = "127.0.0.1"
    port: int = 11112
    retrieve: str = "move"
    timeout: float = 30.0
    """Deadline, in seconds, for one network exchange (association, C-FIND, one retrieval)."""
    max_pdu: int = 0
    """Largest PDU we accept; 0 means unlimited (the largest the peer offers)."""
    prefetch: bool = True
    """Fetch the rest of a series in the background once a reader wants it."""
    exact_sizes: bool = False
    """``stat`` of a file not yet cached retrieves it (and listing a series retrieves the
    series), so every tool sees its exact size (``tar``, which trusts ``st_size``)."""
    receiver: str = "process"
    """``process``: the storage SCP receives and stores in a worker process (off the mount's
    GIL); ``thread``: in the mount's own process."""
    read_ahead: int = 2**20
    """The kernel's read-ahead for the mount, in bytes (``/sys/class/bdi/<dev>/read_ahead_kb``):
    with 1 MiB a sequential reader's file arrives in one FUSE read per MiB instead of one per
    128 KiB (the kernel's default). Setting it needs root; otherwise the mount says so once
    and keeps the default. 0: leave the kernel's default."""
    fast_dicom: bool = field(default_factory=fast_dicom_default)
    """Run the DICOM fast path (``mdm.dicom.fast``); False: stock pynetdicom (docs/DICOM.md,
    The fast path). Default: true, or the ``MDM_FAST_DICOM`` environment variable (0/1)."""


@dataclass(frozen=True)
class CacheSettings:
    """``[cache]``: the encrypted local store and the catalog."""

    dir: Path
    max_bytes: int = 50 * 2**30
    catalog_ttl: float = 600.0
    chunk_size: int = 256 * 1024
    fsync: bool = False
    """fsync each blob before it is placed (see docs/STORE.md, Crash analysis): off, a power
    cut costs the re-fetch of the objects stored in its last seconds, never a wrong byte."""


@dataclass(frozen=True)
class SiteSettings:
    """One ``[[site]]``: a PACS of the federation."""

    name: str
    ae_title: str
    host: str
    port: int
    retrieve: str = "move"
    timeout: float = 30.0
    max_associations: int = 2
    query_model: str = "auto"
    """``study``, ``patient`` or ``auto`` (Patient Root at patient level, Study Root otherwise)."""
    retrievals_per_minute: int = 0
    """Retrievals started per sliding minute, urgent and bulk together (0: no bound)."""
    bulk_windows: tuple[str, ...] = ()
    """When bulk work (prefetch, ``mdm fetch``, series requests) may run (mdm.retrieval.pacing)."""
    bulk_min_objects: int = 1
    """Requests of fewer objects than this are never held by a bulk window."""
    dicomweb: str = ""
    """A DICOMweb (PS3.18) site: the base URL of its QIDO-RS/WADO-RS service (``https://...``;
    ``http://`` only to a loopback address). Empty for a DIMSE site. With it, ``ae_title`` is
    empty, ``host``/``port`` are the URL's and ``max_associations`` bounds its concurrent
    HTTP requests (docs/DICOMWEB.md)."""
    ca_file: Path | None = None
    """A DICOMweb site's CA certificates (PEM); None: the system trust store."""
    max_results: int = 0
    """The site's C-FIND/QIDO result cap, if it has one (0: none known). An answer of exactly
    this many matches is taken as cut off: the listing is marked incomplete."""


COLLECTION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CollectionSettings:
    """One ``[[collection]]``: a named cohort, by C-FIND keys or by a manifest of UIDs."""

    name: str
    match: tuple[tuple[str, str], ...] = ()
    """(DICOM keyword, C-FIND matching value): study-level keys go to every site's study
    C-FIND; series-level keys (Modality, SeriesDescription, BodyPartExamined) select series."""
    manifest: Path | None = None
    """A file of UIDs at any level (one per line, CSV with UID columns, ``mdm find --json``)."""
    pin: bool = False
    """Keep the collection's cached objects out of eviction."""
    principals: tuple[str, ...] | None = None
    """Who may use it (subjects, or ``group:NAME``); None: whoever sees any of it."""
    source: Path | None = None
    """The file that defines it (mdm.toml or a file of the collections directory)."""


@dataclass(frozen=True)
class IdentitySettings:
    """``[identity]``: how JWTs presented by mounts are verified."""

    issuer: str
    audience: str
    public_keys: Path
    leeway: float = 30.0


@dataclass(frozen=True)
class PolicySettings:
    """``[policy]``: the ACL policy directory."""

    dir: Path
    officers: tuple[str, ...] = ()
    """Groups whose (verified) members may ``policy explain`` any object of the federation."""


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the append-only, hash-chained audit log."""

    log: Path
    syslog: str | None = None
    """``udp://HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:/dev/log``: where each record is
    copied as it is written (RFC 5424), off the writing host (docs/AUDIT.md)."""
    anchor_interval: float = 5.0
    """With ``[keys] servers``: seconds between checkpoints sent to the key servers."""
    fail_open: bool = False
    """Go on when a record cannot be written (logged). Default: fail closed, the operation
    whose record cannot be written fails (an open gets EIO)."""
    default: bool = False
    """True when mdm.toml has no [audit]: the log is ``cache.dir/audit.jsonl``."""


@dataclass(frozen=True)
class KeySettings:
    """``[keys]``: where scope keys come from (a local keyring file by default).

    With ``servers``, object keys are split ``threshold``-of-N across those key servers
    (docs/KEYSERVICE.md); ``ca_file`` is the CA their TLS certificates are checked against.
    """

    keyring: Path
    servers: tuple[str, ...] = ()
    threshold: int = 0
    ca_file: Path | None = None
    timeout: float = 5.0
    """Deadline, in seconds, for the key servers to release a key."""


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: where the Prometheus endpoint listens (docs/OPERATIONS.md)."""

    listen: tuple[str, int]


_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def metrics_from(path: Path, table: Mapping[str, Any] | None) -> MetricsSettings | None:
    """``[metrics]`` of ``path`` (mdm.toml or a key server's toml); None when absent."""
    if table is None:
        return None
    m = _Section(path, "metrics", table, {"listen"})
    listen = m.get_str("listen")
    found = _LISTEN.match(listen)
    if found is None or not 0 <= int(found.group(2)) <= 65535:
        raise m._err("listen", f'expected "HOST:PORT" such as "127.0.0.1:9464", got {listen!r}')
    return MetricsSettings((found.group(1).strip("[]"), int(found.group(2))))


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]``: where ``mdm gateway`` serves DICOMweb (docs/GATEWAY.md)."""

    listen: tuple[str, int]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_results: int = 1000
    """Server cap on the rows of one QIDO-RS answer (``limit`` above it is cut, with a Warning)."""
    max_series_instances: int = 5000
    """Instances a series-level QIDO or WADO-RS request may span; above it: 413."""


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def gateway_from(path: Path, table: Mapping[str, Any] | None) -> GatewaySettings | None:
    """``[gateway]`` of ``path``; None when absent. Plain HTTP only on a loopback address."""
    if table is None:
        return None
    g = _Section(
        path,
        "gateway",
        table,
        {"listen", "tls_cert", "tls_key", "max_results", "max_series_instances"},
    )
    listen = g.get_str("listen")
    found = _LISTEN.match(listen)
    if found is None or not 0 <= int(found.group(2)) <= 65535:
        raise g._err("listen", f'expected "HOST:PORT" such as "0.0.0.0:8443", got {listen!r}')
    host = found.group(1).strip("[]")
    cert = g.path_("tls_cert") if g.has("tls_cert") else None
    key = g.path_("tls_key") if g.has("tls_key") else None
    if (cert is None) != (key is None):
        raise g._err("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together")
    if cert is None and host not in _LOOPBACK:
        raise g._err(
            "listen",
            f"{host} is not a loopback address: set tls_cert and tls_key (plain HTTP is "
            "allowed only on 127.0.0.1, ::1 or localhost)",
        )
    return GatewaySettings(
        listen=(host, int(found.group(2))),
        tls_cert=cert,
        tls_key=key,
        max_results=g.get_int("max_results", 1000, 1, 100_000),
        max_series_instances=g.get_int("max_series_instances", 5000, 1, 10_000_000),
    )


@dataclass(frozen=True)
class Config:
    """The whole of ``mdm.toml``, validated."""

    path: Path
    bridge: BridgeSettings
    cache: CacheSettings
    sites: tuple[SiteSettings, ...]
    keys: KeySettings
    identity: IdentitySettings | None = None
    policy: PolicySettings | None = None
    audit: AuditSettings | None = None
    metrics: MetricsSettings | None = None
    gateway: GatewaySettings | None = None
    collections: tuple[CollectionSettings, ...] = ()

    def site(self, name: str) -> SiteSettings:
        """The site called ``name`` (KeyError if there is none)."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def collection(self, name: str) -> CollectionSettings:
        """The collection called ``name`` (KeyError if there is none)."""
        for c in self.collections:
            if c.name == name:
                return c
        raise KeyError(name)


class _Section:
    """Typed accessors over one TOML table that name file and key in every error."""

    def __init__(self, path: Path, prefix: str, table: Mapping[str, Any], known: set[str]):
        self.path = path
        self.prefix = prefix
        self.table = table
        for key in table:
            if key not in known:
                raise ConfigError(
                    path,
                    self._k(key),
                    f"unknown key (known keys: {', '.join(sorted(known))})",
                )

    def _k(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(self.path, self._k(key), msg)

    def has(self, key: str) -> bool:
        return key in self.table

    def get_str(self, key: str, default: str | None = None) -> str:
        if key not in self.table:
            if default is None:
                raise self._err(key, "missing (required)")
            return default
        v = self.table[key]
        if not isinstance(v, str) or not v.strip():
            raise self._err(key, "expected a non-empty string")
        return str(v)

    def get_int(self, key: str, default: int | None = None, lo: int = 0, hi: int = 2**31) -> int:
        if key not in self.table:
            if default is None:
                raise self._err(key, "missing (required)")
            return default
        v = self.table[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(key, "expected an integer")
        if not lo <= v <= hi:
            raise self._err(key, f"must be between {lo} and {hi}")
        return v

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self.table:
            return default
        v = self.table[key]
        if not isinstance(v, bool):
            raise self._err(key, "expected true or false")
        return v

    def size(self, key: str, default: int) -> int:
        if key not in self.table:
            return default
        try:
            return parse_size(self.table[key])
        except ValueError as e:
            raise self._err(key, str(e)) from None

    def duration(self, key: str, default: float) -> float:
        if key not in self.table:
            return default
        try:
            d = parse_duration(self.table[key])
        except ValueError as e:
            raise self._err(key, str(e)) from None
        return d

    def path_(self, key: str, default: Path | None = None) -> Path:
        if key not in self.table:
            if default is None:
                raise self._err(key, "missing (required)")
            return default
        v = self.table[key]
        if not isinstance(v, str) or not v:
            raise self._err(key, "expected a path")
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.get_str(key, default)
        if v not in choices:
            raise self._err(key, f"must be one of {', '.join(repr(c) for c in choices)}")
        return v

    def ae(self, key: str, default: str | None = None) -> str:
        v = self.get_str(key, default)
        if not _AE_RE.match(v) or not v.strip():
            raise self._err(key, "an AE title is 1 to 16 printable ASCII characters, no backslash")
        return v.strip()

    def table_(self, key: str) -> Mapping[str, Any] | None:
        if key not in self.table:
            return None
        v = self.table[key]
        if not isinstance(v, dict):
            raise self._err(key, "expected a table")
        return v


def _windows(s: _Section, key: str) -> tuple[str, ...]:
    from mdm.retrieval.pacing import parse_window

    raw = s.table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
        raise s._err(key, 'expected a list such as ["Mon-Fri 19:00-07:00", "Sat-Sun"]')
    for w in raw:
        try:
            parse_window(w)
        except ValueError as e:
            raise s._err(key, str(e)) from None
    return tuple(raw)


def _dicomweb_site(s: _Section, name: str, bridge: BridgeSettings) -> SiteSettings:
    """A ``[[site]]`` with ``dicomweb = URL``: checked URL, optional CA file."""
    from ipaddress import ip_address
    from urllib.parse import urlsplit

    for key in ("ae_title", "host", "port", "retrieve", "query_model"):
        if s.has(key):
            raise s._err(key, "not used with dicomweb (the URL says where the site is)")
    url = s.get_str("dicomweb").strip()
    try:
        u = urlsplit(url)
        port = u.port
        host = u.hostname or ""
    except ValueError:
        raise s._err("dicomweb", f"not a URL: {url!r}") from None
    if u.scheme not in ("https", "http") or not host or u.query or u.fragment or u.username:
        raise s._err(
            "dicomweb", f"expected https://HOST[:PORT]/PATH (no query or user), got {url!r}"
        )
    if u.scheme == "http":
        try:
            loopback = ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise s._err(
                "dicomweb", "plain http:// is allowed only to a loopback address; use https://"
            )
        if s.has("ca_file"):
            raise s._err("ca_file", "only meaningful with an https:// dicomweb URL")
    ca_file: Path | None = None
    if s.has("ca_file"):
        ca_file = s.path_("ca_file")
        if not ca_file.is_file():
            raise s._err("ca_file", f"{ca_file}: no such file")
    site = SiteSettings(
        name=name,
        ae_title="",
        host=host,
        port=port or (443 if u.scheme == "https" else 80),
        retrieve="wado",
        timeout=s.duration("timeout", bridge.timeout),
        max_associations=s.get_int("max_associations", 2, 1, 16),
        retrievals_per_minute=s.get_int("retrievals_per_minute", 0, 0, 100_000),
        bulk_windows=_windows(s, "bulk_windows"),
        bulk_min_objects=s.get_int("bulk_min_objects", 1, 1, 10_000_000),
        dicomweb=url.rstrip("/"),
        ca_file=ca_file,
    )
    if site.timeout <= 0:
        raise s._err("timeout", "must be positive")
    return site


_SYSLOG = re.compile(r"^((udp|tcp)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}|unix:/\S+)$")
_TOP = {
    "bridge",
    "cache",
    "site",
    "identity",
    "policy",
    "audit",
    "keys",
    "metrics",
    "gateway",
    "collection",
    "collections",
}
_COLLECTION_KEYS = {"name", "match", "manifest", "pin", "principals"}


def _collection(p: Path, prefix: str, table: Any) -> CollectionSettings:
    if not isinstance(table, dict):
        raise ConfigError(p, prefix, "expected a [[collection]] table")
    c = _Section(p, prefix, table, _COLLECTION_KEYS)
    name = c.get_str("name")
    if not COLLECTION_NAME_RE.match(name):
        raise c._err("name", "letters, digits, '.', '_' and '-' only (a directory name)")
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    match: list[tuple[str, str]] = []
    raw = table.get("match")
    if raw is not None:
        if not isinstance(raw, dict) or not raw:
            raise c._err("match", "expected a table of DICOM keyword = matching value")
        for k, v in raw.items():
            tag = tag_for_keyword(str(k))
            if tag is None or dictionary_VR(tag) == "SQ":
                raise c._err(f"match.{k}", "not a DICOM keyword of a matching key")
            if not isinstance(v, str) or not v.strip():
                raise c._err(f"match.{k}", "expected a non-empty string")
            match.append((str(k), v.strip()))
    manifest = c.path_("manifest") if c.has("manifest") else None
    if bool(match) == (manifest is not None):
        raise ConfigError(p, prefix, "give exactly one of match = {...} or manifest = FILE")
    principals = None
    if "principals" in table:
        pr = table["principals"]
        if not isinstance(pr, list) or not all(isinstance(x, str) and x for x in pr):
            raise c._err("principals", "expected a list of subjects or group:NAME")
        principals = tuple(pr)
    return CollectionSettings(
        name=name,
        match=tuple(sorted(match)),
        manifest=manifest,
        pin=c.get_bool("pin", False),
        principals=principals,
        source=p,
    )


def collections_from(p: Path, data: Mapping[str, Any]) -> tuple[CollectionSettings, ...]:
    """``[[collection]]`` of mdm.toml, then those of ``*.toml`` under ``[collections] dir``."""
    out: list[CollectionSettings] = []
    raw = data.get("collection", [])
    if not isinstance(raw, list):
        raise ConfigError(p, "collection", "expected [[collection]] tables")
    out += [_collection(p, f"collection[{i}]", t) for i, t in enumerate(raw)]
    ctab = data.get("collections")
    if ctab is not None:
        if not isinstance(ctab, dict):
            raise ConfigError(p, "collections", "expected a table")
        cs = _Section(p, "collections", ctab, {"dir"})
        d = cs.path_("dir")
        if not d.is_dir():
            raise cs._err("dir", f"{d} is not a directory")
        for f in sorted(d.glob("*.toml")):
            try:
                fdata = tomllib.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f, None, f"cannot read: {e}") from None
            ftop = _Section(f, "", fdata, {"collection"})
            fraw = fdata.get("collection", [])
            if not isinstance(fraw, list):
                raise ftop._err("collection", "expected [[collection]] tables")
            out += [_collection(f, f"collection[{i}]", t) for i, t in enumerate(fraw)]
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise ConfigError(c.source or p, "collection", f"two collections named {c.name!r}")
        seen.add(c.name)
    return tuple(out)


def load_config(path: str | Path) -> Config:
    """Read and validate ``mdm.toml``; raise :class:`ConfigError` naming file and key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(p, None, "no such file") from None
    except OSError as e:
        raise ConfigError(p, None, f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(p, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"TOML syntax error: {e}") from None
    return config_from_dict(data, p)


def config_from_dict(data: Mapping[str, Any], p: Path) -> Config:
    """Validate an already-parsed ``mdm.toml`` (``p`` is used in messages and relative paths)."""
    top = _Section(p, "", data, _TOP)

    b = _Section(
        p,
        "bridge",
        top.table_("bridge") or {},
        {
            "ae_title",
            "host",
            "port",
            "retrieve",
            "timeout",
            "max_pdu",
            "prefetch",
            "exact_sizes",
            "receiver",
            "fast_dicom",
            "read_ahead",
        },
    )
    bridge = BridgeSettings(
        ae_title=b.ae("ae_title", "MDMBRIDGE"),
        host=b.get_str("host", "127.0.0.1"),
        port=b.get_int("port", 11112, 0, 65535),
        retrieve=b.choice("retrieve", RETRIEVE_MODES, "move"),
        timeout=b.duration("timeout", 30.0),
        max_pdu=b.get_int("max_pdu", 0, 0, 2**31),
        prefetch=b.get_bool("prefetch", True),
        exact_sizes=b.get_bool("exact_sizes", False),
        receiver=b.choice("receiver", ("process", "thread"), "process"),
        fast_dicom=b.get_bool("fast_dicom", fast_dicom_default()),
        read_ahead=b.size("read_ahead", 2**20),
    )
    if bridge.timeout <= 0:
        raise ConfigError(p, "bridge.timeout", "must be positive")
    if not 0 <= bridge.read_ahead <= 64 * 2**20:
        raise ConfigError(p, "bridge.read_ahead", "must be between 0 and 64MiB")

    ctab = top.table_("cache")
    if ctab is None:
        raise ConfigError(p, "cache", "missing (required: [cache] with dir = ...)")
    c = _Section(p, "cache", ctab, {"dir", "max_bytes", "catalog_ttl", "chunk_size", "fsync"})
    cache = CacheSettings(
        dir=c.path_("dir"),
        max_bytes=c.size("max_bytes", 50 * 2**30),
        catalog_ttl=c.duration("catalog_ttl", 600.0),
        chunk_size=c.size("chunk_size", 256 * 1024),
        fsync=c.get_bool("fsync", False),
    )
    if not 4096 <= cache.chunk_size <= 16 * 2**20:
        raise ConfigError(p, "cache.chunk_size", "must be between 4KiB and 16MiB")
    # The cache directory is created when missing; one that exists as something else (or
    # under a file) is a configuration error, said in one line.
    for d in (cache.dir, *cache.dir.parents):
        if d.exists() or d.is_symlink():
            if not d.is_dir():
                what = "is not a directory" if d == cache.dir else f"is under {d}, a file"
                raise ConfigError(p, "cache.dir", f"{cache.dir} {what}")
            break

    sites_raw = data.get("site", [])
    if not isinstance(sites_raw, list) or not all(isinstance(s, dict) for s in sites_raw):
        raise ConfigError(p, "site", "expected [[site]] tables")
    sites: list[SiteSettings] = []
    for i, st in enumerate(sites_raw):
        s = _Section(
            p,
            f"site[{i}]",
            st,
            {
                "name",
                "ae_title",
                "host",
                "port",
                "retrieve",
                "timeout",
                "max_associations",
                "query_model",
                "retrievals_per_minute",
                "bulk_windows",
                "bulk_min_objects",
                "dicomweb",
                "ca_file",
                "max_results",
            },
        )
        name = s.get_str("name")
        cap = s.get_int("max_results", 0, 0, 10**9)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(p, f"site[{i}].name", "use letters, digits, '.', '_' or '-'")
        if any(x.name == name for x in sites):
            raise ConfigError(p, f"site[{i}].name", f"duplicate site name {name!r}")
        if s.has("dicomweb"):
            sites.append(dataclasses.replace(_dicomweb_site(s, name, bridge), max_results=cap))
            continue
        if s.has("ca_file"):
            raise s._err("ca_file", "only meaningful with dicomweb")
        sites.append(
            SiteSettings(
                name=name,
                ae_title=s.ae("ae_title"),
                host=s.get_str("host"),
                port=s.get_int("port", None, 1, 65535),
                retrieve=s.choice("retrieve", RETRIEVE_MODES, bridge.retrieve),
                timeout=s.duration("timeout", bridge.timeout),
                max_associations=s.get_int("max_associations", 2, 1, 16),
                query_model=s.choice("query_model", ("auto", "study", "patient"), "auto"),
                retrievals_per_minute=s.get_int("retrievals_per_minute", 0, 0, 100_000),
                bulk_windows=_windows(s, "bulk_windows"),
                bulk_min_objects=s.get_int("bulk_min_objects", 1, 1, 10_000_000),
                max_results=cap,
            )
        )

    ktab = top.table_("keys") or {}
    k = _Section(p, "keys", ktab, {"keyring", "servers", "threshold", "ca_file", "timeout"})
    servers_raw = ktab.get("servers", [])
    if not isinstance(servers_raw, list) or not all(isinstance(u, str) for u in servers_raw):
        raise ConfigError(p, "keys.servers", 'expected a list such as ["https://HOST:PORT"]')
    for j, url in enumerate(servers_raw):
        m_url = re.fullmatch(r"https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?", url)
        if m_url is None or not 1 <= int(m_url.group(2)) <= 65535:
            raise ConfigError(p, f"keys.servers[{j}]", f"expected https://HOST:PORT, got {url!r}")
    if len(set(servers_raw)) != len(servers_raw):
        raise ConfigError(p, "keys.servers", "a key server is listed twice")
    if servers_raw:
        threshold = k.get_int("threshold", None, 2, len(servers_raw))
        ca_file: Path | None = k.path_("ca_file")
    else:
        for key in ("threshold", "ca_file"):
            if k.has(key):
                raise ConfigError(p, f"keys.{key}", "only meaningful with keys.servers")
        threshold, ca_file = 0, None
    keys = KeySettings(
        keyring=k.path_("keyring", p.parent / "keyring.json"),
        servers=tuple(servers_raw),
        threshold=threshold,
        ca_file=ca_file,
        timeout=k.duration("timeout", 5.0),
    )
    if keys.timeout <= 0:
        raise ConfigError(p, "keys.timeout", "must be positive")

    identity = None
    itab = top.table_("identity")
    if itab is not None:
        i_ = _Section(p, "identity", itab, {"issuer", "audience", "public_keys", "leeway"})
        identity = IdentitySettings(
            issuer=i_.get_str("issuer"),
            audience=i_.get_str("audience"),
            public_keys=i_.path_("public_keys"),
            leeway=i_.duration("leeway", 30.0),
        )
    policy = None
    ptab = top.table_("policy")
    if ptab is not None:
        pol = _Section(p, "policy", ptab, {"dir", "officers"})
        officers = ptab.get("officers", [])
        if not isinstance(officers, list) or not all(isinstance(g, str) and g for g in officers):
            raise pol._err("officers", "expected a list of group names")
        policy = PolicySettings(
            dir=pol.path_("dir", p.parent / "acl_policies"), officers=tuple(officers)
        )
    # Without [audit], decisions are still recorded: in the cache directory (UIDs only).
    audit = AuditSettings(log=cache.dir / "audit.jsonl", default=True)
    atab = top.table_("audit")
    if atab is not None:
        a = _Section(p, "audit", atab, {"log", "syslog", "anchor_interval", "fail_open"})
        syslog = a.get_str("syslog", "") or None
        if syslog is not None and not _SYSLOG.match(syslog):
            raise a._err("syslog", "expected udp://HOST:PORT, tcp://HOST:PORT or unix:/PATH")
        interval = a.duration("anchor_interval", 5.0)
        if not 0.1 <= interval <= 3600:
            raise a._err("anchor_interval", "expected between 0.1s and 1h")
        audit = AuditSettings(
            log=a.path_("log"),
            syslog=syslog,
            anchor_interval=interval,
            fail_open=a.get_bool("fail_open", False),
        )

    return Config(
        path=p,
        bridge=bridge,
        cache=cache,
        sites=tuple(sites),
        keys=keys,
        identity=identity,
        policy=policy,
        audit=audit,
        metrics=metrics_from(p, top.table_("metrics")),
        gateway=gateway_from(p, top.table_("gateway")),
        collections=collections_from(p, data),
    )
