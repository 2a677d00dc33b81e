# cython: language_level=3
# cython: boundscheck=True, wraparound=True, initializedcheck=True
"""The compiled receive loop of the fast path: P-DATA-TF PDUs read from the socket, their
presentation data value items reassembled and the C-STORE-RQ command set read in C, so that
Python sees one call per received object instead of several per PDU.

Every byte read here comes from a peer that may be hostile. Every access to a received byte
goes through the checked helpers below (``_u8``, ``_le16``, ``_le32``, ``_be32``), which
raise on an offset outside the data read (a bug here becomes an aborted association, never a
read out of bounds); the limits are those of the Python fast path (docs/DICOM.md, Limits).
Anything this loop does not handle is handed back to the Python fast path unchanged: a PDU
that is not a P-DATA-TF (its header, already read, is in ``Reader.head``), a P-DATA-TF whose
first item is not a whole C-STORE-RQ command set with a data set (its body, in
``Reader.body``), and any state but data transfer (the caller checks that).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
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

from io import BytesIO

# Results of Reader.pump / Reader.begin
CONTINUE = 0
"""begin(): the object goes on in the next PDUs (call pump)."""
MESSAGE = 1
"""A C-STORE-RQ and its whole data set: ``take()``."""
COMMAND = 2
"""A C-STORE-RQ command set was read (``command``): ``begin(part10_header)`` or ``decline()``."""
OTHER = 3
"""The next PDU is not a P-DATA-TF: its 6-byte header is in ``head``, its body unread."""
FALLBACK = 4
"""A P-DATA-TF this loop does not handle, no object in progress: its body is in ``body``."""
IDLE = 5
"""Nothing more arrived at a PDU boundary within the wait."""
WAKE = 6
"""Another thread woke the reactor (its wake-up pipe is readable) at a PDU boundary."""
CLOSED = 7
"""The connection ended or stalled (``problem`` says which, with no peer byte)."""
VIOLATION = 8
"""The peer broke a limit or the protocol (``problem``, with no peer byte): abort."""

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


cdef class Reader:
    """The compiled receive state of one inbound association (used by its DUL thread only)."""

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
    cdef object data
    cdef object _write
    cdef public bytes head
    cdef public object command
    cdef public int context_id
    cdef public str problem
    cdef public double last_pdu
    """Monotonic time the last whole PDU was read here."""
    cdef public long pdus

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
        self.data = None
        self._write = None
        self.head = b""
        self.command = None
        self.context_id = 0
        self.problem = ""
        self.last_pdu = 0.0
        self.pdus = 0

    def __dealloc__(self):
        if self.buf != NULL:
            PyMem_Free(self.buf)
            self.buf = NULL

    @property
    def in_progress(self) -> bool:
        """An object is part read (its next PDUs are this loop's)."""
        return self.in_message

    @property
    def body(self) -> bytes:
        """The body of the last PDU read (for FALLBACK and ``decline``)."""
        return PyBytes_FromStringAndSize(<char *>self.buf, self.length) if self.buf else b""

    # ------------------------------------------------------------ checked access
    cdef inline uint8_t _u8(self, size_t off) except? 0xFF:
        if off >= self.length:
            raise IndexError("PDU body offset")
        return self.buf[off]

    cdef inline uint32_t _be32(self, size_t off) except? 0xFFFFFFFF:
        if off + 4 > self.length or off + 4 < off:
            raise IndexError("PDU body offset")
        return ((<uint32_t>self.buf[off] << 24) | (<uint32_t>self.buf[off + 1] << 16)
                | (<uint32_t>self.buf[off + 2] << 8) | self.buf[off + 3])

    cdef inline uint32_t _le16(self, size_t off) except? 0xFFFFFFFF:
        if off + 2 > self.length or off + 2 < off:
            raise IndexError("PDU body offset")
        return self.buf[off] | (<uint32_t>self.buf[off + 1] << 8)

    cdef inline uint32_t _le32(self, size_t off) except? 0xFFFFFFFF:
        if off + 4 > self.length or off + 4 < off:
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

    # ------------------------------------------------------------ socket reads
    cdef int _fill(self, int fd, size_t want, double stall, bint boundary) except -2:
        """Read ``want`` bytes into ``buf[0:want]``, growing it as the data arrives (so a
        large announced PDU costs memory only as it is sent). 0: done; -1: the connection
        ended or stalled for ``stall`` seconds (``problem`` says which)."""
        cdef size_t got = 0, grow
        cdef ssize_t n
        cdef int rc, err
        cdef pollfd p
        cdef uint8_t *nb
        cdef int wait_ms = <int>(stall * 1000) if stall > 0 else -1
        if wait_ms == 0:
            wait_ms = 1
        if boundary and self.cap > FIRST_CHUNK * 16:
            # Not held between PDUs once over a MiB: 64 idle associations must not keep 4 MiB each.
            PyMem_Free(self.buf)
            self.buf = NULL
            self.cap = 0
        while got < want:
            if got == self.cap:
                grow = self.cap * 2 if self.cap * 2 > FIRST_CHUNK else FIRST_CHUNK
                if grow > want:
                    grow = want
                if grow < 6:
                    grow = 6
                nb = <uint8_t *>PyMem_Realloc(self.buf, grow)
                if nb == NULL:
                    raise MemoryError()
                self.buf = nb
                self.cap = grow
            with nogil:
                n = recv(fd, self.buf + got, (self.cap if self.cap < want else want) - got,
                         MSG_DONTWAIT)
                err = errno
            if n > 0:
                got += <size_t>n
                continue
            if n == 0:
                # At a PDU boundary the peer may close (no problem to report).
                self.problem = "" if got == 0 and boundary else "connection closed mid-PDU"
                return -1
            if err == EINTR:
                continue
            if not mdm_would_block(err):
                self.problem = "connection error"
                return -1
            p.fd = fd
            p.events = POLLIN
            p.revents = 0
            with nogil:
                rc = poll(&p, 1, wait_ms)
                err = errno
            if rc == 0:
                self.problem = "stalled mid-PDU"
                return -1
            if rc < 0 and err != EINTR:
                self.problem = "connection error"
                return -1
        return 0

    cdef int _wait(self, int fd, int wake_fd, int wait_ms) except -2:
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
            with nogil:
                rc = poll(p, nfds, wait_ms)
                err = errno
            if rc < 0 and err == EINTR:
                continue
            break
        if rc < 0:
            self.problem = "connection error"
            return CLOSED
        if rc == 0:
            return IDLE
        if p[0].revents & (POLLIN | POLLERR | POLLHUP):
            return 0
        if p[0].revents & POLLNVAL:
            self.problem = "connection error"
            return CLOSED
        return WAKE

    # ------------------------------------------------------------ the loop
    def pump(self, int fd, int wake_fd, double wait, double stall) -> int:
        """Read PDUs from ``fd`` (a connected, non-blocking stream socket) until an object is
        complete or something needs Python. At a PDU boundary with no data yet, waits up to
        ``wait`` seconds (on ``fd`` and ``wake_fd``); within a PDU, up to ``stall`` seconds
        without a byte."""
        cdef int rc, code
        cdef uint32_t pdu_len
        cdef size_t limit = self.max_pdu
        cdef uint8_t pdu_type
        cdef int wait_ms = <int>(wait * 1000)
        if self.command is not None and not self.in_message:
            raise RuntimeError("begin() or decline() first")
        if self.in_message and self.pos < self.length:
            code = self._items()
            if code != CONTINUE:
                return code
        while True:
            # A PDU boundary: is anything there?
            rc = self._wait(fd, wake_fd, wait_ms)
            if rc != 0:
                return rc
            self.length = 0
            self.pos = 0
            if self._fill(fd, 6, stall, True) < 0:
                return CLOSED
            self.length = 6
            pdu_type = self._u8(0)
            pdu_len = self._be32(2)
            if pdu_type != 0x04:
                self.head = PyBytes_FromStringAndSize(<char *>self.buf, 6)
                self.length = 0
                return OTHER
            if pdu_len > limit:
                self.problem = f"P-DATA-TF of {pdu_len} bytes, over the maximum of {limit}"
                self.length = 0
                return VIOLATION
            self.length = 0
            if self._fill(fd, pdu_len, stall, False) < 0:
                return CLOSED
            self.length = pdu_len
            mdm_quickack(fd)
            self.last_pdu = _now()
            self.pdus += 1
            code = self._check_items()
            if code != CONTINUE:
                return code
            if not self.in_message:
                return self._command()
            code = self._items()
            if code != CONTINUE:
                return code

    cdef int _check_items(self) except -2:
        """The items must exactly fill the body (PS3.8 9.3.5.1), each with data."""
        cdef size_t off = 0, end = self.length
        cdef uint32_t n
        if end == 0:
            self.problem = "P-DATA-TF with malformed presentation data value items"
            return VIOLATION
        while off < end:
            if end - off < 6:
                self.problem = "P-DATA-TF with malformed presentation data value items"
                return VIOLATION
            n = self._be32(off)
            if n < 2 or n > end - off - 4:
                self.problem = "P-DATA-TF with malformed presentation data value items"
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

    def begin(self, bytes prefix) -> int:
        """Receive the data set of the C-STORE-RQ just read into a buffer that starts with
        ``prefix`` (its Part-10 header); handles the rest of the PDU (MESSAGE or CONTINUE)."""
        if self.command is None:
            raise RuntimeError("no command set read")
        self.data = BytesIO()
        self._write = self.data.write
        self._write(prefix)
        self.in_message = True
        return self._items()

    def decline(self) -> bytes:
        """Leave the message just read to the Python path: the body of its first PDU."""
        body = self.body
        self.command = None
        self.length = 0
        self.pos = 0
        return body

    def take(self) -> tuple:
        """The object just completed: (context ID, command fields, data set buffer)."""
        out = (self.context_id, self.command, self.data)
        self.command = None
        self.data = None
        self._write = None
        return out

    cdef int _items(self) except -2:
        """Data set fragments of the message in progress, from ``pos`` to the body's end."""
        cdef size_t off = self.pos, end = self.length
        cdef uint32_t n
        cdef uint8_t control
        while off < end:
            n = self._be32(off)
            control = self._u8(off + 5)
            if control & 1:
                self.problem = "a command set where a data set was expected"
                return self._fail()
            self.message_bytes += n - 1
            if self.message_bytes > self.max_message:
                self.problem = f"DIMSE message over {self.max_message >> 20} MiB"
                return self._fail()
            if off + 4 + n > end:  # checked by _check_items; kept as the bound of the copy
                raise IndexError("PDU body offset")
            self._write(PyBytes_FromStringAndSize(<char *>self.buf + off + 6, n - 2))
            off += 4 + n
            if control & 2:
                if off != end:
                    self.problem = "presentation data values after the end of a message"
                    return self._fail()
                self.pos = self.length = 0
                self.in_message = False
                return MESSAGE
        self.pos = self.length = 0
        return CONTINUE

    cdef int _fail(self) except -2:
        self.in_message = False
        self.command = None
        self.data = None
        self._write = None
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
