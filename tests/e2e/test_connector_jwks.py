"""The connector's JWKS download is bounded (issue 13): a 300 MB key set must not make the
connector hold 300 MB (before: 958 MiB), a trickling one is cut off by the timeout, and a
gzip or deeply nested body is refused. A local HTTPS server with the edge's certificate (the
download is pinned) serves the bodies; the connector's own code runs in a real process whose
peak RSS (VmHWM) is read from /proc."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from pathlib import Path

import pytest

from connector.jwks import JwksFetchError, fetch_jwks
from tests.harness.procs import REPO_ROOT, base_env
from tunnel.tls import cert_pin, ensure_edge_certificate, server_ssl_context
from tunnel.token import TunnelToken

HUGE = 300 * 1024 * 1024
_MIB = b"x" * (1024 * 1024)

# The connector's own path to the keys (Supervisor.jwks, as a stream's assertion check uses it),
# then the process's peak RSS.
CLIENT = r"""
import asyncio, json, sys
from connector.supervisor import Supervisor
from tunnel.token import TunnelToken

async def main():
    sup = Supervisor(TunnelToken.decode(sys.argv[1]), ha_connections=1)
    try:
        await sup.jwks.key_for("no-such-kid")
        result = "fetched"
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"result": result, "hwm_kib": hwm}))

asyncio.run(main())
"""


class KeyServer:
    """HTTPS on 127.0.0.1 answering GET /cdn-cgi/access/certs as `mode` says."""

    def __init__(self, tmp: Path, mode: str) -> None:
        self.cert, self.key = ensure_edge_certificate(tmp, [])
        self.mode = mode
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "KeyServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                 ssl=server_ssl_context(self.cert, self.key))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def token(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return TunnelToken("11111111-2222-3333-4444-555555555555", b"s" * 32, [f"127.0.0.1:{port}"],
                           cert_pin(self.cert)).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            if self.mode == "small":
                body = json.dumps({"keys": []}).encode()
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif self.mode == "gzip":
                body = gzip.compress(json.dumps({"keys": [], "pad": "x" * 10_000_000}).encode())
                writer.write(head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            elif self.mode == "nested":
                body = b"[" * 500_000 + b"]" * 500_000
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif self.mode == "trickle":
                writer.write(head + b"Content-Length: 100\r\n\r\n")
                for _ in range(100):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.5)
            else:  # a valid JSON document of 300 MB, with or without Content-Length
                prefix, suffix = b'{"keys": [], "pad": "', b'"}'
                length = b"Content-Length: %d\r\n" % (len(prefix) + HUGE + len(suffix)) if self.mode == "huge-length" else b""
                writer.write(head + length + b"Connection: close\r\n\r\n" + prefix)
                for _ in range(HUGE // len(_MIB)):
                    writer.write(_MIB)
                    await writer.drain()
                writer.write(suffix)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()


async def _connector_fetch(token: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, token, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT), env=base_env())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["huge-length", "huge-close"])
async def test_a_huge_key_set_is_refused_without_being_held(tmp_path, mode):
    async with KeyServer(tmp_path, "small") as small:
        baseline = await _connector_fetch(small.token)
    assert baseline["result"] == "fetched"
    async with KeyServer(tmp_path, mode) as huge:
        got = await _connector_fetch(huge.token)
    grown_mib = (got["hwm_kib"] - baseline["hwm_kib"]) / 1024
    print(f"{mode}: peak RSS {got['hwm_kib'] / 1024:.0f} MiB (baseline {baseline['hwm_kib'] / 1024:.0f} MiB)")
    assert "JwksFetchError" in got["result"] and "bytes allowed" in got["result"], got
    assert grown_mib < 32, f"the download grew the connector by {grown_mib:.0f} MiB"


async def test_a_trickling_key_set_is_cut_off_by_the_timeout(tmp_path):
    async with KeyServer(tmp_path, "trickle") as server:
        tok = TunnelToken.decode(server.token)
        with pytest.raises(JwksFetchError, match="no complete answer within 1s"):
            await asyncio.wait_for(fetch_jwks(tok.edge, tok.pin, timeout=1.0), 20)


@pytest.mark.parametrize("mode", ["gzip", "nested"])
async def test_compressed_or_deeply_nested_key_sets_are_refused(tmp_path, mode):
    async with KeyServer(tmp_path, mode) as server:
        tok = TunnelToken.decode(server.token)
        with pytest.raises(JwksFetchError):
            await asyncio.wait_for(fetch_jwks(tok.edge, tok.pin), 20)
