"""`run_edge` in-process (fake relay, the real proxy listeners): the state dir's lock, the TLS it
serves and keeps current, the plaintext policy per listener, and `hd edge ca` / `hd edge` options.
Two real processes on one state dir: tests/e2e/test_edge_bounds.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cli.main import run
from control.certs import handshake_check, issue_server_cert, load_edge_tls, make_ca
from control.edge import EdgeError, client_tls_required, run_edge
from tests.harness.pgwire import served_certificate
from tests.unit.test_cli import FakeRelay
from tunnel.tls import server_ssl_context


def _write_operator(d: Path, ca, ca_key, names=("localhost", "127.0.0.1")) -> tuple[Path, Path, bytes]:
    cert, key = issue_server_cert(ca, ca_key, list(names))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "cert.pem", d / "key.pem", cert.public_bytes(serialization.Encoding.DER)


async def _served_der(host: str, port: int) -> bytes:
    return await asyncio.to_thread(served_certificate, host, port, 5.0)

class Running:
    """run_edge as a task; `info` once ready."""

    def __init__(self, state: Path, **kw) -> None:
        self.state, self.kw = state, kw
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.info: dict = {}
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Running":
        def on_ready(info: dict) -> None:
            self.info = info
            self.ready.set()

        self.task = asyncio.create_task(run_edge(self.state, "127.0.0.1:0", "127.0.0.1:0", on_ready,
                                                 relay_factory=FakeRelay, stop_event=self.stop, **self.kw))
        done, _ = await asyncio.wait({self.task, asyncio.create_task(self.ready.wait())}, timeout=20,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()  # raises the startup error
        assert self.ready.is_set(), "the edge did not get ready in 20 s"
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


async def test_a_second_edge_in_the_same_process_is_refused_and_changes_nothing(tmp_path) -> None:
    async with Running(tmp_path) as first:
        before = (tmp_path / "edge.json").read_bytes()
        with pytest.raises(EdgeError, match=r"another edge \(pid \d+\) is using this state dir"):
            await asyncio.wait_for(run_edge(tmp_path, "127.0.0.1:0", "127.0.0.1:0", relay_factory=FakeRelay), 60)
        assert (tmp_path / "edge.json").read_bytes() == before and json.loads(before)["api_url"] == first.info["api_url"]
    async with Running(tmp_path):  # released at exit
        pass


async def test_the_listeners_serve_the_operators_certificate_and_pick_up_its_renewal(tmp_path) -> None:
    ops = tmp_path / "ops"
    ops.mkdir()
    ca, ca_key = make_ca()
    (ops / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert, key, first = _write_operator(ops, ca, ca_key)
    async with Running(tmp_path / "state", pg_listen="127.0.0.1:0", tls_cert=cert, tls_key=key,
                       tls_ca=ops / "ca.pem", tls_refresh_interval=0.1) as edge:
        assert edge.info["ca_path"] == str(ops / "ca.pem")
        host, port = edge.info["pg_listen"].rsplit(":", 1)
        assert await _served_der(host, int(port)) == first
        _, _, renewed = _write_operator(ops, ca, ca_key)  # what an ACME client does, in place
        deadline = asyncio.get_running_loop().time() + 60  # hang guard (the refresh interval is 0.1 s)
        while (served := await _served_der(host, int(port))) != renewed:
            assert served == first and asyncio.get_running_loop().time() < deadline, "renewal not picked up in 60 s"
            await asyncio.sleep(0.05)


async def test_the_edge_own_certificate_covers_the_names_it_is_reached_by(tmp_path) -> None:
    async with Running(tmp_path, pg_listen="127.0.0.1:0", advertise="edge.example.com:7844",
                       tls_names=("db.example.com", "192.0.2.7")) as edge:
        ca = Path(edge.info["ca_path"])
        assert ca == tmp_path / "ca-cert.pem"
        ctx = server_ssl_context(tmp_path / "listener-cert.pem", tmp_path / "listener-key.pem")
        for name in ("edge.example.com", "db.example.com", "192.0.2.7", "127.0.0.1", "localhost"):
            handshake_check(ctx, ca, name)
        host, port = edge.info["pg_listen"].rsplit(":", 1)
        served = await _served_der(host, int(port))
        assert served == x509.load_pem_x509_certificate((tmp_path / "listener-cert.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER)
        assert edge.info["client_tls"] == {"postgres": "allow"}  # loopback: plaintext allowed by default


def test_client_tls_policy_per_listener() -> None:
    listeners = {"postgres": "0.0.0.0", "mysql": "127.0.0.1"}
    assert client_tls_required(None, listeners) == {"postgres"}  # the default: require off loopback
    assert client_tls_required(None, {"postgres": "::", "mysql": "10.0.0.5"}) == {"postgres", "mysql"}
    assert client_tls_required(None, {"postgres": "::1", "mysql": "localhost"}) == frozenset()
    assert client_tls_required("require", listeners) == {"postgres", "mysql"}
    assert client_tls_required("allow", listeners) == frozenset()
    with pytest.raises(EdgeError, match="--client-tls"):
        client_tls_required("prefer", listeners)


async def test_bad_operator_files_stop_the_edge_with_one_clear_line(tmp_path) -> None:
    with pytest.raises(EdgeError, match="cannot read .*missing.pem: no such file"):
        await run_edge(tmp_path, "127.0.0.1:0", "127.0.0.1:0", relay_factory=FakeRelay,
                       tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "missing.pem")
    assert not (tmp_path / "edge.json").exists()


def test_hd_edge_ca_reads_the_state_dir_and_says_what_is_missing(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HD_API_URL", raising=False)
    monkeypatch.delenv("HD_STATE_DIR", raising=False)
    capsys.readouterr()
    assert run(["edge", "ca", "--state-dir", str(tmp_path)]) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.strip().endswith(f"no edge CA in {tmp_path}: start `hd edge` once (it makes the CA"
                                              " on first start)")
    load_edge_tls(tmp_path, [])
    pem = (tmp_path / "ca-cert.pem").read_text()
    assert run(["edge", "ca", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == pem
    assert run(["edge", "--state-dir", str(tmp_path), "ca", "--json"]) == 0  # the group's option works too
    assert json.loads(capsys.readouterr().out) == {"pem": pem, "path": str(tmp_path / "ca-cert.pem")}
    assert run(["edge", "--tls-cert", str(tmp_path / "c.pem"), "--state-dir", str(tmp_path)]) != 0
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
