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
import ssl


class TlsError(ValueError):
    """Certificate or key files that cannot be used (the message says which and why)."""


class Tls:
    def __init__(self, cert: str, key: str, ca: str = "") -> None:
        self.cert = cert
        self.key = key
        self.ca = ca
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.set_alpn_protocols(["http/1.1"])
        self.server_context.options |= ssl.OP_NO_RENEGOTIATION
        self.reload()

    def reload(self) -> None:
        """Load the certificate and key again (raises TlsError and keeps the old ones)."""
        try:
            # Into a scratch context first: a bad pair must not half-replace the live one.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
            self.server_context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load --tls-cert {self.cert} / --tls-key {self.key}: "
                           f"{exc}") from None

    def client_context(self) -> ssl.SSLContext:
        """For this node's own connections to peers (peer links and membership probes)."""
        if self.ca:
            try:
                context = ssl.create_default_context(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot load --tls-ca {self.ca}: {exc}") from None
            context.check_hostname = False  # peers are reached by address; the CA is private
            return context
        return ssl.create_default_context()


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
