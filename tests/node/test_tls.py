"""TLS on the SDK port, the internal port and the peer links, with real certificates made per
run (trustme), real sockets and real `relay serve` processes: wss:// SDK sessions, the admin
API over https, a cluster whose probes and peer links are TLS, peers that do not trust each
other, certificate rotation on SIGHUP, the CLI against https, and startup errors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from relay.client import RelayClient, RelayClientError
from relay.cluster.membership import make_membership
from relay.cluster.membership.base import Member
from relay.config import StaticDiscovery
from relay.core.node_state import NodeState
from relay.core.ring import Ring
from relay.node import Node
from relay.tls import Tls, TlsError, TlsStream, fingerprint, snapshot
from tests.cluster import Cluster
from tests.helpers import Admin, RelayProcess, start_relay

MakeNode = Callable[..., Awaitable[Node]]


class Pki:
    """A throwaway CA and the files a node is given: its certificate, key and the CA bundle."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1 and localhost, and its key, as files `name`.crt/.key."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        write_atomically(cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        write_atomically(key, leaf.private_key_pem.bytes())
        return cert, key

    def client(self) -> ssl.SSLContext:
        """What a client that trusts this CA uses (host names checked: 127.0.0.1 is in)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def write_atomically(path: Path, data: bytes) -> None:
    """As rotation tools do: a new file renamed over the old one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def der_of(cert_file: Path) -> bytes:
    """The DER of the first certificate of a PEM file (what a server presents)."""
    text = cert_file.read_text()
    end = text.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)
    return ssl.PEM_cert_to_DER_cert(text[:end])


def served_der(url: str, context: ssl.SSLContext) -> bytes:
    """The certificate a TLS port presents to a new connection (`wss://` or `https://` URL)."""
    host, _, port = url.split("://", 1)[1].split("/", 1)[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def tls_node(make_node: MakeNode, pki: Pki) -> Node:
    cert, key = pki.issue("node")
    return await make_node(tls_cert=str(cert), tls_key=str(key))


# --- one node in process ----------------------------------------------------------------------


async def test_sdk_client_over_wss_gets_hello_snapshot_and_deltas(
        make_node: MakeNode, pki: Pki) -> None:
    node = await tls_node(make_node, pki)
    assert node.ws_url.startswith("wss://") and node.admin_url.startswith("https://")
    admin = Admin(node.admin_url, ssl=pki.client())
    try:
        await admin.put_env("prod", ["sdk-prod"])
        await admin.publish("prod", {"a": 1})
        async with RelayClient(node.ws_url, "sdk-prod", ssl=pki.client()) as client:
            await client.wait_ready(timeout=10)
            assert (client.env, client.node, client.version) == ("prod", "test-node", 1)
            assert client.flags == {"a": 1} and client.stats.snaps == 1
            v = await admin.publish("prod", {"a": 2, "b": True})
            await client.wait_for_version(v, timeout=10)
            assert client.flags == {"a": 2, "b": True} and client.stats.deltas == 1
    finally:
        await admin.close()


async def test_admin_api_over_https(make_node: MakeNode, pki: Pki) -> None:
    node = await tls_node(make_node, pki)
    admin = Admin(node.admin_url, ssl=pki.client())
    try:
        await admin.put_env("prod", ["sdk-prod"])
        await admin.publish("prod", {"on": True})
        assert await admin.flags("prod") == (1, {"on": True})
        status, body = await admin.call("GET", "/readyz")
        assert status == 200 and body["ready"] is True
        status, text = await admin.call("GET", "/metrics")
        assert status == 200 and "relay_publishes_total" in text
    finally:
        await admin.close()
    # A client that does not trust the CA is refused by its own TLS stack.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(node.admin_url + "/readyz")


async def test_a_plain_text_client_on_the_tls_ports_gets_nothing(
        make_node: MakeNode, pki: Pki) -> None:
    """Plain HTTP on the TLS SDK and admin ports gets no answer and is closed, while a TLS
    client beside it goes on receiving changes."""
    node = await tls_node(make_node, pki)
    admin = Admin(node.admin_url, ssl=pki.client())
    try:
        await admin.put_env("prod", ["sdk-prod"])
        async with RelayClient(node.ws_url, "sdk-prod", ssl=pki.client()) as client:
            await client.wait_ready(timeout=10)
            for port in (node.port, node.admin_port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(), 5)  # until EOF
                except ConnectionResetError:
                    answer = b""
                assert b"HTTP" not in answer, answer  # at most a TLS alert, never plain text
                writer.close()
            v = await admin.publish("prod", {"after": 1})
            await client.wait_for_version(v, timeout=10)
            assert client.flags == {"after": 1} and client.stats.connects == 1
    finally:
        await admin.close()


async def test_a_client_that_does_not_trust_the_certificate_stops_with_the_reason(
        make_node: MakeNode, pki: Pki) -> None:
    """Retrying cannot fix a missing CA: the client ends at once with the reason."""
    node = await tls_node(make_node, pki)
    client = RelayClient(node.ws_url, "any", ssl=Pki(pki.dir / "other").client())
    async with client:
        with pytest.raises(RelayClientError, match="TLS certificate is not trusted"):
            await client.wait_ready(timeout=10)
    assert client.stats.connects == 0 and client.stats.reconnects == 0
    with pytest.raises(ValueError, match="wss://"):
        RelayClient("ws://127.0.0.1:1/v1/stream", "k", ssl=pki.client())


# --- reloading ------------------------------------------------------------------------------


def _handshake(tls: Tls, client: ssl.SSLContext) -> bytes:
    """A TLS handshake over memory with the server context; the certificate it presents."""
    server = TlsStream(tls.server_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    for _ in range(10):
        try:
            conn.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.receive(outgoing.read())
            incoming.write(server.outgoing())
    der = conn.getpeercert(binary_form=True)
    assert der is not None, "no handshake"
    return der


def test_a_reload_reads_each_file_once(pki: Pki) -> None:
    """A certificate rewritten between two reads of one reload (a rotation under way) must not
    leave the server with a certificate and no key: the pair read is loaded, or nothing."""
    cert_a, key_a = pki.issue("a")
    cert_b, _ = pki.issue("b")
    fifo = pki.dir / "cert.fifo"  # every open reads what the writer hands out for it
    os.mkfifo(fifo)
    state = {"phase": "start", "opens": 0}
    done = threading.Event()

    def reader_gone() -> bool:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no reader has it open
        return False

    def writer() -> None:
        while not done.is_set():
            # open() blocks until a reader opens the FIFO
            with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as out:
                state["opens"] += 1
                later = state["phase"] == "reload" and state["opens"] > 1
                out.write((cert_b if later else cert_a).read_bytes())
            # One content per open: wait until that reader has closed its end (else the
            # next write would reach the same reader, before its EOF).
            while not reader_gone() and not done.is_set():
                time.sleep(0.001)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        tls = Tls(str(fifo), str(key_a))
        assert _handshake(tls, pki.client()) == der_of(cert_a)
        state.update(phase="reload", opens=0)
        tls.reload()  # reads A once; reading twice would get B, which is not key A's
        assert _handshake(tls, pki.client()) == der_of(cert_a)
    finally:
        done.set()
        with open(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "rb"):
            pass  # lets a writer blocked in open() go
        thread.join(5)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_snapshot_holds_the_bytes_read_and_nothing_after(in_memory: bool) -> None:
    """Where a reload's pair is loaded from: in memory (Linux) or a private directory."""
    with snapshot(b"certificate", b"key", in_memory=in_memory) as (cert, key):
        assert (Path(cert).read_bytes(), Path(key).read_bytes()) == (b"certificate", b"key")
        if not in_memory:
            assert Path(key).stat().st_mode & 0o077 == 0
            assert Path(key).parent.stat().st_mode & 0o077 == 0
    if not in_memory:
        assert not Path(key).exists() and not Path(key).parent.exists()


def test_a_failed_reload_keeps_the_pair_and_says_why(pki: Pki) -> None:
    cert, key = pki.issue("node")
    tls = Tls(str(cert), str(key), str(pki.ca_file))
    before, loaded = der_of(cert), fingerprint(cert.read_bytes())
    other_cert, _ = pki.issue("other")
    write_atomically(cert, other_cert.read_bytes())  # a certificate that is not key's
    with pytest.raises(TlsError, match="cannot load --tls-cert"):
        tls.reload()
    assert _handshake(tls, pki.client()) == before
    cert.write_text("not a certificate")
    with pytest.raises(TlsError, match="cannot load --tls-cert"):
        tls.reload()
    assert _handshake(tls, pki.client()) == before
    assert tls.fingerprint == loaded


# --- relay serve: startup errors, SIGHUP ------------------------------------------------------


def serve(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", "0", "--admin-port", "0",
         "--data-dir", str(tmp / "data"), *args],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay: ")
    return lines[0]


def test_bad_certificate_files_stop_serve_with_one_line(tmp_path: Path, pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = pki.issue("node")
    _, other_key = pki.issue("other")
    missing = one_line_error(serve(tmp_path, "--tls-cert", str(tmp_path / "no.crt"),
                                   "--tls-key", str(key)))
    assert f"cannot load --tls-cert {tmp_path / 'no.crt'}: No such file" in missing
    mismatch = one_line_error(serve(tmp_path, "--tls-cert", str(cert),
                                    "--tls-key", str(other_key)))
    assert "cannot load --tls-cert" in mismatch and "KEY_VALUES_MISMATCH" in mismatch
    garbage = pki.dir / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert "cannot load --tls-cert" in one_line_error(
        serve(tmp_path, "--tls-cert", str(garbage), "--tls-key", str(key)))
    # An encrypted key would make OpenSSL prompt for a pass phrase on the terminal.
    encrypted = pki.dir / "encrypted.key"
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert f"--tls-key {encrypted} is encrypted" in one_line_error(
        serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(encrypted)))
    bad_ca = one_line_error(serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                                  "--tls-ca", str(key)))
    assert f"cannot load --tls-ca {key}" in bad_ca
    # A key file that others can write is refused, as token files are.
    planted = pki.dir / "planted.key"
    planted.write_bytes(key.read_bytes())
    planted.chmod(0o666)
    assert f"--tls-key {planted} is writable by" in one_line_error(
        serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(planted)))
    assert "go together" in one_line_error(serve(tmp_path, "--tls-cert", str(cert)))
    assert "--tls-ca is for a node with TLS" in one_line_error(
        serve(tmp_path, "--tls-ca", str(pki.ca_file)))


@pytest.fixture
def tls_relay(tmp_path: Path, pki: Pki) -> Iterator[RelayProcess]:
    cert, key = pki.issue("node")
    proc = start_relay(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key),
                       "--admin-token", "tls-token")
    yield proc
    assert proc.stop() == 0


def _lines_after(proc: RelayProcess, mark: int, text: str) -> list[str]:
    return [line for line in proc.output[mark:] if text in line]


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_sighup_rotates_the_certificate(tls_relay: RelayProcess, pki: Pki) -> None:
    """New connections to both ports get the new certificate; a session opened before keeps
    working; a bad file on SIGHUP keeps the current pair and is one log line."""
    cert, key = pki.dir / "node.crt", pki.dir / "node.key"
    old = der_of(cert)
    trust = pki.client()
    assert served_der(tls_relay.ws_url, trust) == old
    assert served_der(tls_relay.admin_url, trust) == old
    admin = Admin(tls_relay.admin_url, "tls-token", ssl=trust)
    try:
        await admin.put_env("prod", ["sdk-prod"])
        async with RelayClient(tls_relay.ws_url, "sdk-prod", ssl=trust) as before:
            await before.wait_ready(timeout=10)
            new_cert, new_key = pki.issue("next")
            write_atomically(key, new_key.read_bytes())
            write_atomically(cert, new_cert.read_bytes())
            new = der_of(cert)
            assert new != old
            mark = len(tls_relay.output)
            tls_relay.proc.send_signal(signal.SIGHUP)
            await _until(lambda: bool(_lines_after(tls_relay, mark, "SIGHUP")), "no SIGHUP log")
            assert served_der(tls_relay.ws_url, trust) == new
            assert served_der(tls_relay.admin_url, trust) == new
            [line] = _lines_after(tls_relay, mark, "SIGHUP")
            assert "reloaded --tls-cert" in line and fingerprint(cert.read_bytes()) in line
            # The session from before the rotation goes on; a new one works too.
            v = await admin.publish("prod", {"rotated": True})
            await before.wait_for_version(v, timeout=10)
            assert before.stats.connects == 1
            async with RelayClient(tls_relay.ws_url, "sdk-prod", ssl=trust) as after:
                await after.wait_ready(timeout=10)
                assert after.flags == {"rotated": True}

            # A certificate that does not match the key: the current pair stays.
            mismatched, _ = pki.issue("mismatched")
            write_atomically(cert, mismatched.read_bytes())
            mark = len(tls_relay.output)
            tls_relay.proc.send_signal(signal.SIGHUP)
            await _until(lambda: bool(_lines_after(tls_relay, mark, "SIGHUP")), "no SIGHUP log")
            await asyncio.sleep(0.3)  # anything more it would log
            [line] = _lines_after(tls_relay, mark, "SIGHUP")
            assert "cannot load --tls-cert" in line and "previous certificate" in line
            assert not _lines_after(tls_relay, mark, "Traceback")
            assert len(tls_relay.output) - mark == 1, tls_relay.output[mark:]
            assert served_der(tls_relay.ws_url, trust) == new
            assert served_der(tls_relay.admin_url, trust) == new
            v = await admin.publish("prod", {"still": True})
            await before.wait_for_version(v, timeout=10)
    finally:
        await admin.close()


async def test_sighup_without_tls_is_ignored(tmp_path: Path) -> None:
    proc = start_relay(tmp_path / "data")
    try:
        mark = len(proc.output)
        proc.proc.send_signal(signal.SIGHUP)
        await _until(lambda: bool(_lines_after(proc, mark, "SIGHUP")), "no SIGHUP log")
        assert "TLS is off" in _lines_after(proc, mark, "SIGHUP")[0]
        assert proc.proc.poll() is None
    finally:
        assert proc.stop() == 0


# --- the CLI against TLS --------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=60)


def test_admin_commands_over_https(tls_relay: RelayProcess, pki: Pki) -> None:
    assert tls_relay.admin_url.startswith("https://")
    admin = ["--admin-url", tls_relay.admin_url, "--admin-token", "tls-token"]
    ca = ["--admin-ca", str(pki.ca_file)]
    result = cli("env", "put", "prod", "--key", "sdk-prod", *admin, *ca)
    assert result.returncode == 0, result.stderr
    result = cli("flags", "set", "prod", "on=true", *admin,
                 env={"RELAY_ADMIN_CA": str(pki.ca_file)})
    assert result.stdout.strip() == "prod: v=1 (1 flag(s) set)", result.stderr
    assert "on = true" in cli("flags", "get", "prod", *admin, *ca).stdout
    assert "(ready)" in cli("status", *admin, *ca).stdout
    untrusted = one_line_error(cli("status", *admin))
    assert "certificate is not trusted" in untrusted and "--admin-ca" in untrusted
    other = Pki(pki.dir / "other")
    assert "certificate is not trusted" in one_line_error(
        cli("status", *admin, "--admin-ca", str(other.ca_file)))
    missing = one_line_error(cli("status", *admin, "--admin-ca", str(pki.dir / "none.pem")))
    assert f"cannot load --admin-ca {pki.dir / 'none.pem'}: No such file" in missing
    not_a_ca = one_line_error(cli("status", *admin, "--admin-ca", str(pki.dir / "node.key")))
    assert "cannot load --admin-ca" in not_a_ca
    plain = one_line_error(cli("status", "--admin-url",
                               tls_relay.admin_url.replace("https://", "http://"),
                               "--admin-token", "tls-token"))
    assert "an https:// port?" in plain


def watch_error(result: subprocess.CompletedProcess[str]) -> str:
    """`relay watch`'s error: its last line, after the connection's state ("connecting to")."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[0].startswith("relay watch: connecting to "), lines
    assert lines[-1].startswith("relay: "), lines
    return lines[-1]


def test_watch_over_wss(tls_relay: RelayProcess, pki: Pki) -> None:
    admin = ["--admin-url", tls_relay.admin_url, "--admin-token", "tls-token",
             "--admin-ca", str(pki.ca_file)]
    cli("env", "put", "watched", "--key", "sdk-watch", *admin)
    cli("flags", "set", "watched", "a=1", *admin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    watch = subprocess.Popen(
        [sys.executable, "-m", "relay", "watch", "--url", tls_relay.ws_url, "--key", "sdk-watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONUNBUFFERED": "1", "RELAY_CA": str(pki.ca_file)},
    )
    assert watch.stdout is not None
    try:
        lines = [watch.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("snapshot v=1: 1 flag(s)"), lines
        assert watch.stderr is not None
        watch.stderr.readline()  # connecting to
        assert watch.stderr.readline().startswith("relay watch: connected: env watched")
        cli("flags", "set", "watched", "a=2", *admin)
        assert watch.stdout.readline().strip() == "v=2 set a = 2"
    finally:
        watch.terminate()
        watch.wait(10)
    url = ["--url", tls_relay.ws_url, "--key", "sdk-watch"]
    untrusted = watch_error(cli("watch", *url))
    assert "certificate is not trusted" in untrusted and "--ca" in untrusted
    assert "certificate is not trusted" in watch_error(
        cli("watch", *url, "--ca", str(Pki(pki.dir / "other").ca_file)))
    assert "cannot load --ca" in one_line_error(cli("watch", *url, "--ca", str(pki.dir / "x")))
    plain_url = tls_relay.ws_url.replace("wss://", "ws://")
    assert "--ca is for wss:// URLs" in one_line_error(
        cli("watch", "--url", plain_url, "--key", "k", "--ca", str(pki.ca_file)))


def test_drain_by_address_over_https(tmp_path: Path, pki: Pki) -> None:
    """`relay drain HOST:PORT --wait` (the Kubernetes preStop hook) with an https admin URL:
    the node is reached, and its /readyz followed, over TLS."""
    cert, key = pki.issue("node")
    proc = start_relay(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key),
                       "--admin-token", "tls-token")
    try:
        address = proc.admin_url.removeprefix("https://")
        result = cli("drain", address, "--wait", "--deadline", "10",
                     env={"RELAY_ADMIN_URL": proc.admin_url, "RELAY_ADMIN_TOKEN": "tls-token",
                          "RELAY_ADMIN_CA": str(pki.ca_file)})
        assert result.returncode == 0, result.stderr
        assert "drained and stopping" in result.stdout
        proc.proc.wait(20)
        assert proc.proc.returncode == 0
    finally:
        proc.stop()


# --- a cluster over TLS ---------------------------------------------------------------------


async def test_a_tls_node_says_why_a_plain_peer_is_not_a_member(
        make_node: MakeNode, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A cluster is all-TLS or all-plain: a TLS node's probe of a node without TLS fails its
    handshake, and the log says so once."""
    plain = await make_node()
    me = Member("me", "127.0.0.1:1", NodeState.READY)
    address = f"127.0.0.1:{plain.admin_port}"
    membership = make_membership(StaticDiscovery({"plain": address}), lambda: me, "", 0.05,
                                 ssl_context=pki.client())
    caplog.set_level(logging.WARNING, logger="relay.membership")
    await membership.start()
    try:
        await asyncio.sleep(0.5)  # ten rounds
        assert set(membership.members()) == {"me"}
    finally:
        await membership.stop()
    [record] = [r for r in caplog.records if address in r.getMessage()]
    assert "TLS handshake failed" in record.getMessage()
    assert "a cluster is all-TLS or all-plain" in record.getMessage()


def _tls_flags(pki: Pki, name: str, ca: Path | None = None) -> list[str]:
    cert, key = pki.issue(name)
    return ["--tls-cert", str(cert), "--tls-key", str(key),
            "--tls-ca", str(ca or pki.ca_file)]


def _env_owned_by(owner: str, nodes: list[str]) -> str:
    ring = Ring(nodes)
    return next(env for env in (f"env{i}" for i in range(100)) if ring.owner(env) == owner)


def _log_lines(node: RelayProcess, text: str) -> list[str]:
    return [line for line in node.output if text in line]


@pytest.fixture
def cluster2(tmp_path: Path, redis_url: str, pki: Pki) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, redis_url, 2, ssl_context=pki.client())
    try:
        yield cluster
    finally:
        cluster.stop_all()


async def test_a_cluster_over_tls(cluster2: Cluster, pki: Pki) -> None:
    """Two nodes with --tls-ca: probes (https) make the ring, and a change published on the
    owner reaches a wss:// client on the other node over the peer link (wss)."""
    for i in range(2):
        cluster2.start(i, *_tls_flags(pki, f"n{i}"))
    await cluster2.wait_ring({0, 1})
    env = _env_owned_by("n0", ["n0", "n1"])
    admin = cluster2.admin(0)
    try:
        await admin.put_env(env, ["sdk-key"])
        async with RelayClient(cluster2.nodes[1].ws_url, "sdk-key", ssl=pki.client()) as client:
            await client.wait_ready(timeout=10)
            await _until(lambda: cluster2.metric(1, "relay_peer_links") >= 1, "no peer link")
            for n in range(3):
                v = await admin.publish(env, {"n": n})
                await client.wait_for_version(v, timeout=10)
            assert client.flags == {"n": 2} and client.stats.gaps == 0
            assert client.node == "n1"
    finally:
        await admin.close()
    for node in cluster2.nodes.values():
        assert not _log_lines(node, "Traceback") and not _log_lines(node, "TLS")


async def test_a_peer_that_does_not_trust_the_ca_is_not_a_member_until_it_does(
        cluster2: Cluster, pki: Pki) -> None:
    """n1 trusts another CA only: its probes of n0 fail verification, so n0 is not in its
    ring (one log line says why, however many probes fail). Once n1's bundle holds n0's CA
    too, a SIGHUP makes it trust n0: the ring forms and n1 follows n0 over a peer link."""
    other = Pki(pki.dir / "other")
    bundle = pki.dir / "n1-trusts.pem"
    bundle.write_bytes(other.ca_file.read_bytes())
    cluster2.start(0, *_tls_flags(pki, "n0"))
    n1 = cluster2.start(1, *_tls_flags(pki, "n1", ca=bundle))
    await _until(lambda: bool(_log_lines(n1, "is not a member")), "n1 says nothing")
    await asyncio.sleep(1.0)  # five more probe rounds: still one line
    [line] = _log_lines(n1, "is not a member")
    address = cluster2.nodes[0].admin_url.removeprefix("https://")
    assert f"peer {address} is not a member: its TLS certificate is not trusted" in line
    assert "--tls-ca" in line
    assert {m["node"] for m in cluster2.status(1)["ring"] if m["in_ring"]} == {"n1"}
    assert cluster2.metric(1, "relay_peer_links") == 0

    bundle.write_bytes(other.ca_file.read_bytes() + pki.ca_file.read_bytes())
    n1.proc.send_signal(signal.SIGHUP)
    await cluster2.wait_ring({0, 1})
    env = _env_owned_by("n0", ["n0", "n1"])
    admin = cluster2.admin(0)
    try:
        await admin.put_env(env, ["sdk-key"])
        async with RelayClient(n1.ws_url, "sdk-key", ssl=pki.client()) as client:
            await client.wait_ready(timeout=10)
            await _until(lambda: cluster2.metric(1, "relay_peer_links") >= 1, "no peer link")
            v = await admin.publish(env, {"trusted": True})
            await client.wait_for_version(v, timeout=10)
    finally:
        await admin.close()
    assert not _log_lines(n1, "Traceback")


async def test_a_peer_link_to_an_untrusted_peer_is_not_formed(
        tmp_path: Path, redis_url: str, pki: Pki) -> None:
    """With heartbeat membership (no probes) the peers are in each other's rings, and the
    peer link itself refuses the certificate: n1 says why once, follows n0's environments
    from the store instead, and its client still gets every change."""
    cluster = Cluster(tmp_path, redis_url, 2, discovery="redis", ssl_context=pki.client())
    other = Pki(pki.dir / "other")
    try:
        cluster.start(0, *_tls_flags(pki, "n0"))
        n1 = cluster.start(1, *_tls_flags(pki, "n1", ca=other.ca_file))
        await cluster.wait_ring({0, 1})
        env = _env_owned_by("n0", ["n0", "n1"])
        admin = cluster.admin(0)
        try:
            await admin.put_env(env, ["sdk-key"])
            async with RelayClient(n1.ws_url, "sdk-key", ssl=pki.client()) as client:
                await client.wait_ready(timeout=10)
                await _until(lambda: bool(_log_lines(n1, "peer link to n0")), "n1 says nothing")
                for n in range(3):
                    v = await admin.publish(env, {"n": n})
                    await client.wait_for_version(v, timeout=10)
                await asyncio.sleep(1.0)  # the link keeps retrying meanwhile
        finally:
            await admin.close()
        [line] = _log_lines(n1, "peer link to n0")
        assert "its TLS certificate is not trusted" in line, line
        assert cluster.metric(1, "relay_peer_links") == 0
        assert not _log_lines(n1, "Traceback")
    finally:
        cluster.stop_all()


def test_a_certificate_file_that_holds_the_key_first_is_served(tmp_path: Path) -> None:
    """load_cert_chain takes a PEM with the key before the chain; so must the rest (the
    fingerprint logged at start and on SIGHUP failed on it with a traceback)."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    combined = tmp_path / "combined.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(combined))
    key = tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    tls = Tls(str(combined), str(key))
    assert tls.fingerprint == fingerprint(issued.cert_chain_pems[0].bytes())
    assert tls.fingerprint.count(":") == 31


async def test_a_burst_of_tls_handshakes_is_done_a_few_per_tick(
    tmp_path: Path, pki: Pki, make_node: Any
) -> None:
    """A handshake costs a signature; 200 from one address in one burst held the loop for
    50-65 ms. The server does TLS_HANDSHAKES_PER_TICK per event-loop tick; the others wait
    their turn (reading paused), and all complete."""
    from relay import sdk_server

    cert, key = pki.issue("node")
    node = await make_node(tls_cert=str(cert), tls_key=str(key))
    loop = asyncio.get_running_loop()
    ticks = 0
    ticking = True

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticking:
            loop.call_soon(tick)

    steps: list[int] = []  # the tick of each handshake step
    receive = sdk_server.TlsStream.receive

    def counted(self: TlsStream, data: bytes) -> bytes:
        if not self.handshaken:
            steps.append(ticks)
        return receive(self, data)

    sdk_server.TlsStream.receive = counted  # type: ignore[method-assign]
    try:
        tick()
        context = pki.client()
        # 40 ClientHellos made beforehand and sent at once, as another host would.
        clients = []
        for _ in range(40):
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            sock = socket.create_connection(("127.0.0.1", node.port))
            clients.append((sock, outgoing.read()))
        await asyncio.sleep(0.2)  # all accepted
        for sock, hello in clients:
            sock.sendall(hello)
        for sock, _ in clients:  # each gets its ServerHello
            sock.setblocking(False)
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert data[:1] == b"\x16"  # a handshake record
            sock.close()
    finally:
        ticking = False
        sdk_server.TlsStream.receive = receive  # type: ignore[method-assign]
    per_tick = Counter(steps)
    assert max(per_tick.values()) <= sdk_server.TLS_HANDSHAKES_PER_TICK, per_tick
