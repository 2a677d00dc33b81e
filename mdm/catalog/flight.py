"""Single-flight for trio: one execution per key, however many tasks wait for its result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from mdm.errors import MdmError

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """Run ``fn`` once per key at a time; concurrent callers with the same key share the result.

    The first caller runs ``fn`` in its own task; if it is cancelled, the waiters get the
    cancellation as an error and the next caller starts afresh.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        """True while a call for ``key`` runs."""
        return key in self._calls

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        """The result of ``fn()``, run once for all concurrent callers of ``key``."""
        call = self._calls.get(key)
        if call is not None:
            await call.done.wait()
            if isinstance(call.error, trio.Cancelled):
                # A Cancelled must never escape its own cancel scope: tell waiters plainly.
                raise MdmError("the operation was interrupted; try again")
            if call.error is not None:
                raise call.error
            return call.result  # type: ignore[return-value]
        call = _Call()
        self._calls[key] = call
        try:
            call.result = await fn()
            return call.result
        except BaseException as e:
            call.error = e
            raise
        finally:
            del self._calls[key]
            call.done.set()
