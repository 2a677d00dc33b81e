"""The mount's side of the key service: :class:`KeyServiceProvider` (a KeyProvider).

Sealing needs no key server: the object key is split M-of-N (mdm.keyservice.shares) and share
``i`` is sealed to server ``i``'s PUBLIC scope key, read from ``public-keys.json`` (written by
``mdm keys init`` beside ``ca.pem``, updated by ``mdm keys rotate``; re-read when it changes).
Only a scope missing from that file is fetched from the servers (all N, over TLS checked
against the CA), once per process, and kept in memory.

Opening asks every server in parallel, within ``timeout`` seconds in all, to release its share
to this principal; each reply is sealed to a fresh ephemeral key of the request, checked
against the share's commitment, and the first M good shares are combined in memory. Fewer than
M: :class:`~mdm.errors.KeyUnavailable` (EACCES) saying how many servers answered and why the
others did not.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mdm.access.decide import Resource
from mdm.access.identity import Principal
from mdm.config import KeySettings
from mdm.errors import ConfigError, IntegrityError, KeyUnavailable
from mdm.keyservice import prf
from mdm.keyservice import shares as sss
from mdm.keyservice.seal import open_from, public_bytes, seal_to
from mdm.keyservice.wire import (
    INFO_PRF,
    INFO_REPLY,
    INFO_SHARE,
    SealedKey,
    SealedShare,
    b64d,
    b64e,
    dek_context,
    prf_aad,
    reply_aad,
    resource_to_dict,
    share_aad,
    share_plaintext,
)
from mdm.ops import metrics
from mdm.store.keys import Scope

log = logging.getLogger(__name__)

PUBLIC_FILE = "public-keys.json"
MAX_ANSWER = 64 * 1024


def check_server_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``https://HOST:PORT`` key server URL; ValueError otherwise."""
    u = urlsplit(url)
    if u.scheme != "https" or not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError(f"key server URL must be https://HOST:PORT, got {url!r}")
    try:
        port = u.port or 443
    except ValueError:
        raise ValueError(f"bad port in key server URL {url!r}") from None
    return u.hostname, port


class ServerError(Exception):
    """One key server did not give a usable answer (the message says why)."""


class HttpsPool:
    """JSON over HTTPS to the key servers, verified against one CA; thread-safe."""

    def __init__(self, servers: Sequence[str], ca_file: Path) -> None:
        self.servers = tuple(servers)
        self.addrs = [check_server_url(u) for u in self.servers]
        try:
            self.ssl = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(ca_file, None, f"cannot load the key servers' CA: {e}") from None
        self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._pool = cf.ThreadPoolExecutor(
            max_workers=max(4, 3 * len(self.servers)), thread_name_prefix="mdm-keys"
        )

    def label(self, index: int) -> str:
        """``key server K (host:port)``, for messages."""
        host, port = self.addrs[index - 1]
        return f"key server {index} ({host}:{port})"

    def post(
        self, index: int, path: str, body: dict[str, Any], bearer: str, timeout: float
    ) -> dict[str, Any]:
        """POST to server ``index`` (1-based); ServerError on any failure."""
        try:
            answer = self._post(index, path, body, bearer, timeout)
        except ServerError as e:
            result = (
                "timeout" if "deadline" in str(e) else "refused" if "refused" in str(e) else "error"
            )
            metrics.KEYSERVER_CALLS.labels(str(index), result).inc()
            raise
        metrics.KEYSERVER_CALLS.labels(str(index), "ok").inc()
        return answer

    def _post(
        self, index: int, path: str, body: dict[str, Any], bearer: str, timeout: float
    ) -> dict[str, Any]:
        host, port = self.addrs[index - 1]
        name = self.label(index)
        conn = http.client.HTTPSConnection(host, port, context=self.ssl, timeout=max(timeout, 0.05))
        try:
            conn.request(
                "POST",
                path,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"},
            )
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER + 1)
            status = resp.status
        except TimeoutError:
            raise ServerError(f"{name}: no answer within the deadline") from None
        except ssl.SSLError as e:
            raise ServerError(f"{name}: TLS failed ({e.reason or e})") from None
        except (OSError, http.client.HTTPException) as e:
            raise ServerError(f"{name}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if len(raw) <= MAX_ANSWER else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError(f"{name}: answered garbage (HTTP {status}, not a JSON object)")
        if status != 200:
            err = str(answer.get("error", ""))[:300] or "no reason given"
            raise ServerError(f"{name}: refused (HTTP {status}): {err}")
        return answer

    def gather(
        self,
        calls: dict[int, Callable[[float], Any]],
        deadline: float,
        enough: int,
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """Run ``calls`` (index -> fn(timeout)) in parallel until ``enough`` succeed or the
        deadline passes; ``(results, errors)``. Late calls are abandoned, not awaited."""
        futures = {
            self._pool.submit(fn, max(deadline - time.monotonic(), 0.05)): i
            for i, fn in calls.items()
        }
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        pending = set(futures)
        while pending and len(results) < enough:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = cf.wait(pending, timeout=left, return_when=cf.FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                try:
                    results[i] = f.result()
                except ServerError as e:
                    errors[i] = str(e)
                except (IntegrityError, ValueError, KeyError, TypeError) as e:
                    errors[i] = f"{self.label(i)}: unusable answer ({e})"
        for f in pending:
            i = futures[f]
            f.cancel()
            errors.setdefault(i, f"{self.label(i)}: no answer within the deadline")
        return results, errors

    def close(self) -> None:
        """Stop the worker threads (abandoned requests end at their socket timeout)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class PublicKeys:
    """``public-keys.json``: each server's public scope keys and pseudonym-PRF commitments."""

    scopes: dict[str, dict[int, tuple[str, bytes]]]
    prf: dict[int, bytes]
    """Each server's commitment ``K_i`` to its pseudonym-PRF share."""

    @classmethod
    def load(cls, path: Path) -> PublicKeys:
        """Parse the file (ConfigError naming it)."""
        try:
            d = json.loads(path.read_bytes())
            scopes = {
                str(label): {
                    int(i): (str(v["kid"]), b64d(v["public"])) for i, v in per_server.items()
                }
                for label, per_server in d["scopes"].items()
            }
            commits = {int(i): b64d(c) for i, c in (d.get("prf") or {}).items()}
            return cls(scopes, commits)
        except OSError as e:
            raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(
                path, None, f"malformed public key file ({type(e).__name__})"
            ) from None


def write_public_keys(path: Path, doc: dict[str, Any]) -> None:
    """Write ``public-keys.json`` atomically (0644: it holds public material only)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class KeyServiceProvider:
    """A :class:`~mdm.store.keys.KeyProvider` whose object keys are split across key servers.

    ``token`` returns the raw JWT of the mount's principal (sent to the servers on ``open``,
    ``secret`` and when a scope's public keys must be fetched); ``public_file`` defaults to
    ``public-keys.json`` beside ``ca_file``.
    """

    remote = True

    def __init__(
        self,
        servers: Sequence[str],
        threshold: int,
        ca_file: Path,
        *,
        token: Callable[[], str] | None = None,
        timeout: float = 5.0,
        public_file: Path | None = None,
    ) -> None:
        if not 2 <= threshold <= len(servers):
            raise ValueError("need 2 <= threshold <= number of key servers")
        self.n = len(servers)
        self.threshold = threshold
        self.timeout = timeout
        self._token = token
        self._http = HttpsPool(servers, ca_file)
        self.public_file = public_file or Path(ca_file).parent / PUBLIC_FILE
        self._lock = threading.Lock()
        self._pub_sig: tuple[int, int] | None = None
        self._pub: PublicKeys | None = None
        self._fetched: dict[str, dict[int, tuple[str, bytes]]] = {}
        self._secrets: dict[str, bytes] = {}

    @classmethod
    def from_settings(
        cls, settings: KeySettings, token: Callable[[], str] | None = None
    ) -> KeyServiceProvider:
        """The provider of ``[keys]`` (servers, threshold, ca_file, timeout)."""
        if not settings.servers or settings.ca_file is None:
            raise ValueError("[keys] names no key servers")
        return cls(
            settings.servers,
            settings.threshold,
            settings.ca_file,
            token=token,
            timeout=settings.timeout,
        )

    # -- public keys ------------------------------------------------------------------------
    def _public(self) -> PublicKeys | None:
        """The public key file, re-read whenever it changes (a rotation rewrites it)."""
        try:
            st = self.public_file.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if sig != self._pub_sig:
                self._pub = PublicKeys.load(self.public_file)
                self._pub_sig = sig
            return self._pub

    def _bearer(self) -> str:
        if self._token is None:
            raise KeyUnavailable("the key service needs a token, and this process has none")
        return self._token().strip()

    def _scope_keys(self, label: str) -> dict[int, tuple[str, bytes]]:
        pub = self._public()
        if pub is not None and len(pub.scopes.get(label, {})) == self.n:
            return pub.scopes[label]
        with self._lock:
            got = self._fetched.get(label)
        if got is not None:
            return got
        bearer = self._bearer()

        def fetch(i: int) -> Callable[[float], tuple[str, bytes]]:
            def call(timeout: float) -> tuple[str, bytes]:
                a = self._http.post(i, "/v1/public-key", {"scope": label}, bearer, timeout)
                public = b64d(a["public"])
                if a.get("index") != i or len(public) != 32:
                    raise ServerError(f"key server {i}: wrong public key answer")
                return str(a["kid"]), public

            return call

        deadline = time.monotonic() + self.timeout
        calls = {i: fetch(i) for i in range(1, self.n + 1)}
        results, errors = self._http.gather(calls, deadline, self.n)
        if len(results) < self.n:
            raise KeyUnavailable(
                f"cannot seal in new scope {label}: its public keys are needed from all "
                f"{self.n} key servers and {len(results)} answered ({'; '.join(errors.values())})"
            )
        keys = {i: results[i] for i in range(1, self.n + 1)}
        with self._lock:
            self._fetched[label] = keys
        log.info("fetched public keys of scope %s from %d key servers", label, self.n)
        return keys

    # -- KeyProvider ------------------------------------------------------------------------
    def seal(
        self, identity: bytes, scope: Scope, object_key: bytes, *, resource: Resource | None = None
    ) -> bytes:
        """Split ``object_key`` M-of-N and seal share ``i`` to server ``i`` (no server needed)."""
        label = scope.label()
        keys = self._scope_keys(label)
        ctx = dek_context(identity, label)
        res = resource_to_dict(resource, scope)
        sealed: list[SealedShare] = []
        for i, share in sss.split(object_key, self.threshold, self.n):
            kid, public = keys[i]
            body = seal_to(
                public, share_plaintext(share, res), share_aad(identity, label, i, kid), INFO_SHARE
            )
            sealed.append(SealedShare(i, kid, sss.commit(ctx, i, share), body))
        return SealedKey(self.threshold, sss.commit(ctx, 0, object_key), tuple(sealed)).encode()

    def open(
        self,
        principal: Principal,
        identity: bytes,
        scope: Scope,
        sealed: bytes,
        *,
        resource: Resource | None = None,
    ) -> bytes:
        """Ask the key servers for M shares and combine them in memory; KeyUnavailable if not.

        ``resource`` is not sent: the attributes the servers decide on are the ones sealed
        with each share, so a mount cannot claim others.
        """
        try:
            sk = SealedKey.decode(sealed)
        except IntegrityError as e:
            raise KeyUnavailable(f"cannot open the object key: {e}") from None
        label = scope.label()
        ctx = dek_context(identity, label)
        bearer = self._bearer()

        def ask(s: SealedShare) -> Callable[[float], bytes]:
            def call(timeout: float) -> bytes:
                eph = X25519PrivateKey.generate()
                body = {
                    "identity": b64e(identity),
                    "scope": label,
                    "index": s.index,
                    "kid": s.kid,
                    "sealed": b64e(s.sealed),
                    "reply_key": b64e(public_bytes(eph)),
                }
                a = self._http.post(s.index, "/v1/open", body, bearer, timeout)
                if a.get("index") != s.index:
                    raise ServerError(f"key server {s.index}: answered as server {a.get('index')}")
                share = open_from(
                    eph, b64d(a["share"]), reply_aad(identity, label, s.index), INFO_REPLY
                )
                if sss.commit(ctx, s.index, share) != s.commitment:
                    raise ServerError(
                        f"key server {s.index}: returned a share that is not this object's "
                        "(wrong server or garbage)"
                    )
                return share

            return call

        calls = {s.index: ask(s) for s in sk.shares if 1 <= s.index <= self.n}
        deadline = time.monotonic() + self.timeout
        results, errors = self._http.gather(calls, deadline, sk.threshold)
        if len(results) < sk.threshold:
            raise KeyUnavailable(
                f"object key of {label} not released: {len(results)} of {len(calls)} key "
                f"servers answered with a share, {sk.threshold} needed "
                f"({'; '.join(errors[i] for i in sorted(errors))})"
            )
        try:
            key = sss.combine(sorted(results.items()), sk.threshold)
        except ValueError as e:
            raise KeyUnavailable(f"cannot combine the key shares: {e}") from None
        if sss.commit(ctx, 0, key) != sk.check:
            raise KeyUnavailable("the combined shares do not give this object's key")
        if errors:
            log.warning("key service: %s", "; ".join(errors[i] for i in sorted(errors)))
        return key

    def secret(self, name: str) -> bytes:
        """The secret ``name``, scoped so that nothing beyond this principal's grant leaves
        the key servers:

        - ``catalog``: a random key of this process, never stored nor released. The catalog
          is a cache of C-FIND answers for every study of the federation (PHI of patients
          this principal may not see); under the key service it lives in a private index of
          this process (:meth:`mdm.catalog.records.Catalog.private`), unreadable once it ends.
        - ``pseudonym:SCOPE`` and ``pseudonym:metadata:RULE``: the threshold PRF of the
          servers (:mod:`mdm.keyservice.prf`) on ``deid:SCOPE`` / ``metadata:RULE``, released
          only to a principal granted that scope or rule; kept in memory once combined.
        """
        with self._lock:
            got = self._secrets.get(name)
        if got is not None:
            return got
        if name == "catalog":
            got = os.urandom(32)
        elif name.startswith("pseudonym:metadata:"):
            got = self._pseudonym_key("metadata:" + name[len("pseudonym:metadata:") :])
        elif name.startswith("pseudonym:"):
            got = self._pseudonym_key("deid:" + name[len("pseudonym:") :])
        else:
            raise KeyUnavailable(f"the key service keeps no secret named {name!r}")
        with self._lock:
            return self._secrets.setdefault(name, got)

    def _pseudonym_key(self, label: str) -> bytes:
        pub = self._public()
        if pub is None or len(pub.prf) < self.threshold:
            raise KeyUnavailable(
                f"no pseudonym-key commitments in {self.public_file} (made by an older "
                "'mdm keys init'?)"
            )
        bearer = self._bearer()
        data = label.encode()

        def ask(i: int) -> Callable[[float], bytes]:
            def call(timeout: float) -> bytes:
                eph = X25519PrivateKey.generate()
                a = self._http.post(
                    i,
                    "/v1/pseudonym",
                    {"label": label, "reply_key": b64e(public_bytes(eph))},
                    bearer,
                    timeout,
                )
                got = open_from(eph, b64d(a["partial"]), prf_aad(label, i), INFO_PRF)
                point, proof = got[: prf.POINT_LEN], got[prf.POINT_LEN :]
                if not prf.verify(pub.prf.get(i, b""), data, point, proof):
                    raise ServerError(f"key server {i}: its pseudonym partial fails its proof")
                return point

            return call

        deadline = time.monotonic() + self.timeout
        calls = {i: ask(i) for i in range(1, self.n + 1) if i in pub.prf}
        results, errors = self._http.gather(calls, deadline, self.threshold)
        if len(results) < self.threshold:
            raise KeyUnavailable(
                f"pseudonym key {label} not released: {len(results)} of {self.n} key servers "
                f"answered, {self.threshold} needed ({'; '.join(errors.values())})"
            )
        chosen = dict(sorted(results.items())[: self.threshold])
        return prf.derive(data, prf.combine(chosen))

    def close(self) -> None:
        """Forget the secrets and stop the request threads."""
        with self._lock:
            self._secrets.clear()
        self._http.close()


def provider_for(keys: KeySettings, token_file: Path | None) -> KeyServiceProvider | None:
    """The key-service provider of ``[keys]``, or None if it names no servers (use the keyring).

    ``token_file`` holds the principal's JWT; it is re-read on every request, so a renewed
    token is used at once. Without it, only sealing in scopes of ``public-keys.json`` works.
    """
    if not keys.servers:
        return None

    def token() -> str:
        if token_file is None:
            raise KeyUnavailable("the key service needs a token (--token-file or MDM_TOKEN_FILE)")
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise KeyUnavailable(f"cannot read the token file {token_file}: {e.strerror}") from None

    return KeyServiceProvider.from_settings(keys, token=token if token_file else None)
