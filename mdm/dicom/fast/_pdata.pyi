"""Type stub of the compiled receive loop (``_pdata.pyx``)."""

CONTINUE: int
MESSAGE: int
COMMAND: int
OTHER: int
FALLBACK: int
IDLE: int
WAKE: int
CLOSED: int
VIOLATION: int
PENDING: int

CommandFields = tuple[str, str, int, int | None, str | None, int | None]

class Message:
    """A received data set as a read-only buffer (its Part-10 prefix first)."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Reader:
    head: bytes
    command: CommandFields | None
    context_id: int
    problem: str
    last_pdu: float
    pdus: int
    pending_id: int
    def __init__(self, max_pdu: int, max_message: int = ...) -> None: ...
    @property
    def in_progress(self) -> bool: ...
    @property
    def body(self) -> bytes: ...
    def pump(self, fd: int, wake_fd: int, wait: float, stall: float) -> int: ...
    def begin(self, prefix: bytes) -> int: ...
    def decline(self) -> bytes: ...
    def take(self) -> tuple[int, CommandFields, Message]: ...

def store_response_pdu(
    context_id: int, sop_class: str, sop_instance: str, message_id: int, status: int
) -> bytes: ...
