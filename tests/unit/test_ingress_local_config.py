"""`hd-connector --config FILE`: the locally-managed ingress config, its origin options
(durations, tcpKeepAlive on a real socket, noTLSVerify warnings) and every refusal."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from connector.ingress import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TCP_KEEPALIVE,
    KEEPALIVE_PROBES,
    AccessRequirement,
    IngressConfig,
    IngressError,
    Service,
    apply_tcp_keepalive,
)
from connector.localconfig import load_local_config

GOOD = """\
originRequest:            # defaults for every rule
  connectTimeout: 5s
  tcpKeepAlive: 1m
ingress:
  - hostname: DB.Internal.Example
    service: tcp://127.0.0.1:5432
    originRequest: {connectTimeout: 1m30s, tcpKeepAlive: 0, noTLSVerify: false}
    access: {required: true, audTag: [abc123]}
  - hostname: "*.internal.example"
    service: ssh://10.0.0.5
    originRequest: {connectTimeout: 500ms}
  - service: http_status:404
"""


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_rules_wildcards_catch_all_and_inherited_defaults(tmp_path) -> None:
    cfg = load_local_config(write(tmp_path, GOOD))
    assert cfg.version == -1  # as cloudflared: any pushed version (>= 0) is newer
    assert cfg.warnings == ()
    db = cfg.match("db.internal.example")
    assert db.service == Service("tcp", "127.0.0.1", 5432)
    assert (db.connect_timeout, db.tcp_keepalive, db.no_tls_verify) == (90.0, None, False)  # 0: keepalive off
    assert db.access == AccessRequirement(True, ("abc123",))
    ssh = cfg.match("bastion.internal.example")
    assert ssh.service == Service("tcp", "10.0.0.5", 22)
    assert (ssh.connect_timeout, ssh.tcp_keepalive, ssh.access) == (0.5, 60.0, None)  # keepalive inherited
    assert cfg.match("internal.example").service.status == 404  # a wildcard never matches its bare domain
    catch_all = cfg.match("anything.else")
    assert catch_all.hostname is None and catch_all.connect_timeout == 5.0  # connectTimeout inherited


def test_without_options_the_cloudflared_defaults_apply(tmp_path) -> None:
    cfg = load_local_config(write(tmp_path, "ingress:\n  - service: tcp://h:1\n"))
    rule = cfg.match("x")
    assert (rule.connect_timeout, rule.tcp_keepalive, rule.no_tls_verify) == (
        DEFAULT_CONNECT_TIMEOUT, DEFAULT_TCP_KEEPALIVE, False)
    assert DEFAULT_TCP_KEEPALIVE == 30.0


@pytest.mark.parametrize("value, seconds", [(3, 3.0), (2.5, 2.5), ("500ms", 0.5), ("5s", 5.0), ("1m30s", 90.0),
                                            ("5m", 300.0)])
def test_connect_timeout_takes_numbers_and_durations(value, seconds) -> None:
    cfg = IngressConfig.parse(0, [{"service": "tcp://h:1", "originRequest": {"connectTimeout": value}}])
    assert cfg.rules[0].connect_timeout == seconds


@pytest.mark.parametrize("value, seconds", [(None, None), (0, None), ("0s", None), (1, 1.0), ("45s", 45.0),
                                            ("2h", 7200.0)])
def test_tcp_keepalive_takes_durations_and_zero_or_null_turns_it_off(value, seconds) -> None:
    cfg = IngressConfig.parse(0, [{"service": "tcp://h:1", "originRequest": {"tcpKeepAlive": value}}])
    assert cfg.rules[0].tcp_keepalive == seconds


def test_pushed_configs_take_the_new_options_but_ignore_unknown_ones() -> None:
    # a newer edge may push options this connector does not know: only a local file is strict
    cfg = IngressConfig.parse(3, [{"service": "tcp://h:1", "originRequest": {
        "tcpKeepAlive": "10s", "noTLSVerify": True, "httpHostHeader": "x"}}])
    assert (cfg.rules[0].tcp_keepalive, cfg.rules[0].no_tls_verify) == (10.0, True)


@pytest.mark.parametrize("options, text", [
    ({"connectTimeout": 0}, "connectTimeout must be more than 0 and at most 300s"),
    ({"connectTimeout": "6m"}, "connectTimeout must be more than 0 and at most 300s"),
    ({"connectTimeout": "soon"}, "connectTimeout: invalid duration 'soon'"),
    ({"connectTimeout": True}, "connectTimeout must be a duration like 500ms"),
    ({"connectTimeout": [1]}, "connectTimeout must be a duration like 500ms"),
    ({"tcpKeepAlive": "500ms"}, "tcpKeepAlive must be 0 (off) or from 1s to 2h"),
    ({"tcpKeepAlive": "3h"}, "tcpKeepAlive must be 0 (off) or from 1s to 2h"),
    ({"tcpKeepAlive": -1}, "tcpKeepAlive must be 0 (off) or from 1s to 2h"),
    ({"tcpKeepAlive": "nan"}, "tcpKeepAlive must be 0 (off) or from 1s to 2h"),
    ({"tcpKeepAlive": "often"}, "tcpKeepAlive: invalid duration"),
    ({"noTLSVerify": "yes"}, "noTLSVerify must be true or false"),
])
def test_bad_origin_options_name_the_rule_and_the_option(options, text) -> None:
    with pytest.raises(IngressError, match=r"^ingress rule #2: ") as e:
        IngressConfig.parse(0, [{"hostname": "a", "service": "tcp://h:1"},
                                {"service": "tcp://h:1", "originRequest": options}])
    assert text in str(e.value)


def _error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(IngressError) as e:
        load_local_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message  # always names the file
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("text, message", [
    ("", "the config must be a mapping with an ingress list"),
    ("- service: tcp://h:1\n", "the config must be a mapping with an ingress list"),
    ("originRequest: {}\n", "ingress must be a non-empty list of rules ending with a catch-all"),
    ("ingress: []\n", "ingress must be a non-empty list of rules ending with a catch-all"),
    ("ingress: {service: tcp://h:1}\n", "ingress must be a non-empty list"),
    ("ingress:\n  - tcp://h:1\n", "ingress rule #1 must be a mapping"),
    ("ingres:\n  - service: tcp://h:1\n", "unknown key 'ingres' (allowed: ingress, originRequest;"),
    ("tunnel: 6ff42ae2\ningress:\n  - service: tcp://h:1\n",
     "'tunnel' is not used: the tunnel and its credentials come from --token or --token-file"),
    ("credentials-file: /x.json\ningress:\n  - service: tcp://h:1\n", "'credentials-file' is not used"),
    ("originRequest: {conectTimeout: 5s}\ningress:\n  - service: tcp://h:1\n",
     "originRequest: unknown originRequest key 'conectTimeout' (allowed: connectTimeout, tcpKeepAlive,"
     " noTLSVerify, access)"),
    ("originRequest: 5s\ningress:\n  - service: tcp://h:1\n", "originRequest must be a mapping of options"),
    ("originRequest: {connectTimeout: 0}\ningress:\n  - service: tcp://h:1\n",
     "originRequest: connectTimeout must be more than 0"),
    ("ingress:\n  - hostname: a.example\n    service: tcp://h:1\n    path: /x\n  - service: http_status:404\n",
     "ingress rule #1: unknown key 'path' (allowed: hostname, service, originRequest, access)"),
    ("ingress:\n  - service: tcp://h:1\n    originRequest: {httpHostHeader: x}\n",
     "ingress rule #1: unknown originRequest key 'httpHostHeader'"),
    ("ingress:\n  - service: tcp://h:1\n    originRequest: [1]\n", "ingress rule #1: originRequest must be a mapping"),
    ("ingress:\n  - service: tcp://h:1\n    access: {required: true, audtag: [x]}\n",
     "ingress rule #1: unknown access key 'audtag' (allowed: required, audTag, issuer)"),
    ("ingress:\n  - service: tcp://h:1\n    access: {required: true}\n",
     "ingress rule #1: access.required needs at least one audTag"),
    ("ingress:\n  - service: tcp://h:1\n    access: yes\n", "ingress rule #1: access must be a mapping"),
    ("ingress:\n  - hostname: a.example\n    service: tcp://h:1\n  - hostname: b.example\n    service: tcp://h:2\n",
     "the last ingress rule must be a catch-all (no hostname)"),
    ("ingress:\n  - service: tcp://h:1\n  - hostname: b.example\n    service: tcp://h:2\n",
     "ingress rule #1 is a catch-all but only the last rule may be"),
    ("ingress:\n  - hostname: a.example\n  - service: http_status:404\n", "ingress rule #1 needs a service"),
    ("ingress:\n  - hostname: a.example\n    service: http://h:80\n  - service: http_status:404\n",
     "unsupported service 'http://h:80'"),
    ("ingress:\n  - hostname: a.*.example\n    service: tcp://h:1\n  - service: http_status:404\n",
     "ingress rule #1: a wildcard must be the first label"),
    ("ingress:\n  - hostname: a.example:22\n    service: tcp://h:1\n  - service: http_status:404\n",
     "ingress rule #1: bad hostname"),
    ("ingress:\n  - hostname: a.example\n    service: tcp://h:1\n  - service: http_status:404\n"
     "    originRequest: {connectTimeout: forever}\n", "ingress rule #2: connectTimeout: invalid duration"),
    ("ingress:\n  - service: [tcp\n", "invalid YAML: "),
    ("ingress:\n  - hostname: *.example.com\n    service: tcp://h:1\n",
     'invalid YAML (quote wildcard hostnames: "*.example.com"): '),
])
def test_every_refusal_names_the_file_and_says_why(tmp_path, text, message) -> None:
    assert message in _error(tmp_path, text)


def test_a_missing_or_unreadable_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(IngressError, match=f"^{missing}: no such config file$"):
        load_local_config(missing)
    with pytest.raises(IngressError, match=f"^{tmp_path}: cannot read the config file"):
        load_local_config(tmp_path)  # a directory
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00ingress")
    with pytest.raises(IngressError, match="cannot read the config file"):
        load_local_config(binary)


def test_no_tls_verify_is_accepted_with_a_warning_for_tcp_services(tmp_path) -> None:
    cfg = load_local_config(write(tmp_path, """\
ingress:
  - hostname: a.example
    service: tcp://h:1
  - hostname: b.example
    service: ssh://h
    originRequest: {noTLSVerify: true}
  - service: http_status:404
    originRequest: {noTLSVerify: true}
"""))
    assert cfg.match("b.example").no_tls_verify and not cfg.match("a.example").no_tls_verify
    assert cfg.warnings == (
        "ingress rule #2: noTLSVerify has no effect on tcp:// and ssh:// services (the connector passes bytes"
        " through; TLS, if any, is end to end)",
    )  # an http_status rule dials nothing: nothing to warn about
    # set once as a default: one warning, not one per rule
    cfg = load_local_config(write(tmp_path, "originRequest: {noTLSVerify: true}\ningress:\n"
                                            "  - hostname: a.example\n    service: tcp://h:1\n"
                                            "  - service: tcp://h:2\n"))
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith("originRequest: noTLSVerify has no effect")
    assert all(rule.no_tls_verify for rule in cfg.rules)


def _keepalive(sock: socket.socket) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux keepalive options")
async def test_keepalive_is_set_on_a_real_connected_socket_and_can_be_turned_off() -> None:
    import asyncio

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            apply_tcp_keepalive(sock, 45.0)
            assert _keepalive(sock) == (1, 45, 45, KEEPALIVE_PROBES)
            apply_tcp_keepalive(sock, 0.4)  # the kernel counts whole seconds, at least 1
            assert _keepalive(sock)[1:3] == (1, 1)
            apply_tcp_keepalive(sock, None)
            assert _keepalive(sock)[0] == 0
        # asyncio's TransportSocket, as the supervisor gets it from the origin transport
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        apply_tcp_keepalive(writer.get_extra_info("socket"), 30.0)
        raw = socket.socket(fileno=writer.get_extra_info("socket").fileno())
        try:
            assert _keepalive(raw) == (1, 30, 30, KEEPALIVE_PROBES)
        finally:
            raw.detach()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_access_may_be_a_default_and_a_rule_may_override_it(tmp_path) -> None:
    cfg = load_local_config(write(tmp_path, """\
originRequest:
  access: {required: true, audTag: [team]}
ingress:
  - hostname: a.example
    service: tcp://h:1
  - hostname: b.example
    service: tcp://h:2
    originRequest: {access: {required: true, audTag: [other, team]}}
  - service: http_status:404
"""))
    assert cfg.match("a.example").access == AccessRequirement(True, ("team",))
    assert cfg.match("b.example").access == AccessRequirement(True, ("other", "team"))
