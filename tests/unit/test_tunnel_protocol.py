"""Sans-I/O pieces of the tunnel protocol: message framing, ConnectRequest/Response, ingress
matching and validation, reconnect backoff."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.backoff import Backoff
from connector.ingress import IngressConfig, IngressError, Service
from connector.supervisor import Orchestrator
from tunnel.messages import (
    MAX_MESSAGE_SIZE,
    ConnectRequest,
    ConnectResponse,
    MessageError,
    MessageReader,
    encode,
)

# ------------------------------------------------------------------ messages


def test_messages_split_across_arbitrary_chunks_and_keep_the_rest():
    data = encode({"type": "a"}) + encode({"type": "b", "n": 1}) + b"raw bytes"
    for cut in range(len(data) + 1):
        # In preamble mode the caller limits how many messages it takes; the rest is raw data.
        r2 = MessageReader()
        msgs = r2.feed(data[:cut], limit=2)
        msgs += r2.feed(data[cut:], limit=2 - len(msgs))
        assert msgs == [{"type": "a"}, {"type": "b", "n": 1}]
        assert r2.rest() == b"raw bytes"


@settings(deadline=None)  # no per-example wall-clock deadline: a busy box is slow, not wrong
@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), max_size=5), st.data())
def test_messages_roundtrip_any_chunking(messages, data):
    wire = b"".join(encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    r = MessageReader()
    out = []
    prev = 0
    for c in [*cuts, len(wire)]:
        out += r.feed(wire[prev:c])
        prev = c
    assert out == messages
    assert r.buffered == 0


@pytest.mark.parametrize("wire, text", [
    (struct.pack("!I", MAX_MESSAGE_SIZE + 1), "exceeds maximum"),
    (struct.pack("!I", 3) + b"{x}", "not valid JSON"),
    (struct.pack("!I", 2) + b"[]", "not a JSON object"),
    (struct.pack("!I", 2) + b"\xff\xfe", "not valid JSON"),
])
def test_malformed_messages_raise_clear_errors(wire, text):
    with pytest.raises(MessageError, match=text):
        MessageReader().feed(wire)


def test_encode_refuses_oversized_messages():
    with pytest.raises(MessageError):
        encode({"x": "y" * MAX_MESSAGE_SIZE})


def test_connect_request_validation_and_normalisation():
    req = ConnectRequest.from_dict({"hostname": "DB.Example.", "headers": {"a": 1}})
    assert req.hostname == "db.example" and req.headers == {"a": "1"} and req.type == "tcp"
    assert ConnectRequest.from_dict(req.to_dict()) == req
    for bad in [{}, {"hostname": ""}, {"hostname": 5}, {"hostname": "x" * 300},
                {"hostname": "a", "metadata": []}, {"hostname": "a", "assertion": 3}]:
        with pytest.raises(MessageError):
            ConnectRequest.from_dict(bad)


def test_connect_response_roundtrip_and_defaults():
    assert ConnectResponse.from_dict({"ok": True}).ok
    fail = ConnectResponse.fail(403, "access_denied", "no")
    assert ConnectResponse.from_dict(json.loads(json.dumps(fail.to_dict()))) == fail
    odd = ConnectResponse.from_dict({"ok": "yes", "status": "x"})
    assert not odd.ok and odd.status == 502  # anything but a literal true is a refusal


# ------------------------------------------------------------------ ingress


RULES = [
    {"hostname": "db.example.com", "service": "tcp://10.0.0.5:5432", "originRequest": {"connectTimeout": 3}},
    {"hostname": "*.ssh.example.com", "service": "ssh://bastion"},
    {"service": "http_status:404"},
]


def test_ingress_matching_exact_wildcard_and_catch_all():
    cfg = IngressConfig.parse(3, RULES)
    assert cfg.match("db.example.com").service == Service("tcp", "10.0.0.5", 5432)
    assert cfg.match("DB.EXAMPLE.COM.").connect_timeout == 3
    assert cfg.match("a.ssh.example.com").service == Service("tcp", "bastion", 22)
    assert cfg.match("ssh.example.com").service.status == 404  # a wildcard never matches its bare domain
    assert cfg.match("other").service == Service("http_status", status=404)


@pytest.mark.parametrize("rules, text", [
    ([{"hostname": "a", "service": "tcp://h:1"}], "last ingress rule must be a catch-all"),
    ([{"service": "http_status:404"}, {"hostname": "a", "service": "tcp://h:1"}], "catch-all"),
    ([{"hostname": "a:5", "service": "tcp://h:1"}, {"service": "http_status:404"}], "bad hostname"),
    ([{"hostname": "a.*.b", "service": "tcp://h:1"}, {"service": "http_status:404"}], "wildcard"),
    ([{"service": "http://x"}], "unsupported service"),
    ([{"service": "tcp://h"}], "needs a host and a port"),
    ([{"service": "tcp://h:1/path"}], "must not have a path"),
    ([{"service": "http_status:42"}], "bad status"),
    ([{"service": "tcp://h:1", "originRequest": {"connectTimeout": -1}}], "connectTimeout"),
    ([{"hostname": "a"}], "needs a service"),
])
def test_ingress_validation_messages(rules, text):
    with pytest.raises(IngressError, match=text):
        IngressConfig.parse(1, rules)


def test_an_older_config_version_never_replaces_a_newer_one():
    o = Orchestrator()
    assert o.config.match("x").service.status == 503  # nothing pushed yet: refuse clearly
    assert o.update(5, RULES)
    assert not o.update(4, [{"service": "http_status:500"}])
    assert not o.update(5, [{"service": "http_status:500"}])
    assert o.config.version == 5 and o.config.match("other").service.status == 404
    assert o.update(6, [{"service": "http_status:500"}])


# ------------------------------------------------------------------ backoff


def test_backoff_doubles_from_1s_to_a_32s_cap_with_jitter_and_resets():
    highs = Backoff(rand=lambda: 1.0)
    assert [highs.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 32, 32]
    lows = Backoff(rand=lambda: 0.0)
    assert [lows.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 16, 16]
    lows.reset()
    assert lows.next_delay() == 0.5


def test_backoff_jitter_spreads_retries():
    seq = itertools.cycle([0.1, 0.9, 0.5])
    b = Backoff(rand=lambda: next(seq))
    delays = [b.next_delay() for _ in range(3)]
    assert delays == [pytest.approx(0.55), pytest.approx(1.9), pytest.approx(3.0)]
