# cython: language_level=3
# cython: boundscheck=True, wraparound=True, initializedcheck=True
"""The compiled receive loop of the fast path: P-DATA-TF PDUs read from the socket, their
presentation data value items reassembled and the C-STORE-RQ command set read in C, so that
Python sees one call per received object instead of several per PDU.

Within an object the loop runs without the GIL (Python runs when a message starts and when it
is complete), and the data set is reassembled into one buffer handed over as a
:class:`Message`, without a copy.

Every byte read here comes from a peer that may be hostile. Every access to a received byte
is bounds-checked: with the GIL held through the helpers below (``_u8``, ``_le16``,
``_le32``, ``_be32``), which raise on an offset outside the data read; without it, by a
``_within`` check before the read, which ends the message as a violation (a bug here becomes
an aborted association, never a read out of bounds). The limits are those of the Python fast
path (docs/DICOM.md, Limits).
Anything this loop does not handle is handed back to the Python fast path unchanged: a PDU
that is not a P-DATA-TF (its header, already read, is in ``Reader.head``), a P-DATA-TF whose
first item is not a whole C-STORE-RQ command set with a data set (its body, in
``Reader.body``), and any state but data transfer (the caller checks that).
"""

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint32_t, int64_t
from libc.errno cimport errno, EINTR

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    enum:
        MSG_DONTWAIT

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *tp)
    enum:
        CLOCK_MONOTONIC

cdef extern from *:
    """
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <sys/socket.h>
    #include <errno.h>
    static int mdm_would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }
    static void mdm_quickack(int fd) {
    #ifdef TCP_QUICKACK
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
    #else
        (void)fd;
    #endif
    }
    """
    void mdm_quickack(int fd) nogil
    int mdm_would_block(int e) nogil

# Results of Reader.pump / Reader.begin (C constants, also the module's Python names).
cpdef enum:
    # begin(): the object goes on in the next PDUs (call pump).
    CONTINUE = 0
    # A C-STORE-RQ and its whole data set: ``take()``.
    MESSAGE = 1
    # A C-STORE-RQ command set was read (``command``): ``begin(part10_header)`` or ``decline()``.
    COMMAND = 2
    # The next PDU is not a P-DATA-TF: its 6-byte header is in ``head``, its body unread.
    OTHER = 3
    # A P-DATA-TF this loop does not handle, no object in progress: its body is in ``body``.
    FALLBACK = 4
    # Nothing more arrived at a PDU boundary within the wait.
    IDLE = 5
    # Another thread woke the reactor (its wake-up pipe is readable) at a PDU boundary.
    WAKE = 6
    # The connection ended or stalled (``problem`` says which, with no peer byte).
    CLOSED = 7
    # The peer broke a limit or the protocol (``problem``, with no peer byte): abort.
    VIOLATION = 8
    # A pending C-MOVE/C-GET response holding nothing but its sub-operation counts, alone in
    # its PDU (``pending_id``): ``decline()`` to drop it, or to hand its PDU to Python.
    PENDING = 9

cdef uint32_t NO_DATA_SET = 0x0101
cdef size_t FIRST_CHUNK = 1 << 16

# Command elements of a C-STORE-RQ (PS3.7 9.3.1.1), as bits of a seen-mask.
cdef enum:
    E_LENGTH = 1
    E_CLASS = 2
    E_FIELD = 4
    E_ID = 8
    E_PRIORITY = 16
    E_DSTYPE = 32
    E_INSTANCE = 64
    E_MOVE_AE = 128
    E_MOVE_ID = 256


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Why a read stopped, set where the GIL is not held and turned into ``Reader.problem`` after.
cdef enum:
    WHY_NONE = 0
    WHY_CLOSED_MID_PDU = 1
    WHY_CONNECTION = 2
    WHY_STALLED = 3
    WHY_PDU_SIZE = 4
    WHY_ITEMS = 5
    WHY_COMMAND_IN_DATA = 6
    WHY_MESSAGE_SIZE = 7
    WHY_AFTER_END = 8
    WHY_BOUNDS = 9
    WHY_MEMORY = 10

cdef enum:
    _NEED_COMMAND = 100
"""Internal: a P-DATA-TF that starts a message was read (its command set is parsed with the
GIL held)."""

cdef size_t HINT_CAP = 64 << 20
"""The largest first allocation for a data set (the size of the previous one, at most this)."""


cdef inline bint _within(size_t off, size_t n, size_t length) noexcept nogil:
    """``[off, off + n)`` lies inside ``length`` bytes (no overflow)."""
    return off + n >= off and off + n <= length


cdef inline uint32_t _be32_at(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef class Message:
    """A data set received whole by the loop (the Part-10 header given to ``begin`` ahead of
    it), as a read-only buffer: the memory the PDUs were reassembled into, handed over without
    a copy and freed with this object."""

    cdef uint8_t *data
    cdef Py_ssize_t length

    def __cinit__(self):
        self.data = NULL
        self.length = 0

    def __dealloc__(self):
        free(self.data)
        self.data = NULL

    def __len__(self) -> int:
        return self.length

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void *>self.data, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


cdef class Reader:
    """The compiled receive state of one inbound association (used by its DUL thread only).

    Within an object, PDUs are read, checked and reassembled without the GIL: Python runs
    once when a message starts (its command set) and once when it is complete, and the
    threads that store earlier objects are not made to hand the GIL over for every PDU."""

    cdef uint8_t *buf
    cdef size_t cap
    cdef size_t length
    """Bytes of the current PDU body in ``buf``."""
    cdef size_t pos
    """Next item of the body still to be handled (after a COMMAND)."""
    cdef size_t max_pdu
    cdef int64_t message_bytes
    cdef int64_t max_message
    cdef bint in_message
    cdef uint8_t *msg
    """The message being received: the Part-10 prefix, then the data set fragments."""
    cdef size_t msg_len
    cdef size_t msg_cap
    cdef size_t msg_hint
    cdef int why
    cdef uint32_t why_value
    cdef public bytes head
    cdef public object command
    cdef public int context_id
    cdef public str problem
    cdef public double last_pdu
    """Monotonic time the last whole PDU was read here."""
    cdef public long pdus
    cdef public int pending_id
    """The message ID a PENDING response answers."""

    def __cinit__(self, size_t max_pdu, int64_t max_message=1 << 30):
        """``max_pdu``: the largest P-DATA-TF body accepted (our announced maximum and its
        slack); ``max_message``: the largest DIMSE message (command set and data set)."""
        self.buf = NULL
        self.cap = 0
        self.length = 0
        self.pos = 0
        self.max_pdu = max_pdu
        self.max_message = max_message
        self.in_message = False
        self.message_bytes = 0
        self.msg = NULL
        self.msg_len = 0
        self.msg_cap = 0
        self.msg_hint = 0
        self.why = WHY_NONE
        self.why_value = 0
        self.head = b""
        self.command = None
        self.context_id = 0
        self.problem = ""
        self.last_pdu = 0.0
        self.pdus = 0
        self.pending_id = -1

    def __dealloc__(self):
        free(self.buf)
        self.buf = NULL
        free(self.msg)
        self.msg = NULL

    @property
    def in_progress(self) -> bool:
        """An object is part read (its next PDUs are this loop's)."""
        return self.in_message

    @property
    def body(self) -> bytes:
        """The body of the last PDU read (for FALLBACK and ``decline``)."""
        return PyBytes_FromStringAndSize(<char *>self.buf, self.length) if self.buf else b""

    # ------------------------------------------------------------ checked access (GIL held)
    cdef inline uint8_t _u8(self, size_t off) except? 0xFF:
        if off >= self.length:
            raise IndexError("PDU body offset")
        return self.buf[off]

    cdef inline uint32_t _be32(self, size_t off) except? 0xFFFFFFFF:
        if not _within(off, 4, self.length):
            raise IndexError("PDU body offset")
        return _be32_at(self.buf + off)

    cdef inline uint32_t _le16(self, size_t off) except? 0xFFFFFFFF:
        if not _within(off, 2, self.length):
            raise IndexError("PDU body offset")
        return self.buf[off] | (<uint32_t>self.buf[off + 1] << 8)

    cdef inline uint32_t _le32(self, size_t off) except? 0xFFFFFFFF:
        if not _within(off, 4, self.length):
            raise IndexError("PDU body offset")
        return (self.buf[off] | (<uint32_t>self.buf[off + 1] << 8)
                | (<uint32_t>self.buf[off + 2] << 16) | (<uint32_t>self.buf[off + 3] << 24))

    cdef object _text(self, size_t off, size_t n, bint ui):
        """An ASCII UI (trailing NULs cut) or AE (spaces cut) value, or None if it is empty
        or not printable ASCII (the Python path then reads the message)."""
        cdef size_t start = off, end = off + n
        if n == 0 or end > self.length or end < off:
            return None
        if ui:
            while end > start and self._u8(end - 1) == 0:
                end -= 1
        else:
            while end > start and self._u8(end - 1) == 0x20:
                end -= 1
            while start < end and self._u8(start) == 0x20:
                start += 1
        if end == start:
            return None
        cdef size_t i
        cdef uint8_t c
        for i in range(start, end):
            c = self._u8(i)
            if c < 0x20 or c > 0x7E:
                return None
        return PyBytes_FromStringAndSize(<char *>self.buf + start, end - start).decode("ascii")

    cdef int _result(self, int code) except -2:
        """After a stretch without the GIL: ``problem`` from ``why``; MemoryError raised."""
        cdef int why = self.why
        self.why = WHY_NONE
        if why == WHY_MEMORY:
            self._drop_message()
            raise MemoryError()
        if code == VIOLATION:
            self.command = None
        if why == WHY_NONE:
            if code == CLOSED:
                self.problem = ""
            return code
        if why == WHY_CLOSED_MID_PDU:
            self.problem = "connection closed mid-PDU"
        elif why == WHY_CONNECTION:
            self.problem = "connection error"
        elif why == WHY_STALLED:
            self.problem = "stalled mid-PDU"
        elif why == WHY_PDU_SIZE:
            self.problem = (
                f"P-DATA-TF of {self.why_value} bytes, over the maximum of {self.max_pdu}"
            )
        elif why == WHY_ITEMS:
            self.problem = "P-DATA-TF with malformed presentation data value items"
        elif why == WHY_COMMAND_IN_DATA:
            self.problem = "a command set where a data set was expected"
        elif why == WHY_MESSAGE_SIZE:
            self.problem = f"DIMSE message over {self.max_message >> 20} MiB"
        elif why == WHY_AFTER_END:
            self.problem = "presentation data values after the end of a message"
        else:
            self.problem = "a presentation data value item out of the PDU's bounds"
        return code

    # ------------------------------------------------------------ socket reads (no GIL)
    cdef int _fill(self, int fd, size_t want, int wait_ms, bint boundary) noexcept nogil:
        """Read ``want`` bytes into ``buf[0:want]``, growing it as the data arrives (so a
        large announced PDU costs memory only as it is sent). 0: done; -1: the connection
        ended, stalled for ``wait_ms``, or memory ran out (``why`` says which)."""
        cdef size_t got = 0, grow
        cdef ssize_t n
        cdef int rc, err
        cdef pollfd p
        cdef uint8_t *nb
        if boundary and self.cap > FIRST_CHUNK * 16:
            # Not held between PDUs once over a MiB: 64 idle associations must not keep 4 MiB each.
            free(self.buf)
            self.buf = NULL
            self.cap = 0
        while got < want:
            if got == self.cap:
                grow = self.cap * 2 if self.cap * 2 > FIRST_CHUNK else FIRST_CHUNK
                if grow > want:
                    grow = want
                if grow < 6:
                    grow = 6
                nb = <uint8_t *>realloc(self.buf, grow)
                if nb == NULL:
                    self.why = WHY_MEMORY
                    return -1
                self.buf = nb
                self.cap = grow
            n = recv(fd, self.buf + got, (self.cap if self.cap < want else want) - got,
                     MSG_DONTWAIT)
            err = errno
            if n > 0:
                got += <size_t>n
                continue
            if n == 0:
                # At a PDU boundary the peer may close (no problem to report).
                self.why = WHY_NONE if got == 0 and boundary else WHY_CLOSED_MID_PDU
                return -1
            if err == EINTR:
                continue
            if not mdm_would_block(err):
                self.why = WHY_CONNECTION
                return -1
            p.fd = fd
            p.events = POLLIN
            p.revents = 0
            rc = poll(&p, 1, wait_ms)
            err = errno
            if rc == 0:
                self.why = WHY_STALLED
                return -1
            if rc < 0 and err != EINTR:
                self.why = WHY_CONNECTION
                return -1
        return 0

    cdef int _wait(self, int fd, int wake_fd, int wait_ms) noexcept nogil:
        """Wait for the socket at a PDU boundary: 0 readable, IDLE, WAKE or CLOSED."""
        cdef pollfd p[2]
        cdef int rc, err, nfds = 1
        p[0].fd = fd
        p[0].events = POLLIN
        p[0].revents = 0
        if wake_fd >= 0:
            p[1].fd = wake_fd
            p[1].events = POLLIN
            p[1].revents = 0
            nfds = 2
        while True:
            rc = poll(p, nfds, wait_ms)
            err = errno
            if rc < 0 and err == EINTR:
                continue
            break
        if rc < 0:
            self.why = WHY_CONNECTION
            return CLOSED
        if rc == 0:
            return IDLE
        if p[0].revents & (POLLIN | POLLERR | POLLHUP):
            return 0
        if p[0].revents & POLLNVAL:
            self.why = WHY_CONNECTION
            return CLOSED
        return WAKE

    # ------------------------------------------------------------ the loop
    def pump(self, int fd, int wake_fd, double wait, double stall) -> int:
        """Read PDUs from ``fd`` (a connected, non-blocking stream socket) until an object is
        complete or something needs Python. At a PDU boundary with no data yet, waits up to
        ``wait`` seconds (on ``fd`` and ``wake_fd``); within a PDU, up to ``stall`` seconds
        without a byte."""
        cdef int code
        cdef int wait_ms = <int>(wait * 1000)
        cdef int stall_ms = <int>(stall * 1000) if stall > 0 else -1
        if stall_ms == 0:
            stall_ms = 1
        if self.command is not None and not self.in_message:
            raise RuntimeError("begin() or decline() first")
        if self.in_message and self.pos < self.length:
            code = self._result(self._items())
            if code != CONTINUE:
                return code
        with nogil:
            code = self._loop(fd, wake_fd, wait_ms, stall_ms)
        if code == OTHER:
            self.head = PyBytes_FromStringAndSize(<char *>self.buf, 6)
            self.length = 0
            return OTHER
        if code == _NEED_COMMAND:
            return self._command()
        return self._result(code)

    cdef int _loop(self, int fd, int wake_fd, int wait_ms, int stall_ms) noexcept nogil:
        """PDUs, until a message completes or starts, or something needs Python."""
        cdef int rc, code
        cdef uint32_t pdu_len
        cdef uint8_t pdu_type
        while True:
            # A PDU boundary: is anything there?
            rc = self._wait(fd, wake_fd, wait_ms)
            if rc != 0:
                return rc
            self.length = 0
            self.pos = 0
            if self._fill(fd, 6, stall_ms, True) < 0:
                return CLOSED
            pdu_type = self.buf[0]
            pdu_len = _be32_at(self.buf + 2)
            if pdu_type != 0x04:
                return OTHER  # its header stays in buf[0:6]
            if pdu_len > self.max_pdu:
                self.why = WHY_PDU_SIZE
                self.why_value = pdu_len
                return VIOLATION
            if self._fill(fd, pdu_len, stall_ms, False) < 0:
                return CLOSED
            self.length = pdu_len
            mdm_quickack(fd)
            self.last_pdu = _now()
            self.pdus += 1
            code = self._check_items()
            if code != CONTINUE:
                return code
            if not self.in_message:
                return _NEED_COMMAND
            code = self._items()
            if code != CONTINUE:
                return code

    cdef int _check_items(self) noexcept nogil:
        """The items must exactly fill the body (PS3.8 9.3.5.1), each with data."""
        cdef size_t off = 0, end = self.length
        cdef uint32_t n
        if end == 0:
            self.why = WHY_ITEMS
            return VIOLATION
        while off < end:
            if end - off < 6:
                self.why = WHY_ITEMS
                return VIOLATION
            n = _be32_at(self.buf + off)
            if n < 2 or n > end - off - 4:
                self.why = WHY_ITEMS
                return VIOLATION
            off += 4 + n
        return CONTINUE

    cdef int _command(self) except -2:
        """The first PDU of a message: a whole C-STORE-RQ command set with a data set in its
        first item, or the Python path (FALLBACK)."""
        cdef uint32_t n = self._be32(0)
        cdef uint8_t control = self._u8(5)
        if control & 3 != 3:
            return FALLBACK
        fields = self._parse_command(6, n - 2)
        if fields is None:
            # A command set alone in its PDU: a pending C-MOVE/C-GET response (one per
            # object a PACS sends), whose Python decoding costs more than the object's own.
            if n + 4 == self.length and self._parse_pending(6, n - 2):
                self.context_id = self._u8(4)
                return PENDING
            return FALLBACK
        self.context_id = self._u8(4)
        self.command = fields
        self.message_bytes = n - 1
        self.pos = 4 + n
        return COMMAND

    cdef object _parse_command(self, size_t off, size_t n):
        """(class UID, instance UID, message ID, priority, move originator AE or None, its
        message ID or None) of a C-STORE-RQ command set with a data set, made only of its
        usual elements, each once, with its fixed length; None for anything else."""
        cdef size_t end = off + n
        cdef uint32_t group, element, vlen, value = 0
        cdef unsigned seen = 0, bit
        cdef uint32_t field = 0, msg_id = 0, priority = 0, dstype = 0, move_id = 0
        sop_class = sop_instance = move_ae = None
        if end > self.length:
            return None
        while off < end:
            if end - off < 8:
                return None
            group = self._le16(off)
            element = self._le16(off + 2)
            vlen = self._le32(off + 4)
            off += 8
            if group != 0 or vlen == 0 or vlen > end - off:
                return None
            if element == 0x0000:
                bit = E_LENGTH
            elif element == 0x0002:
                bit = E_CLASS
            elif element == 0x0100:
                bit = E_FIELD
            elif element == 0x0110:
                bit = E_ID
            elif element == 0x0700:
                bit = E_PRIORITY
            elif element == 0x0800:
                bit = E_DSTYPE
            elif element == 0x1000:
                bit = E_INSTANCE
            elif element == 0x1030:
                bit = E_MOVE_AE
            elif element == 0x1031:
                bit = E_MOVE_ID
            else:
                return None
            if seen & bit:
                return None
            seen |= bit
            if bit == E_LENGTH:
                if vlen != 4:
                    return None
            elif bit == E_CLASS or bit == E_INSTANCE or bit == E_MOVE_AE:
                text = self._text(off, vlen, bit != E_MOVE_AE)
                if text is None:
                    return None
                if bit == E_CLASS:
                    sop_class = text
                elif bit == E_INSTANCE:
                    sop_instance = text
                else:
                    move_ae = text
            else:
                if vlen != 2:
                    return None
                value = self._le16(off)
                if bit == E_FIELD:
                    field = value
                elif bit == E_ID:
                    msg_id = value
                elif bit == E_PRIORITY:
                    priority = value
                elif bit == E_DSTYPE:
                    dstype = value
                else:
                    move_id = value
            off += vlen
        if field != 0x0001 or not (seen & E_DSTYPE) or dstype == NO_DATA_SET:
            return None
        if not (seen & E_ID) or not (seen & E_CLASS) or not (seen & E_INSTANCE):
            return None
        return (
            sop_class,
            sop_instance,
            msg_id,
            priority if seen & E_PRIORITY else None,
            move_ae,
            move_id if seen & E_MOVE_ID else None,
        )

    cdef bint _parse_pending(self, size_t off, size_t n) except -1:
        """True for the command set of a pending (0xFF00/0xFF01) C-MOVE-RSP or C-GET-RSP
        without a data set, made only of its group length, affected SOP class, message ID
        responded to and sub-operation counts, each once with its fixed length (sets
        ``pending_id``); anything else (an error comment, an offending element, an identifier)
        is for the Python path."""
        cdef size_t end = off + n
        cdef uint32_t element, vlen, value
        cdef unsigned seen = 0, bit
        cdef uint32_t field = 0, msg_id = 0, dstype = 0, status = 0
        if end > self.length or end < off:
            return False
        while off < end:
            if end - off < 8:
                return False
            if self._le16(off) != 0:
                return False
            element = self._le16(off + 2)
            vlen = self._le32(off + 4)
            off += 8
            if vlen > end - off:
                return False
            if element == 0x0000:
                bit = 1
                if vlen != 4:
                    return False
            elif element == 0x0002:
                bit = 2
                if self._text(off, vlen, True) is None:
                    return False
            else:
                if element == 0x0100:
                    bit = 4
                elif element == 0x0120:
                    bit = 8
                elif element == 0x0800:
                    bit = 16
                elif element == 0x0900:
                    bit = 32
                elif 0x1020 <= element <= 0x1023:  # remaining, completed, failed, warning
                    bit = 64 << (element - 0x1020)
                else:
                    return False
                if vlen != 2:
                    return False
                value = self._le16(off)
                if element == 0x0100:
                    field = value
                elif element == 0x0120:
                    msg_id = value
                elif element == 0x0800:
                    dstype = value
                elif element == 0x0900:
                    status = value
            if seen & bit:
                return False
            seen |= bit
            off += vlen
        if seen & (4 | 8 | 16 | 32) != (4 | 8 | 16 | 32):
            return False
        if field not in (0x8021, 0x8010) or dstype != NO_DATA_SET:
            return False
        if status != 0xFF00 and status != 0xFF01:
            return False
        self.pending_id = msg_id
        return True

    def begin(self, bytes prefix) -> int:
        """Receive the data set of the C-STORE-RQ just read into a buffer that starts with
        ``prefix`` (its Part-10 header); handles the rest of the PDU (MESSAGE or CONTINUE)."""
        if self.command is None:
            raise RuntimeError("no command set read")
        cdef size_t n = <size_t>PyBytes_GET_SIZE(prefix)
        cdef size_t first = self.msg_hint + (self.msg_hint >> 3)
        if first < n + FIRST_CHUNK:
            first = n + FIRST_CHUNK
        self._drop_message()
        self.msg = <uint8_t *>malloc(first)
        if self.msg == NULL:
            raise MemoryError()
        self.msg_cap = first
        memcpy(self.msg, PyBytes_AS_STRING(prefix), n)
        self.msg_len = n
        self.in_message = True
        return self._result(self._items())

    def decline(self) -> bytes:
        """Leave the message just read to the Python path: the body of its first PDU."""
        body = self.body
        self.command = None
        self.length = 0
        self.pos = 0
        return body

    def take(self) -> tuple:
        """The object just completed: (context ID, command fields, :class:`Message`)."""
        if self.in_message or self.command is None or self.msg == NULL:
            raise RuntimeError("no message received")
        cdef Message m = Message.__new__(Message)
        # Not shrunk to fit: glibc then serves the next allocation of this size from memory
        # freed by the last one (its mmap threshold rises to the size of a freed mapping),
        # instead of mapping and faulting in fresh pages for every object.
        m.data = self.msg
        m.length = <Py_ssize_t>self.msg_len
        self.msg_hint = self.msg_len if self.msg_len < HINT_CAP else HINT_CAP
        self.msg = NULL
        self.msg_len = self.msg_cap = 0
        out = (self.context_id, self.command, m)
        self.command = None
        return out

    cdef void _drop_message(self) noexcept nogil:
        free(self.msg)
        self.msg = NULL
        self.msg_len = self.msg_cap = 0

    cdef int _append(self, const uint8_t *src, size_t n) noexcept nogil:
        """Add ``n`` bytes to the message (doubling its buffer as needed); -1: no memory."""
        cdef size_t need = self.msg_len + n, cap = self.msg_cap
        cdef uint8_t *nb
        if need < self.msg_len:
            self.why = WHY_MEMORY
            return -1
        if need > cap:
            if cap < FIRST_CHUNK:
                cap = FIRST_CHUNK
            while cap < need:
                cap *= 2
            nb = <uint8_t *>realloc(self.msg, cap)
            if nb == NULL:
                self.why = WHY_MEMORY
                return -1
            self.msg = nb
            self.msg_cap = cap
        memcpy(self.msg + self.msg_len, src, n)
        self.msg_len = need
        return 0

    cdef int _items(self) noexcept nogil:
        """Data set fragments of the message in progress, from ``pos`` to the body's end."""
        cdef size_t off = self.pos, end = self.length
        cdef uint32_t n
        cdef uint8_t control
        while off < end:
            if not _within(off, 6, end):
                self.why = WHY_BOUNDS
                return self._fail()
            n = _be32_at(self.buf + off)
            control = self.buf[off + 5]
            if control & 1:
                self.why = WHY_COMMAND_IN_DATA
                return self._fail()
            # Checked by _check_items; kept as the bound of the copy.
            if n < 2 or not _within(off + 4, n, end):
                self.why = WHY_BOUNDS
                return self._fail()
            self.message_bytes += n - 1
            if self.message_bytes > self.max_message:
                self.why = WHY_MESSAGE_SIZE
                return self._fail()
            if self._append(self.buf + off + 6, n - 2) < 0:
                return self._fail()
            off += 4 + n
            if control & 2:
                if off != end:
                    self.why = WHY_AFTER_END
                    return self._fail()
                self.pos = self.length = 0
                self.in_message = False
                return MESSAGE
        self.pos = self.length = 0
        return CONTINUE

    cdef int _fail(self) noexcept nogil:
        self.in_message = False
        self._drop_message()
        self.pos = self.length = 0
        return VIOLATION


def store_response_pdu(int context_id, str sop_class, str sop_instance, int message_id,
                       int status) -> bytes:
    """A P-DATA-TF holding the command set of a C-STORE-RSP without a data set (PS3.7
    9.3.1.2, Implicit VR Little Endian) in one last-fragment item. ValueError for a UID that
    is not ASCII or values out of range."""
    if not 0 <= context_id <= 255 or not 0 <= message_id <= 0xFFFF or not 0 <= status <= 0xFFFF:
        raise ValueError("value out of range")
    cdef bytes cls = sop_class.encode("ascii")
    cdef bytes inst = sop_instance.encode("ascii")
    cdef size_t lc = len(cls) + (len(cls) & 1), li = len(inst) + (len(inst) & 1)
    if lc > 0xFFFF or li > 0xFFFF:
        raise ValueError("UID too long")
    cdef size_t body = 8 + lc + 3 * (8 + 2) + 8 + 2 + 8 + li
    cdef size_t cmd = 12 + body
    cdef size_t total = 6 + 4 + 2 + cmd
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    cdef size_t o = 0
    p[0] = 0x04
    p[1] = 0
    _put_be32(p + 2, total - 6)
    _put_be32(p + 6, cmd + 2)
    p[10] = context_id
    p[11] = 0x03
    o = 12
    o = _element(p, o, 0x0000, 4)
    _put_le32(p + o, body)
    o += 4
    o = _element(p, o, 0x0002, lc)
    memcpy(p + o, PyBytes_AS_STRING(cls), len(cls))
    if lc != len(cls):
        p[o + lc - 1] = 0
    o += lc
    o = _element(p, o, 0x0100, 2)
    _put_le16(p + o, 0x8001)
    o += 2
    o = _element(p, o, 0x0120, 2)
    _put_le16(p + o, message_id)
    o += 2
    o = _element(p, o, 0x0800, 2)
    _put_le16(p + o, 0x0101)
    o += 2
    o = _element(p, o, 0x0900, 2)
    _put_le16(p + o, status)
    o += 2
    o = _element(p, o, 0x1000, li)
    memcpy(p + o, PyBytes_AS_STRING(inst), len(inst))
    if li != len(inst):
        p[o + li - 1] = 0
    o += li
    if o != total:
        raise AssertionError("C-STORE-RSP length")
    return out


cdef inline void _put_be32(uint8_t *p, size_t v) noexcept:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void _put_le32(uint8_t *p, size_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void _put_le16(uint8_t *p, size_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline size_t _element(uint8_t *p, size_t o, unsigned element, size_t length) noexcept:
    _put_le16(p + o, 0)
    _put_le16(p + o + 2, element)
    _put_le32(p + o + 4, length)
    return o + 8
