"""A final refusal is final on both transports (issue 13): a wrong token or a deleted tunnel makes
`hd-connector` exit 1 with one clear line, over WebSocket, over QUIC, and on `auto` preferring
QUIC (a refusal is not a transport failure: no fallback, no retry). Real processes on loopback."""

from __future__ import annotations

import pytest

from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.procs import Proc, connector_argv
from tunnel.token import TunnelToken

TRANSPORTS = {
    "websocket": ["--protocol", "websocket"],
    "quic": ["--protocol", "quic"],
    "auto-prefer-quic": ["--protocol", "auto", "--prefer", "quic"],
}


def _connector(edge: EdgeProc, token: str, name: str, args: list[str]) -> Proc:
    proc = Proc(connector_argv("--token", token, "--ha-connections", "2", *args), name=name,
                log_dir=edge.state_dir / "logs")
    edge.children.append(proc)
    return proc


def _one_clear_error(proc: Proc, *needles: str) -> str:
    """The connector's last stderr line is its one error line, and it never retried."""
    err = proc.stderr_text()
    last = err.strip().splitlines()[-1]
    assert last.startswith("hd-connector: error: "), err[-2000:]
    for needle in needles:
        assert needle in last, err[-2000:]
    assert "reconnecting" not in err and "Traceback" not in err, err[-2000:]
    return last


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_token_is_final_on_every_transport(edge, transport):
    t = edge.hd("tunnel", "create", f"auth-{transport}")
    good = TunnelToken.decode(t["token"])
    bad = TunnelToken(good.tunnel_id, bytes(32), good.edge, good.pin).encode()
    proc = _connector(edge, bad, f"wrong-secret-{transport}", TRANSPORTS[transport])
    assert proc.wait_exit(30) == 1  # before the fix, over QUIC: retried forever
    _one_clear_error(proc, "refused this tunnel token", "secret is wrong")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_deleted_tunnel_stops_its_connector_and_refuses_new_ones_on_every_transport(edge, transport):
    name = f"doomed-{transport}"
    t = edge.hd("tunnel", "create", name)
    conn = ConnectorProc(edge, t["token"], tunnel=t["id"], name=f"serving-{transport}",
                         extra_args=TRANSPORTS[transport]).start()
    edge.hd("tunnel", "delete", name)
    assert conn.proc.wait_exit(30) == 1
    _one_clear_error(conn.proc, "deleted")
    late = _connector(edge, t["token"], f"late-{transport}", TRANSPORTS[transport])
    assert late.wait_exit(30) == 1
    _one_clear_error(late, "does not exist")
