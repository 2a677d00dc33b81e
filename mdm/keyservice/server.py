"""One key server: an ASGI app served over TLS by hypercorn on trio.

A mount POSTs the principal's JWT (``Authorization: Bearer``), an object's identity and scope,
and the share sealed to this server. The server verifies the token (``[identity]``), opens the
share with its scope key (the AEAD associated data proves it belongs to that object, scope,
server and key), evaluates the policy (``[policy]``, hot-reloaded) on the resource attributes
sealed with the share, and returns only its share, sealed again to an ephemeral key the client
sent, so it never appears in clear even where TLS is terminated. Every release and refusal is
an audit record. Admin endpoints (a credential made by ``mdm keys init``) drive rotation: the
server re-seals its own shares to a new scope key, so no share ever leaves it in clear.

Endpoints (JSON bodies, JSON answers, ``{"error": "..."}`` on failure):

=====================================  ===========================================
``GET  /v1/health``                    ``{"index": K}``
``POST /v1/public-key``  (token)       ``{"scope"}`` -> ``{"index", "kid", "public"}``
``POST /v1/open``        (token)       ``{"identity", "scope", "index", "kid", "sealed",
                                       "reply_key"}`` -> ``{"index", "share"}``
``POST /v1/pseudonym``   (token)       ``{"label", "reply_key"}`` -> ``{"index", "partial"}``
``POST /v1/admin/rotate/begin``        ``{"scope"}`` -> ``{"old", "kid", "public"}``
``POST /v1/admin/rotate/reseal``       ``{"identity", "scope", "index", "kid", "sealed"}``
                                       -> ``{"kid", "sealed"}``
``POST /v1/admin/rotate/finish``       ``{"scope"}`` -> ``{"kid", "public"}``
``POST /v1/anchor``      (token)       ``{"log", "chain", "seq", "head"}`` -> ``{"index",
                                       "anchor"}`` (mdm.keyservice.anchor)
``POST /v1/anchor/list`` (token)       ``{"log", "after"}`` -> ``{"index", "public",
                                       "anchors", "next"}``
=====================================  ===========================================
"""

from __future__ import annotations

import json
import logging
import re
import time
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from mdm.access.decide import AccessLevel, Resource
from mdm.access.identity import InvalidToken, Principal, TokenVerifier
from mdm.access.views import deid_options
from mdm.audit.log import AuditLog
from mdm.config import IdentitySettings, MetricsSettings, PolicySettings, _Section, metrics_from
from mdm.errors import ConfigError, IntegrityError, UserError
from mdm.keyservice import prf
from mdm.keyservice.anchor import AnchorBook, AnchorConflict, AnchorRequestError, book_path
from mdm.keyservice.seal import open_from, public_bytes, seal_to
from mdm.keyservice.store import KeyStore
from mdm.keyservice.wire import (
    INFO_PRF,
    INFO_REPLY,
    INFO_SHARE,
    PSEUDONYM_LABEL,
    b64d,
    b64e,
    parse_identity,
    parse_scope,
    parse_share_plaintext,
    prf_aad,
    reply_aad,
    resource_from_dict,
    share_aad,
    share_plaintext,
)
from mdm.ops import metrics
from mdm.policy import PolicyResolver
from mdm.policy.model import Rule

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNVERIFIED = Principal(sub="-", issuer="-")
_ADMIN = Principal(sub="keys-admin", issuer="mdm-keys")
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ServerSettings:
    """``server-K.toml``: one key server."""

    path: Path
    index: int
    listen: tuple[str, ...]
    certfile: Path
    keyfile: Path
    keystore: Path
    audit_log: Path
    identity: IdentitySettings
    policy: PolicySettings
    metrics: MetricsSettings | None = None


def load_server_config(path: str | Path) -> ServerSettings:
    """Read ``server-K.toml``; ConfigError naming the file and key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(p, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(p, None, f"cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"TOML syntax error: {e}") from None
    top = _Section(p, "", data, {"server", "identity", "policy", "metrics"})
    s = _Section(
        p,
        "server",
        top.table_("server") or {},
        {"index", "listen", "certfile", "keyfile", "keystore", "audit_log"},
    )
    listen = s.table.get("listen")
    if (
        not isinstance(listen, list)
        or not listen
        or not all(isinstance(x, str) and x for x in listen)
    ):
        raise ConfigError(p, "server.listen", 'expected a list such as ["127.0.0.1:8441"]')
    itab, ptab = top.table_("identity"), top.table_("policy")
    if itab is None:
        raise ConfigError(p, "identity", "missing (required: tokens are verified with it)")
    if ptab is None:
        raise ConfigError(p, "policy", "missing (required: releases follow the policy)")
    i_ = _Section(p, "identity", itab, {"issuer", "audience", "public_keys", "leeway"})
    pol = _Section(p, "policy", ptab, {"dir"})
    return ServerSettings(
        path=p,
        index=s.get_int("index", None, 1, 16),
        listen=tuple(listen),
        certfile=s.path_("certfile"),
        keyfile=s.path_("keyfile"),
        keystore=s.path_("keystore"),
        audit_log=s.path_("audit_log"),
        identity=IdentitySettings(
            issuer=i_.get_str("issuer"),
            audience=i_.get_str("audience"),
            public_keys=i_.path_("public_keys"),
            leeway=i_.duration("leeway", 30.0),
        ),
        policy=PolicySettings(dir=pol.path_("dir")),
        metrics=metrics_from(p, top.table_("metrics")),
    )


class Refused(Exception):
    """A request the server refuses: HTTP status and a clear message (no key material)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _field(body: Mapping[str, Any], name: str) -> Any:
    if name not in body:
        raise Refused(400, f"request lacks {name!r}")
    return body[name]


def _b64_field(body: Mapping[str, Any], name: str) -> bytes:
    try:
        return b64d(_field(body, name))
    except ValueError:
        raise Refused(400, f"{name!r} is not base64") from None


def _needed_level(scope_level: str, view: str) -> AccessLevel:
    # The stricter of the scope's level and the object's view: identified material is never
    # released on a de-identified grant, whichever of the two says "identified".
    if "identified" in (scope_level, view):
        return AccessLevel.IDENTIFIED
    return AccessLevel.DEIDENTIFIED


class KeyServiceApp:
    """The ASGI application of one key server."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.index = settings.index
        self.keys = KeyStore.load(settings.keystore)
        if self.keys.index != settings.index:
            raise ConfigError(
                settings.keystore,
                None,
                f"key store belongs to server {self.keys.index}, not {settings.index}",
            )
        self.verifier = TokenVerifier(settings.identity)
        self.resolver = PolicyResolver(settings.policy.dir, reload_interval=1.0, settle=0.25)
        self.audit = AuditLog(settings.audit_log)
        self.anchors = AnchorBook(
            book_path(settings.keystore, self.index), self.index, self.keys.anchor_key
        )

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """ASGI entry point: lifespan and HTTP."""
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await trio.to_thread.run_sync(self.audit.close)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        status, answer = 200, {}
        endpoint = metrics.endpoint_label(scope["path"])
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > MAX_BODY:
                status, answer = 413, {"error": f"request larger than {MAX_BODY} bytes"}
                break
            if not msg.get("more_body"):
                break
        if status == 200:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            auth = headers.get("authorization", "")
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            handler = partial(self.handle, scope["method"], scope["path"], bearer, body)
            started = time.monotonic()
            status, answer = await trio.to_thread.run_sync(handler)
            metrics.KS_SECONDS.labels(endpoint).observe(time.monotonic() - started)
        metrics.KS_REQUESTS.labels(endpoint, str(status)).inc()
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    def handle(
        self, method: str, path: str, bearer: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Route one request (blocking: runs in a worker thread)."""
        routes: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "/v1/public-key": self._public_key,
            "/v1/open": self._open,
            "/v1/pseudonym": self._pseudonym,
            "/v1/admin/rotate/begin": self._rotate_begin,
            "/v1/admin/rotate/reseal": self._rotate_reseal,
            "/v1/admin/rotate/finish": self._rotate_finish,
            "/v1/anchor": self._anchor,
            "/v1/anchor/list": self._anchor_list,
        }
        try:
            if path == "/v1/health" and method == "GET":
                return 200, {"index": self.index}
            route = routes.get(path)
            if route is None:
                raise Refused(404, f"no such endpoint {path[:64]!r}")
            if method != "POST":
                raise Refused(405, "use POST")
            try:
                req = json.loads(body)
            except ValueError:
                raise Refused(400, "request body is not JSON") from None
            if not isinstance(req, dict):
                raise Refused(400, "request body must be a JSON object")
            return 200, route(bearer, req)
        except Refused as e:
            return e.status, {"error": str(e)}
        except Exception:
            log.exception("key server %d: internal error on %s", self.index, path[:64])
            return 500, {"error": "internal error (see the key server's log)"}

    # -- helpers --------------------------------------------------------------------------
    def _principal(self, bearer: str, action: str, resource: dict[str, str]) -> Principal:
        try:
            return self.verifier.verify(bearer)
        except InvalidToken as e:
            # The reason (expired, unknown key id, ...) stays here: an unauthenticated
            # caller learns nothing about the configured keys or issuers.
            self._audit(_UNVERIFIED, action, "deny", resource, reason=str(e), token=e.code)
            log.info("key server %d: %s refused: %s", self.index, action, e)
            raise Refused(401, f"key server {self.index}: token refused") from None

    def _not_granted(self, principal: Principal, action: str, why: str) -> Refused:
        """A 403 that names neither rule nor level (they are in this server's log and audit)."""
        log.info("key server %d: %s refused to %s: %s", self.index, action, principal.label(), why)
        return Refused(403, f"key server {self.index}: not granted")

    def _grants(self, principal: Principal) -> tuple[Rule, ...]:
        return self.resolver.grants(principal)

    def _audit(
        self,
        principal: Principal,
        action: str,
        decision: str,
        resource: dict[str, str],
        rule: str = "",
        policy: str = "",
        **extra: Any,
    ) -> None:
        extra = {k: (v[:256] if isinstance(v, str) else v) for k, v in extra.items()}
        try:
            self.audit.record(
                principal=principal,
                action=action,
                decision=decision,
                resource=resource,
                rule=rule,
                policy=policy,
                key_server=self.index,
                **extra,
            )
        except Exception:
            metrics.AUDIT_WRITES.labels("failed").inc()
            raise
        metrics.AUDIT_WRITES.labels("ok").inc()

    def _admin(self, bearer: str) -> None:
        if not bearer or not self.keys.check_admin(bearer):
            raise Refused(401, f"key server {self.index}: admin credential refused")

    def _object(
        self, req: dict[str, Any]
    ) -> tuple[bytes, str, str, str, int, str, bytes, dict[str, str]]:
        identity = _b64_field(req, "identity")
        label = _field(req, "scope")
        try:
            scope = parse_scope(label)
            view, sop_uid = parse_identity(identity)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(400, f"bad scope or identity: {e}") from None
        audit_res = {"site": scope.site, "level": scope.level, "view": view[:32]}
        if _UID.match(sop_uid) and len(sop_uid) <= 64:
            audit_res["sop_uid"] = sop_uid
        index, kid = _field(req, "index"), _field(req, "kid")
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(kid, str):
            raise Refused(400, "'index' must be an integer and 'kid' a string")
        sealed = _b64_field(req, "sealed")
        return identity, scope.label(), view, sop_uid, index, kid, sealed, audit_res

    def _unseal(
        self, identity: bytes, label: str, index: int, kid: str, sealed: bytes
    ) -> tuple[bytes, dict[str, Any]]:
        if index != self.index:
            raise Refused(409, f"this is key server {self.index}, not key server {index}")
        private = self.keys.private(label, kid)
        if private is None:
            raise Refused(
                404,
                f"key server {self.index} holds no key {kid[:16]!r} for scope {label} "
                "(never made here, or destroyed by a rotation)",
            )
        try:
            plain = open_from(private, sealed, share_aad(identity, label, index, kid), INFO_SHARE)
            share, res = parse_share_plaintext(plain)
        except (IntegrityError, ValueError):
            raise Refused(
                409,
                f"key server {self.index}: the sealed share does not belong to this object, "
                "scope and server (replayed or damaged material)",
            ) from None
        return share, res

    # -- endpoints ------------------------------------------------------------------------
    def _public_key(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        label = _field(req, "scope")
        try:
            scope = parse_scope(label)
        except ValueError as e:
            raise Refused(400, f"bad scope: {e}") from None
        ares = {"site": scope.site, "level": scope.level}
        principal = self._principal(bearer, "key-public", ares)
        if not self._grants(principal):
            self._audit(principal, "key-public", "deny", ares, "", self.resolver.version())
            raise self._not_granted(principal, "key-public", "no rule names this principal")
        got = self.keys.public(scope.label(), create=True)
        assert got is not None
        return {"index": self.index, "kid": got[0], "public": b64e(got[1])}

    def _open(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        identity, label, view, sop_uid, index, kid, sealed, ares = self._object(req)
        try:
            reply_key = b64d(_field(req, "reply_key"))
            if len(reply_key) != 32:
                raise ValueError("length")
        except ValueError:
            raise Refused(400, "'reply_key' must be a base64 X25519 public key") from None
        principal = self._principal(bearer, "key-release", ares)
        try:
            share, res = self._unseal(identity, label, index, kid, sealed)
            resource: Resource = resource_from_dict(res, sop_uid)
        except Refused as e:
            self._audit(principal, "key-release", "deny", ares, reason=str(e))
            raise
        except ValueError:
            self._audit(principal, "key-release", "deny", ares, reason="malformed attributes")
            raise Refused(409, "sealed resource attributes are malformed") from None
        if resource.study_uid and _UID.match(resource.study_uid):
            ares["study_uid"] = resource.study_uid
        if resource.trial:
            ares["trial"] = resource.trial[:256]
        need = _needed_level(parse_scope(label).level, view)
        decision = self.resolver.decide(principal, resource)
        metrics.POLICY_DECISIONS.labels("object", decision.level.label).inc()
        version = decision.version or self.resolver.version()
        why = ""
        if decision.level < need:
            why = f"{decision.level.label} access by rule {decision.rule}, {need.label} needed"
        elif decision.level < AccessLevel.IDENTIFIED and view.startswith("deid/"):
            # A de-identified copy is released only within the pseudonym scope the decision
            # grants: a grant in scope X must not open (and so link) objects of scope Y.
            granted = deid_options(decision.rule, self.resolver.deid_of(decision.rule))[1]
            if view.split("/")[1] != granted:
                why = f"rule {decision.rule} grants pseudonym scope {granted}, not this object's"
        if why:
            self._audit(
                principal, "key-release", "deny", ares, decision.rule, version, need=need.label
            )
            raise self._not_granted(principal, "key-release", why)
        reply = seal_to(reply_key, share, reply_aad(identity, label, index), INFO_REPLY)
        self._audit(principal, "key-release", "allow", ares, decision.rule, version)
        return {"index": self.index, "share": b64e(reply)}

    def _pseudonym(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        """This server's partial of a pseudonym key (mdm.keyservice.prf), only for a principal
        entitled to that label: ``deid:SCOPE`` to one granted a de-identified view in SCOPE
        (or identified access, which re-identification needs); ``metadata:RULE`` to one that
        rule grants metadata access."""
        label = _field(req, "label")
        if not isinstance(label, str) or not PSEUDONYM_LABEL.match(label):
            raise Refused(400, "'label' must be deid:SCOPE or metadata:RULE")
        try:
            reply_key = b64d(_field(req, "reply_key"))
            if len(reply_key) != 32:
                raise ValueError("length")
        except ValueError:
            raise Refused(400, "'reply_key' must be a base64 X25519 public key") from None
        kind, _, name = label.partition(":")
        ares = {"kind": "pseudonym-key", "level": kind}
        principal = self._principal(bearer, "pseudonym-release", ares)
        ok = False
        for r in self._grants(principal):
            if kind == "metadata":
                ok = r.id == name and r.access == AccessLevel.METADATA
            elif r.access >= AccessLevel.IDENTIFIED:
                ok = True
            elif r.access == AccessLevel.DEIDENTIFIED:
                ok = deid_options(r.id, r.deid)[1] == name
            if ok:
                rule = r.id
                break
        version = self.resolver.version()
        if not ok:
            self._audit(principal, "pseudonym-release", "deny", ares, "", version)
            raise self._not_granted(principal, "pseudonym-release", f"no grant of {label}")
        partial, proof = prf.partial(self.keys.prf_share, label.encode())
        reply = seal_to(reply_key, partial + proof, prf_aad(label, self.index), INFO_PRF)
        self._audit(principal, "pseudonym-release", "allow", ares, rule, version)
        return {"index": self.index, "partial": b64e(reply)}

    def _scope_label(self, req: dict[str, Any]) -> str:
        try:
            label = parse_scope(_field(req, "scope")).label()
        except ValueError as e:
            raise Refused(400, f"bad scope: {e}") from None
        if self.keys.rotation(label) is None:
            raise Refused(404, f"key server {self.index} has no key for scope {label}")
        return label

    def _rotate_begin(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        self._admin(bearer)
        label = self._scope_label(req)
        old, kid, public = self.keys.begin_rotation(label)
        site, level = label.split("/")[:2]
        self._audit(_ADMIN, "rotate-begin", "allow", {"site": site, "level": level}, kid=kid)
        return {"index": self.index, "old": old, "kid": kid, "public": b64e(public)}

    def _rotate_reseal(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        self._admin(bearer)
        identity, label, _, _, index, kid, sealed, _ = self._object(req)
        state = self.keys.rotation(label)
        if state is None or state[1] is None:
            raise Refused(409, f"scope {label} is not being rotated on key server {self.index}")
        new_kid = state[1]
        if kid == new_kid:
            return {"kid": kid, "sealed": b64e(sealed)}
        share, res = self._unseal(identity, label, index, kid, sealed)
        new_private = self.keys.private(label, new_kid)
        assert new_private is not None
        # Re-sealed here, to this server's own new key: the share never leaves in clear.
        out = seal_to(
            public_bytes(new_private),
            share_plaintext(share, res),
            share_aad(identity, label, index, new_kid),
            INFO_SHARE,
        )
        return {"kid": new_kid, "sealed": b64e(out)}

    def _rotate_finish(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        self._admin(bearer)
        label = self._scope_label(req)
        kid, public = self.keys.finish_rotation(label)
        site, level = label.split("/")[:2]
        self._audit(_ADMIN, "rotate-finish", "allow", {"site": site, "level": level}, kid=kid)
        return {"index": self.index, "kid": kid, "public": b64e(public)}

    def _anchor(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        res = {"kind": "audit-anchor"}
        principal = self._principal(bearer, "audit-anchor", res)
        args = (req.get("log"), req.get("chain"), req.get("seq"), req.get("head"))
        try:
            anchor, new = self.anchors.checkpoint(*args)  # type: ignore[arg-type]
        except AnchorRequestError as e:
            raise Refused(400, str(e)) from None
        except AnchorConflict as e:
            self._audit(principal, "audit-anchor", "deny", res, log_id=args[0], reason=str(e))
            raise Refused(409, f"key server {self.index}: {e}") from None
        if new:
            self._audit(
                principal,
                "audit-anchor",
                "allow",
                res,
                log_id=anchor.log,
                chain=anchor.chain,
                anchor_seq=anchor.seq,
                head=anchor.head,
            )
        return {"index": self.index, "anchor": anchor.to_dict()}

    def _anchor_list(self, bearer: str, req: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints are accepted from any valid token (a revoked principal's denials must
        # still be anchored; the answer is a signature over the caller's own checkpoint), but
        # the anchors of a log, like everything a server gives out, need a rule naming the caller.
        res = {"kind": "audit-anchor"}
        principal = self._principal(bearer, "audit-anchor-list", res)
        if not self._grants(principal):
            self._audit(principal, "audit-anchor-list", "deny", res, "", self.resolver.version())
            raise self._not_granted(principal, "audit-anchor-list", "no rule names this principal")
        try:
            page, nxt = self.anchors.list(req.get("log"), req.get("after", 0))  # type: ignore[arg-type]
        except AnchorRequestError as e:
            raise Refused(400, str(e)) from None
        return {
            "index": self.index,
            "public": b64e(self.keys.anchor_public()),
            "anchors": [a.to_dict() for a in page],
            "next": nxt,
        }

    def close(self) -> None:
        """Close the audit log and the anchor book."""
        self.audit.close()
        self.anchors.close()


def serve(settings: ServerSettings) -> None:
    """Run one key server until interrupted (hypercorn on trio, TLS on every listen address)."""
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    for f in (settings.certfile, settings.keyfile):
        if not f.is_file():
            raise ConfigError(settings.path, None, f"TLS file {f} does not exist")
    app = KeyServiceApp(settings)
    cfg = HyperConfig()
    cfg.bind = list(settings.listen)
    cfg.certfile = str(settings.certfile)
    cfg.keyfile = str(settings.keyfile)
    cfg.accesslog = None
    cfg.graceful_timeout = 1.0
    log.info("key server %d listening on %s", settings.index, ", ".join(settings.listen))
    exporter = metrics.serve(settings.metrics.listen if settings.metrics else None, "keyserver")
    try:
        trio.run(partial(hyper_serve, app, cfg, mode="asgi"))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise UserError(f"key server {settings.index}: cannot serve: {e}") from None
    finally:
        if exporter is not None:
            exporter.close()
        app.close()
