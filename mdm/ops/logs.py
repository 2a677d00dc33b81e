"""Log formats of the ``mdm`` command: human lines (the default) and JSON lines for shippers.

The library only logs (``logging.getLogger(__name__)``); the command picks the format with
``mdm --log-format human|json`` (or ``$MDM_LOG_FORMAT``). The choice is kept in that
environment variable, so that the processes the command starts (the background mount daemon,
the receiver process) log in the same format.

A JSON line has these keys, always all of them, in this order:

``time``       ISO 8601 in UTC with milliseconds, ``2026-12-01T12:22:14.570Z``
``level``      ``DEBUG`` | ``INFO`` | ``WARNING`` | ``ERROR`` | ``CRITICAL``
``logger``     the logger's name (``mdm.retrieval.fetcher``, ``pynetdicom.assoc``, ...)
``process``    ``null`` in the command's own process, ``"receiver"`` in the receiver process
``event``      the message before its arguments were filled in: the same for every record
               of one kind (``"site %s: C-FIND ended with %s"``), a key to count and alert on
``message``    the message as the human format prints it
``site``       the site the record is about, or ``null``
``uid``        the study, series or instance UID the record is about, or ``null``
``error``      ``"ExceptionType: text"`` of the record's exception (``exc_info``, or else an
               exception among the arguments), or ``null``

and ``traceback`` only when an exception is attached. ``site`` and ``uid`` come from
``extra={"site": ..., "uid": ...}``; without it, ``site`` is the argument that follows
``site `` in the message (``log.info("site %s: ...", site.name)``, the convention of the code
base). Both formats render the same records: a JSON line carries nothing that the human line
does not, and neither carries patient data (names, patient IDs, dates of birth; see the tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import traceback
from datetime import UTC, datetime
from typing import Any

ENV = "MDM_LOG_FORMAT"
FORMATS = ("human", "json")
HUMAN = "%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"

# One printf conversion of a %-style message (flags, width, precision, length, type).
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([a-zA-Z%])")
_SITE_BEFORE = re.compile(r"\bsite $")


def current_format() -> str:
    """The format chosen for this process and its children (``human`` unless set)."""
    fmt = os.environ.get(ENV, "human").strip().lower()
    return fmt if fmt in FORMATS else "human"


def make_formatter(fmt: str, process: str | None = None) -> logging.Formatter:
    """The formatter of ``fmt``; ``process`` names a helper process (``receiver``)."""
    if fmt == "json":
        return JsonFormatter(process)
    return logging.Formatter(HUMAN.format(tag=f"[{process}]" if process else ""))


def configure(
    level: int | str, handler: logging.Handler, fmt: str, process: str | None = None
) -> None:
    """Send every record at ``level`` or above to ``handler`` only, in format ``fmt``.

    pynetdicom logs every association at INFO, and its failures again in its own words: at
    DEBUG only (the bridge names each failure and its site). pydicom quotes invalid
    values word for word in its warnings, which is patient data: its errors only.
    """
    handler.setFormatter(make_formatter(fmt, process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # pynetdicom's own errors ("Association request failed ...") repeat what the bridge says
    # of the same failure in its own words, naming the site: kept for DEBUG only.
    pnd = logging.CRITICAL if root.level > logging.DEBUG else logging.DEBUG
    logging.getLogger("pynetdicom").setLevel(pnd)
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def site_of(record: logging.LogRecord) -> str | None:
    """The site a record is about: ``extra={"site": ...}``, or the argument after ``site ``."""
    site = getattr(record, "site", None)
    if site is not None:
        return str(site)
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return None
    i = 0
    for m in _CONVERSION.finditer(record.msg):
        if m.group(1) == "%":
            continue
        if "*" in m.group(0):  # a width or precision taken from the arguments: give up
            return None
        if _SITE_BEFORE.search(record.msg, 0, m.start()) and i < len(record.args):
            return str(record.args[i])
        i += 1
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the keys listed in the module docstring."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "event": str(record.msg),
            "message": record.getMessage(),
            "site": site_of(record),
            "uid": getattr(record, "uid", None),
            "error": None,
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = "".join(traceback.format_exception(exc)).rstrip()
        elif record.exc_text:
            out["traceback"] = record.exc_text
        elif isinstance(record.args, tuple):
            # "retrieval from site %s failed: %s", name, e: the error is an argument.
            errors = [a for a in record.args if isinstance(a, BaseException)]
            if errors:
                out["error"] = f"{type(errors[-1]).__name__}: {errors[-1]}"
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)
