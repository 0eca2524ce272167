"""relay.core.handshake: the fast path of the opening handshake, checked against websockets itself.

The property: whatever the request, the fast path either declines (None: websockets answers it)
or answers exactly what websockets' own handshake would: a 101 with the same accept key and
subprotocol, for the same target and credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.http11 import Request
from websockets.server import ServerProtocol

from relay.core import protocol
from relay.core.handshake import accept_upgrade
from relay.node import Node
from relay.sdk_server import _select_subprotocol
from tests.helpers import Admin, open_stream, recv_frame

PATH, SUB = protocol.STREAM_PATH, protocol.SUBPROTOCOL
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example: its accept key is below


def _head(request_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [request_line, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _plain(*extra: tuple[str, str], target: str = PATH) -> bytes:
    return _head(f"GET {target} HTTP/1.1", [
        ("Host", "127.0.0.1:8080"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"), *extra,
    ])


def _websockets_answer(head: bytes) -> tuple[Request | None, int, dict[str, str]]:
    """What websockets' own server handshake (relay's slow path) answers to `head`."""
    proto = ServerProtocol(select_subprotocol=_select_subprotocol, max_size=1 << 20)
    proto.receive_data(head)
    requests = [e for e in proto.events_received() if isinstance(e, Request)]
    if not requests:
        return None, 0, {}
    response = proto.accept(requests[0])
    return requests[0], response.status_code, dict(response.headers.raw_items())


def _check_same_as_websockets(head: bytes) -> bool:
    """True when the fast path accepted `head`; it must agree with websockets when it does."""
    upgrade = accept_upgrade(head, PATH, SUB)
    if upgrade is None:
        return False
    request, status, headers = _websockets_answer(head)
    assert request is not None and status == 101, (head, status)
    assert urlsplit(request.path).path == PATH and request.path == upgrade.target
    assert request.headers.get_all("Authorization") == upgrade.authorizations
    assert headers.get("Sec-WebSocket-Protocol") == upgrade.subprotocol
    answer = upgrade.response.decode()
    assert answer.startswith("HTTP/1.1 101 Switching Protocols\r\n") and answer.endswith("\r\n\r\n")
    assert f"Sec-WebSocket-Accept: {headers['Sec-WebSocket-Accept']}\r\n" in answer
    assert ("Sec-WebSocket-Protocol" in answer) == (upgrade.subprotocol is not None)
    return True


def test_rfc_6455_example_key() -> None:
    upgrade = accept_upgrade(_plain(("Sec-WebSocket-Protocol", SUB)), PATH, SUB)
    assert upgrade is not None and upgrade.subprotocol == SUB
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in upgrade.response
    assert _check_same_as_websockets(_plain(("Sec-WebSocket-Protocol", SUB)))


def test_what_real_clients_send_takes_the_fast_path() -> None:
    """The requests of a browser, the websockets client and picows (the load generator)."""
    browser = _head(f"GET {PATH}?since=12 HTTP/1.1", [
        ("Host", "flags.example.com"), ("Connection", "keep-alive, Upgrade"),
        ("Pragma", "no-cache"), ("Cache-Control", "no-cache"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0.0.0 Safari/537.36"),
        ("Upgrade", "websocket"), ("Origin", "https://app.example.com"),
        ("Sec-WebSocket-Version", "13"), ("Accept-Encoding", "gzip, deflate, br, zstd"),
        ("Accept-Language", "en-US,en;q=0.9"), ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Protocol", SUB),
    ])
    websockets_client = _plain(
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Sec-WebSocket-Protocol", SUB), ("Authorization", "Bearer sdk-key"),
        ("User-Agent", "Python/3.11 websockets/17.4"),
    )
    picows = _plain(("Authorization", "Bearer sdk-key"), ("Sec-WebSocket-Protocol", SUB))
    for head in (browser, websockets_client, picows):
        assert _check_same_as_websockets(head), head
    upgrade = accept_upgrade(browser, PATH, SUB)
    assert upgrade is not None and upgrade.target == f"{PATH}?since=12"
    # No extension is negotiated: permessage-deflate stays off.
    assert b"Extensions" not in upgrade.response


def test_declines_what_it_does_not_answer_itself() -> None:
    def variant(*headers: tuple[str, str], line: str = f"GET {PATH} HTTP/1.1") -> bytes:
        return _head(line, list(headers))

    base = [("Host", "h"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]
    declined = [
        variant(*base, line=f"POST {PATH} HTTP/1.1"),
        variant(*base, line=f"GET {PATH} HTTP/1.0"),
        variant(*base, line="GET /elsewhere HTTP/1.1"),
        variant(*base, line=f"GET {PATH}/more HTTP/1.1"),
        variant(*base[:1], *base[2:]),  # no Upgrade
        variant(*base[:2], *base[3:]),  # no Connection
        variant(*base[:3], *base[4:]),  # no key
        variant(*base[:4]),  # no version
        variant(*base[:3], ("Sec-WebSocket-Key", "c2hvcnQ="), *base[4:]),  # 5 bytes
        variant(*base[:3], ("Sec-WebSocket-Key", "not base64!"), *base[4:]),
        variant(*base, ("Sec-WebSocket-Key", KEY)),  # two keys
        variant(*base[:4], ("Sec-WebSocket-Version", "8")),
        variant(*base, ("Upgrade", "h2c")),
        variant(*base, ("Content-Length", "5")),
        variant(*base, ("Transfer-Encoding", "chunked")),
        variant(*base, ("Sec-WebSocket-Protocol", "")),
        variant(*base, *[(f"X-{i}", "x") for i in range(130)]),  # over websockets' 128
        variant(*base, ("Cookie", "x" * 9000)),  # over websockets' line limit
        b"GET /v1/stream HTTP/1.1\r\nHost h\r\n\r\n",  # not HTTP
        b"\r\n" + variant(*base),  # a line break before the request line
        variant(*base, line=f"GET  {PATH} HTTP/1.1"),  # two spaces
        variant(*base, line=f"GET {PATH}  HTTP/1.1"),
    ]
    for head in declined:
        assert accept_upgrade(head, PATH, SUB) is None, head


def test_a_client_that_does_not_offer_the_subprotocol_is_accepted_without_one() -> None:
    """As with websockets' handshake: the server then closes it with 4002."""
    head = _plain(("Sec-WebSocket-Protocol", "other, else"))
    upgrade = accept_upgrade(head, PATH, SUB)
    assert upgrade is not None and upgrade.subprotocol is None
    assert _check_same_as_websockets(head)


# Building blocks of requests, valid and not, in the shapes clients and attackers send.
_tokens = st.sampled_from(["websocket", "WebSocket", "Upgrade", "upgrade", "keep-alive",
                           "h2c", "relay.v1", "relay.v2", "x"])
_lists = st.lists(_tokens, min_size=0, max_size=3).flatmap(
    lambda items: st.sampled_from([", ", ",", " ,", ",,", ", ,"]).map(lambda sep: sep.join(items))
)
_values = st.one_of(
    _lists,
    st.sampled_from([KEY, "13", "8", "", " ", "Bearer sdk", "Bearer  sdk ", "c2hvcnQ=",
                     "AAAAAAAAAAAAAAAAAAAAAA==", "AAAAAAAAAAAAAAAAAAAAAA", "0", "5"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=12),
)
_names = st.sampled_from(["Host", "Upgrade", "Connection", "Sec-WebSocket-Key",
                          "Sec-WebSocket-Version", "Sec-WebSocket-Protocol", "Authorization",
                          "Content-Length", "Transfer-Encoding", "upgrade", "CONNECTION",
                          "sec-websocket-key", "X-Any", "Origin"])
_required = [("Host", "h"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
             ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "GET", "get", "POST"]))
    target = draw(st.sampled_from([PATH, f"{PATH}?since=3", f"{PATH}?a=1&since=x", "/",
                                   f"{PATH}#f", f"{PATH}?q#f", "/v1/streams", "*"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2"]))
    headers = [h for h in _required if draw(st.integers(0, 9)) > 0]
    headers += draw(st.lists(st.tuples(_names, _values), max_size=5))
    order = draw(st.permutations(headers))
    # Request lines llhttp tolerates and websockets does not: runs of spaces, a tab, a line
    # break before the request.
    gap = draw(st.sampled_from([" ", " ", " ", "  ", "\t"]))
    gap2 = draw(st.sampled_from([" ", " ", " ", "  "]))
    before = draw(st.sampled_from(["", "", "", "\r\n", "\n", "\r"]))
    return before.encode() + _head(f"{method}{gap}{target}{gap2}{version}", list(order))


@settings(max_examples=1500, deadline=None)
@given(_requests())
def test_the_fast_path_answers_only_what_websockets_answers_the_same(head: bytes) -> None:
    _check_same_as_websockets(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_declined_or_answered_like_websockets(junk: bytes) -> None:
    for head in (junk + b"\r\n\r\n", _plain()[:-2] + junk + b"\r\n\r\n"):
        _check_same_as_websockets(head)


async def test_both_paths_over_a_real_socket(admin: Admin, node: Node) -> None:
    """The websockets client's request takes the fast path; one with an empty list element in
    a Connection header (valid, but not plain) takes websockets' path. Each is served, with the
    key looked up in the store (the first) or in the node's cache (the others, which attach
    without a task and send the 101 with hello and the snapshot in one write)."""
    v = await admin.put_env("hs", ["sdk-hs"])
    v = await admin.publish("hs", put={"f": 1})
    for extra in ({}, {"Connection": "Upgrade, ,"}, {}, {"Connection": "Upgrade, ,"}):
        async with websockets.connect(
            node.ws_url + "?since=0", subprotocols=[websockets.Subprotocol(SUB)],
            compression=None, additional_headers={"Authorization": "Bearer sdk-hs", **extra},
        ) as ws:
            hello, delta = await recv_frame(ws), await recv_frame(ws)
            assert (hello["t"], hello["env"], hello["v"]) == ("hello", "hs", v)
            assert (delta["t"], delta["base"], delta["v"]) == ("delta", 0, v)
            assert ws.response is not None
            # websockets' own answer carries a Date header; the fast path's does not.
            assert ("Date" in ws.response.headers) == bool(extra)
    for frame_auth in (False, True):  # a cached key, authenticated by header or first frame
        ws = await open_stream(node.ws_url, "sdk-hs", since=v, frame_auth=frame_auth)
        hello, delta = await recv_frame(ws), await recv_frame(ws)
        assert (hello["v"], delta["t"], delta["base"], delta["v"]) == (v, "delta", v, v)
        await ws.close()
