"""Domain exceptions of the bridge.

Each exception carries the errno that the FUSE adapter reports for it; the mapping lives here,
in one place, so every front end agrees on it (ENOENT for anything not visible, EACCES for
visible-but-not-readable, ETIMEDOUT for a missed network deadline, EIO for PACS and integrity
failures).
"""

from __future__ import annotations

import errno


class MdmError(Exception):
    """Base class of every error the bridge raises on purpose."""

    errno: int = errno.EIO


class UserError(MdmError):
    """An error caused by the user's input; the CLI prints it without a traceback."""

    exit_code: int = 1


class UsageError(UserError):
    """A command line that asks for something that does not exist (a misspelt key, an unknown
    site): exit code 2, like a configuration error."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file is missing, malformed or holds a wrong key or value."""

    exit_code = 2

    def __init__(self, path: object, key: str | None, message: str) -> None:
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {message}")


class NotFound(MdmError):
    """The object does not exist, or is not visible to this principal (never tell which)."""

    errno = errno.ENOENT


class AccessDenied(MdmError):
    """The object is visible but this principal may not read its content."""

    errno = errno.EACCES


class ReadOnly(MdmError):
    """Any attempt to modify the namespace."""

    errno = errno.EROFS


class RetrieveTimeout(MdmError):
    """A network deadline passed while talking to a PACS."""

    errno = errno.ETIMEDOUT


class RetrieveError(MdmError):
    """A PACS refused, failed or delivered less than it announced."""

    errno = errno.EIO


class IntegrityError(MdmError):
    """A cached object failed authentication (tampered, truncated, reordered) or is malformed."""

    errno = errno.EIO


class StoreFull(MdmError):
    """The cache cannot make room for an object (every candidate is in use, or disk full)."""

    errno = errno.ENOSPC


class KeyUnavailable(MdmError):
    """A key could not be found, opened or released."""

    errno = errno.EACCES
