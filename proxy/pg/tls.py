"""TLS over any `ByteChannel`: a sans-I/O core on `ssl.MemoryBIO` and a thin channel adapter.

Why not `loop.start_tls`: it only wraps the loop's own transports; under uvloop it cannot wrap a
tunnel stream (or anything that is not a uvloop transport), and the origin connection must be the
same code whether it runs over TCP or over a tunnel stream. `ssl.SSLObject` with two memory BIOs
does the TLS work on bytes we move ourselves.

    core = TlsCore(ctx, server_hostname="db.example")
    out = core.start()                 # ClientHello to send
    plain = core.receive(data)         # feed ciphertext; returns decrypted bytes (may be b"")
    out = core.data_to_send()          # handshake/alerts/tickets replies to send
    core.send(b"...")                  # encrypt (buffered until the handshake is done)

`TlsChannel(inner, ctx, server_hostname=...)` runs the core on a channel; `await
tls.handshake(timeout)` and then use it as any other `ByteChannel`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from proxy.channel import ByteChannel

_READ_CHUNK = 256 * 1024


class TlsCore:
    """The TLS state machine of one connection, without I/O (client side by default)."""

    def __init__(self, context: ssl.SSLContext, *, server_hostname: str | None = None,
                 server_side: bool = False) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object: ssl.SSLObject = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname)
        self.handshake_done = False
        self.peer_closed = False  # close_notify or EOF from the peer
        self.clean_close = False  # the peer sent close_notify
        self._pending: list[bytes] = []  # plaintext written before the handshake completed
        self._started = False

    def start(self) -> bytes:
        """Begin the handshake; returns the bytes to send (the ClientHello on the client side)."""
        self._started = True
        self._handshake()
        return self.data_to_send()

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext from the peer; returns the plaintext it carried. Raises `ssl.SSLError`
        (e.g. `ssl.SSLCertVerificationError`) on a failed handshake or a bad record."""
        if data:
            self._incoming.write(data)
        if not self._started:
            self._started = True
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return b""
        return self._read()

    def receive_eof(self) -> bytes:
        """The peer's transport ended; returns plaintext still decodable. A handshake that had
        not finished raises `ssl.SSLEOFError`."""
        self._incoming.write_eof()
        if not self.handshake_done:
            try:
                self._handshake()
            except ssl.SSLError:
                raise
            if not self.handshake_done:
                raise ssl.SSLEOFError("EOF during the TLS handshake")
        data = self._read()
        self.peer_closed = True
        return data

    def send(self, data: bytes) -> None:
        """Encrypt `data` (queued until the handshake completes). Read `data_to_send()` after."""
        if not data:
            return
        if not self.handshake_done or self._pending:
            self._pending.append(bytes(data))
            if self.handshake_done:
                self._flush_pending()
            return
        self._write(data)

    def close(self) -> None:
        """Send close_notify (read it with `data_to_send()`); does not wait for the peer's."""
        try:
            self.ssl_object.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLSyscallError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            pass
        except ssl.SSLError:
            pass

    def data_to_send(self) -> bytes:
        return self._outgoing.read()

    # ------------------------------------------------------------------ internals
    def _handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.handshake_done = True
        self._flush_pending()

    def _flush_pending(self) -> None:
        while self._pending:
            data = self._pending[0]
            try:
                self._write(data)
            except ssl.SSLWantReadError:  # renegotiation in progress: retry after more input
                return
            self._pending.pop(0)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.ssl_object.write(view)
            view = view[n:]

    def _read(self) -> bytes:
        chunks: list[bytes] = []
        obj = self.ssl_object
        while True:
            try:
                chunk = obj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                self.clean_close = True
                break
            except ssl.SSLEOFError:
                self.peer_closed = True
                break
            if not chunk:  # b"" is how SSLObject reports the peer's close_notify
                self.peer_closed = True
                self.clean_close = True
                break
            chunks.append(chunk)
        if self._pending and self.handshake_done:
            self._flush_pending()
        return b"".join(chunks)


class TlsHandshakeError(ConnectionError):
    """The TLS handshake failed; `ssl_error` is the underlying `ssl.SSLError` when there is one."""

    def __init__(self, message: str, ssl_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.ssl_error = ssl_error

    @property
    def verification_failed(self) -> bool:
        return isinstance(self.ssl_error, ssl.SSLCertVerificationError)


class TlsChannel(ByteChannel):
    """TLS (client by default) over another `ByteChannel`.

    Takes the inner channel's receiver and write-flow callbacks. Reading pauses are passed to
    the inner channel once the handshake is done (the handshake itself must keep reading);
    the inner channel's write back-pressure is this channel's write back-pressure.
    """

    def __init__(self, inner: ByteChannel, context: ssl.SSLContext, *,
                 server_hostname: str | None = None, server_side: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.core = TlsCore(context, server_hostname=server_hostname, server_side=server_side)
        self._server_side = server_side
        self._handshake_waiter: asyncio.Future[None] | None = None
        self._handshake_error: BaseException | None = None
        self._eof_sent = False
        inner.set_write_flow(lambda: self._set_write_paused(True), lambda: self._set_write_paused(False))
        inner.set_receiver(self._inner_data, self._inner_closed)

    @property
    def handshake_done(self) -> bool:
        return self.core.handshake_done

    async def handshake(self, timeout: float | None = None) -> None:
        """Run the handshake; raises `TlsHandshakeError` (the inner channel is aborted) or
        `TimeoutError`."""
        loop = asyncio.get_running_loop()
        if self.core.handshake_done:
            return
        if self._handshake_error is not None:
            raise self._handshake_error
        self._handshake_waiter = loop.create_future()
        if not self._server_side:
            try:
                self._send_out(self.core.start())
            except ssl.SSLError as exc:
                self._fail_handshake(exc)
        try:
            if timeout is None:
                await self._handshake_waiter
            else:
                await asyncio.wait_for(self._handshake_waiter, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self.abort()
            raise TimeoutError("timed out during the TLS handshake") from None
        except asyncio.CancelledError:
            if not self.core.handshake_done:
                self.abort()
            raise

    # ------------------------------------------------------------------ inner channel events
    def _inner_data(self, data: bytes) -> None:
        if self._finished:
            return
        was_done = self.core.handshake_done
        try:
            plain = self.core.receive(data)
        except ssl.SSLError as exc:
            out = self.core.data_to_send()  # the alert, if any
            if out:
                self.inner.write(out)
            if not was_done:
                self._fail_handshake(exc)
            else:
                self._fail(ConnectionResetError(f"TLS error: {exc.reason or exc}"))
            return
        self._send_out(self.core.data_to_send())
        if not was_done and self.core.handshake_done:
            self._handshake_succeeded()
        if plain:
            self._received(plain)
        if self.core.peer_closed:
            self._peer_ended()

    def _inner_closed(self, exc: Exception | None) -> None:
        if self._finished:
            return
        if not self.core.handshake_done:
            msg = "the server closed the connection during the TLS handshake"
            if exc is not None:
                msg += f" ({exc})"
            self._fail_handshake(ConnectionResetError(msg))
            return
        if exc is not None:
            self._ended(exc)
            return
        try:
            plain = self.core.receive_eof()
        except ssl.SSLError as err:
            self._ended(ConnectionResetError(f"TLS error: {err}"))
            return
        if plain:
            self._received(plain)
        self._ended(None)  # EOF without close_notify is treated as a clean end (PG frames itself)

    def _peer_ended(self) -> None:
        self._ended(None)

    def _send_out(self, data: bytes) -> None:
        if data and not self.inner.is_closing():
            self.inner.write(data)

    def _handshake_succeeded(self) -> None:
        w = self._handshake_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._source_paused:
            self.inner.pause_reading()

    def _fail_handshake(self, exc: BaseException) -> None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            err = TlsHandshakeError(f"TLS handshake failed: certificate verification failed: "
                                    f"{exc.verify_message or exc.reason or exc}", exc)
        elif isinstance(exc, ssl.SSLError):
            err = TlsHandshakeError(f"TLS handshake failed: {exc.reason or exc}", exc)
        else:
            err = TlsHandshakeError(str(exc) or "TLS handshake failed", exc)
        self._handshake_error = err
        w = self._handshake_waiter
        if w is not None and not w.done():
            w.set_exception(err)
            w.exception()  # retrieved: the awaiting handshake() re-raises it anyway
        self.inner.abort()
        self._ended(err)

    def _fail(self, exc: Exception) -> None:
        self.inner.abort()
        self._ended(exc)

    # ------------------------------------------------------------------ ByteChannel
    def write(self, data: bytes) -> None:
        if self._finished or self._eof_sent or not data:
            return
        try:
            self.core.send(data)
        except ssl.SSLError as exc:
            self._fail(ConnectionResetError(f"TLS error: {exc.reason or exc}"))
            return
        self._send_out(self.core.data_to_send())

    def write_eof(self) -> None:
        if self._finished or self._eof_sent:
            return
        self._eof_sent = True
        if self.core.handshake_done:
            self.core.close()
            self._send_out(self.core.data_to_send())
        self.inner.write_eof()

    def close(self) -> None:
        if not self._finished and self.core.handshake_done and not self._eof_sent:
            self._eof_sent = True
            self.core.close()
            self._send_out(self.core.data_to_send())
        self._closed_locally()
        self.inner.close()

    def abort(self) -> None:
        self._closed_locally()
        self.inner.abort()
        w = self._handshake_waiter
        if w is not None and not w.done():
            w.set_exception(TlsHandshakeError("the connection was closed during the TLS handshake"))
            w.exception()  # retrieved: no "never retrieved" noise when nobody awaits it

    def is_closing(self) -> bool:
        return self._finished or self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        obj = self.core.ssl_object
        if name == "ssl_object":
            return obj
        if name == "peercert":
            return obj.getpeercert() if self.core.handshake_done else default
        if name == "peercert_der":
            return obj.getpeercert(binary_form=True) if self.core.handshake_done else default
        if name == "cipher":
            return obj.cipher()
        if name == "tls_version":
            return obj.version()
        return self.inner.get_extra_info(name, default)

    def _pause_source(self) -> None:
        if self.core.handshake_done:
            self.inner.pause_reading()

    def _resume_source(self) -> None:
        self.inner.resume_reading()
