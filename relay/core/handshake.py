"""The opening handshake's fast path: a plain, valid WebSocket upgrade, answered without
websockets' pure-Python HTTP parser.

Measured here (tests aside, `python -m loadtests connect-storm`): websockets' sans-I/O handshake,
its generator-based request parser and `accept`, cost about 80 us of Python per connection, more
than half of what a whole SDK connection costs the server. httptools (llhttp, the parser under
uvicorn) parses the same request in about 3 us.

The fast path is deliberately narrow. It answers only requests that websockets would accept with
the same response (tests/node/test_handshake.py checks that against websockets, property-based);
anything else, whether invalid, unusual or merely long, returns None, and the caller hands the
request to websockets' `ServerProtocol`, which answers every error exactly as before.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import httptools
from websockets.utils import accept_key

# websockets' own limits on the request (websockets.http11): longer or larger requests take
# the slow path, which refuses them with its usual status.
_MAX_HEAD = 8192  # no line can be longer than websockets' MAX_LINE_LENGTH
_MAX_HEADERS = 128
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")


@dataclass(slots=True)
class Upgrade:
    """An accepted upgrade: what the server needs of the request, and the 101 to send."""

    target: str  # the request target: path and query
    authorizations: list[str]  # every Authorization header's value
    subprotocol: str | None  # the one selected, or None when the client did not offer it
    response: bytes
    forwarded_for: list[str]  # every X-Forwarded-For header's value (believed from trusted
    # proxies only: relay/core/trusted_proxies.py)


class _Head:
    """httptools callbacks: the request target and the headers, names lower-cased."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, list[str]] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # iso-8859-1, as websockets decodes header values: an opaque byte-for-byte mapping;
        # and, as websockets does, without the whitespace around the value.
        self.headers.setdefault(name.decode("latin-1").lower(), []).append(
            value.strip(b" \t").decode("latin-1")
        )

    def on_headers_complete(self) -> None:
        self.complete = True


def _tokens(values: list[str]) -> list[str] | None:
    """A comma-separated list of tokens over all of a header's values; None if any item is
    empty or not a plain token (websockets may read those differently: leave them to it)."""
    items = []
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if not _TOKEN.fullmatch(item):
                return None
            items.append(item)
    return items


def _single(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values is not None and len(values) == 1 else None


def accept_upgrade(head: bytes, path: str, subprotocol: str) -> Upgrade | None:
    """The 101 answer to `head` (the request up to and including its blank line) when it is a
    plain, valid WebSocket upgrade to `path`; None for anything else.

    `subprotocol` is selected when the client offers it; a client that does not is still
    accepted (as websockets does with relay's selection), and the caller closes it with 4002.
    """
    if len(head) > _MAX_HEAD:
        return None
    # llhttp tolerates what websockets refuses in the request line (leading line breaks, runs
    # of spaces): only the exact form `GET <target> HTTP/1.1` takes the fast path.
    line = head[: head.find(b"\r\n")].split(b" ")
    if len(line) != 3 or line[0] != b"GET" or line[2] != b"HTTP/1.1" or not line[1]:
        return None
    request = _Head()
    parser = httptools.HttpRequestParser(request)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops at an upgrade: what we want
    except httptools.HttpParserError:
        return None
    if (
        not request.complete
        or parser.get_method() != b"GET"
        or parser.get_http_version() != "1.1"
    ):
        return None
    headers = request.headers
    if len(headers) > _MAX_HEADERS or sum(map(len, headers.values())) > _MAX_HEADERS:
        return None
    if "transfer-encoding" in headers or not set(headers.get("content-length", ())) <= {"0"}:
        return None
    if len(headers.get("origin", ())) > 1:  # RFC 6454: one at most; websockets refuses more
        return None
    if len(headers.get("host", ())) != 1:  # RFC 7230 5.4: exactly one; the caller answers 400
        return None
    try:
        target = request.url.decode("ascii")
    except UnicodeDecodeError:
        return None
    route, _, query = target.partition("?")
    if route != path or "#" in query:
        return None
    connection = _tokens(headers.get("connection", []))
    if not connection or not any(c.lower() == "upgrade" for c in connection):
        return None
    upgrade = _tokens(headers.get("upgrade", []))
    if upgrade is None or len(upgrade) != 1 or upgrade[0].lower() != "websocket":
        return None
    if _single(headers, "sec-websocket-version") != "13":
        return None
    key = _single(headers, "sec-websocket-key")
    if key is None:
        return None
    try:
        if len(base64.b64decode(key.encode(), validate=True)) != 16:
            return None
    except (binascii.Error, UnicodeEncodeError):
        return None
    offered = _tokens(headers.get("sec-websocket-protocol", []))
    if offered is None:
        return None
    selected = subprotocol if subprotocol in offered else None
    response = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        + (f"Sec-WebSocket-Protocol: {selected}\r\n" if selected else "")
        + "\r\n"
    ).encode()
    return Upgrade(target, headers.get("authorization", []), selected, response,
                   headers.get("x-forwarded-for", []))
