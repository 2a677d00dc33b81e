"""Reading a policy directory: parse, validate (every problem at ``file:line``), compile.

Line numbers. ``tomllib`` reports a line only for syntax errors; the parsed document carries
none. The loader therefore scans the source text itself (:class:`SourceMap`): string contents
and comments are blanked first (so a key named in a description or a comment is never taken
for the key), table headers are indexed, the n-th ``[[allow]]`` / ``[[deny]]`` header opens the
n-th rule's block (which runs to the next header that is not one of its own sub-tables such as
``[allow.deid]``), and a key is found in that block by its name followed by ``=``, ``.`` or
``]``, which covers plain keys, inline tables (``principals = { groups = [...] }``), dotted
keys (``principals.groups = [...]``) and sub-table headers (``[allow.principals]``). A nested
key (``resources`` then ``modalities``) is searched from where its parent was found. When a key
cannot be located (unusual formatting) the message points at the rule's header, and when the
rules are not written as ``[[...]]`` headers at all, at the array's key.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from mdm.access.decide import AccessLevel
from mdm.access.identity import RESERVED_CLAIMS
from mdm.policy.evaluate import Policy, normalize_now
from mdm.policy.model import Advice, Effect, PolicyError, Problem, Rule

TESTS_SUBDIR = "tests"
RULE_KINDS: tuple[Effect, ...] = ("allow", "deny")
_RULE_KEYS = {
    "allow": {"id", "description", "principals", "resources", "access", "expires", "deid"},
    "deny": {"id", "description", "principals", "resources", "expires"},
}
_PRINCIPAL_KEYS = {"subjects", "groups", "issuers", "claims"}
_RESOURCE_KEYS = {"sites", "patient_ids", "study_uids", "trial", "modalities", "study_dates"}
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*(\]\]?)\s*$")
_SYNTAX_AT_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


# ---------------------------------------------------------------------------- source map
def _code_lines(text: str) -> list[str]:
    """Each source line with string contents blanked and comments removed (columns kept)."""
    out: list[str] = []
    state: str | None = None  # the open quote: ", ', """ or '''
    for raw in text.split("\n"):
        if state in ('"', "'"):
            state = None  # a single-line string cannot span lines (tomllib reported it)
        buf: list[str] = []
        i = 0
        while i < len(raw):
            c = raw[i]
            if state is None:
                if c == "#":
                    break
                if raw.startswith('"""', i) or raw.startswith("'''", i):
                    state = raw[i : i + 3]
                    buf.append(state)
                    i += 3
                elif c in "\"'":
                    state = c
                    buf.append(c)
                    i += 1
                else:
                    buf.append(c)
                    i += 1
            elif state in ('"', '"""') and c == "\\":
                buf.append("  ")
                i += 2
            elif raw.startswith(state, i):
                buf.append(state)
                i += len(state)
                state = None
            else:
                buf.append(" ")
                i += 1
        out.append("".join(buf))
    return out


@dataclass(frozen=True)
class Block:
    """Lines ``[start, end)`` (0-based) of one array-of-tables entry; ``line`` is 1-based."""

    start: int
    end: int
    line: int


class SourceMap:
    """Finds the line of a key in a TOML source (see the module docstring for the approach)."""

    def __init__(self, text: str) -> None:
        self.code = _code_lines(text)
        self.headers: list[tuple[int, str, bool]] = []
        for i, line in enumerate(self.code):
            m = _HEADER_RE.match(line)
            if m and len(m.group(1)) == len(m.group(3)):
                self.headers.append((i, m.group(2), len(m.group(1)) == 2))
        first = self.headers[0][0] if self.headers else len(self.code)
        self._top = Block(0, first, 1)

    def top_key(self, key: str) -> int:
        """The line of a top-level key (or of a table header of that name)."""
        for i, name, _ in self.headers:
            if name == key or name.startswith(key + "."):
                return i + 1
        return self.find(self._top, (key,))

    def block(self, kind: str, n: int) -> Block:
        """The block of the n-th (0-based) ``[[kind]]`` entry."""
        starts = [i for i, name, arr in self.headers if arr and name == kind]
        if n >= len(starts):
            line = self.top_key(kind)
            return Block(0, len(self.code), line)
        start = starts[n]
        end = len(self.code)
        for i, name, _ in self.headers:
            if i > start and not name.startswith(kind + "."):
                end = i
                break
        return Block(start, end, start + 1)

    def find(self, block: Block, path: Iterable[str]) -> int:
        """The 1-based line of ``path`` (nested keys) in ``block``; the closest parent if lost."""
        line, col = block.start, 0
        found = block.line
        for comp in path:
            pat = re.compile(r"(?:^|[\s{,.\[])" + re.escape(comp) + r"\s*(?:=|\.|\])")
            hit = None
            for i in range(line, block.end):
                m = pat.search(self.code[i], col if i == line else 0)
                if m:
                    hit = (i, m.end())
                    break
            if hit is None:
                return found
            line, col = hit
            found = line + 1
        return found


# ---------------------------------------------------------------------------- validation
class Checker:
    """Collects problems of one block of one file, each located by a key path."""

    def __init__(
        self,
        file: str,
        smap: SourceMap,
        block: Block,
        errors: list[Problem],
        warnings: list[Problem],
    ) -> None:
        self.file, self.smap, self.block = file, smap, block
        self.errors, self.warnings = errors, warnings

    def line(self, *path: str) -> int:
        return self.smap.find(self.block, path) if path else self.block.line

    def err(self, path: tuple[str, ...], message: str) -> None:
        self.errors.append(Problem(self.file, self.line(*path), message))

    def warn(self, path: tuple[str, ...], message: str) -> None:
        self.warnings.append(Problem(self.file, self.line(*path), message))

    def advise(self, path: tuple[str, ...], message: str) -> None:
        self.warnings.append(Advice(self.file, self.line(*path), message))

    def unknown_keys(
        self, table: dict[str, Any], allowed: Collection[str], prefix: tuple[str, ...], what: str
    ) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, list(allowed), n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                self.err(
                    (*prefix, key),
                    f"unknown key {_dotted(*prefix, key)!r} in {what}"
                    f" (allowed: {', '.join(sorted(allowed))}){did}",
                )

    def table(self, value: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(path, f"{_dotted(*path)} must be a table, not {_tname(value)}")
            return None
        return value

    def string(self, value: Any, path: tuple[str, ...]) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"{_dotted(*path)} must be a string, not {_tname(value)}")
            return None
        return value

    def strings(
        self, value: Any, path: tuple[str, ...], *, scalar_ok: bool = False
    ) -> frozenset[str] | None:
        """A non-empty list of non-empty strings (or one string when ``scalar_ok``)."""
        name = _dotted(*path)
        if scalar_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            kind = "a string or a list of strings" if scalar_ok else "a list of strings"
            self.err(path, f"{name} must be {kind}, not {_tname(value)}")
            return None
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            self.err(path, f"{name} must hold non-empty strings only (found {_tname(bad[0])})")
            return None
        if not value:
            self.err(path, f"{name} is empty: the rule can never match")
            return None
        return frozenset(v.strip() for v in value)


def _dotted(*path: str) -> str:
    return ".".join(path)


def _tname(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else "a string"
    if isinstance(v, datetime):
        return "a datetime"
    names = {int: "an integer", float: "a float", list: "a list", dict: "a table", date: "a date"}
    return names.get(type(v), type(v).__name__)


def _date_value(ck: Checker, value: Any, path: tuple[str, ...]) -> date | None:
    """A TOML date, or a ``YYYY-MM-DD`` string."""
    if isinstance(value, datetime):
        ck.err(path, f"{_dotted(*path)} must be a date (YYYY-MM-DD), not a datetime")
        return None
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            if len(value.strip()) == 10:  # fromisoformat also takes 20240101; be strict
                return date.fromisoformat(value.strip())
        except ValueError:
            pass
        ck.err(path, f"{_dotted(*path)}: bad date {value!r} (expected YYYY-MM-DD)")
        return None
    ck.err(path, f"{_dotted(*path)} must hold dates (YYYY-MM-DD), not {_tname(value)}")
    return None


def _expiry(ck: Checker, value: Any) -> tuple[datetime | None, str]:
    """The first instant the rule no longer applies, and the text explain shows."""
    if isinstance(value, datetime):
        at = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return at, value.isoformat()
    if isinstance(value, date):
        # A date means "valid through that day" (UTC): ignored from the next midnight on.
        at = datetime(value.year, value.month, value.day, tzinfo=UTC) + timedelta(days=1)
        return at, value.isoformat()
    if isinstance(value, str):
        ck.err(("expires",), f"expires must be a TOML date, written without quotes: {value}")
    else:
        ck.err(("expires",), f"expires must be a TOML date or datetime, not {_tname(value)}")
    return None, ""


def _check_deid(ck: Any, table: dict[str, Any], access: AccessLevel) -> None:
    """Validate ``[allow.deid]``: the options of mdm.deid.DeidOptions plus ``scope``."""
    from mdm.deid import DeidOptions

    if access != AccessLevel.DEIDENTIFIED:
        ck.warn(("deid",), "[allow.deid] only applies to access = 'deidentified'")
    known = set(DeidOptions.__dataclass_fields__) | {"scope"}
    for key, value in table.items():
        if key not in known:
            ck.err(
                ("deid", key),
                f"unknown de-identification option (known: {', '.join(sorted(known))})",
            )
        elif key == "scope":
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
                ck.err(("deid", key), "scope: 1-64 letters, digits, '.', '_' or '-'")
        elif key == "retain_longitudinal":
            if value not in ("off", "full", "offset"):
                ck.err(("deid", key), "retain_longitudinal must be 'off', 'full' or 'offset'")
        elif not isinstance(value, bool):
            ck.err(("deid", key), f"{key} must be true or false")


def _principals(ck: Checker, value: Any, kw: dict[str, Any]) -> None:
    tab = ck.table(value, ("principals",))
    if tab is None:
        return
    ck.unknown_keys(tab, _PRINCIPAL_KEYS, ("principals",), "principals")
    for key in ("subjects", "groups", "issuers"):
        if key in tab:
            kw[key] = ck.strings(tab[key], ("principals", key))
    if "claims" in tab:
        claims = ck.table(tab["claims"], ("principals", "claims"))
        if claims is not None:
            out: list[tuple[str, frozenset[str]]] = []
            for name, v in claims.items():
                if name in RESERVED_CLAIMS:
                    what = {"sub": "subjects", "iss": "issuers", "groups": "groups"}.get(name)
                    use = f"; use principals.{what}" if what else ""
                    ck.err(
                        ("principals", "claims", name),
                        f"claim {name!r} is not matched through claims: the rule can never "
                        f"match{use}",
                    )
                    continue
                vals = ck.strings(v, ("principals", "claims", name), scalar_ok=True)
                if vals is not None:
                    out.append((name, vals))
            kw["claims"] = tuple(sorted(out))


def _resources(ck: Checker, value: Any, kw: dict[str, Any]) -> None:
    tab = ck.table(value, ("resources",))
    if tab is None:
        return
    ck.unknown_keys(tab, _RESOURCE_KEYS, ("resources",), "resources")
    for key in ("sites", "patient_ids", "study_uids"):
        if key in tab:
            kw[key] = ck.strings(tab[key], ("resources", key))
    if "trial" in tab:
        kw["trials"] = ck.strings(tab["trial"], ("resources", "trial"), scalar_ok=True)
    if "modalities" in tab:
        mods = ck.strings(tab["modalities"], ("resources", "modalities"))
        kw["modalities"] = frozenset(m.upper() for m in mods) if mods is not None else None
    if "study_dates" in tab:
        path = ("resources", "study_dates")
        v = tab["study_dates"]
        if not isinstance(v, list) or len(v) != 2:
            ck.err(path, 'study_dates must be a range of two dates: ["YYYY-MM-DD", "YYYY-MM-DD"]')
            return
        lo, hi = (_date_value(ck, d, path) for d in v)
        if lo is not None and hi is not None:
            if lo > hi:
                ck.err(
                    path, f"study_dates range is reversed ({lo} > {hi}): the rule can never match"
                )
            else:
                kw["study_dates"] = (lo, hi)


MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM "
    "HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV "
    "OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD "
    "RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC".split()
)
"""Modality defined terms (DICOM PS3.3 C.7.3.1.1.1)."""
_FAIL_OPEN = {
    "trial": "ClinicalTrialProtocolID",
    "modalities": "Modality / ModalitiesInStudy",
    "study_dates": "StudyDate",
}


def _lint(ck: Checker, kind: Effect, tab: Any, kw: dict[str, Any], access: AccessLevel) -> None:
    """Warnings about rules that are valid but likely not what their author meant."""
    res = tab.get("resources") if isinstance(tab, dict) else None
    res = res if isinstance(res, dict) else {}
    for m in sorted(kw.get("modalities") or ()):
        if m not in MODALITIES:
            hint = difflib.get_close_matches(m, sorted(MODALITIES), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            ck.advise(("resources", "modalities"), f"modality {m!r} is not a DICOM modality{did}")
    if kind == "deny":
        for key, attr in _FAIL_OPEN.items():
            if key in res:
                ck.advise(
                    ("resources", key),
                    f"a deny on {key} does not apply to objects without {attr}: it fails open "
                    "where the PACS leaves that attribute empty (deny on sites or patient_ids, "
                    "or allow narrowly instead)",
                )
    if kind == "allow" and access == AccessLevel.IDENTIFIED:
        if not res:
            ck.advise((), "identified access with no resources: every patient of every site")
        if not kw.get("issuers"):
            ck.advise(
                ("principals",),
                "identified access without issuers: any trusted issuer's token with these "
                "names or groups is granted it",
            )
    text = tab.get("access") if isinstance(tab, dict) else None
    if isinstance(text, str) and text != text.strip().lower():
        ck.advise(
            ("access",), f"access {text!r}: write it in lower case ({text.strip().lower()!r})"
        )


def compile_rule(
    ck: Checker,
    kind: Effect,
    raw: Any,
    now: datetime,
    known_sites: Collection[str] | None,
) -> Rule | None:
    """Validate one rule table; the compiled rule, or None if it has errors."""
    n_errors = len(ck.errors)
    tab = ck.table(raw, ())
    if tab is None:
        return None
    ck.unknown_keys(tab, _RULE_KEYS[kind], (), f"[[{kind}]]")
    kw: dict[str, Any] = {}
    rule_id = ck.string(tab["id"], ("id",)) if "id" in tab else None
    if "id" not in tab:
        ck.err((), f"[[{kind}]] without id (every rule needs a unique id)")
    elif rule_id is not None and not _ID_RE.fullmatch(rule_id):
        ck.err(("id",), f"id {rule_id!r}: use letters, digits and . _ : @ - only")
    if "description" in tab:
        kw["description"] = ck.string(tab["description"], ("description",)) or ""
    before_principals = len(ck.errors)
    if "principals" in tab:
        _principals(ck, tab["principals"], kw)
    if "resources" in tab:
        _resources(ck, tab["resources"], kw)
    access = AccessLevel.NONE
    if kind == "allow":
        if "access" not in tab:
            ck.err((), "[[allow]] without access (none, metadata, deidentified, identified)")
        elif (text := ck.string(tab["access"], ("access",))) is not None:
            try:
                access = AccessLevel.parse(text)
            except ValueError as e:
                ck.err(("access",), str(e))
            else:
                if access == AccessLevel.NONE:
                    ck.warn(("access",), "access = 'none' grants nothing (default deny)")
        # An allow for "everyone" is never what a reviewer expects to read: it must at least
        # name an issuer. (A deny without principals is fine: it applies to everyone.)
        named = any(kw.get(k) for k in ("subjects", "groups", "issuers", "claims"))
        if not named and len(ck.errors) == before_principals:
            ck.err(
                ("principals",) if "principals" in tab else (),
                "[[allow]] without principals would grant every principal: name subjects, "
                "groups, issuers or claims",
            )
        if "deid" in tab and ck.table(tab["deid"], ("deid",)) is not None:
            kw["deid"] = dict(tab["deid"])
            _check_deid(ck, kw["deid"], access)
    elif "access" in tab:
        ck.err(("access",), "a deny takes no access (its effect is always none)")
    if "expires" in tab:
        kw["expires"], kw["expires_text"] = _expiry(ck, tab["expires"])
        if kw["expires"] is not None and now >= kw["expires"]:
            ck.warn(("expires",), f"rule {rule_id} expired on {kw['expires_text']}: it is ignored")
    if known_sites is not None and kw.get("sites"):
        for s in sorted(kw["sites"] - set(known_sites)):
            hint = difflib.get_close_matches(s, list(known_sites), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            ck.warn(("resources", "sites"), f"site {s!r} is not a configured site{did}")
    _lint(ck, kind, tab, kw, access)
    if len(ck.errors) > n_errors or rule_id is None:
        return None
    return Rule(id=rule_id, effect=kind, access=access, file=ck.file, line=ck.block.line, **kw)


# ---------------------------------------------------------------------------- files
def read_toml(
    path: Path, label: str, errors: list[Problem]
) -> tuple[dict[str, Any], SourceMap] | None:
    """Parse one file; a syntax error becomes a ``file:line`` problem."""
    try:
        data = path.read_bytes()
    except OSError as e:
        errors.append(Problem(label, 0, f"cannot read: {e.strerror or e}"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.append(Problem(label, data[: e.start].count(b"\n") + 1, "not UTF-8 text"))
        return None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _SYNTAX_AT_RE.search(msg)
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            msg = msg[: m.start()]
        else:  # "(at end of document)"
            line, col = max(1, len(text.rstrip().splitlines())), 0
            msg = msg.replace("(at end of document)", "at end of file").strip()
        where = f" (column {col})" if col else ""
        if "Invalid date" in msg and 0 < line <= len(text.splitlines()):
            bad = _date_problem(text.splitlines()[line - 1])
            if bad:
                errors.append(Problem(label, line, bad))
                return None
        errors.append(Problem(label, line, f"TOML syntax error: {msg}{where}"))
        return None
    return doc, SourceMap(text)


def _date_problem(line: str) -> str | None:
    """What is wrong with a date on a line the TOML parser refused (e.g. 2024-02-30)."""
    for m in re.finditer(r"\d{4}-\d{2}-\d{2}", line):
        try:
            date.fromisoformat(m.group(0))
        except ValueError as e:
            return f"{m.group(0)} is not a calendar date ({e}); write YYYY-MM-DD"
    return None


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory: ``*.toml`` directly in it, sorted by name."""
    return sorted(p for p in directory.glob("*.toml") if p.is_file())


def snapshot(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, mtimes and sizes of the policy files: a change means "reload"."""
    out = []
    for p in policy_files(directory):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_policy(
    directory: Path,
    *,
    now: datetime | date | None = None,
    known_sites: Collection[str] | None = None,
) -> Policy:
    """Load and validate every ``*.toml`` directly in ``directory`` (``tests/`` excluded).

    Raises :class:`PolicyError` listing every error found; warnings (expired rules, unknown
    sites, an empty directory) are kept in ``Policy.warnings``.
    """
    t = normalize_now(now)
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError(directory, [Problem(str(directory), 0, "not a directory")])
    errors: list[Problem] = []
    warnings: list[Problem] = []
    rules: list[Rule] = []
    seen: dict[str, str] = {}  # rule id -> file:line of its first definition
    digest = hashlib.sha256()
    files = policy_files(directory)
    for path in files:
        label = str(path)
        try:
            content = path.read_bytes()
        except OSError:
            content = b""
        digest.update(f"{path.name}\0{len(content)}\0".encode())
        digest.update(content)
        parsed = read_toml(path, label, errors)
        if parsed is None:
            continue
        doc, smap = parsed
        for key in doc:
            if key not in RULE_KINDS:
                hint = difflib.get_close_matches(key, list(RULE_KINDS), n=1)
                did = f"; did you mean [[{hint[0]}]]?" if hint else ""
                errors.append(
                    Problem(
                        label,
                        smap.top_key(key),
                        f"unknown key {key!r} (a policy file holds [[allow]] and [[deny]] "
                        f"rules only){did}",
                    )
                )
        for kind in RULE_KINDS:
            if kind not in doc:
                continue
            entries = doc[kind]
            if not isinstance(entries, list):
                errors.append(
                    Problem(
                        label, smap.top_key(kind), f"write each rule as [[{kind}]], not [{kind}]"
                    )
                )
                continue
            for n, raw in enumerate(entries):
                ck = Checker(label, smap, smap.block(kind, n), errors, warnings)
                rule = compile_rule(ck, kind, raw, t, known_sites)
                rid = raw.get("id") if isinstance(raw, dict) else None
                if isinstance(rid, str):
                    if rid in seen:
                        ck.err(("id",), f"duplicate rule id {rid!r} (first defined at {seen[rid]})")
                        continue
                    seen[rid] = f"{label}:{ck.line('id')}"
                if rule is not None:
                    rules.append(rule)
    if errors:
        raise PolicyError(directory, errors)
    if not files:
        warnings.append(Problem(str(directory), 0, "no *.toml policy files: everything is denied"))
    return Policy(
        directory=str(directory),
        version=digest.hexdigest()[:16],
        rules=tuple(rules),
        files=tuple(p.name for p in files),
        warnings=tuple(warnings),
    )
