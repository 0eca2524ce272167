"""The pure parts of the public port's defences: request heads, PROXY headers, trusted
proxies, admission control, keepalive rounds and the memory of failed authentications.
No sockets, no event loop."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import admission as adm
from relay.core import protocol, proxy_protocol
from relay.core.auth_failures import FailureLog, UnknownKeys
from relay.core.keepalive import PendingPings, PingRounds
from relay.core.reqhead import HeadStatus, RequestHead
from relay.core.trusted_proxies import TrustedProxies, TrustedProxiesError

HEAD = (b"GET /v1/stream HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


# --- request heads ------------------------------------------------------------------------------


def test_a_head_sent_a_byte_at_a_time_is_scanned_once() -> None:
    """The quadratic case: 16 KB one byte per segment. Each byte is examined once (a buffer
    joined and searched again per segment examines n^2/2 = 134 million)."""
    filler = b"X-Pad: " + b"a" * 16_000 + b"\r\n"
    head = HEAD[:-2] + filler + b"\r\n"
    reader = RequestHead(limit=32 << 10)
    statuses = [reader.feed(head[i : i + 1]) for i in range(len(head))]
    assert statuses[-1] is HeadStatus.COMPLETE
    assert set(statuses[:-1]) == {HeadStatus.INCOMPLETE}
    assert reader.head == head and reader.rest == b""
    assert reader.scanned <= len(head)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30), st.binary(max_size=50))
def test_any_segmentation_gives_the_same_head_and_rest(cuts: list[int], after: bytes) -> None:
    data = HEAD + after
    reader = RequestHead(limit=8192)
    status, pos = HeadStatus.INCOMPLETE, 0
    for size in [*cuts, len(data)]:
        chunk = data[pos : pos + size]
        pos += size
        status = reader.feed(chunk)
        if status is not HeadStatus.INCOMPLETE:
            break
    assert status is HeadStatus.COMPLETE
    assert reader.head == HEAD
    assert reader.rest + data[pos:] == after


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"GET / HTTP/1.1", b"Host: h", b"", b"X: \n", b"\r"]),
                max_size=6).map(lambda lines: b"\r\n".join(lines)), st.binary(max_size=20))
def test_a_whole_head_in_one_read_is_read_as_fed_pieces_are(head: bytes, after: bytes) -> None:
    data = head + after
    whole = RequestHead.whole(data, 64)
    reader = RequestHead(limit=64)
    status = reader.feed(data)
    if whole is not None:
        assert status is HeadStatus.COMPLETE and whole == (reader.head, reader.rest)
    else:
        assert status is not HeadStatus.COMPLETE


@pytest.mark.parametrize("head", [
    b"GET /v1/stream HTTP/1.1\nHost: h\n\n",
    b"GET /v1/stream HTTP/1.1\r\nHost: h\n\r\n",
    b"\nGET / HTTP/1.1\r\n\r\n",
])
def test_a_bare_line_feed_is_reported_at_once(head: bytes) -> None:
    reader = RequestHead(limit=8192)
    statuses = [reader.feed(head[i : i + 1]) for i in range(len(head))]
    assert HeadStatus.BARE_LF in statuses
    # ... as soon as the LF arrives, not at the end of the head.
    bare = next(i for i, c in enumerate(head) if c == 0x0A and (i == 0 or head[i - 1] != 0x0D))
    assert statuses.index(HeadStatus.BARE_LF) == bare


def test_a_head_over_the_limit_is_refused() -> None:
    reader = RequestHead(limit=100)
    assert reader.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 80) is HeadStatus.INCOMPLETE
    assert reader.feed(b"a" * 10) is HeadStatus.TOO_LARGE


# --- PROXY protocol -----------------------------------------------------------------------------


def _v2(source: str, dest: str = "10.0.0.1", command: int = 0x21, tlvs: bytes = b"") -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", 51000, 443) + tlvs
    return (proxy_protocol.V2_SIGNATURE + bytes([command, family])
            + struct.pack("!H", len(block)) + block)


@pytest.mark.parametrize(("data", "source"), [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", "2001:db8::7"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (_v2("203.0.113.7"), "203.0.113.7"),
    (_v2("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    (_v2("203.0.113.7", tlvs=b"\x04\x00\x03abc"), "203.0.113.7"),
    (_v2("203.0.113.7", command=0x20), None),  # LOCAL: a health check
])
def test_proxy_headers_name_the_client(data: bytes, source: str | None) -> None:
    header = proxy_protocol.parse(data + b"GET / HTTP/1.1\r\n")
    assert header == proxy_protocol.ProxyHeader(source, len(data))
    for cut in range(len(data)):  # any prefix asks for more
        assert proxy_protocol.parse(data[:cut]) is None


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 443\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 443\r\n",
    b"PROXY TCP5 a b 1 2\r\n",
    b"PROXY " + b"x" * 200,
    proxy_protocol.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    proxy_protocol.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    proxy_protocol.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # block too short
    proxy_protocol.V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than relay takes
    b"GET / HTTP/1.1\r\n",
])
def test_bad_proxy_headers_are_refused(data: bytes) -> None:
    with pytest.raises(proxy_protocol.ProxyProtocolError):
        proxy_protocol.parse(data)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=100).map(lambda b: proxy_protocol.V2_SIGNATURE + b),
    st.binary(max_size=100).map(lambda b: proxy_protocol.V1_PREFIX + b),
))
def test_any_bytes_parse_or_are_refused_cleanly(data: bytes) -> None:
    """Fuzzing: never an exception other than ProxyProtocolError, and a header never claims
    more bytes than it was given."""
    try:
        header = proxy_protocol.parse(data)
    except proxy_protocol.ProxyProtocolError:
        return
    if header is not None:
        assert header.length <= len(data)
        if header.source is not None:
            ipaddress.ip_address(header.source)


# --- trusted proxies ----------------------------------------------------------------------------


def test_forwarded_for_is_believed_from_trusted_proxies_only() -> None:
    trusted = TrustedProxies.parse("10.0.0.0/8, 192.0.2.1")
    # The rightmost address that is not a trusted proxy is the client.
    assert trusted.client_address("10.1.1.1", ["198.51.100.9, 203.0.113.5"]) == "203.0.113.5"
    assert trusted.client_address("10.1.1.1", ["203.0.113.5, 10.2.2.2"]) == "203.0.113.5"
    assert trusted.client_address("10.1.1.1", ["203.0.113.5", "192.0.2.1"]) == "203.0.113.5"
    # What a client wrote to the left of the proxies' entries is not believed.
    assert trusted.client_address("10.1.1.1", ["1.1.1.1, 203.0.113.5"]) == "203.0.113.5"
    # Every entry a proxy: the leftmost.
    assert trusted.client_address("10.1.1.1", ["10.3.3.3, 10.4.4.4"]) == "10.3.3.3"
    # From anyone else, or garbage where the proxy writes, the peer itself.
    assert trusted.client_address("198.51.100.1", ["203.0.113.5"]) == "198.51.100.1"
    assert trusted.client_address("10.1.1.1", ["203.0.113.5, not-an-ip"]) == "10.1.1.1"
    assert trusted.client_address("10.1.1.1", []) == "10.1.1.1"
    # Ports and brackets as some proxies write them; IPv4-mapped IPv6.
    assert trusted.client_address("10.1.1.1", ["[2001:db8::5]:443"]) == "2001:db8::5"
    assert trusted.client_address("10.1.1.1", ["203.0.113.5:1234"]) == "203.0.113.5"
    assert trusted.trusts("::ffff:10.0.0.7") and not trusted.trusts("11.0.0.1")
    assert not TrustedProxies.parse("").trusts("127.0.0.1")


def test_bad_trusted_proxies_are_refused() -> None:
    with pytest.raises(TrustedProxiesError):
        TrustedProxies.parse("10.0.0.0/8, nonsense")


# --- admission ----------------------------------------------------------------------------------


def _limits(**overrides: float) -> adm.AdmissionLimits:
    values: dict[str, float] = dict(max_sessions=100, max_pending=100)
    values.update(overrides)
    return adm.AdmissionLimits(**values)  # type: ignore[arg-type]


def test_address_keys_group_an_ipv6_subscriber() -> None:
    assert adm.address_key("2001:db8:1:2:aaaa::1") == adm.address_key("2001:db8:1:2:bbbb::9")
    assert adm.address_key("2001:db8:1:3::1") != adm.address_key("2001:db8:1:2::1")
    assert adm.address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert adm.address_key("192.0.2.1") == "192.0.2.1"


def test_pending_and_sessions_are_capped_and_given_back() -> None:
    admission = adm.Admission(_limits(max_sessions=2, max_pending=3))
    tickets = [admission.accept() for _ in range(3)]
    assert None not in tickets and admission.accept() is None  # pending full: dropped
    for t in tickets:
        assert t is not None and admission.identify(t, "192.0.2.1", 0) is None
    assert admission.start_session(tickets[0]) is None  # type: ignore[arg-type]
    assert admission.start_session(tickets[1]) is None  # type: ignore[arg-type]
    assert admission.pending == 1 and admission.sessions == 2
    refusal = admission.start_session(tickets[2])  # type: ignore[arg-type]
    assert refusal is not None and refusal.reason == adm.SESSIONS
    assert admission.accept() is not None  # sessions no longer hold pending slots
    for t in tickets:
        admission.release(t)  # type: ignore[arg-type]
        admission.release(t)  # type: ignore[arg-type]  # idempotent
    assert admission.sessions == 0 and admission.pending == 1


def test_an_address_cannot_take_the_slots_of_others() -> None:
    admission = adm.Admission(_limits(max_pending_per_ip=2, max_sessions_per_ip=1))
    a = [admission.accept() for _ in range(3)]
    assert admission.identify(a[0], "192.0.2.1", 0) is None  # type: ignore[arg-type]
    assert admission.identify(a[1], "192.0.2.1", 0) is None  # type: ignore[arg-type]
    refusal = admission.identify(a[2], "192.0.2.1", 0)  # type: ignore[arg-type]
    assert refusal == adm.Refusal(adm.IP_PENDING, 0, True)
    other = admission.accept()
    assert other is not None and admission.identify(other, "192.0.2.2", 0) is None
    assert admission.start_session(a[0]) is None  # type: ignore[arg-type]
    refusal = admission.start_session(a[1])  # type: ignore[arg-type]
    assert refusal is not None and refusal.reason == adm.IP_SESSIONS
    assert admission.start_session(other) is None


def test_connect_rate_refuses_with_the_wait_and_drops_those_that_keep_coming() -> None:
    admission = adm.Admission(_limits(max_pending=1000, connect_rate=10, connect_burst=5))
    refusals = []
    for _ in range(20):
        ticket = admission.accept()
        assert ticket is not None
        refusals.append(admission.identify(ticket, "192.0.2.1", 100.0))
        admission.release(ticket)
    assert refusals[:5] == [None] * 5
    first = refusals[5]
    assert first is not None and first.reason == adm.IP_RATE and not first.hard
    assert first.retry_ms == 200  # the refused attempt took one too: two tokens at 10/s
    # Each refused attempt costs too: the wait grows, and past minus the burst it is a drop.
    waits = [r.retry_ms for r in refusals[5:] if r is not None]
    assert waits == sorted(waits) and waits[-1] > waits[0]
    assert refusals[-1] is not None and refusals[-1].hard
    # Once the wait is over, it is admitted again.
    later = admission.accept()
    assert later is not None
    assert admission.identify(later, "192.0.2.1", 100.001 + waits[-1] / 1000) is None


def test_auth_failures_refuse_an_address_without_a_lookup() -> None:
    admission = adm.Admission(_limits(auth_failure_rate=0.5, auth_failure_burst=3))
    ticket = admission.accept()
    assert ticket is not None and admission.identify(ticket, "192.0.2.1", 0) is None
    for _ in range(3):
        assert admission.may_authenticate(ticket, 0) is None
        admission.auth_failed(ticket, 0)
    refusal = admission.may_authenticate(ticket, 0)
    assert refusal is not None and refusal.reason == adm.IP_AUTH_FAILURES
    assert refusal.retry_ms == 2000
    assert admission.may_authenticate(ticket, 2.0) is None


def test_lookups_under_way_hold_the_failure_budget() -> None:
    """50 connections of one address authenticating at once started 50 store lookups against
    a budget of 20: each lookup now holds a token until it ends, a success gives it back."""
    admission = adm.Admission(_limits(max_pending=100, auth_failure_rate=0.5,
                                      auth_failure_burst=20))
    tickets = []
    for _ in range(50):
        ticket = admission.accept()
        assert ticket is not None and admission.identify(ticket, "192.0.2.1", 0) is None
        tickets.append(ticket)
    started = [t for t in tickets if admission.may_authenticate(t, 0) is None]
    assert len(started) == 20
    for ticket in started[:10]:
        admission.auth_done(ticket, 0, failed=False)  # found: their tokens come back
    for ticket in started[10:]:
        admission.auth_failed(ticket, 0)  # unknown: their tokens stay spent, once
    again = [t for t in tickets[20:] if admission.may_authenticate(t, 0) is None]
    assert len(again) == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["accept", "identify", "session", "release",
                                           "fail"]),
                          st.integers(0, 400), st.integers(0, 30)), max_size=300))
def test_counts_stay_exact_and_the_table_bounded(ops: list[tuple[str, int, int]]) -> None:
    """Whatever connections do, the counts equal what open tickets hold, and the address
    table holds at most the live addresses plus `max_idle_addresses`."""
    admission = adm.Admission(
        _limits(max_sessions=20, max_pending=30, max_pending_per_ip=4, max_sessions_per_ip=3,
                connect_rate=1, connect_burst=2, auth_failure_rate=1, auth_failure_burst=2),
        max_idle_addresses=10)
    tickets: list[adm.Ticket] = []
    now = 0.0
    for op, address, pick in ops:
        now += 0.1
        ip = f"192.0.2.{address % 256}" if address < 256 else f"2001:db8:{address}::1"
        if op == "accept":
            ticket = admission.accept()
            if ticket is not None:
                tickets.append(ticket)
        elif tickets:
            ticket = tickets[pick % len(tickets)]
            if op == "identify":
                admission.identify(ticket, ip, now)
            elif op == "session":
                admission.start_session(ticket)
            elif op == "fail":
                admission.auth_failed(ticket, now)
            else:
                admission.release(ticket)
                tickets.remove(ticket)
        assert admission.pending == sum(t.pending for t in tickets) <= 30
        assert admission.sessions == sum(t.session for t in tickets) <= 20
        live = {t.key for t in tickets if t.key is not None}
        assert admission.addresses() <= len(live) + 10


# --- keepalive ----------------------------------------------------------------------------------


def test_two_connections_are_pinged_once_per_interval_not_every_tick() -> None:
    rounds: PingRounds[str] = PingRounds(interval=20.0, slices=20)
    pinged: dict[str, list[float]] = {"a": [], "b": []}
    now = 0.0
    while now < 200:
        for conn in rounds.due(now, lambda: ["a", "b"]):
            pinged[conn].append(now)
        now += rounds.tick_s
    for times in pinged.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == 10 and all(19.0 <= g <= 21.0 for g in gaps), times


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.integers(1, 40))
def test_every_connection_is_pinged_once_per_round_in_slices(n: int, slices: int) -> None:
    rounds: PingRounds[int] = PingRounds(interval=10.0, slices=slices)
    seen: list[int] = []
    batches = 0
    now = 0.0
    while len(seen) < n:
        batch = rounds.due(now, lambda: range(n))
        seen += batch
        batches += bool(batch)
        now += rounds.tick_s
    assert sorted(seen) == list(range(n))  # each once, nobody twice in one round
    assert batches <= slices


def test_unanswered_pings_come_out_oldest_first_after_the_timeout() -> None:
    pending: PendingPings[str] = PendingPings()
    pending.sent("a", 1.0)
    pending.sent("b", 2.0)
    assert pending.due(10.0, 9.5) == []
    assert pending.due(11.5, 9.5) == [(1.0, "a"), (2.0, "b")]
    assert len(pending) == 0


# --- failed authentications ---------------------------------------------------------------------


def test_unknown_keys_are_remembered_briefly_and_boundedly() -> None:
    unknown = UnknownKeys(ttl=5.0, capacity=3)
    unknown.add("k1", 0.0)
    assert ("k1", 4.9) in unknown and ("k1", 5.0) not in unknown
    for i in range(10):
        unknown.add(f"x{i}", 1.0)
    assert len(unknown) == 3
    unknown.clear()
    assert ("x9", 1.0) not in unknown


def test_failures_are_summed_in_one_line_per_period() -> None:
    failures = FailureLog(period=10.0)
    for i in range(1500):
        failures.record("unknown_key", f"192.0.2.{i % 3}" if i < 1400 else f"h{i}", float(i) / 200)
    assert failures.summary(5.0) is None
    line = failures.summary(10.0)
    assert line is not None
    assert line.startswith("refused 1500 SDK authentication(s) in 10 s: unknown_key 1500")
    assert "192.0.2.0 (467)" in line
    assert failures.summary(30.0) is None  # a new period: nothing yet


def test_the_retry_hint_of_a_4101_round_trips() -> None:
    reason = protocol.limit_reason("too many connections from this address", 1234)
    assert len(reason.encode()) <= 123  # a close reason's limit
    assert protocol.close_retry_ms(reason) == 1234
    assert protocol.close_retry_ms("too many connections") is None
    assert protocol.close_retry_ms("x; retry_ms=12a") is None


def test_bearer_is_read_one_way_on_every_port() -> None:
    from relay.core.bearer import bearer, same_token

    assert bearer("Bearer k-1") == "k-1"
    assert bearer("bearer   k-1  ") == "k-1"  # the scheme is case-insensitive (RFC 7235)
    assert bearer(None) is None and bearer("") is None
    assert bearer("Basic a2V5") is None and bearer("Bearer") is None
    assert bearer("Bearer    ") is None
    assert same_token("t\udcff", b"t\xff")  # any text a client sends can be compared
    assert same_token("tok", "tok") and not same_token("tok", "toK")
