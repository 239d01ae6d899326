"""proxy.pg.protocol: framing (startup packets, typed messages), parsers and builders, and bytes
captured from a real PostgreSQL."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pg import protocol as p
from proxy.pg.protocol import B, F, PgProtocolError


def one(data: bytes) -> tuple[int, bytes]:
    """Frame exactly one whole message; returns (type, payload)."""
    r = p.MessageReader()
    msgs = r.feed(data)
    assert len(msgs) == 1 and r.buffered == 0
    t, s, e = msgs[0]
    assert (s, e) == (0, len(data)) and bytes(r.raw(msgs[0])) == data
    assert bytes(r.payload(msgs[0])) == r.buf[s + 5:e]
    return t, r.buf[s + 5:e]


def both(payload: bytes) -> list:
    """The payload as bytes and as a memoryview (parsers must accept both)."""
    return [payload, memoryview(b"xx" + payload + b"yy")[2:-2]]


# ------------------------------------------------------------------------------ builders ↔ parsers


def test_backend_authentication_round_trip():
    assert one(p.authentication_ok()) == (B.AUTHENTICATION, b"\0\0\0\0")
    assert p.parse_authentication(one(p.authentication_ok())[1]) == (p.Auth.OK, b"")
    assert p.parse_authentication(one(p.authentication_cleartext())[1]) == (p.Auth.CLEARTEXT, b"")
    assert p.parse_authentication(one(p.authentication_md5(b"salt"))[1]) == (p.Auth.MD5, b"salt")
    t, payload = one(p.authentication_sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]))
    code, data = p.parse_authentication(payload)
    assert code == p.Auth.SASL and p.parse_sasl_mechanisms(data) == ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
    assert p.parse_authentication(one(p.authentication_sasl_continue(b"r=x,s=y,i=1"))[1]) == (11, b"r=x,s=y,i=1")
    assert p.parse_authentication(one(p.authentication_sasl_final(b"v=abc"))[1]) == (12, b"v=abc")
    with pytest.raises(ValueError):
        p.authentication_md5(b"12345")


def test_backend_messages_round_trip():
    for payload in both(one(p.parameter_status("TimeZone", "Europe/Zürich"))[1]):
        assert p.parse_parameter_status(payload) == ("TimeZone", "Europe/Zürich")
    assert one(p.parameter_status("a", ""))[0] == B.PARAMETER_STATUS
    for key in (b"\1\2\3\4", bytes(range(32)), bytes(256)):
        t, payload = one(p.backend_key_data(-7, key))
        assert t == B.BACKEND_KEY_DATA and p.parse_backend_key_data(payload) == (-7, key)
    for status in "ITE":
        t, payload = one(p.ready_for_query(status))
        assert t == B.READY_FOR_QUERY and p.parse_ready_for_query(payload) == status
    with pytest.raises(ValueError):
        p.ready_for_query("X")
    t, payload = one(p.command_complete("INSERT 0 1"))
    assert t == B.COMMAND_COMPLETE and p.parse_command_complete(payload) == "INSERT 0 1"
    for build, typ in ((p.parse_complete, B.PARSE_COMPLETE), (p.bind_complete, B.BIND_COMPLETE),
                       (p.close_complete, B.CLOSE_COMPLETE), (p.no_data, B.NO_DATA),
                       (p.empty_query_response, B.EMPTY_QUERY_RESPONSE),
                       (p.portal_suspended, B.PORTAL_SUSPENDED)):
        assert one(build()) == (typ, b"")
    t, payload = one(p.parameter_description([23, 25, 4294967295]))
    assert t == B.PARAMETER_DESCRIPTION and p.parse_parameter_description(payload) == (23, 25, 4294967295)
    assert p.parse_parameter_description(one(p.parameter_description([]))[1]) == ()
    t, payload = one(p.negotiate_protocol_version(0, ["_pq_.foo", "_pq_.bar"]))
    assert t == B.NEGOTIATE_PROTOCOL_VERSION
    assert p.parse_negotiate_protocol_version(payload) == (0, ["_pq_.foo", "_pq_.bar"])
    assert p.parse_negotiate_protocol_version(one(p.negotiate_protocol_version(2))[1]) == (2, [])


def test_error_and_notice_round_trip():
    t, payload = one(p.error_response("FATAL", "28P01", "password authentication failed",
                                      detail="dé", hint="check it"))
    assert t == B.ERROR_RESPONSE
    for pl in both(payload):
        assert p.parse_error_fields(pl) == {"S": "FATAL", "V": "FATAL", "C": "28P01",
                                            "M": "password authentication failed", "D": "dé", "H": "check it"}
    t, payload = one(p.notice_response("WARNING", "01000", "careful"))
    assert t == B.NOTICE_RESPONSE
    assert p.parse_error_fields(payload) == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"}
    assert p.parse_error_fields(b"\0") == {}
    with pytest.raises(ValueError):
        p.error_response("ERROR", "123", "bad sqlstate")


@pytest.mark.parametrize("payload", [b"", b"SERROR", b"SERROR\0", b"SERROR\0\0\0", b"\0\0",
                                     b"SERROR\0\0Mx\0\0", b"M\xff\0\0"])
def test_error_fields_malformed(payload):
    with pytest.raises(PgProtocolError):
        p.parse_error_fields(payload)


def test_row_description_and_data_row_round_trip():
    fields = [p.Field("id", 16384, 1, 23, 4, -1, 0), p.Field("näme"), ("blob", 0, 0, 17, -1, -1, 1)]
    t, payload = one(p.row_description(fields))
    assert t == B.ROW_DESCRIPTION
    for pl in both(payload):
        assert p.parse_row_description(pl) == [p.Field(*f) for f in fields]
    assert p.parse_row_description(one(p.row_description([]))[1]) == []
    values = [b"1", None, b"", b"\0\xff" * 100]
    t, payload = one(p.data_row(values))
    assert t == B.DATA_ROW
    for pl in both(payload):
        out = p.parse_data_row(pl)
        assert out == values and all(v is None or type(v) is bytes for v in out)
    assert p.parse_data_row(one(p.data_row([]))[1]) == []


def test_frontend_messages_round_trip():
    t, payload = one(p.query("SELECT 'é'"))
    assert t == F.QUERY and p.parse_query(payload) == "SELECT 'é'"
    t, payload = one(p.parse("s1", "SELECT $1, $2", [23, 4294967295]))
    assert t == F.PARSE
    for pl in both(payload):
        assert p.parse_parse(pl) == ("s1", "SELECT $1, $2", (23, 4294967295))
    assert p.parse_parse(one(p.parse("", "SELECT 1"))[1]) == ("", "SELECT 1", ())
    t, payload = one(p.describe("S", "s1"))
    assert t == F.DESCRIBE and p.parse_describe(payload) == ("S", "s1")
    assert p.parse_describe(one(p.describe("P", ""))[1]) == ("P", "")
    t, payload = one(p.close("P", "portal"))
    assert t == F.CLOSE and p.parse_close(payload) == ("P", "portal")
    t, payload = one(p.execute("c", 50))
    assert t == F.EXECUTE and p.parse_execute(payload) == ("c", 50)
    assert p.parse_execute(one(p.execute())[1]) == ("", 0)
    assert one(p.sync()) == (F.SYNC, b"")
    assert one(p.flush()) == (F.FLUSH, b"")
    assert one(p.terminate()) == (F.TERMINATE, b"")
    t, payload = one(p.password_message(b"md5abc"))
    assert t == F.PASSWORD and p.parse_password(payload) == b"md5abc"
    t, payload = one(p.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert t == F.PASSWORD and p.parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert p.parse_sasl_initial_response(one(p.sasl_initial_response("X", None))[1]) == ("X", None)
    assert p.parse_sasl_initial_response(one(p.sasl_initial_response("X", b""))[1]) == ("X", b"")
    assert one(p.sasl_response(b"c=biws")) == (F.PASSWORD, b"c=biws")
    with pytest.raises(ValueError):
        p.describe("X", "a")
    with pytest.raises(ValueError):
        p.query("SELECT 1\0")
    with pytest.raises(ValueError):
        p.password_message(b"a\0b")


def test_bind_round_trip_and_statement_name():
    params = [b"42", None, b"", b"\x00" * 70000]
    t, payload = one(p.bind("portal", "stmt_é", [0, 1, 0, 1], params, [1]))
    assert t == F.BIND
    for pl in both(payload):
        b = p.parse_bind(pl)
        assert b == p.Bind("portal", "stmt_é", (0, 1, 0, 1), params, (1,))
        assert all(v is None or type(v) is bytes for v in b.params)
        assert p.bind_statement_name(pl) == "stmt_é"
    assert p.parse_bind(one(p.bind("", ""))[1]) == p.Bind("", "", (), [], ())
    # a long portal name in a memoryview payload: the name probe must widen
    long = "p" * 2000
    pl = memoryview(one(p.bind(long, "s", [], [b"x" * 10]))[1])
    assert p.bind_statement_name(pl) == "s" and p.parse_bind(pl).portal == long


def test_rename_bind_and_parse_keep_everything_else():
    original = p.bind("c1", "client_stmt", [1], [b"\x00\x01", None], [0, 1])
    _, payload = one(original)
    renamed = p.rename_bind(memoryview(payload), "hd_7")
    assert renamed == p.bind("c1", "hd_7", [1], [b"\x00\x01", None], [0, 1])
    _, payload = one(p.parse("client", "SELECT $1", [25]))
    assert p.rename_parse(payload, "hd_7") == p.parse("hd_7", "SELECT $1", [25])


def test_startup_and_frontend_special_packets():
    r = p.StartupReader()
    ev = r.feed(p.startup_message({"user": "bob", "database": "db", "application_name": "ä"}))
    assert ev == p.StartupMessage(p.PROTOCOL_3_0, {"user": "bob", "database": "db", "application_name": "ä"})
    assert (ev.user, ev.database, ev.minor) == ("bob", "db", 0)
    assert p.StartupReader().feed(p.startup_message({"user": "u"})).database == "u"
    assert p.StartupReader().feed(p.ssl_request()) == p.SslRequest()
    assert p.StartupReader().feed(p.gssenc_request()) == p.GssEncRequest()
    assert p.StartupReader().feed(p.cancel_request(123, b"\1\2\3\4")) == p.CancelRequest(123, b"\1\2\3\4")
    assert p.StartupReader().feed(p.cancel_request(9, bytes(range(32)))) == p.CancelRequest(9, bytes(range(32)))
    ev = p.StartupReader().feed(p.startup_message({"user": "u", "_pq_.x": "1"}, version=p.PROTOCOL_3_2))
    assert ev.version == p.PROTOCOL_3_2 and ev.minor == 2 and ev.params["_pq_.x"] == "1"
    with pytest.raises(ValueError):
        p.cancel_request(1, b"abc")
    with pytest.raises(ValueError):
        p.backend_key_data(1, bytes(257))


# ------------------------------------------------------------------------------ StartupReader


PACKETS = [
    (p.ssl_request(), p.SslRequest()),
    (p.gssenc_request(), p.GssEncRequest()),
    (p.cancel_request(77, b"k" * 4), p.CancelRequest(77, b"k" * 4)),
    (p.cancel_request(77, b"k" * 256), p.CancelRequest(77, b"k" * 256)),
    (p.startup_message({"user": "u", "database": "d"}), p.StartupMessage(p.PROTOCOL_3_0, {"user": "u", "database": "d"})),
]


@pytest.mark.parametrize("packet, event", PACKETS)
def test_startup_reader_byte_by_byte_and_rest(packet, event):
    after = b"\x16\x03\x01\x02\x00garbage that must not be parsed"
    data = packet + after
    r = p.StartupReader()
    for i in range(len(packet) - 1):
        assert r.feed(data[i:i + 1]) is None
    assert r.feed(data[len(packet) - 1:]) == event
    assert r.rest() == after
    assert r.rest() == b"" and r.buffered == 0


def test_ssl_request_then_pipelined_client_hello_is_returned_not_parsed():
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(100)
    r = p.StartupReader()
    assert r.feed(p.ssl_request() + hello) == p.SslRequest()
    assert r.rest() == hello


def test_startup_after_ssl_refused_in_the_same_reader():
    # Answering 'N' to SSLRequest; the StartupMessage may already be buffered: feed(b"") parses it.
    r = p.StartupReader()
    assert r.feed(p.ssl_request() + p.startup_message({"user": "u"})) == p.SslRequest()
    assert r.feed(b"") == p.StartupMessage(p.PROTOCOL_3_0, {"user": "u"})
    assert r.feed(b"") is None


def test_direct_tls_is_detected_without_consuming():
    hello = b"\x16\x03\x01\x00\x10" + bytes(16)
    r = p.StartupReader(direct_tls=True)
    assert r.feed(hello[:1]) == p.DirectTls()
    r.feed(hello[1:])
    assert r.rest() == hello
    with pytest.raises(PgProtocolError, match="sslnegotiation=direct"):
        p.StartupReader().feed(hello)


def _raw_startup(code: int, body: bytes) -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


@pytest.mark.parametrize("data, match", [
    (struct.pack("!i", 7) + bytes(4), "invalid length of startup packet"),
    (struct.pack("!i", -1), "invalid length of startup packet"),
    (struct.pack("!i", 10001), "invalid length of startup packet"),
    (b"GET / HTTP/1.1\r\n", "invalid length"),
    (_raw_startup(p.SSL_REQUEST_CODE, b"\0\0\0\0"), "SSLRequest"),
    (_raw_startup(p.GSSENC_REQUEST_CODE, b"\0"), "GSSENCRequest"),
    (_raw_startup(p.CANCEL_REQUEST_CODE, b"\0\0\0\1" + b"abc"), "CancelRequest"),
    (_raw_startup(p.CANCEL_REQUEST_CODE, b"\0\0\0\1" + bytes(257)), "CancelRequest"),
    (_raw_startup(2 << 16, b"user\0u\0\0"), r"unsupported frontend protocol 2\.0"),
    (_raw_startup(1234 << 16 | 5681, b""), r"unsupported frontend protocol 1234\.5681"),
    (_raw_startup(p.PROTOCOL_3_0, b"user\0u\0"), "expected terminator"),
    (_raw_startup(p.PROTOCOL_3_0, b"user\0u"), "expected terminator"),
    (_raw_startup(p.PROTOCOL_3_0, b"user\0\0"), "has no value"),
    (_raw_startup(p.PROTOCOL_3_0, b"\0u\0\0"), "empty parameter name"),
    (_raw_startup(p.PROTOCOL_3_0, b"database\0d\0\0"), "no PostgreSQL user name"),
    (_raw_startup(p.PROTOCOL_3_0, b"user\0\0\0"), "no PostgreSQL user name"),
    (_raw_startup(p.PROTOCOL_3_0, b"\0"), "no PostgreSQL user name"),
    (_raw_startup(p.PROTOCOL_3_0, b"user\0\xff\0\0"), "UTF-8"),
])
def test_startup_reader_errors(data, match):
    with pytest.raises(PgProtocolError, match=match):
        p.StartupReader().feed(data)


# ------------------------------------------------------------------------------ MessageReader


SAMPLE = (p.authentication_ok() + p.parameter_status("server_version", "15") + p.backend_key_data(1, b"abcd")
          + p.ready_for_query("I") + p.row_description([p.Field("x")]) + p.data_row([b"1"]) * 3
          + p.data_row([b"x" * 300]) + p.command_complete("SELECT 4") + p.ready_for_query("I"))


def expected_of(stream: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(stream):
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        out.append((stream[pos], stream[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def read_all(chunks, reader=None) -> tuple[list[tuple[int, bytes]], bytes]:
    reader = reader or p.MessageReader()
    msgs, raw = [], b""
    for c in chunks:
        batch = reader.feed(c)
        for t, s, e in batch:
            msgs.append((t, bytes(reader.payload((t, s, e)))))
        if batch:
            raw += bytes(reader.raw(batch[0], batch[-1]))
    assert reader.buffered == 0
    return msgs, raw


def test_reader_every_split_offset():
    expected = expected_of(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        assert read_all([SAMPLE[:cut], SAMPLE[cut:]]) == (expected, SAMPLE)
    for a in range(0, len(SAMPLE), 7):
        for b in range(a, len(SAMPLE), 13):
            assert read_all([SAMPLE[:a], SAMPLE[a:b], SAMPLE[b:]]) == (expected, SAMPLE)


def test_reader_byte_by_byte():
    assert read_all([SAMPLE[i:i + 1] for i in range(len(SAMPLE))]) == (expected_of(SAMPLE), SAMPLE)


messages = st.lists(st.tuples(st.integers(0x20, 0x7e), st.binary(max_size=300)), max_size=25)


@settings(max_examples=200, deadline=None)
@given(messages, st.lists(st.integers(0, 10_000), max_size=30),
       st.sampled_from([bytes, bytearray, memoryview]))
def test_reader_property_split_anywhere(msgs, cuts, kind):
    stream = b"".join(bytes([t]) + struct.pack("!i", 4 + len(pl)) + pl for t, pl in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [kind(stream[a:b]) for a, b in zip([0] + points, points + [len(stream)])]
    assert read_all(chunks) == ([(t, pl) for t, pl in msgs], stream)


def test_reader_views_stay_valid_after_later_feeds():
    r = p.MessageReader()
    first = r.feed(p.data_row([b"a" * 10]) + p.sync()[:2])
    view, buf = r.raw(first[0]), r.buf
    r.feed(p.sync()[2:] + p.data_row([b"b"]))
    assert bytes(view) == p.data_row([b"a" * 10]) and r.buf is not buf


def test_reader_no_copy_when_fed_whole_messages():
    data = p.data_row([b"1"]) * 3
    r = p.MessageReader()
    r.feed(data)
    assert r.buf is data


def test_reader_large_message_in_small_chunks():
    big = p.data_row([b"z" * (8 << 20)])
    r = p.MessageReader()
    out = []
    for i in range(0, len(big), 4096):
        out += r.feed(big[i:i + 4096])
        assert r.buffered == (0 if out else min(i + 4096, len(big)))
    assert len(out) == 1 and bytes(r.raw(out[0])) == big


@pytest.mark.parametrize("data, match", [
    (b"D" + struct.pack("!i", 3), "invalid message length 3"),
    (b"D" + struct.pack("!i", -5), "invalid message length -5"),
    (b"D" + struct.pack("!i", 0x7FFFFFFF), "message too long"),
    (p.sync() + b"Q" + struct.pack("!i", 1025) + b"x", "message too long"),
    (b"\x00\xff\xff\xff\xff", "invalid message length -1"),
])
def test_reader_errors(data, match):
    r = p.MessageReader(max_message=1024)
    with pytest.raises(PgProtocolError, match=match):
        r.feed(data)
    with pytest.raises(PgProtocolError, match=match):  # the stream stays broken
        r.feed(p.sync())


def test_reader_default_limit_is_one_gib():
    r = p.MessageReader()
    assert r.feed(b"D" + struct.pack("!i", 1 << 30)) == []
    with pytest.raises(PgProtocolError, match="too long"):
        p.MessageReader().feed(b"D" + struct.pack("!i", (1 << 30) + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_reader_garbage_raises_only_protocol_errors(data):
    r = p.MessageReader(max_message=4096)
    try:
        for i in range(0, len(data), 17):
            r.feed(data[i:i + 17])
    except PgProtocolError:
        pass


PARSERS = [p.parse_error_fields, p.parse_parse, p.parse_bind, p.bind_statement_name, p.parse_describe,
           p.parse_close, p.parse_execute, p.parse_ready_for_query, p.parse_backend_key_data,
           p.parse_parameter_status, p.parse_authentication, p.parse_command_complete, p.parse_query,
           p.parse_row_description, p.parse_data_row, p.parse_parameter_description,
           p.parse_sasl_mechanisms, p.parse_password, p.parse_sasl_initial_response,
           p.parse_negotiate_protocol_version]

VALID = [one(m)[1] for m in (
    p.error_response("ERROR", "42P01", "x"), p.parse("a", "b", [1]), p.bind("a", "b", [1], [b"x", None], [0]),
    p.describe("S", "a"), p.execute("a", 1), p.ready_for_query("T"), p.backend_key_data(1, b"abcd"),
    p.parameter_status("a", "b"), p.authentication_md5(b"salt"), p.command_complete("SELECT 1"),
    p.query("SELECT 1"), p.row_description([p.Field("a")]), p.data_row([b"a", None]),
    p.parameter_description([1, 2]), p.sasl_initial_response("M", b"data"), p.negotiate_protocol_version(0, ["x"]))]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda f: f.__name__)
def test_parsers_on_truncated_and_extended_payloads(parser):
    for payload in VALID:
        for cut in range(len(payload) + 1):
            for pl in (payload[:cut], payload[:cut] + b"\0", payload + b"\0\1"):
                for arg in (pl, memoryview(pl)):
                    try:
                        parser(arg)
                    except PgProtocolError:
                        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_parsers_raise_only_protocol_errors(data):
    for parser in PARSERS:
        try:
            parser(data)
        except PgProtocolError:
            pass


@pytest.mark.parametrize("parser, payload, match", [
    (p.parse_bind, p.bind("", "", [0, 0], [b"a"])[5:], "2 parameter formats but 1 parameters"),
    (p.parse_bind, b"\0\0\0\0\0\1\xff\xff\xff\xfe\0\0", "invalid parameter length -2"),
    (p.parse_query, b"SELECT \xff\0", "invalid UTF-8 in Query"),
    (p.parse_query, b"SELECT 1\0trailing\0", "malformed Query"),
    (p.parse_describe, b"Xname\0", "malformed Describe"),
    (p.parse_ready_for_query, b"X", "malformed ReadyForQuery"),
    (p.parse_backend_key_data, b"\0\0\0\1abc", "malformed BackendKeyData"),
    (p.parse_authentication, b"\0\0\0\5abc", "malformed Authentication"),
])
def test_parser_error_messages(parser, payload, match):
    with pytest.raises(PgProtocolError, match=match):
        parser(payload)


def test_message_names():
    assert p.message_name(B.DATA_ROW) == "DATA_ROW"
    assert p.message_name(F.DESCRIBE, backend=False) == "DESCRIBE"
    assert p.message_name(ord("q")) == "'q' (0x71)" and p.message_name(0) == "0x00"


# ------------------------------------------------------------------------------ a real server


def _converse(sock: socket.socket, reader: p.MessageReader, request: bytes) -> list[tuple[int, bytes]]:
    sock.sendall(request)
    out: list[tuple[int, bytes]] = []
    while not out or out[-1][0] != B.READY_FOR_QUERY:
        data = sock.recv(7)  # small reads: messages arrive split across feeds
        assert data, "server closed the connection"
        out += [(t, reader.buf[s + 5:e]) for t, s, e in reader.feed(data)]
    return out


def test_real_server_conversation(pg_cluster):
    """Startup, a simple query and an extended-protocol round trip against PostgreSQL (trust over
    the unix socket), everything framed by MessageReader."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(f"{pg_cluster.socket_dir}/.s.PGSQL.{pg_cluster.port}")
        reader = p.MessageReader()
        msgs = _converse(sock, reader, p.startup_message({"user": "postgres", "database": "postgres",
                                                           "application_name": "hd-test"}))
        types = [t for t, _ in msgs]
        assert types[0] == B.AUTHENTICATION and p.parse_authentication(msgs[0][1]) == (p.Auth.OK, b"")
        assert set(types[1:-2]) == {B.PARAMETER_STATUS}
        assert types[-2:] == [B.BACKEND_KEY_DATA, B.READY_FOR_QUERY]
        params = dict(p.parse_parameter_status(pl) for t, pl in msgs if t == B.PARAMETER_STATUS)
        assert params["application_name"] == "hd-test" and params["client_encoding"] == "UTF8"
        pid, key = p.parse_backend_key_data(msgs[-2][1])
        assert pid > 0 and len(key) == 4
        assert p.parse_ready_for_query(msgs[-1][1]) == "I"

        msgs = _converse(sock, reader, p.query("SELECT g, 'é' || g FROM generate_series(1, 3) g"))
        assert [t for t, _ in msgs] == [B.ROW_DESCRIPTION] + [B.DATA_ROW] * 3 + [B.COMMAND_COMPLETE,
                                                                                  B.READY_FOR_QUERY]
        fields = p.parse_row_description(msgs[0][1])
        assert [(f.name, f.type_oid) for f in fields] == [("g", 23), ("?column?", 25)]
        assert p.parse_data_row(msgs[2][1]) == [b"2", "é2".encode()]
        assert p.parse_command_complete(msgs[-2][1]) == "SELECT 3"

        msgs = _converse(sock, reader, p.parse("s1", "SELECT $1::int + 1, NULL::text", [23])
                         + p.describe("S", "s1") + p.bind("", "s1", [1], [struct.pack("!i", 41)], [1, 0])
                         + p.execute("", 0) + p.close("S", "s1") + p.sync())
        assert [t for t, _ in msgs] == [B.PARSE_COMPLETE, B.PARAMETER_DESCRIPTION, B.ROW_DESCRIPTION,
                                        B.BIND_COMPLETE, B.DATA_ROW, B.COMMAND_COMPLETE,
                                        B.CLOSE_COMPLETE, B.READY_FOR_QUERY]
        assert p.parse_parameter_description(msgs[1][1]) == (23,)
        assert p.parse_data_row(msgs[4][1]) == [struct.pack("!i", 42), None]

        msgs = _converse(sock, reader, p.query("SELECT * FROM no_such_table"))
        assert [t for t, _ in msgs] == [B.ERROR_RESPONSE, B.READY_FOR_QUERY]
        fields = p.parse_error_fields(msgs[0][1])
        assert fields["C"] == "42P01" and fields["V"] == "ERROR" and "no_such_table" in fields["M"]

        msgs = _converse(sock, reader, p.query("BEGIN"))
        assert p.parse_ready_for_query(msgs[-1][1]) == "T"
        sock.sendall(p.terminate())


def test_reader_release_drops_the_batch():
    r = p.MessageReader()
    r.feed(p.sync())
    r.release()
    assert r.buf == b"" and len(r.view) == 0
