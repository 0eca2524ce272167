"""TLS for relay's ports and peer links: the server context and its reload (no sockets).

One certificate and key (`--tls-cert`, `--tls-key`, PEM) serve the public SDK port and the
internal port. The server context is one object for the life of the process: `reload()` loads
the files again into it (OpenSSL uses the new pair for handshakes from then on, while open
connections keep theirs), so a rotated certificate takes effect on SIGHUP without a restart.
A reload that fails (a half-written file, a key that does not match) keeps the old pair.

Peers and membership probes connect to each other over TLS when it is on, verifying the peer's
certificate against `--tls-ca` (a private CA: peers are reached by address, so host names are
not checked) or, without it, the system's CAs with host names checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from relay.private_files import SecretFileError, read_private_bytes


class TlsError(ValueError):
    """Certificate, key or CA files that cannot be used (the message says which and why)."""


class _EncryptedKey(Exception):
    """OpenSSL asked for a pass phrase."""


def _no_pass_phrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal (and block the node).
    raise _EncryptedKey


def client_context(ca: str = "", flag: str = "--tls-ca") -> ssl.SSLContext:
    """A context for connecting to relay nodes: with `ca` (a private CA's PEM bundle), the
    server's certificate must chain to it and host names are not checked (nodes are reached
    by address, as pods are); without it, the system's CAs with host names checked.
    `flag` names the option in errors."""
    if not ca:
        return ssl.create_default_context()
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load {flag} {ca}: {_reason(exc)}") from None
    context.check_hostname = False
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)


_MEMFD = hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()


@contextlib.contextmanager
def snapshot(cert: bytes, key: bytes, in_memory: bool = _MEMFD) -> Iterator[tuple[str, str]]:
    """Paths holding these bytes, for `load_cert_chain` (which only takes paths): both loads
    of a reload read the same pair even if the files change meanwhile. In memory (memfd)
    where the platform has it, else in a private temporary directory."""
    if in_memory:
        fds = [os.memfd_create("relay-tls", os.MFD_CLOEXEC) for _ in range(2)]
        try:
            for fd, data in zip(fds, (cert, key), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="relay-tls-") as tmp:  # created 0700
        paths = (os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem"))
        for path, data in zip(paths, (cert, key), strict=True):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
                out.write(data)
        yield paths


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the first certificate in a PEM chain, as `openssl x509 -fingerprint -sha256`
    prints it (what an operator compares after a rotation)."""
    text = pem.decode("ascii", "replace")
    start = text.find(ssl.PEM_HEADER)  # (a file may hold the key first, then the chain)
    end = text.find(ssl.PEM_FOOTER, start)
    if start < 0 or end < 0:
        return "unknown"
    try:
        der = ssl.PEM_cert_to_DER_cert(text[start : end + len(ssl.PEM_FOOTER)])
    except ValueError:
        return "unknown"
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class Tls:
    """The node's TLS: one server context for its ports and one client context for its
    connections to peers, both loaded again (in place) by `reload`."""

    def __init__(self, cert: str, key: str, ca: str = "") -> None:
        self.cert = cert
        self.key = key
        self.ca = ca
        self.fingerprint = ""
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.set_alpn_protocols(["http/1.1"])
        self.server_context.options |= ssl.OP_NO_RENEGOTIATION
        self._client = client_context(ca)
        self.reload()

    def reload(self) -> None:
        """Load the certificate and key again, and add the CAs of --tls-ca (a CA once trusted
        stays trusted until a restart: OpenSSL's store only grows). Raises TlsError and keeps
        what was loaded before when anything cannot be used. Each file is read once, so a
        rotation that rewrites them meanwhile cannot mix an old and a new half."""
        try:
            cert = Path(self.cert).read_bytes()
            ca = Path(self.ca).read_bytes().decode("ascii", "replace") if self.ca else ""
        except OSError as exc:
            raise TlsError(f"cannot load {self._flag_of(exc.filename)} {exc.filename}: "
                           f"{_reason(exc)}") from None
        try:  # the key is a secret: a file others can write is refused, as tokens are
            key = read_private_bytes(self.key, "--tls-key")
        except SecretFileError as exc:
            raise TlsError(str(exc)) from None
        if ca:
            try:
                ssl.create_default_context(cadata=ca)
            except ssl.SSLError as exc:
                raise TlsError(f"cannot load --tls-ca {self.ca}: {exc}") from None
        with snapshot(cert, key) as (cert_path, key_path):
            try:
                # Into a scratch context first: a bad pair must not half-replace the live one
                # (OpenSSL drops the old key when a certificate that does not match it loads).
                scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                scratch.load_cert_chain(cert_path, key_path, password=_no_pass_phrase)
                self.server_context.load_cert_chain(cert_path, key_path,
                                                    password=_no_pass_phrase)
            except _EncryptedKey:
                raise TlsError(f"--tls-key {self.key} is encrypted: give the key without a "
                               "pass phrase") from None
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot load --tls-cert {self.cert} / --tls-key {self.key}: "
                               f"{exc}") from None
        if ca:
            self._client.load_verify_locations(cadata=ca)
        self.fingerprint = fingerprint(cert)

    def _flag_of(self, path: object) -> str:
        return {self.cert: "--tls-cert", self.key: "--tls-key", self.ca: "--tls-ca"}.get(
            str(path), "file")

    def client_context(self) -> ssl.SSLContext:
        """For this node's own connections to peers (peer links and membership probes): one
        object, so a reload's new CAs apply to the next connections."""
        return self._client


def peer_failure(exc: BaseException) -> str:
    """One line on why a TLS connection to a peer failed, with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({exc.verify_message}); "
                "check --tls-ca and the CA that signed its --tls-cert")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake failed ({exc.reason or exc}); does it run with TLS? "
                "(a cluster is all-TLS or all-plain)")
    return f"TLS failed: {exc}"


class TlsFailed(Exception):
    """The TLS handshake or a record failed: the connection is dropped."""


class TlsStream:
    """One server-side TLS session over memory buffers (no I/O): bytes from the socket go in,
    plaintext comes out; plaintext to send goes in, bytes for the socket come out.

    The SDK server drives TLS itself rather than through the event loop's `start_tls`, so a
    connection is admitted (address, rates, caps) before any handshake work, a trusted
    proxy's PROXY header can precede the handshake, and reading stays budgeted as for plain
    connections.
    """

    __slots__ = ("_in", "_obj", "_out", "eof", "handshaken")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshaken = False
        self.eof = False  # the client sent close_notify

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the socket; return the plaintext they complete (maybe none).
        Raises TlsFailed. Call `outgoing` afterwards: the handshake has answers to send."""
        self._in.write(data)
        chunks: list[bytes] = []
        try:
            if not self.handshaken:
                self._obj.do_handshake()
                self.handshaken = True
            while chunk := self._obj.read(1 << 16):
                chunks.append(chunk)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True
        except ssl.SSLError as exc:
            raise TlsFailed(str(exc)) from None
        return b"".join(chunks)

    def send(self, data: bytes) -> bytes:
        """Encrypt `data`; return the bytes to write to the socket."""
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise TlsFailed(str(exc)) from None
        return self._out.read()

    def outgoing(self) -> bytes:
        """Bytes the session produced for the socket (handshake messages, alerts)."""
        return self._out.read()

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing the socket."""
        with contextlib.suppress(ssl.SSLError):  # (it wants the peer's: not waited for)
            self._obj.unwrap()
        return self._out.read()
