"""proxy.mysql.protocol: framing, length-encoded values, every builder byte for byte against the
MySQL documentation's examples and bytes captured from MariaDB 10.11 (with a raw socket, once),
round trips, the reply state machine, and fuzzing of the framer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mysql import protocol as p
from proxy.mysql.protocol import Capability as C
from proxy.mysql.protocol import ColumnDefinition, MySQLProtocolError
from proxy.mysql.protocol import ServerStatus as S


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def one(wire: bytes) -> tuple[int, bytes]:
    """Frame exactly one packet: (seq, payload)."""
    r = p.PacketReader()
    pkts = r.feed(wire)
    assert len(pkts) == 1 and r.buffered == 0 and bytes(r.raw(pkts[0])) == wire
    return pkts[0][0], bytes(r.payload(pkts[0]))


P41 = C.CLIENT_PROTOCOL_41
SERVER_CAPS = (C.CLIENT_LONG_PASSWORD | C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION | C.CLIENT_PLUGIN_AUTH
               | C.CLIENT_TRANSACTIONS | C.CLIENT_MULTI_RESULTS | C.CLIENT_SSL)
EOF_CAPS = C.CLIENT_PROTOCOL_41 | C.CLIENT_TRANSACTIONS | C.CLIENT_MULTI_RESULTS | C.CLIENT_MULTI_STATEMENTS
DEP_CAPS = EOF_CAPS | C.CLIENT_DEPRECATE_EOF | C.CLIENT_SESSION_TRACK

# ------------------------------------------------------------------ documented examples (MySQL docs)

DOC_OK = h("07 00 00 02 00 00 00 02 00 00 00")
DOC_ERR = h("17 00 00 01 ff 48 04 23 48 59 30 30 30 4e 6f 20 74 61 62 6c 65 73 20 75 73 65 64")
DOC_EOF = h("05 00 00 05 fe 00 00 02 00")
DOC_COM_QUERY = h("21 00 00 00 03 73 65 6c 65 63 74 20 40 40 76 65 72 73 69 6f 6e 5f 63 6f 6d 6d 65 6e 74"
                  "20 6c 69 6d 69 74 20 31")  # select @@version_comment limit 1
DOC_RESULT_SET = h("""
    01 00 00 01 01
    27 00 00 02 03 64 65 66 00 00 00 11 40 40 76 65 72 73 69 6f 6e 5f 63 6f 6d 6d 65 6e 74 00 0c 08 00
    1c 00 00 00 fd 00 00 1f 00 00
    05 00 00 03 fe 00 00 02 00
    1d 00 00 04 1c 4d 79 53 51 4c 20 43 6f 6d 6d 75 6e 69 74 79 20 53 65 72 76 65 72 20 28 47 50 4c 29
    05 00 00 05 fe 00 00 02 00""")
DOC_HANDSHAKE_55 = h("""
    36 00 00 00 0a 35 2e 35 2e 32 2d 6d 32 00 0b 00 00 00 64 76 48 40 49 2d 43 4a 00 ff f7 08 02 00
    00 00 00 00 00 00 00 00 00 00 00 00 00 2a 34 64 7c 63 5a 77 6b 34 5e 5d 3a 00""")
DOC_HANDSHAKE_56 = h("""
    50 00 00 00 0a 35 2e 36 2e 34 2d 6d 37 2d 6c 6f 67 00 56 0a 00 00 52 42 33 76 7a 26 47 72 00 ff
    ff 08 02 00 0f c0 15 00 00 00 00 00 00 00 00 00 00 2b 79 44 26 2f 5a 5a 33 30 35 5a 47 00 6d 79
    73 71 6c 5f 6e 61 74 69 76 65 5f 70 61 73 73 77 6f 72 64 00""")
DOC_HANDSHAKE_RESPONSE = h("""
    54 00 00 01 8d a6 0f 00 00 00 00 01 08 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
    00 00 00 00 70 61 6d 00 14 ab 09 ee f6 bc b1 32 3e 61 14 38 65 c0 99 1d 95 7d 75 d4 47 74 65 73
    74 00 6d 79 73 71 6c 5f 6e 61 74 69 76 65 5f 70 61 73 73 77 6f 72 64 00""")
DOC_AUTH_SWITCH_RESPONSE = h("14 00 00 03 f4 17 96 1f 79 f3 ac 10 0b da a6 b3 b5 c2 0e ab 59 85 ff b8")

# ------------------------------------------------------------------ captured from MariaDB 10.11.19

MARIADB_GREETING = h(
    "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b64656231327531001000000056494b7c4f553e73"
    "00fef72d0200ff81150000000000001d0000004a5652792c694e2d345c5269006d7973716c5f6e61746976655f7061737377"
    "6f726400")
PYMYSQL_LOGIN = h(  # PyMySQL 1.2.4: database, plugin, connect attributes
    "0da23a00ffffff002d0000000000000000000000000000000000000000000000726f6f7400006d7973716c006d7973716c5f"
    "6e61746976655f70617373776f726400360c5f636c69656e745f6e616d650770796d7973716c0f5f636c69656e745f766572"
    "73696f6e05312e322e34045f706964053332343237")
LIBMARIADB_LOGIN = h(  # mariadb CLI (libmariadb 3.3.20): MariaDB extended capabilities in the filler
    "84a2bf000000100021000000000000000000000000000000000000001d000000726f6f7400006d7973716c5f6e6174697665"
    "5f70617373776f7264007f035f6f73054c696e75780c5f636c69656e745f6e616d650a6c69626d617269616462045f706964"
    "0533323433310f5f636c69656e745f76657273696f6e06332e332e3230095f706c6174666f726d067838365f36340c70726f"
    "6772616d5f6e616d65056d7973716c0c5f7365727665725f686f7374093132372e302e302e31")
# SELECT 1 AS a, NULL AS b, 'x' AS c
MARIADB_SELECT_EOF = h(
    "010000010317000002036465660000000161000c3f000100000003810000000017000003036465660000000162000c3f0000"
    "00000006800000000017000004036465660000000163000c2d0004000000fd010027000005000005fe000002000500000601"
    "31fb017805000007fe00000200")
MARIADB_SELECT_DEP = h(
    "010000010317000002036465660000000161000c3f000100000003810000000017000003036465660000000162000c3f0000"
    "00000006800000000017000004036465660000000163000c2d0004000000fd0100270000050000050131fb017807000006fe"
    "000002000000")
# SELECT 1; SELECT 2 (the first terminator has SERVER_MORE_RESULTS_EXISTS), inside a transaction
MARIADB_MULTI_EOF = h(
    "010000010117000002036465660000000131000c3f000100000003810000000005000003fe00000b00020000040131050000"
    "05fe00000b00010000060117000007036465660000000132000c3f000100000003810000000005000008fe00000300020000"
    "0901320500000afe00000300")
MARIADB_MULTI_DEP = h(
    "010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000b00000001"
    "0000050117000006036465660000000132000c3f000100000003810000000002000007013207000008fe000003000000")
# SELECT 1; SELECT * FROM nope; SELECT 3 (ERR after the first result)
MARIADB_MULTI_ERR_DEP = h(
    "010000010117000002036465660000000131000c3f000100000003810000000002000003013107000004fe00000800000"
    "01d000005ff16042333443030304e6f2064617461626173652073656c6563746564")
MARIADB_ERR = h("1d000001ff16042333443030304e6f2064617461626173652073656c6563746564")
MARIADB_BEGIN_OK = h("0700000100000003000000")
# with CLIENT_SESSION_TRACK: SET autocommit=0, and USE mysql
MARIADB_OK_SYSVAR = h("1a000001000000014000000011000f0a6175746f636f6d6d6974034f4646")
MARIADB_OK_SCHEMA = h("1100000100000000c0000000080106056d7973716c")


# ------------------------------------------------------------------ framing


def test_frame_and_documented_ok_packet():
    assert p.frame(p.OkPacket().build(), 2) == DOC_OK
    assert p.frame(b"\x0e") == h("01 00 00 00 0e")
    assert p.frame(b"", 7) == h("00 00 00 07")
    assert p.frame(b"x", 256) == h("01 00 00 00 78")  # ids wrap
    wire, nxt = p.frame_all([b"a", b"bc"], 255)
    assert wire == h("01 00 00 ff 61 02 00 00 00 62 63") and nxt == 1
    assert p.next_seq(255) == 0 and p.next_seq(3, 2) == 5


@pytest.mark.parametrize("size", [p.MAX_PAYLOAD - 1, p.MAX_PAYLOAD, p.MAX_PAYLOAD + 100, 2 * p.MAX_PAYLOAD])
def test_large_payloads_are_split_and_joined(size):
    payload = (b"\x03" + bytes(range(256)) * (size // 256 + 1))[:size]
    wire = p.frame(payload, 0)
    parts = p.packet_parts(size)
    assert len(wire) == size + 4 * parts
    # headers: full parts of 0xFFFFFF with consecutive ids, then the remainder (empty if exact)
    for i in range(parts):
        hdr = wire[i * (p.MAX_PAYLOAD + 4):][:4]
        length = p.MAX_PAYLOAD if i < parts - 1 else size - (parts - 1) * p.MAX_PAYLOAD
        assert hdr == length.to_bytes(3, "little") + bytes([i])
    r = p.PacketReader(expected_seq=0)
    pkts = []
    for i in range(0, len(wire), 1 << 20):  # arrives in 1 MiB reads
        pkts += r.feed(wire[i:i + (1 << 20)])
    assert len(pkts) == 1 and r.buffered == 0
    (pkt,) = pkts
    assert pkt[0] == parts - 1 and r.parts(pkt) == parts and r.payload_length(pkt) == size
    assert bytes(r.payload(pkt)) == payload and bytes(r.raw(pkt)) == wire
    assert r.expected_seq == parts
    # followed by a small packet in the same read: both come out
    r2 = p.PacketReader()
    pkts = r2.feed(wire + p.frame(b"\x0e", parts))
    assert [r2.payload_length(k) for k in pkts] == [size, 1] and pkts[1][0] == parts


def test_reader_offsets_views_and_partial_feeds():
    wire = p.frame(b"hello", 0) + p.frame(b"", 1) + p.frame(b"world!", 2)
    r = p.PacketReader()
    assert r.feed(wire[:3]) == [] and r.buffered == 3
    pkts = r.feed(wire[3:12])
    assert pkts == [(0, 0, 9)] and r.buffered == 3
    assert isinstance(r.payload(pkts[0]), memoryview) and bytes(r.payload(pkts[0])) == b"hello"
    pkts = r.feed(wire[12:])
    assert [(k[0], bytes(r.payload(k))) for k in pkts] == [(1, b""), (2, b"world!")]
    assert bytes(r.raw(pkts[0], pkts[1])) == wire[9:]
    assert r.read(p.frame(b"abc", 9)) == [(9, b"abc")]
    # byte-by-byte
    r = p.PacketReader()
    got = [pl for i in range(len(wire)) for pl in r.read(wire[i:i + 1])]
    assert got == [(0, b"hello"), (1, b""), (2, b"world!")]


def test_reader_limits_and_sequence_errors_are_sticky():
    r = p.PacketReader(max_packet=10)
    assert r.read(p.frame(b"x" * 10)) == [(0, b"x" * 10)]
    with pytest.raises(MySQLProtocolError, match="too large") as e:
        r.feed(h("0b 00 00 00"))  # refused from the header alone
    assert e.value.code == p.ER.NET_PACKET_TOO_LARGE and e.value.sqlstate == "08S01"
    with pytest.raises(MySQLProtocolError):
        r.feed(b"")
    r = p.PacketReader(max_packet=p.MAX_PAYLOAD + 5)
    with pytest.raises(MySQLProtocolError, match="too large"):
        r.feed(p.frame(b"y" * (p.MAX_PAYLOAD + 6)))
    r = p.PacketReader(expected_seq=0)
    assert r.read(p.frame(b"a", 0) + p.frame(b"b", 1)) == [(0, b"a"), (1, b"b")]
    with pytest.raises(MySQLProtocolError, match="expected sequence id 2, got 5") as e:
        r.feed(p.frame(b"c", 5))
    assert e.value.code == p.ER.NET_PACKETS_OUT_OF_ORDER
    assert e.value.err_packet() == p.ErrPacket(1156, str(e.value), "08S01")


def test_reader_rest_and_unread():
    r = p.PacketReader()
    assert r.read(p.frame(b"ssl", 1) + b"\x16\x03\x01") == [(1, b"ssl")]
    assert r.rest() == b"\x16\x03\x01" and r.buffered == 0 and r.rest() == b""
    r.feed(b"\x05\x00")  # a partial packet is pending
    r.unread(p.frame(b"again", 3))
    assert r.read(b"\x00\x04abcde") == [(3, b"again"), (4, b"abcde")]
    r.unread(p.frame(b"z", 1))
    assert r.read(b"") == [(1, b"z")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64), st.one_of(st.none(), st.integers(0, 255)),
       st.integers(0, 2000))
def test_reader_fuzz_raises_only_protocol_errors(data, step, expected_seq, limit):
    r = p.PacketReader(max_packet=limit, expected_seq=expected_seq)
    try:
        for i in range(0, len(data), step):
            for pkt in r.feed(data[i:i + step]):
                assert r.payload_length(pkt) == len(r.payload(pkt)) <= limit
    except MySQLProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=12), st.data())
def test_reader_reassembles_arbitrary_splits(packets, data):
    wire = b"".join(p.frame(pl, seq) for seq, pl in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    r = p.PacketReader()
    got = []
    for a, b in zip([0] + cuts, cuts + [len(wire)]):
        got += r.read(wire[a:b])
    assert got == packets and r.buffered == 0


# ------------------------------------------------------------------ length-encoded values


@pytest.mark.parametrize("n, wire", [
    (0, "00"), (250, "fa"), (251, "fc fb 00"), (0xFFFF, "fc ff ff"), (0x10000, "fd 00 00 01"),
    (0xFFFFFF, "fd ff ff ff"), (0x1000000, "fe 00 00 00 01 00 00 00 00"), (2**64 - 1, "fe" + " ff" * 8)])
def test_lenenc_int(n, wire):
    assert p.lenenc_int(n) == h(wire)
    assert p.read_lenenc_int(h(wire) + b"rest") == (n, len(h(wire)))
    assert p.read_lenenc_int(memoryview(b"x" + h(wire)), 1) == (n, len(h(wire)) + 1)


def test_lenenc_edge_cases():
    assert p.read_lenenc_int(b"\xfb") == (None, 1)  # NULL in a text row
    assert p.read_lenenc_str(b"\xfb") == (None, 1)
    for bad in (b"", b"\xff", b"\xfc\x01", b"\xfd\x01\x02", b"\xfe" + bytes(7)):
        with pytest.raises(MySQLProtocolError):
            p.read_lenenc_int(bad)
    with pytest.raises(MySQLProtocolError):
        p.read_lenenc_str(b"\x05abc")
    for n in (-1, 2**64):
        with pytest.raises(ValueError):
            p.lenenc_int(n)
    assert p.lenenc_str(b"abc") == b"\x03abc" and p.lenenc_str(b"z" * 251)[:3] == h("fc fb 00")
    assert p.nul_str(b"abc") == b"abc\0" and p.read_nul_str(b"ab\0cd\0", 3) == (b"cd", 6)
    with pytest.raises(ValueError):
        p.nul_str(b"a\0b")
    with pytest.raises(MySQLProtocolError):
        p.read_nul_str(b"abc")


@settings(deadline=None)  # no per-example wall-clock deadline: a busy box is slow, not wrong
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_lenenc_round_trip(n, s):
    wire = p.lenenc_int(n) + p.lenenc_str(s)
    v, pos = p.read_lenenc_int(wire)
    assert v == n and p.read_lenenc_str(wire, pos) == (s, len(wire))


# ------------------------------------------------------------------ OK / ERR / EOF


def test_documented_ok_err_eof():
    seq, payload = one(DOC_OK)
    assert seq == 2 and p.parse_ok(payload) == p.OkPacket(status=S.SERVER_STATUS_AUTOCOMMIT)
    seq, payload = one(DOC_ERR)
    err = p.parse_err(payload)
    assert err == p.ErrPacket(1096, "No tables used", "HY000") and err.code == p.ER.NO_TABLES_USED
    assert p.frame(err.build(), 1) == DOC_ERR
    seq, payload = one(DOC_EOF)
    assert p.parse_eof(payload) == p.EofPacket(0, S.SERVER_STATUS_AUTOCOMMIT)
    assert p.frame(p.EofPacket().build(), 5) == DOC_EOF


def test_ok_with_session_state_from_mariadb():
    _, payload = one(MARIADB_OK_SYSVAR)
    ok = p.parse_ok(payload, DEP_CAPS)
    assert ok.status == S.SERVER_STATUS_IN_TRANS | S.SERVER_SESSION_STATE_CHANGED and ok.in_transaction
    assert ok.info == "" and p.parse_session_state(ok.session_state) == [(p.SessionTrack.SYSTEM_VARIABLES,
                                                                          b"\x0aautocommit\x03OFF")]
    assert ok.build(DEP_CAPS) == payload
    _, payload = one(MARIADB_OK_SCHEMA)
    ok = p.parse_ok(payload, DEP_CAPS)
    assert p.parse_session_state(ok.session_state) == [(p.SessionTrack.SCHEMA, b"\x05mysql")]
    assert ok.status & S.SERVER_STATUS_ANSI_QUOTES and ok.build(DEP_CAPS) == payload


@pytest.mark.parametrize("caps", [0, C.CLIENT_TRANSACTIONS, P41, P41 | C.CLIENT_SESSION_TRACK])
@pytest.mark.parametrize("ok", [
    p.OkPacket(),
    p.OkPacket(3, 2**40, S.SERVER_STATUS_IN_TRANS, 7, "Rows matched: 3  Changed: 3  Warnings: 7"),
    p.OkPacket(status=S.SERVER_SESSION_STATE_CHANGED, info="hé", session_state=b"\x01\x03\x02db"),
    p.OkPacket(header=0xFE, status=S.SERVER_MORE_RESULTS_EXISTS),
])
def test_ok_round_trip(caps, ok):
    back = p.parse_ok(ok.build(caps), caps)
    assert back.affected_rows == ok.affected_rows and back.last_insert_id == ok.last_insert_id
    assert back.header == ok.header and back.info == ok.info
    if caps & P41:
        assert (back.status, back.warnings) == (ok.status, ok.warnings)
    if caps & C.CLIENT_SESSION_TRACK:
        assert back == ok


def test_ok_err_eof_details():
    assert p.OkPacket(info="ok").build(0) == h("00 00 00") + b"ok"  # pre-4.1: info runs to the end
    with pytest.raises(MySQLProtocolError, match="malformed OK"):
        p.parse_ok(h("00 00"))
    with pytest.raises(MySQLProtocolError):
        p.parse_ok(h("01 00 00 02 00 00 00"))
    # an ERR sent before the handshake has no '#' + SQLSTATE
    assert p.parse_err(b"\xff\x13\x04Too many connections") == p.ErrPacket(1043, "Too many connections", "HY000")
    assert p.ErrPacket(1045, "denied", "28000").build(0) == b"\xff\x15\x04denied"
    assert p.ErrPacket.for_code(p.ER.ACCESS_DENIED_ERROR, "x").sqlstate == "28000"
    assert p.ErrPacket.for_code(p.ER.MALFORMED_PACKET, "x").sqlstate == "HY000"
    assert p.parse_err(p.ErrPacket(1, "Ünïcode ✓", "XY123").build()) == p.ErrPacket(1, "Ünïcode ✓", "XY123")
    assert p.parse_err(b"\xff\x01\x00\xff\xfe").message.encode("utf-8", "surrogateescape") == b"\xff\xfe"
    with pytest.raises(ValueError):
        p.ErrPacket(1, "x", "HY0").build()
    assert p.EofPacket(3, 0x22).build(0) == b"\xfe" and p.parse_eof(b"\xfe", 0) == p.EofPacket(0, 0)
    assert p.parse_eof(p.EofPacket(3, 0x22).build()) == p.EofPacket(3, 0x22)
    with pytest.raises(MySQLProtocolError):
        p.parse_eof(b"\xfe" + bytes(8))


def test_classify_reply():
    R = p.Reply
    assert p.classify_reply(b"\x00\x00\x00\x02\x00\x00\x00") == R.OK
    assert p.classify_reply(memoryview(b"\xff\x01\x00")) == R.ERR
    assert p.classify_reply(b"\xfe\x00\x00\x02\x00") == R.EOF
    assert p.classify_reply(b"\xfbdata.csv") == R.LOCAL_INFILE
    assert p.classify_reply(b"\x03") == R.RESULT_SET
    assert p.classify_reply(b"\xfemysql_native_password\0", auth=True) == R.AUTH_SWITCH
    assert p.classify_reply(b"\x01\x03", auth=True) == R.AUTH_MORE_DATA
    assert p.classify_reply(b"\x00\x00\x00\x02\x00\x00\x00", auth=True) == R.OK
    with pytest.raises(MySQLProtocolError):
        p.classify_reply(b"\x05", auth=True)
    with pytest.raises(MySQLProtocolError):
        p.classify_reply(b"")


# ------------------------------------------------------------------ connection phase


def test_documented_handshakes_parse_and_rebuild():
    seq, payload = one(DOC_HANDSHAKE_55)
    hs = p.parse_handshake_v10(payload)
    assert seq == 0 and hs.server_version == "5.5.2-m2" and hs.connection_id == 11
    assert hs.auth_data == b"dvH@I-CJ*4d|cZwk4^]:" and len(hs.auth_data) == 20
    assert hs.capabilities == 0xF7FF and hs.charset == 8 and hs.status == 2 and hs.auth_plugin == ""
    assert p.frame(hs.build(), 0) == DOC_HANDSHAKE_55
    _, payload = one(DOC_HANDSHAKE_56)
    hs = p.parse_handshake_v10(payload)
    assert (hs.server_version, hs.connection_id, hs.auth_plugin) == ("5.6.4-m7-log", 2646, "mysql_native_password")
    assert hs.auth_data == b"RB3vz&Gr+yD&/ZZ305ZG" and hs.capabilities == 0xC00FFFFF
    assert hs.capabilities & C.CLIENT_PLUGIN_AUTH and not hs.is_mariadb
    assert p.frame(hs.build(), 0) == DOC_HANDSHAKE_56


def test_mariadb_greeting_extended_capabilities():
    _, payload = one(MARIADB_GREETING)
    hs = p.parse_handshake_v10(payload)
    assert hs.server_version == "5.5.5-10.11.19-MariaDB-0+deb12u1" and hs.connection_id == 16
    assert hs.is_mariadb and not hs.capabilities & p.CLIENT_MYSQL
    ext = hs.capabilities >> 32
    assert ext == 0x1D and hs.capabilities & C.MARIADB_CLIENT_EXTENDED_METADATA
    assert hs.capabilities & C.MARIADB_CLIENT_CACHE_METADATA and hs.capabilities & C.MARIADB_CLIENT_PROGRESS
    assert hs.charset == p.Charset.UTF8MB4_GENERAL_CI and len(hs.auth_data) == 20
    assert hs.build() == payload


def test_handshake_build_shape_and_errors():
    hs = p.HandshakeV10("8.0.36", 7, bytes(range(1, 21)), SERVER_CAPS | C.CLIENT_DEPRECATE_EOF,
                        auth_plugin="caching_sha2_password")
    payload = hs.build()
    assert payload.startswith(b"\x0a8.0.36\0\x07\0\0\0" + bytes(range(1, 9)) + b"\0")
    assert payload.endswith(bytes(range(9, 21)) + b"\0caching_sha2_password\0")
    assert payload[payload.index(b"\0", 1) + 1 + 4 + 8 + 1 + 2 + 1 + 2 + 2] == 21  # auth-plugin-data length
    assert p.parse_handshake_v10(payload) == hs
    with pytest.raises(ValueError):  # extended capabilities need CLIENT_MYSQL clear
        p.HandshakeV10("x", 1, bytes(20), C.CLIENT_LONG_PASSWORD | C.MARIADB_CLIENT_PROGRESS).build()
    with pytest.raises(MySQLProtocolError, match="Too many connections") as e:
        p.parse_handshake_v10(p.ErrPacket.for_code(p.ER.CON_COUNT_ERROR, "Too many connections").build())
    assert e.value.code == 1040 and e.value.sqlstate == "08004"
    with pytest.raises(MySQLProtocolError, match="protocol version 9"):
        p.parse_handshake_v10(b"\x093.20\0\1\0\0\0abcdefgh\0")
    # a pre-4.1 server stops after the lower capability flags
    old = p.parse_handshake_v10(b"\x0a4.0\0\1\0\0\0abcdefgh\0\x2c\xa2")
    assert old.capabilities == 0xA22C and old.auth_data == b"abcdefgh" and old.charset == 0
    for cut in (5, 20, 40, len(payload) - 30):
        with pytest.raises(MySQLProtocolError):
            p.parse_handshake_v10(payload[:cut])


@settings(deadline=None)  # no per-example wall-clock deadline: a busy box is slow, not wrong
@given(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40),
       st.integers(0, 2**32 - 1), st.binary(min_size=20, max_size=20).filter(lambda b: not b.endswith(b"\0")),
       st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**16 - 1))
def test_handshake_round_trip(version, conn_id, scramble, caps, charset, status, ext):
    caps |= C.CLIENT_SECURE_CONNECTION
    if ext:
        caps = (caps & ~p.CLIENT_MYSQL) | ext << 32
    plugin = "caching_sha2_password" if caps & C.CLIENT_PLUGIN_AUTH else ""
    hs = p.HandshakeV10(version, conn_id, scramble, caps, charset, status, plugin)
    assert p.parse_handshake_v10(hs.build()) == hs


def test_documented_handshake_response():
    seq, payload = one(DOC_HANDSHAKE_RESPONSE)
    r = p.parse_client_handshake(payload)
    assert seq == 1 and isinstance(r, p.HandshakeResponse41)
    assert r.capabilities == 0x000FA68D and r.max_packet == 1 << 24 and r.charset == 8
    assert (r.user, r.database, r.auth_plugin) == ("pam", "test", "mysql_native_password")
    assert r.auth_response == h("ab 09 ee f6 bc b1 32 3e 61 14 38 65 c0 99 1d 95 7d 75 d4 47")
    assert r.capabilities & C.CLIENT_SECURE_CONNECTION and not r.capabilities & C.CLIENT_SSL
    assert p.frame(r.build(), 1) == DOC_HANDSHAKE_RESPONSE


def test_captured_client_logins():
    r = p.parse_client_handshake(PYMYSQL_LOGIN)
    assert (r.user, r.database, r.auth_response, r.auth_plugin) == ("root", "mysql", b"", "mysql_native_password")
    assert r.attributes["_client_name"] == "pymysql" and r.charset == 45 and r.max_packet == 0xFFFFFF
    assert r.capabilities & C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA and r.capabilities & C.CLIENT_CONNECT_ATTRS
    assert r.build() == PYMYSQL_LOGIN
    r = p.parse_client_handshake(LIBMARIADB_LOGIN)
    assert r.capabilities >> 32 == 0x1D and not r.capabilities & p.CLIENT_MYSQL and r.database is None
    assert r.attributes["program_name"] == "mysql" and len(r.attributes) == 7 and r.charset == 33
    assert r.build() == LIBMARIADB_LOGIN


def test_ssl_request():
    req = p.SslRequest(SERVER_CAPS | C.CLIENT_CONNECT_WITH_DB, charset=p.Charset.UTF8MB4_0900_AI_CI)
    payload = req.build()
    assert len(payload) == 32 and payload[:4] == (int(req.capabilities)).to_bytes(4, "little")
    assert payload[4:9] == h("00 00 00 01 ff") and payload[9:] == bytes(23)
    assert p.parse_client_handshake(payload) == req
    ext = p.SslRequest(C.CLIENT_PROTOCOL_41 | C.CLIENT_SSL | C.MARIADB_CLIENT_STMT_BULK_OPERATIONS)
    assert ext.build()[28:] == h("04 00 00 00") and p.parse_client_handshake(ext.build()) == ext
    # after TLS the client sends the full response, CLIENT_SSL still set
    full = p.HandshakeResponse41(SERVER_CAPS, "u", b"\x01" * 20, auth_plugin="mysql_native_password")
    assert p.parse_client_handshake(full.build()) == full
    with pytest.raises(MySQLProtocolError):  # 32 bytes without CLIENT_SSL is a truncated login
        p.parse_client_handshake(p.SslRequest(C.CLIENT_PROTOCOL_41).build())


@pytest.mark.parametrize("extra", [
    0, C.CLIENT_CONNECT_WITH_DB, C.CLIENT_PLUGIN_AUTH, C.CLIENT_CONNECT_ATTRS, C.CLIENT_ZSTD_COMPRESSION_ALGORITHM,
    C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | C.CLIENT_CONNECT_WITH_DB | C.CLIENT_PLUGIN_AUTH | C.CLIENT_CONNECT_ATTRS,
])
@pytest.mark.parametrize("secure", [0, C.CLIENT_SECURE_CONNECTION])
def test_handshake_response_round_trip(extra, secure):
    caps = C.CLIENT_PROTOCOL_41 | extra | secure
    resp = p.HandshakeResponse41(
        caps, "üser", b"\x01\x02" * 10,
        database="db" if caps & C.CLIENT_CONNECT_WITH_DB else None,
        auth_plugin="caching_sha2_password" if caps & C.CLIENT_PLUGIN_AUTH else None,
        attributes={"_client_name": "t", "é": "ü"} if caps & C.CLIENT_CONNECT_ATTRS else {},
        zstd_level=5 if caps & C.CLIENT_ZSTD_COMPRESSION_ALGORITHM else None)
    assert p.parse_client_handshake(resp.build()) == resp


def test_handshake_response_details():
    lenenc = C.CLIENT_PROTOCOL_41 | C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    big = p.HandshakeResponse41(lenenc, "u", b"k" * 300)
    assert big.build()[34:37] == h("fc 2c 01") and p.parse_client_handshake(big.build()) == big
    with pytest.raises(ValueError):
        p.HandshakeResponse41(C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION, "u", b"k" * 256).build()
    with pytest.raises(ValueError):
        p.HandshakeResponse41(C.CLIENT_PROTOCOL_41, "u\0x").build()
    # optional trailing fields may be missing; the plugin name's NUL too
    caps = C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION | C.CLIENT_CONNECT_WITH_DB | C.CLIENT_PLUGIN_AUTH
    head = p.SslRequest(caps).build() + b"u\0\x00"
    assert p.parse_client_handshake(head) == p.HandshakeResponse41(caps, "u")
    assert p.parse_client_handshake(head + b"db\0plug").auth_plugin == "plug"
    with pytest.raises(MySQLProtocolError, match="pre-4.1") as e:
        p.parse_client_handshake(h("85 24 00 00 00 6f 6c 64 00 47 44 53 43 51 59 52 5f"))  # HandshakeResponse320
    assert e.value.code == p.ER.NOT_SUPPORTED_AUTH_MODE
    with pytest.raises(MySQLProtocolError, match="UTF-8"):
        p.parse_client_handshake(p.SslRequest(caps).build() + b"\xff\0\x00")
    with pytest.raises(MySQLProtocolError):
        p.parse_client_handshake(p.SslRequest(caps).build() + b"u\0\x14short")
    with pytest.raises(MySQLProtocolError):
        p.parse_client_handshake(b"\x00\x02\x00")


def test_auth_packets():
    scramble = bytes(range(65, 85))
    req = p.AuthSwitchRequest("mysql_native_password", scramble + b"\0")
    assert req.build() == b"\xfemysql_native_password\0" + scramble + b"\0"
    assert p.parse_auth_switch_request(req.build()) == req and req.scramble == scramble
    assert p.parse_auth_switch_request(b"\xfe") == p.AuthSwitchRequest("mysql_old_password", b"")
    assert p.parse_auth_switch_request(b"\xfemysql_clear_password\0") == p.AuthSwitchRequest("mysql_clear_password")
    with pytest.raises(MySQLProtocolError):
        p.parse_auth_switch_request(b"\xfeno-nul")
    more = p.AuthMoreData(b"\x03")  # caching_sha2_password: fast auth succeeded
    assert more.build() == b"\x01\x03" and p.parse_auth_more_data(memoryview(b"\x01\x03")) == more
    with pytest.raises(MySQLProtocolError):
        p.parse_auth_more_data(b"\x02")
    seq, payload = one(DOC_AUTH_SWITCH_RESPONSE)
    resp = p.parse_auth_switch_response(payload)
    assert seq == 3 and len(resp.data) == 20 and p.frame(resp.build(), 3) == DOC_AUTH_SWITCH_RESPONSE


# ------------------------------------------------------------------ commands


def test_documented_com_query_and_simple_commands():
    assert p.frame(p.ComQuery("select @@version_comment limit 1").build(), 0) == DOC_COM_QUERY
    assert p.parse_com_query(one(DOC_COM_QUERY)[1]) == p.ComQuery("select @@version_comment limit 1")
    assert p.frame(p.com_ping()) == h("01 00 00 00 0e")
    assert p.frame(p.com_quit()) == h("01 00 00 00 01")
    assert p.frame(p.com_reset_connection()) == h("01 00 00 00 1f")
    assert p.com_init_db("shop") == b"\x02shop" and p.parse_com_init_db(b"\x02shop") == "shop"
    assert p.Command.COM_STMT_PREPARE == 22 and p.Command.COM_RESET_CONNECTION == 31
    assert p.command_name(22) == "COM_STMT_PREPARE" and p.command_name(0x63) == "0x63"


def test_com_query_with_query_attributes():
    qa = C.CLIENT_QUERY_ATTRIBUTES
    # no attributes: parameter count 0, parameter set count 1 (what libmysqlclient sends)
    assert p.ComQuery("SELECT 1").build(qa) == b"\x03\x00\x01SELECT 1"
    assert p.parse_com_query(b"\x03\x00\x01SELECT 1", qa) == p.ComQuery("SELECT 1")
    q = p.ComQuery("SELECT mysql_query_attribute_string('n')", (
        p.QueryAttribute("n", b"v1"),
        p.QueryAttribute("nul", None, p.ColumnType.NULL),
        p.QueryAttribute("i", (7).to_bytes(8, "little"), p.ColumnType.LONGLONG, unsigned=True),
        p.QueryAttribute("d", h("e8 07 01 02"), p.ColumnType.DATE),  # 2024-01-02; sent as 04 e8 07 01 02
    ))
    payload = q.build(qa)
    assert payload[:5] == h("03 04 01 02 01")  # 4 attributes, 1 set, NULL bitmap (bit 1), bind flag
    assert payload[5:9] == h("fd 00 01 6e")  # VAR_STRING, name "n"
    assert p.parse_com_query(payload, qa) == q
    with pytest.raises(ValueError):
        q.build(0)
    with pytest.raises(ValueError):
        p.ComQuery("x", (p.QueryAttribute("i", b"\1", p.ColumnType.LONG),)).build(qa)
    with pytest.raises(MySQLProtocolError):
        p.parse_com_query(b"\x03\x01\x01\x00\x00", qa)  # attribute without types
    with pytest.raises(MySQLProtocolError):
        p.parse_com_query(b"\x03\x00\x02SELECT 1", qa)


def test_com_query_refuses_invalid_utf8():
    with pytest.raises(MySQLProtocolError, match="UTF-8") as e:
        p.parse_com_query(b"\x03SELECT '\xe9'")
    assert e.value.code == p.ER.INVALID_CHARACTER_STRING and e.value.err_packet().code == 1300
    with pytest.raises(MySQLProtocolError):
        p.parse_com_query(b"\x16SELECT 1")  # COM_STMT_PREPARE is not a COM_QUERY


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)  # encodable as UTF-8


@settings(deadline=None)  # no per-example wall-clock deadline: a busy box is slow, not wrong
@given(_TEXT, st.lists(st.tuples(_TEXT, st.one_of(st.none(), st.binary(max_size=300))), max_size=9))
def test_com_query_round_trip(sql, attrs):
    q = p.ComQuery(sql, tuple(p.QueryAttribute(n, v) for n, v in attrs))
    assert p.parse_com_query(q.build(C.CLIENT_QUERY_ATTRIBUTES), C.CLIENT_QUERY_ATTRIBUTES) == q
    assert p.parse_com_query(p.ComQuery(sql).build()) == p.ComQuery(sql)


# ------------------------------------------------------------------ text result sets


DOC_COLUMN = ColumnDefinition("@@version_comment", p.ColumnType.VAR_STRING, 8, 28, 0, 0x1F)


def test_documented_result_set_is_built_byte_for_byte():
    assert p.text_result_set([DOC_COLUMN], [[b"MySQL Community Server (GPL)"]]) == DOC_RESULT_SET
    r = p.PacketReader()
    pkts = r.feed(DOC_RESULT_SET)
    assert [k[0] for k in pkts] == [1, 2, 3, 4, 5]
    assert p.parse_column_count(r.payload(pkts[0])) == (1, True)
    assert p.parse_column_definition(r.payload(pkts[1])) == DOC_COLUMN
    assert p.parse_text_row(r.payload(pkts[3]), 1) == [b"MySQL Community Server (GPL)"]


def test_column_definition_and_rows():
    col = ColumnDefinition("prïce", p.ColumnType.NEWDECIMAL, 63, 12, p.ColumnFlag.NOT_NULL | p.ColumnFlag.NUM, 2,
                           "shop", "i", "items", "price")
    assert p.parse_column_definition(col.build()) == col
    ext = C.MARIADB_CLIENT_EXTENDED_METADATA
    col2 = ColumnDefinition("j", p.ColumnType.BLOB, extended_metadata=b"\x00\x04json")
    assert p.parse_column_definition(col2.build(ext), ext) == col2
    assert p.parse_column_definition(col.build() + b"\x00default") == col  # COM_FIELD_LIST's extra
    with pytest.raises(MySQLProtocolError):
        p.parse_column_definition(col.build()[:-3])
    row = p.text_row([b"1", None, "é", b"", b"z" * 300])
    assert row[:8] == h("01 31 fb 02 c3 a9 00 fc")
    assert p.parse_text_row(row) == [b"1", None, "é".encode(), b"", b"z" * 300]
    assert p.parse_text_row(memoryview(row), 5)[4] == b"z" * 300
    with pytest.raises(MySQLProtocolError):
        p.parse_text_row(row, 4)
    with pytest.raises(MySQLProtocolError):
        p.parse_text_row(b"\x05abc")
    assert p.column_count(3) == b"\x03" and p.column_count(3, C.CLIENT_OPTIONAL_RESULTSET_METADATA) == b"\x03\x01"
    assert p.parse_column_count(b"\x02\x00", C.MARIADB_CLIENT_CACHE_METADATA) == (2, False)
    for bad in (b"\x00", b"\x02\x01"):
        with pytest.raises(MySQLProtocolError):
            p.parse_column_count(bad)


def read_all(caps: int, wire: bytes, step: int | None = None, **kw) -> tuple[p.ResultSetReader, bytes]:
    rs = p.ResultSetReader(caps, **kw)
    step = step or len(wire) or 1
    out = b""
    for i in range(0, len(wire), step):
        assert not rs.done
        out += bytes(rs.feed(wire[i:i + step]))
    return rs, out


@pytest.mark.parametrize("step", [None, 1, 7])
def test_result_set_reader_on_the_documented_result(step):
    rs, out = read_all(P41, DOC_RESULT_SET, step, keep=True)
    assert rs.done and out == DOC_RESULT_SET and rs.error is None
    assert rs.status == S.SERVER_STATUS_AUTOCOMMIT and not rs.in_transaction
    assert (rs.result_count, rs.row_count) == (1, 1)
    (res,) = rs.results
    assert res.columns == [DOC_COLUMN] and res.rows == [[b"MySQL Community Server (GPL)"]]


@pytest.mark.parametrize("caps, wire", [(EOF_CAPS, MARIADB_SELECT_EOF), (DEP_CAPS, MARIADB_SELECT_DEP)])
def test_result_set_reader_on_mariadb_results(caps, wire):
    for step in (None, 1, 5):
        rs, out = read_all(caps, wire, step, keep=True)
        assert rs.done and out == wire and rs.status == S.SERVER_STATUS_AUTOCOMMIT
        (res,) = rs.results
        assert [c.name for c in res.columns] == ["a", "b", "c"] and res.rows == [[b"1", None, b"x"]]
        assert res.columns[1].type == p.ColumnType.NULL
    if caps & C.CLIENT_DEPRECATE_EOF:
        assert rs.ok == p.OkPacket(status=S.SERVER_STATUS_AUTOCOMMIT, header=0xFE)
    # the same result built by us (MariaDB's decimals=39 etc. are carried in the definitions)
    assert p.text_result_set(res.columns, res.rows, capabilities=caps) == wire


@pytest.mark.parametrize("caps, wire", [(EOF_CAPS, MARIADB_MULTI_EOF), (DEP_CAPS, MARIADB_MULTI_DEP)])
def test_result_set_reader_multi_results(caps, wire):
    rs, out = read_all(caps, wire, keep=True)
    assert rs.done and out == wire and rs.result_count == 2 and rs.row_count == 2
    assert [r.rows for r in rs.results] == [[[b"1"]], [[b"2"]]]
    assert rs.results[0].status & S.SERVER_MORE_RESULTS_EXISTS
    assert rs.status == S.SERVER_STATUS_IN_TRANS | S.SERVER_STATUS_AUTOCOMMIT and rs.in_transaction
    # cut just before the last packet: not done yet
    rs, _ = read_all(caps, wire[:-11])
    assert not rs.done and rs.result_count == 1


def test_result_set_reader_err_mid_way_and_direct_replies():
    rs, out = read_all(DEP_CAPS, MARIADB_MULTI_ERR_DEP, status=S.SERVER_STATUS_AUTOCOMMIT)
    assert rs.done and out == MARIADB_MULTI_ERR_DEP and rs.result_count == 1 and rs.row_count == 1
    assert rs.error == p.ErrPacket(1046, "No database selected", "3D000")
    assert not rs.status & S.SERVER_MORE_RESULTS_EXISTS
    rs, _ = read_all(EOF_CAPS, MARIADB_ERR, status=S.SERVER_STATUS_IN_TRANS)
    assert rs.done and rs.error.code == 1046 and rs.in_transaction  # ERR keeps the last known status
    rs, _ = read_all(EOF_CAPS, MARIADB_BEGIN_OK, keep=True)
    assert rs.done and rs.in_transaction and rs.ok.status == 3 and rs.results[0].columns == []
    # ERR after the column definitions and in the middle of rows
    cols = [ColumnDefinition("a")]
    for caps in (EOF_CAPS, DEP_CAPS):
        r = p.PacketReader()
        pkts = r.feed(p.text_result_set(cols, [[b"1"], [b"2"]], capabilities=caps))
        first_row = 2 if caps & C.CLIENT_DEPRECATE_EOF else 3  # count, column, [EOF], row, ...
        for upto, rows in ((first_row - 1, 0), (first_row, 1)):  # ERR after the columns / after a row
            body = bytes(r.raw(pkts[0], pkts[upto]))
            err = p.frame(p.ErrPacket(1317, "Query execution was interrupted", "70100").build(), pkts[upto + 1][0])
            rs, out = read_all(caps, body + err)
            assert rs.done and rs.error.code == 1317 and rs.row_count == rows and out == body + err


def test_result_set_reader_refusals():
    with pytest.raises(MySQLProtocolError, match="LOAD DATA LOCAL") as e:
        read_all(EOF_CAPS, p.frame(b"\xfb/etc/passwd", 1))
    assert e.value.code == p.ER.NOT_SUPPORTED_YET
    with pytest.raises(MySQLProtocolError, match="out of order"):
        read_all(EOF_CAPS, p.frame(p.OkPacket().build(), 2))
    assert read_all(EOF_CAPS, p.frame(p.OkPacket().build(), 2), first_seq=None)[0].done
    with pytest.raises(MySQLProtocolError, match="EOF packet after the columns"):
        read_all(EOF_CAPS, p.frame_all([b"\x01", ColumnDefinition("a").build(), b"\x011"], 1)[0])
    with pytest.raises(MySQLProtocolError):
        read_all(EOF_CAPS, p.frame(b"", 1))
    with pytest.raises(MySQLProtocolError):
        read_all(EOF_CAPS, p.frame(b"\xfe\x00\x00\x02\x00", 1))


def test_result_set_reader_pipelined_replies_and_reset():
    wire = MARIADB_SELECT_DEP + MARIADB_OK_SYSVAR + b"\x07\x00"  # next reply and a partial third
    rs = p.ResultSetReader(DEP_CAPS)
    assert bytes(rs.feed(wire)) == MARIADB_SELECT_DEP and rs.done
    assert bytes(rs.feed(b"\x00")) == b""  # still done: kept for the next reply
    rs.reset()
    assert bytes(rs.feed(b"")) == MARIADB_OK_SYSVAR and rs.done and rs.in_transaction
    assert rs.rest() == b"\x07\x00\x00" and rs.reader.buffered == 0
    # status carries over to the next reply unless given
    rs.reset()
    assert rs.in_transaction
    rs.reset(status=0)
    assert not rs.in_transaction


def test_result_set_reader_big_row_starting_with_0xfe():
    """A value of 16 MiB+ makes the row start with 0xFE (8-byte length): it is a row, not the end."""
    value = b"v" * (1 << 24)
    cols = [ColumnDefinition("big", p.ColumnType.LONG_BLOB)]
    for caps in (EOF_CAPS, DEP_CAPS):
        wire = p.text_result_set(cols, [[value], [b"small"]], capabilities=caps)
        rs, out = read_all(caps, wire, 1 << 20, keep=True)
        assert rs.done and rs.row_count == 2 and len(out) == len(wire)
        assert rs.results[0].rows[0][0] == value and rs.results[0].rows[1] == [b"small"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([EOF_CAPS, DEP_CAPS]),
       st.lists(st.lists(st.one_of(st.none(), st.binary(max_size=300)), min_size=2, max_size=2), max_size=8),
       st.integers(0, 3), st.data())
def test_result_set_reader_any_split(caps, rows, extra_results, data):
    cols = [ColumnDefinition("a"), ColumnDefinition("b")]
    replies, seq = [], 1
    for i in range(extra_results + 1):
        last = i == extra_results
        status = S.SERVER_STATUS_AUTOCOMMIT | (0 if last else S.SERVER_MORE_RESULTS_EXISTS)
        if i % 2:
            payload = p.OkPacket(i, 0, status).build(caps)
            replies.append(p.frame(payload, seq))
            seq += 1
        else:
            wire = p.text_result_set(cols, rows, capabilities=caps, status=status, seq=seq)
            replies.append(wire)
            seq += len(p.PacketReader().feed(wire))
    wire = b"".join(replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    rs = p.ResultSetReader(caps, keep=True)
    out = b""
    for a, b in zip([0] + cuts, cuts + [len(wire)]):
        out += bytes(rs.feed(wire[a:b]))
    assert rs.done and out == wire and rs.result_count == extra_results + 1
    assert rs.row_count == len(rows) * (extra_results // 2 + 1)
    assert all(r.rows == [list(x) for x in rows] for r in rs.results[::2])
    assert rs.status == S.SERVER_STATUS_AUTOCOMMIT
