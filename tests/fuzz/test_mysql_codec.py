"""Fuzz targets: the MySQL codec of proxy/mysql/protocol.py.

- `PacketReader`: streams of packets (with and without sequence-id checks, small and default
  packet limits), mutated and cut anywhere.
- `parse_client_handshake`: SSLRequests and HandshakeResponse41s with every optional field the
  capabilities switch on, mutated.
- `ResultSetReader`: pipelined replies (OK, ERR, result sets, multi-results; EOF and
  DEPRECATE_EOF), mutated and cut anywhere, with and without ``keep``.
- `parse_com_query`: COM_QUERYs with and without query attributes, mutated.
- the other payload parsers (OK, ERR, EOF, column count and definition, text row, greeting,
  auth switch / more data, COM_INIT_DB, session state), mutated.

What must hold for any input: only `MySQLProtocolError` is raised; the same answer for bytes,
bytearray and memoryview; framing forwards exactly the bytes received, in order, and holds at
most one packet within its limit; what a parser accepts, its builder writes back to something
the parser reads as the same value.
"""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import given
from hypothesis import strategies as st

from proxy.mysql import protocol as p
from proxy.mysql.protocol import Capability as C
from proxy.mysql.protocol import ColumnDefinition, MySQLProtocolError
from proxy.mysql.protocol import ServerStatus as S
from tests.fuzz._fuzz import cuts, fuzz, mutate, mutations, split

texts = st.one_of(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12),
                  st.sampled_from(["", "app", "SELECT 1", "mysql_native_password", "é☃"]))
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
EOF_CAPS = C.CLIENT_PROTOCOL_41 | C.CLIENT_TRANSACTIONS | C.CLIENT_MULTI_RESULTS | C.CLIENT_MULTI_STATEMENTS
DEP_CAPS = EOF_CAPS | C.CLIENT_DEPRECATE_EOF | C.CLIENT_SESSION_TRACK
reply_caps = st.sampled_from([int(EOF_CAPS), int(DEP_CAPS), int(DEP_CAPS | C.CLIENT_OPTIONAL_RESULTSET_METADATA),
                              int(EOF_CAPS | C.MARIADB_CLIENT_EXTENDED_METADATA)])


# ------------------------------------------------------------------------ PacketReader

@fuzz(600)
@given(st.lists(st.tuples(st.binary(max_size=60), st.integers(0, 255)), max_size=8), st.booleans(), mutations(),
       cuts, st.sampled_from([p.MAX_PACKET, 1000, 16, 0]), st.sampled_from([bytes, bytearray, memoryview]))
def test_packet_reader(packets: list[tuple[bytes, int]], in_order: bool, ops: list, cut: list[int], limit: int,
                       kind: type) -> None:
    if in_order:  # consecutive ids, checked by the reader
        packets = [(payload, i & 0xFF) for i, (payload, _) in enumerate(packets)]
    valid = b"".join(p.frame(payload, seq) for payload, seq in packets)
    stream = mutate(valid, ops)
    r = p.PacketReader(max_packet=limit, expected_seq=0 if in_order else None)
    out = bytearray()
    got: list[tuple[int, bytes]] = []
    error: MySQLProtocolError | None = None
    for chunk in split(stream, cut):
        try:
            batch = r.feed(kind(chunk))
        except MySQLProtocolError as exc:
            error = exc
            break
        for pkt in batch:
            payload = bytes(r.payload(pkt))
            assert len(payload) == r.payload_length(pkt) <= limit
            got.append((pkt[0], payload))
        if batch:
            out += r.raw(batch[0], batch[-1])
        assert r.buffered <= limit + 4 * (limit // p.MAX_PAYLOAD + 2)  # at most one packet
    assert stream.startswith(bytes(out))
    if error is not None:
        assert str(error) and error.code
        try:
            r.feed(b"\x01\x00\x00\x00x")
        except MySQLProtocolError as again:
            assert again is error
        else:
            raise AssertionError("a broken reader accepted more input")
    else:
        assert len(out) + r.buffered == len(stream)
        if not ops and all(len(payload) <= limit for payload, _ in packets):
            assert got == [(seq, payload) for payload, seq in packets]


# ------------------------------------------------------------------------ client handshake

HANDSHAKE_CAPS = [C.CLIENT_CONNECT_WITH_DB, C.CLIENT_PLUGIN_AUTH, C.CLIENT_CONNECT_ATTRS,
                  C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, C.CLIENT_SECURE_CONNECTION, C.CLIENT_SSL,
                  C.CLIENT_ZSTD_COMPRESSION_ALGORITHM, C.CLIENT_QUERY_ATTRIBUTES, C.CLIENT_DEPRECATE_EOF]


@st.composite
def client_handshakes(draw: st.DrawFn) -> bytes:
    caps = C.CLIENT_PROTOCOL_41
    for flag in HANDSHAKE_CAPS:
        if draw(st.booleans()):
            caps |= flag
    if draw(st.booleans()):
        caps |= C.CLIENT_LONG_PASSWORD  # MySQL; otherwise MariaDB extended capabilities may follow
    elif draw(st.booleans()):
        caps |= C.MARIADB_CLIENT_EXTENDED_METADATA | C.MARIADB_CLIENT_CACHE_METADATA
    caps = int(caps)
    if caps & C.CLIENT_SSL and draw(st.booleans()):
        return p.SslRequest(caps, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 255))).build()
    auth = draw(st.binary(max_size=300 if caps & C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA else 40))
    if not caps & (C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | C.CLIENT_SECURE_CONNECTION):
        auth = auth.replace(b"\0", b"")
    return p.HandshakeResponse41(caps, draw(texts), auth, draw(st.none() | texts), draw(st.none() | texts),
                                 draw(st.dictionaries(texts, texts, max_size=3)), draw(st.integers(0, 2**32 - 1)),
                                 draw(st.integers(0, 255)), draw(st.none() | st.integers(0, 255))).build()


def _filled(h: p.HandshakeResponse41) -> p.HandshakeResponse41:
    """What a handshake reads as once rebuilt: optional fields the capabilities announce but the
    client left out are written (empty / the default zstd level)."""
    caps = h.capabilities
    return p.HandshakeResponse41(
        caps, h.user, h.auth_response,
        h.database if h.database is not None or not caps & C.CLIENT_CONNECT_WITH_DB else "",
        h.auth_plugin if h.auth_plugin is not None or not caps & C.CLIENT_PLUGIN_AUTH else "",
        h.attributes, h.max_packet, h.charset,
        h.zstd_level if h.zstd_level is not None or not caps & C.CLIENT_ZSTD_COMPRESSION_ALGORITHM else 3)


@fuzz(800)
@given(client_handshakes(), mutations())
def test_client_handshake(valid: bytes, ops: list) -> None:
    payload = mutate(valid, ops)
    results = []
    for kind in (bytes, bytearray, memoryview):
        try:
            results.append(p.parse_client_handshake(kind(payload)))
        except MySQLProtocolError as exc:
            assert str(exc) and exc.code
            results.append(("error", str(exc), exc.code))
    assert results[0] == results[1] == results[2]
    h = results[0]
    if not ops:
        assert not isinstance(h, tuple), f"refused a valid handshake: {h}"
    if isinstance(h, p.HandshakeResponse41):
        assert h.capabilities & C.CLIENT_PROTOCOL_41 and isinstance(h.user, str)
        if h.capabilities & C.CLIENT_SECURE_CONNECTION and not h.capabilities & C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            assert len(h.auth_response) <= 255
        again = p.parse_client_handshake(h.build())
        assert again == _filled(h), (h, again)
    elif isinstance(h, p.SslRequest):
        assert len(payload) == 32 and h.capabilities & C.CLIENT_SSL
        assert p.parse_client_handshake(h.build()) == h


# ------------------------------------------------------------------------ ResultSetReader

columns = st.lists(st.builds(ColumnDefinition, texts, st.integers(0, 255), u16, st.integers(0, 2**32 - 1), u16,
                             st.integers(0, 255), texts, texts), min_size=1, max_size=3)


@st.composite
def replies(draw: st.DrawFn, caps: int) -> tuple[bytes, int]:
    """One whole reply to a command (seq from 1): (wire, number of results)."""
    wire, seq, n = [], 1, draw(st.integers(1, 3))
    for i in range(n):
        more = S.SERVER_MORE_RESULTS_EXISTS if i < n - 1 else 0
        status = int(draw(st.sampled_from([S.SERVER_STATUS_AUTOCOMMIT, S.SERVER_STATUS_IN_TRANS])) | more)
        what = draw(st.sampled_from(["ok", "set"] + (["err"] if not more else [])))
        if what == "ok":
            payload = p.OkPacket(draw(u64), draw(u64), status, draw(u16), draw(texts)).build(caps)
            wire.append(p.frame(payload, seq))
            seq += 1
        elif what == "err":
            wire.append(p.frame(p.ErrPacket(draw(u16), draw(texts), "42S02").build(caps), seq))
            seq += 1
        else:
            cols = draw(columns)
            rows = draw(st.lists(st.lists(st.none() | st.binary(max_size=30), min_size=len(cols), max_size=len(cols)),
                                 max_size=4))
            part = p.text_result_set(cols, rows, capabilities=caps, status=status, seq=seq)
            wire.append(part)
            seq += len(p.PacketReader().feed(part))
        seq &= 0xFF
    return b"".join(wire), n


@fuzz(500)
@given(reply_caps.flatmap(lambda caps: st.tuples(st.just(caps), st.lists(replies(caps), min_size=1, max_size=3))),
       st.booleans(), mutations(), cuts)
def test_result_set_reader(case: tuple[int, list[tuple[bytes, int]]], keep: bool, ops: list, cut: list[int]) -> None:
    caps, reply_list = case
    valid = b"".join(wire for wire, _ in reply_list)
    stream = mutate(valid, ops)
    rs = p.ResultSetReader(caps, keep=keep)
    out = bytearray()
    done: list[bytes] = []
    try:
        for chunk in split(stream, cut):
            out += rs.feed(chunk)
            while rs.done:  # the next reply may already be here (pipelined)
                assert rs.result_count >= 1 or rs.error is not None
                assert rs.error is None or not rs.status & S.SERVER_MORE_RESULTS_EXISTS
                done.append(bytes(out))
                out.clear()
                rs.reset()
                out += rs.feed(b"")
    except MySQLProtocolError as exc:
        assert str(exc) and exc.code
        return
    forwarded = b"".join(done) + bytes(out)
    assert stream.startswith(forwarded)  # every reply's bytes, as received, in order
    if not ops:
        assert done == [wire for wire, _ in reply_list] and not out
        assert rs.rest() == b""


# ------------------------------------------------------------------------ COM_QUERY

attributes = st.lists(st.one_of(
    st.builds(p.QueryAttribute, texts, st.none() | st.binary(max_size=20)),
    st.builds(p.QueryAttribute, texts, st.binary(min_size=8, max_size=8), st.just(p.ColumnType.LONGLONG), st.booleans()),
    st.builds(p.QueryAttribute, texts, st.binary(min_size=4, max_size=4), st.just(p.ColumnType.LONG)),
    st.builds(p.QueryAttribute, texts, st.binary(max_size=11), st.just(p.ColumnType.DATETIME)),
    st.builds(p.QueryAttribute, texts, st.just(b""), st.just(p.ColumnType.NULL)),
), max_size=4)


@fuzz(800)
@given(texts, attributes, st.booleans(), mutations())
def test_com_query(sql: str, attrs: list, with_attrs: bool, ops: list) -> None:
    caps = C.CLIENT_QUERY_ATTRIBUTES if with_attrs else 0
    valid = p.ComQuery(sql, tuple(attrs) if with_attrs else ()).build(caps)
    payload = mutate(valid, ops)
    results = []
    for kind in (bytes, bytearray, memoryview):
        try:
            results.append(p.parse_com_query(kind(payload), caps))
        except MySQLProtocolError as exc:
            assert str(exc) and exc.code
            results.append(("error", str(exc), exc.code))
    assert results[0] == results[1] == results[2]
    q = results[0]
    if not ops:
        assert q == p.ComQuery(sql, tuple(attrs) if with_attrs else ())
    if isinstance(q, p.ComQuery):
        assert p.parse_com_query(q.build(caps), caps) == q


# ------------------------------------------------------------------------ other parsers

OK_CAPS = int(DEP_CAPS)
PARSERS: dict[str, tuple[Callable[[Any], Any], st.SearchStrategy[bytes]]] = {
    "ok": (lambda b: p.parse_ok(b, OK_CAPS),
           st.builds(p.OkPacket, u64, u64, u16, u16, texts, st.binary(max_size=20)).map(lambda o: o.build(OK_CAPS))),
    "ok_320": (lambda b: p.parse_ok(b, 0), st.builds(p.OkPacket, u64, u64, u16, u16, texts).map(lambda o: o.build(0))),
    "err": (p.parse_err, st.builds(p.ErrPacket, u16, texts, st.just("HY000")).map(lambda e: e.build())),
    "eof": (p.parse_eof, st.builds(p.EofPacket, u16, u16).map(lambda e: e.build())),
    "column_count": (lambda b: p.parse_column_count(b, C.CLIENT_OPTIONAL_RESULTSET_METADATA),
                     st.integers(1, 2**64 - 1).map(lambda n: p.column_count(n, C.CLIENT_OPTIONAL_RESULTSET_METADATA))),
    "column_definition": (lambda b: p.parse_column_definition(b, C.MARIADB_CLIENT_EXTENDED_METADATA),
                          columns.map(lambda c: c[0].build(C.MARIADB_CLIENT_EXTENDED_METADATA))),
    "text_row": (p.parse_text_row, st.lists(st.none() | st.binary(max_size=30), max_size=4).map(p.text_row)),
    "handshake_v10": (p.parse_handshake_v10, st.builds(
        p.HandshakeV10, texts, st.integers(0, 2**32 - 1), st.binary(min_size=20, max_size=20),
        st.sampled_from([int(C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION | C.CLIENT_PLUGIN_AUTH | C.CLIENT_LONG_PASSWORD),
                         int(C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION | C.CLIENT_PLUGIN_AUTH
                             | C.MARIADB_CLIENT_EXTENDED_METADATA)]),
        st.integers(0, 255), u16, texts).map(lambda h: h.build())),
    "auth_switch_request": (p.parse_auth_switch_request,
                            st.builds(p.AuthSwitchRequest, texts, st.binary(max_size=21)).map(lambda a: a.build())),
    "auth_more_data": (p.parse_auth_more_data, st.binary(max_size=20).map(lambda d: p.AuthMoreData(d).build())),
    "com_init_db": (p.parse_com_init_db, texts.map(p.com_init_db)),
    "session_state": (p.parse_session_state, st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=20)), max_size=3)
                      .map(lambda es: b"".join(bytes([t]) + p.lenenc_str(d) for t, d in es))),
    "classify_reply": (p.classify_reply, st.binary(min_size=1, max_size=4)),
    "classify_auth_reply": (lambda b: p.classify_reply(b, auth=True),
                            st.sampled_from([b"\x00", b"\xff", b"\xfe", b"\x01"]).map(lambda h: h + b"\x00\x00")),
}


@st.composite
def parser_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(PARSERS)))
    return name, draw(PARSERS[name][1])


@fuzz(1000)
@given(parser_inputs(), mutations())
def test_payload_parsers(case: tuple[str, bytes], ops: list) -> None:
    name, valid = case
    parser = PARSERS[name][0]
    payload = mutate(valid, ops)
    results = []
    for kind in (bytes, bytearray, memoryview):
        try:
            results.append(("ok", parser(kind(payload))))
        except MySQLProtocolError as exc:
            assert str(exc) and exc.code
            results.append(("error", str(exc)))
    assert results[0] == results[1] == results[2], results
    if not ops:
        assert results[0][0] == "ok", f"{name} refused its builder's payload {payload!r}: {results[0][1]}"
