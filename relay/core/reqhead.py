"""Collecting an HTTP request head from a byte stream, in linear time (no I/O).

A client may send its upgrade request one byte per TCP segment. Joining each segment to what
came before and searching the whole buffer again costs O(n^2): a 60 KB head sent byte by byte
took half a second of CPU. `RequestHead` appends into one buffer and searches only the bytes
that could complete the terminator, so a head of n bytes costs O(n) whatever the segmentation.

Line ends must be CRLF (RFC 7230 3.5 lets a server reject a bare LF, and websockets does): a
bare LF is reported at once, rather than waiting for a CRLF CRLF that will never come.
"""

from __future__ import annotations

import enum

_END = b"\r\n\r\n"


class HeadStatus(enum.Enum):
    INCOMPLETE = "incomplete"  # give it more bytes
    COMPLETE = "complete"  # `head` holds the request up to its blank line, `rest` what follows
    TOO_LARGE = "too_large"  # more than `limit` bytes without a blank line
    BARE_LF = "bare_lf"  # a line ends with LF alone


class RequestHead:
    """Feed bytes until the head is complete; then `head` and `rest` hold what came."""

    __slots__ = ("_buf", "_checked", "head", "limit", "rest", "scanned")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._checked = 0  # bytes already known to hold no terminator start and no bare LF
        self.head = b""
        self.rest = b""
        self.scanned = 0  # bytes examined so far, over all calls: linear in the input

    @staticmethod
    def whole(data: bytes, limit: int) -> tuple[bytes, bytes] | None:
        """(head, rest) when `data` holds a whole, valid head of at most `limit` bytes;
        None when it does not (then feed a `RequestHead`, which says why). Most heads come
        whole in one read: this costs two searches and two counts, all in C, and no object."""
        end = data.find(_END, 0, limit + len(_END))
        if end < 0:
            return None
        head = data[: end + len(_END)]
        if head.count(b"\n") != head.count(b"\r\n"):  # a bare LF in it
            return None
        return head, data[end + len(_END) :]

    def feed(self, data: bytes) -> HeadStatus:
        buf = self._buf
        buf += data
        # Only a new LF can end the head or be a bare one; what precedes it is looked at
        # directly, so no byte is searched twice.
        start = self._checked
        stop = min(len(buf), self.limit + len(_END))
        self.scanned += max(0, stop - start)
        lf = buf.find(b"\n", start, stop)
        while lf >= 0:
            if lf == 0 or buf[lf - 1] != 0x0D:  # "\n" not after "\r"
                return HeadStatus.BARE_LF
            if lf >= 3 and buf[lf - 3 : lf + 1] == _END:
                end = lf + 1
                self.head = bytes(buf[:end])
                self.rest = bytes(buf[end:])
                buf.clear()
                return HeadStatus.COMPLETE
            lf = buf.find(b"\n", lf + 1, stop)
        if len(buf) > self.limit:
            return HeadStatus.TOO_LARGE
        self._checked = len(buf)
        return HeadStatus.INCOMPLETE

    @property
    def buffered(self) -> int:
        return len(self._buf)
