"""MySQL / MariaDB client-server protocol (text protocol), sans-I/O: framing, parsers, builders and
the reply state machine a pooler needs.

https://dev.mysql.com/doc/dev/mysql-server/latest/PAGE_PROTOCOL.html
https://mariadb.com/kb/en/clientserver-protocol/

Framing
-------
A packet is a 3-byte little-endian payload length, a 1-byte sequence id, then the payload. A
payload of 0xFFFFFF bytes or more travels as parts of exactly 0xFFFFFF bytes followed by a shorter
one (possibly empty), each part taking the next sequence id; together they are one *logical*
packet. The sequence id restarts at 0 with every command and the reply continues it (a COM_QUERY
is seq 0, its reply starts at 1); in the connection phase it runs through the whole exchange.

``PacketReader.feed(data) -> list[tuple[int, int, int]]``: one ``(seq, start, end)`` per complete
logical packet, offsets into ``reader.buf`` (the immutable ``bytes`` of the latest feed that
completed packets), the same design as `proxy.pg.protocol.MessageReader`::

    pkts = reader.feed(data)
    for pkt in pkts:
        payload = reader.payload(pkt)          # zero-copy memoryview (a join for a >16 MiB packet)
    if pkts:
        transport.write(reader.raw(pkts[0], pkts[-1]))   # wire bytes of the run, as received

``seq`` is the id of the packet's *last* part, so a reply to it is ``next_seq(seq)``.

Payloads
--------
Builders return payloads; ``frame(payload, seq)`` adds the headers (splitting), because the
sequence id depends on where in the conversation a packet goes, which only the caller knows.
Packets with fields are frozen dataclasses with a ``build(capabilities)`` method and a module
level ``parse_*(payload, capabilities)``; both take the *negotiated* capabilities, since they
decide the layout (PROTOCOL_41, SESSION_TRACK, DEPRECATE_EOF, ...). Parsers accept ``bytes`` or
``memoryview`` and raise `MySQLProtocolError` on malformed input; that error carries the
``code``/``sqlstate`` to report it with in an ERR packet. A parser error leaves the stream framed
(the packet was whole), so the caller may answer with ERR and go on; a `PacketReader` error
breaks the stream.

Capabilities are one int of up to 64 bits: MariaDB's extended capabilities (which MariaDB sends
in the reserved bytes of the greeting and the HandshakeResponse, when CLIENT_LONG_PASSWORD, a.k.a.
CLIENT_MYSQL, is clear) are bits 32..63, as in MariaDB's own connectors.

Text from the server (versions, column names, messages) is decoded as UTF-8 with
``surrogateescape`` so nothing fails and builders round-trip it; text from the client (user,
database, plugin, SQL) must be valid UTF-8. Compression (CLIENT_COMPRESS) is not supported.

The binary protocol (COM_STMT_*) is only named here (`Command`): the proxy refuses it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Iterable, Mapping, Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]
Packet = tuple[int, int, int]  # (seq of its last part, start offset of its first header, end) in reader.buf

MAX_PAYLOAD = 0xFFFFFF  # largest payload of one physical packet; this length means "more parts follow"
MAX_PACKET = 1 << 30  # default bound on a logical payload: MySQL's largest max_allowed_packet (1 GiB)
DEFAULT_MAX_PACKET_SIZE = 1 << 24  # what clients usually announce in HandshakeResponse41
_PART = MAX_PAYLOAD + 4  # wire size of one full part
SCRAMBLE_LENGTH = 20  # auth-plugin-data of mysql_native_password and caching_sha2_password

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EMPTY = memoryview(b"")


# ---------------------------------------------------------------------------------------------
# Constants


class ER(IntEnum):
    """Server error codes the proxy reports itself (SQLSTATE in `SQLSTATE`)."""

    CON_COUNT_ERROR = 1040  # "Too many connections"
    HANDSHAKE_ERROR = 1043  # "Bad handshake"
    DBACCESS_DENIED_ERROR = 1044
    ACCESS_DENIED_ERROR = 1045
    NO_DB_ERROR = 1046
    UNKNOWN_COM_ERROR = 1047
    BAD_DB_ERROR = 1049
    NO_TABLES_USED = 1096
    UNKNOWN_ERROR = 1105
    NET_PACKET_TOO_LARGE = 1153
    NET_PACKETS_OUT_OF_ORDER = 1156
    NET_READ_ERROR = 1158
    NOT_SUPPORTED_YET = 1235
    NOT_SUPPORTED_AUTH_MODE = 1251
    INVALID_CHARACTER_STRING = 1300
    QUERY_INTERRUPTED = 1317
    PLUGIN_IS_NOT_LOADED = 1524
    MALFORMED_PACKET = 1835
    QUERY_TIMEOUT = 3024


SQLSTATE: dict[int, str] = {
    ER.CON_COUNT_ERROR: "08004", ER.HANDSHAKE_ERROR: "08S01", ER.DBACCESS_DENIED_ERROR: "42000",
    ER.ACCESS_DENIED_ERROR: "28000", ER.NO_DB_ERROR: "3D000", ER.UNKNOWN_COM_ERROR: "08S01",
    ER.BAD_DB_ERROR: "42000", ER.NET_PACKET_TOO_LARGE: "08S01", ER.NET_PACKETS_OUT_OF_ORDER: "08S01",
    ER.NET_READ_ERROR: "08S01", ER.NOT_SUPPORTED_YET: "42000", ER.NOT_SUPPORTED_AUTH_MODE: "08004",
    ER.QUERY_INTERRUPTED: "70100",
}  # codes not listed use "HY000"


class MySQLProtocolError(Exception):
    """Malformed or unsupported protocol input. The message is fit to show to the peer; ``code``
    and ``sqlstate`` are what to send it in an ERR packet (see `err_packet`)."""

    def __init__(self, message: str, code: int = ER.MALFORMED_PACKET, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.sqlstate = sqlstate or SQLSTATE.get(self.code, "HY000")

    def err_packet(self) -> ErrPacket:
        return ErrPacket(self.code, str(self), self.sqlstate)


class Capability(IntFlag):
    """Capability flags (MySQL include/mysql_com.h; MariaDB's extended ones above bit 31)."""

    CLIENT_LONG_PASSWORD = 1 << 0  # MariaDB: CLIENT_MYSQL; clear = MariaDB extended capabilities sent
    CLIENT_FOUND_ROWS = 1 << 1
    CLIENT_LONG_FLAG = 1 << 2
    CLIENT_CONNECT_WITH_DB = 1 << 3
    CLIENT_NO_SCHEMA = 1 << 4
    CLIENT_COMPRESS = 1 << 5
    CLIENT_ODBC = 1 << 6
    CLIENT_LOCAL_FILES = 1 << 7
    CLIENT_IGNORE_SPACE = 1 << 8
    CLIENT_PROTOCOL_41 = 1 << 9
    CLIENT_INTERACTIVE = 1 << 10
    CLIENT_SSL = 1 << 11
    CLIENT_IGNORE_SIGPIPE = 1 << 12
    CLIENT_TRANSACTIONS = 1 << 13
    CLIENT_RESERVED = 1 << 14
    CLIENT_SECURE_CONNECTION = 1 << 15  # a.k.a. CLIENT_RESERVED2: 4.1 auth (length-prefixed response)
    CLIENT_MULTI_STATEMENTS = 1 << 16
    CLIENT_MULTI_RESULTS = 1 << 17
    CLIENT_PS_MULTI_RESULTS = 1 << 18
    CLIENT_PLUGIN_AUTH = 1 << 19
    CLIENT_CONNECT_ATTRS = 1 << 20
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
    CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    CLIENT_SESSION_TRACK = 1 << 23
    CLIENT_DEPRECATE_EOF = 1 << 24
    CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
    CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26
    CLIENT_QUERY_ATTRIBUTES = 1 << 27
    MULTI_FACTOR_AUTHENTICATION = 1 << 28
    CLIENT_CAPABILITY_EXTENSION = 1 << 29  # MariaDB: CLIENT_PROGRESS_OBSOLETE
    CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
    CLIENT_REMEMBER_OPTIONS = 1 << 31
    MARIADB_CLIENT_PROGRESS = 1 << 32
    MARIADB_CLIENT_COM_MULTI = 1 << 33  # reserved since MariaDB 10.6
    MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 34
    MARIADB_CLIENT_EXTENDED_METADATA = 1 << 35
    MARIADB_CLIENT_CACHE_METADATA = 1 << 36
    MARIADB_CLIENT_BULK_UNIT_RESULTS = 1 << 37


class _Ints:
    """A flag class's members as plain ints: IntFlag arithmetic (enum.__and__, enum.__call__)
    runs in Python and was a third of the proxy's per-query protocol cost."""

    def __init__(self, flags: type[IntFlag]) -> None:
        self.__dict__.update({name: int(m) for name, m in flags.__members__.items()})


_C: Any = _Ints(Capability)
CLIENT_MYSQL = _C.CLIENT_LONG_PASSWORD  # MariaDB's name for bit 0
_P41 = int(_C.CLIENT_PROTOCOL_41)
_METADATA_FLAG = _C.CLIENT_OPTIONAL_RESULTSET_METADATA | _C.MARIADB_CLIENT_CACHE_METADATA


class ServerStatus(IntFlag):
    """Status flags of OK and EOF packets (and the greeting)."""

    SERVER_STATUS_IN_TRANS = 1  # a transaction is open: a pooler keeps the server connection
    SERVER_STATUS_AUTOCOMMIT = 2
    SERVER_MORE_RESULTS_EXISTS = 8  # another result of the same command follows
    SERVER_QUERY_NO_GOOD_INDEX_USED = 16
    SERVER_QUERY_NO_INDEX_USED = 32
    SERVER_STATUS_CURSOR_EXISTS = 64
    SERVER_STATUS_LAST_ROW_SENT = 128
    SERVER_STATUS_DB_DROPPED = 256
    SERVER_STATUS_NO_BACKSLASH_ESCAPES = 512
    SERVER_STATUS_METADATA_CHANGED = 1024
    SERVER_QUERY_WAS_SLOW = 2048
    SERVER_PS_OUT_PARAMS = 4096
    SERVER_STATUS_IN_TRANS_READONLY = 8192
    SERVER_SESSION_STATE_CHANGED = 1 << 14  # the OK packet carries session-state information
    SERVER_STATUS_ANSI_QUOTES = 1 << 15  # MariaDB


_S: Any = _Ints(ServerStatus)
_MORE = int(_S.SERVER_MORE_RESULTS_EXISTS)


class Command(IntEnum):
    """First payload byte of a client command."""

    COM_SLEEP = 0
    COM_QUIT = 1
    COM_INIT_DB = 2
    COM_QUERY = 3
    COM_FIELD_LIST = 4
    COM_CREATE_DB = 5
    COM_DROP_DB = 6
    COM_REFRESH = 7
    COM_SHUTDOWN = 8
    COM_STATISTICS = 9
    COM_PROCESS_INFO = 10
    COM_CONNECT = 11
    COM_PROCESS_KILL = 12
    COM_DEBUG = 13
    COM_PING = 14
    COM_TIME = 15
    COM_DELAYED_INSERT = 16
    COM_CHANGE_USER = 17
    COM_BINLOG_DUMP = 18
    COM_TABLE_DUMP = 19
    COM_CONNECT_OUT = 20
    COM_REGISTER_SLAVE = 21
    COM_STMT_PREPARE = 22
    COM_STMT_EXECUTE = 23
    COM_STMT_SEND_LONG_DATA = 24
    COM_STMT_CLOSE = 25
    COM_STMT_RESET = 26
    COM_SET_OPTION = 27
    COM_STMT_FETCH = 28
    COM_DAEMON = 29
    COM_BINLOG_DUMP_GTID = 30
    COM_RESET_CONNECTION = 31
    COM_CLONE = 32
    COM_SUBSCRIBE_GROUP_REPLICATION_STREAM = 33
    COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB


def command_name(code: int) -> str:
    """'COM_STMT_PREPARE', or '0x63' for an unknown byte: for logs and refusal messages."""
    try:
        return Command(code).name
    except ValueError:
        return f"0x{code:02x}"


class ColumnType(IntEnum):
    """enum_field_types: the type byte of a column definition / binary value."""

    DECIMAL = 0
    TINY = 1
    SHORT = 2
    LONG = 3
    FLOAT = 4
    DOUBLE = 5
    NULL = 6
    TIMESTAMP = 7
    LONGLONG = 8
    INT24 = 9
    DATE = 10
    TIME = 11
    DATETIME = 12
    YEAR = 13
    NEWDATE = 14
    VARCHAR = 15
    BIT = 16
    TIMESTAMP2 = 17
    DATETIME2 = 18
    TIME2 = 19
    TYPED_ARRAY = 20
    VECTOR = 242
    INVALID = 243
    BOOL = 244
    JSON = 245
    NEWDECIMAL = 246
    ENUM = 247
    SET = 248
    TINY_BLOB = 249
    MEDIUM_BLOB = 250
    LONG_BLOB = 251
    BLOB = 252
    VAR_STRING = 253
    STRING = 254
    GEOMETRY = 255


class ColumnFlag(IntFlag):
    NOT_NULL = 1
    PRI_KEY = 2
    UNIQUE_KEY = 4
    MULTIPLE_KEY = 8
    BLOB = 16
    UNSIGNED = 32
    ZEROFILL = 64
    BINARY = 128
    ENUM = 256
    AUTO_INCREMENT = 512
    TIMESTAMP = 1024
    SET = 2048
    NO_DEFAULT_VALUE = 4096
    ON_UPDATE_NOW = 8192
    NUM = 32768


class Charset:
    """Collation ids (the 1-byte charset of handshakes, 2 bytes in column definitions)."""

    LATIN1_SWEDISH_CI = 8
    UTF8MB3_GENERAL_CI = 33
    UTF8MB4_GENERAL_CI = 45
    BINARY = 63
    UTF8MB4_UNICODE_CI = 224
    UTF8MB4_0900_AI_CI = 255


class SessionTrack(IntEnum):
    """Entry types of the session-state information in an OK packet."""

    SYSTEM_VARIABLES = 0
    SCHEMA = 1
    STATE_CHANGE = 2
    GTIDS = 3
    TRANSACTION_CHARACTERISTICS = 4
    TRANSACTION_STATE = 5


# ---------------------------------------------------------------------------------------------
# Framing


def next_seq(seq: int, parts: int = 1) -> int:
    """The sequence id after ``parts`` packets sent from ``seq`` (it wraps at 256)."""
    return (seq + parts) & 0xFF


def packet_parts(payload_length: int) -> int:
    """How many physical packets a payload of this length takes (0xFFFFFF needs an empty tail)."""
    return payload_length // MAX_PAYLOAD + 1


def frame(payload: Buffer, seq: int = 0) -> bytes:
    """Wire bytes of one logical packet: header(s) + payload, split at 0xFFFFFF bytes; the parts
    take ``seq``, ``seq + 1``, ... (see `packet_parts`)."""
    n = len(payload)
    if n < MAX_PAYLOAD:
        return _U32.pack(n | (seq & 0xFF) << 24) + payload
    out = []
    for pos in range(0, n + 1, MAX_PAYLOAD):  # n + 1: a multiple of 0xFFFFFF ends with an empty part
        chunk = payload[pos:pos + MAX_PAYLOAD]
        out.append(_U32.pack(len(chunk) | (seq & 0xFF) << 24))
        out.append(chunk)
        seq += 1
    return b"".join(out)


def frame_all(payloads: Iterable[Buffer], seq: int = 0) -> tuple[bytes, int]:
    """Several consecutive packets from ``seq``: (wire bytes, the next sequence id)."""
    out = []
    for p in payloads:
        out.append(frame(p, seq))
        seq = (seq + len(p) // MAX_PAYLOAD + 1) & 0xFF
    return b"".join(out), seq


class PacketReader:
    """Frames a stream of packets into logical packets; see the module doc.

    ``max_packet`` bounds a logical payload (MySQL's max_allowed_packet); a longer one is refused
    as soon as its header says so. With ``expected_seq`` set, every part must carry that id (it
    then advances), else `MySQLProtocolError` (ER_NET_PACKETS_OUT_OF_ORDER); a listener sets it to
    0 before each command. An incomplete packet is kept as a list of chunks joined once when
    enough has arrived, so a big packet costs O(size), not O(size²). After an error the stream is
    unusable and every later feed raises it again.
    """

    __slots__ = ("max_packet", "expected_seq", "buf", "_view", "_parts", "_have", "_need", "_error")

    def __init__(self, max_packet: int = MAX_PACKET, *, expected_seq: int | None = None) -> None:
        self.max_packet = max_packet
        self.expected_seq = expected_seq
        self.buf: bytes = b""
        self._view: memoryview | None = None
        self._parts: list[bytes] = []  # pending bytes of an incomplete packet
        self._have = 0  # their total length
        self._need = 4  # bytes needed (from the pending packet's start) before scanning again
        self._error: MySQLProtocolError | None = None

    def feed(self, data: Buffer) -> list[Packet]:
        """Complete logical packets as ``(seq, start, end)`` offsets into ``self.buf``."""
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)  # buf must be immutable: views of it outlive this call
        parts = self._parts
        if parts:
            parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(parts)
            parts.clear()
        n = len(data)
        pos = 0
        need = 4
        out: list[Packet] = []
        append = out.append
        unpack = _U32.unpack_from
        limit = self.max_packet
        expect = self.expected_seq
        while n - pos >= 4:
            (h,) = unpack(data, pos)
            length = h & 0xFFFFFF
            if length < MAX_PAYLOAD:  # the common case: a single part
                if length > limit:
                    self._fail(MySQLProtocolError(
                        f"packet too large: {length} bytes, the limit is {limit}", ER.NET_PACKET_TOO_LARGE))
                end = pos + 4 + length
                if end > n:
                    need = end - pos
                    break
                seq = h >> 24
                if expect is not None:
                    if seq != expect:
                        self._fail(_out_of_order(expect, seq))
                    expect = (seq + 1) & 0xFF
            else:
                end, seq, more = self._split(data, pos, expect)
                if not end:
                    need = more
                    break
                if expect is not None:
                    expect = (seq + 1) & 0xFF
            append((seq, pos, end))
            pos = end
        self._need = need
        self.expected_seq = expect
        if pos < n:
            parts.append(data[pos:] if pos else data)
            self._have = n - pos
        if out:
            self.buf = data
            self._view = None
        return out

    def _split(self, data: bytes, pos: int, expect: int | None) -> tuple[int, int, int]:
        """A packet of 0xFFFFFF+ bytes: (end, seq of its last part, 0), or (0, 0, bytes needed
        from ``pos`` before it is worth looking again) while incomplete."""
        n = len(data)
        q = pos
        total = 0
        unpack = _U32.unpack_from
        while True:
            if n - q < 4:
                return 0, 0, q - pos + 4
            (h,) = unpack(data, q)
            length = h & 0xFFFFFF
            total += length
            if total > self.max_packet:
                self._fail(MySQLProtocolError(
                    f"packet too large: more than {self.max_packet} bytes", ER.NET_PACKET_TOO_LARGE))
            seq = h >> 24
            if expect is not None:
                if seq != expect:
                    self._fail(_out_of_order(expect, seq))
                expect = (seq + 1) & 0xFF
            q += 4 + length
            if length < MAX_PAYLOAD:
                return (q, seq, 0) if q <= n else (0, 0, q - pos)
            if q > n:
                return 0, 0, q - pos + 4  # the whole part and the next header

    def _fail(self, error: MySQLProtocolError) -> None:
        self._error = error
        raise error

    def read(self, data: Buffer) -> list[tuple[int, bytes]]:
        """Convenience over `feed`: complete packets as ``(seq, payload bytes)``."""
        return [(p[0], bytes(self.payload(p))) for p in self.feed(data)]

    @property
    def view(self) -> memoryview:
        """A memoryview of ``buf`` (made once per batch)."""
        v = self._view
        if v is None:
            v = self._view = memoryview(self.buf)
        return v

    def payload(self, pkt: Packet) -> memoryview | bytes:
        """The logical payload of a packet of the latest batch: a zero-copy memoryview, or for a
        split packet the joined parts (bytes)."""
        s, e = pkt[1], pkt[2]
        v = self.view
        if e - s < _PART:
            return v[s + 4:e]
        return b"".join(v[i + 4:min(i + _PART, e)] for i in range(s, e, _PART))

    @staticmethod
    def parts(pkt: Packet) -> int:
        """Number of physical packets (sequence ids) the logical packet took."""
        return (pkt[2] - pkt[1]) // _PART + 1

    @staticmethod
    def payload_length(pkt: Packet) -> int:
        return pkt[2] - pkt[1] - 4 * ((pkt[2] - pkt[1]) // _PART + 1)

    def raw(self, first: Packet, last: Packet | None = None) -> memoryview:
        """Wire bytes of ``first`` through ``last`` (inclusive, same batch), exactly as received."""
        return self.view[first[1]:(last or first)[2]]

    @property
    def buffered(self) -> int:
        """Bytes held of a packet not yet complete."""
        return self._have if self._parts else 0

    def rest(self) -> bytes:
        """The bytes of an incomplete packet, handed back (e.g. a TLS ClientHello that followed an
        SSLRequest); the reader keeps none."""
        rest = b"".join(self._parts)
        self._parts.clear()
        self._have = 0
        self._need = 4
        return rest

    def unread(self, data: Buffer) -> None:
        """Put whole packets back in front of the pending bytes; the next feed (``feed(b"")`` is
        fine) frames them again (their sequence ids are checked again too)."""
        if data:
            self._parts.insert(0, bytes(data))
            self._have = (self._have if len(self._parts) > 1 else 0) + len(data)
            self._need = 0

    def release(self) -> None:
        """Drop the reference to the latest batch (e.g. a huge one, once it is handled)."""
        self.buf = b""
        self._view = None


def _out_of_order(expected: int, got: int) -> MySQLProtocolError:
    return MySQLProtocolError(f"packets out of order: expected sequence id {expected}, got {got}",
                              ER.NET_PACKETS_OUT_OF_ORDER)


# ---------------------------------------------------------------------------------------------
# Length-encoded integers and strings, NUL-terminated strings

NULL_VALUE = 0xFB  # a NULL column in a text row (where a length-encoded string would start)
_SMALL = [bytes((i,)) for i in range(256)]


def lenenc_int(n: int) -> bytes:
    """Length-encoded integer: 1 byte below 251, else 0xFC + 2, 0xFD + 3 or 0xFE + 8 bytes."""
    if 0 <= n < 0xFB:
        return _SMALL[n]
    if 0 <= n < 1 << 16:
        return b"\xfc" + _U16.pack(n)
    if 0 <= n < 1 << 24:
        return b"\xfd" + _U32.pack(n)[:3]
    if 0 <= n < 1 << 64:
        return b"\xfe" + _U64.pack(n)
    raise ValueError(f"length-encoded integer out of range: {n}")


def lenenc_str(s: Buffer) -> bytes:
    return lenenc_int(len(s)) + s


def nul_str(s: Buffer) -> bytes:
    """A NUL-terminated string; a NUL inside would silently truncate it on the wire, so refuse it."""
    if b"\0" in s:
        raise ValueError(f"NUL byte in protocol string {bytes(s[:40])!r}")
    return bytes(s) + b"\0"


def read_lenenc_int(b: Buffer, pos: int = 0) -> tuple[int | None, int]:
    """(value, next position); value is None for 0xFB (NULL in a text row). 0xFF (an ERR packet's
    marker) and truncation are `MySQLProtocolError`."""
    try:
        c = b[pos]
        if c < 0xFB:
            return c, pos + 1
        if c == 0xFB:
            return None, pos + 1
        width = _LENENC_WIDTH.get(c)
        end = pos + 1 + width if width else -1
        if end < 0 or end > len(b):
            raise IndexError
        return int.from_bytes(b[pos + 1:end], "little"), end
    except (IndexError, TypeError):
        raise MySQLProtocolError("malformed length-encoded integer") from None


_LENENC_WIDTH = {0xFC: 2, 0xFD: 3, 0xFE: 8}


def read_lenenc_str(b: Buffer, pos: int = 0) -> tuple[bytes | None, int]:
    """(bytes or None for NULL, next position)."""
    n, pos = read_lenenc_int(b, pos)
    if n is None:
        return None, pos
    end = pos + n
    if end > len(b):
        raise MySQLProtocolError("malformed length-encoded string")
    return bytes(b[pos:end]), end


def read_nul_str(b: bytes, pos: int = 0) -> tuple[bytes, int]:
    """(bytes before the NUL, position after it)."""
    i = b.find(0, pos)
    if i < 0:
        raise MySQLProtocolError("malformed NUL-terminated string")
    return b[pos:i], i + 1


class _Cursor:
    """Sequential reads over one payload; every failure is "malformed <what> packet"."""

    __slots__ = ("b", "pos", "what")

    def __init__(self, payload: Buffer, what: str, pos: int = 0) -> None:
        self.b = payload if type(payload) is bytes else bytes(payload)
        self.pos = pos
        self.what = what

    def bad(self, why: str = "") -> MySQLProtocolError:
        return MySQLProtocolError(f"malformed {self.what} packet" + (f": {why}" if why else ""))

    @property
    def remaining(self) -> int:
        return len(self.b) - self.pos

    def fixed(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.b):
            raise self.bad("truncated")
        v = self.b[self.pos:end]
        self.pos = end
        return v

    def u8(self) -> int:
        if self.pos >= len(self.b):
            raise self.bad("truncated")
        self.pos += 1
        return self.b[self.pos - 1]

    def u16(self) -> int:
        return _U16.unpack(self.fixed(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.fixed(4))[0]

    def lenenc_int(self) -> int:
        try:
            v, self.pos = read_lenenc_int(self.b, self.pos)
        except MySQLProtocolError:
            raise self.bad("truncated length-encoded integer") from None
        if v is None:
            raise self.bad("unexpected NULL")
        return v

    def lenenc_str(self) -> bytes:
        return self.fixed(self.lenenc_int())

    def nul_str(self, *, optional_nul: bool = False) -> bytes:
        """Up to the next NUL; with ``optional_nul`` a missing NUL ends the string at the packet's
        end (old servers and clients omit the last one)."""
        i = self.b.find(0, self.pos)
        if i < 0:
            if not optional_nul:
                raise self.bad("unterminated string")
            i = len(self.b)
        v = self.b[self.pos:i]
        self.pos = i + 1
        return v

    def rest(self) -> bytes:
        v = self.b[self.pos:]
        self.pos = len(self.b)
        return v

    def utf8(self, b: bytes, name: str, code: int = ER.MALFORMED_PACKET) -> str:
        try:
            return b.decode()
        except UnicodeDecodeError:
            raise MySQLProtocolError(f"invalid UTF-8 in the {name} of a {self.what} packet", code) from None


def _text(b: bytes) -> str:
    """Server text: never fails, and `_enc` gives back the same bytes."""
    return b.decode("utf-8", "surrogateescape")


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _sqlstate(s: str) -> bytes:
    b = s.encode("ascii", "replace")
    if len(b) != 5:
        raise ValueError(f"SQLSTATE must be 5 characters, not {s!r}")
    return b


# ---------------------------------------------------------------------------------------------
# Generic replies: OK, ERR, EOF


@dataclass(frozen=True, slots=True)
class OkPacket:
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = _S.SERVER_STATUS_AUTOCOMMIT
    warnings: int = 0
    info: str = ""  # human-readable, e.g. "Rows matched: 1  Changed: 1  Warnings: 0"
    session_state: bytes = b""  # raw session-state changes (see parse_session_state)
    header: int = 0x00  # 0xFE for the OK that ends a result set under CLIENT_DEPRECATE_EOF

    def build(self, capabilities: int = _P41) -> bytes:
        parts = [_SMALL[self.header], lenenc_int(self.affected_rows), lenenc_int(self.last_insert_id)]
        if capabilities & _P41:
            parts.append(_U16.pack(self.status) + _U16.pack(self.warnings))
        elif capabilities & _C.CLIENT_TRANSACTIONS:
            parts.append(_U16.pack(self.status))
        info = _enc(self.info)
        if capabilities & _C.CLIENT_SESSION_TRACK:
            changed = self.status & _S.SERVER_SESSION_STATE_CHANGED
            if info or changed:  # as the server writes it (net_send_ok)
                parts.append(lenenc_str(info))
            if changed:
                parts.append(lenenc_str(self.session_state))
        else:
            parts.append(info)
        return b"".join(parts)

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & _S.SERVER_STATUS_IN_TRANS)


def parse_ok(payload: Buffer, capabilities: int = _P41) -> OkPacket:
    """OK packet (0x00, or 0xFE ending a result set under CLIENT_DEPRECATE_EOF)."""
    r = _Cursor(payload, "OK")
    header = r.u8()
    if header != 0x00 and header != 0xFE:
        raise r.bad(f"header 0x{header:02x}")
    affected = r.lenenc_int()
    last_id = r.lenenc_int()
    status = warnings = 0
    if capabilities & _P41:
        status, warnings = r.u16(), r.u16()
    elif capabilities & _C.CLIENT_TRANSACTIONS:
        status = r.u16()
    state = b""
    if capabilities & _C.CLIENT_SESSION_TRACK:
        info = r.lenenc_str() if r.remaining else b""
        if status & _S.SERVER_SESSION_STATE_CHANGED and r.remaining:
            state = r.lenenc_str()
    else:
        info = r.rest()
    return OkPacket(affected, last_id, status, warnings, _text(info), state, header)


def parse_session_state(data: Buffer) -> list[tuple[int, bytes]]:
    """Session-state information of an OK packet → [(SessionTrack type, entry data), ...]. The
    data of SYSTEM_VARIABLES is lenenc name + lenenc value, of SCHEMA a lenenc name."""
    r = _Cursor(data, "session state")
    out = []
    while r.remaining:
        out.append((r.u8(), r.lenenc_str()))
    return out


@dataclass(frozen=True, slots=True)
class ErrPacket:
    code: int
    message: str
    sqlstate: str = "HY000"

    @classmethod
    def for_code(cls, code: int, message: str) -> ErrPacket:
        """With the SQLSTATE MySQL uses for that code (`SQLSTATE`, else HY000)."""
        return cls(int(code), message, SQLSTATE.get(code, "HY000"))

    def build(self, capabilities: int = _P41) -> bytes:
        head = b"\xff" + _U16.pack(self.code)
        if capabilities & _P41:
            head += b"#" + _sqlstate(self.sqlstate)
        return head + _enc(self.message)


def parse_err(payload: Buffer) -> ErrPacket:
    """ERR packet. The '#'+SQLSTATE part is read when present (a server that refuses a connection
    before the handshake omits it); without it the SQLSTATE is HY000."""
    r = _Cursor(payload, "ERR")
    if r.u8() != 0xFF:
        raise r.bad("not an ERR packet")
    code = r.u16()
    sqlstate = "HY000"
    if r.remaining >= 6 and r.b[r.pos] == 0x23:  # '#'
        sqlstate = r.b[r.pos + 1:r.pos + 6].decode("ascii", "replace")
        r.pos += 6
    return ErrPacket(code, _text(r.rest()), sqlstate)


@dataclass(frozen=True, slots=True)
class EofPacket:
    warnings: int = 0
    status: int = _S.SERVER_STATUS_AUTOCOMMIT

    def build(self, capabilities: int = _P41) -> bytes:
        if capabilities & _P41:
            return b"\xfe" + _U16.pack(self.warnings) + _U16.pack(self.status)
        return b"\xfe"


def parse_eof(payload: Buffer, capabilities: int = _P41) -> EofPacket:
    r = _Cursor(payload, "EOF")
    if r.u8() != 0xFE or len(r.b) >= 9:
        raise r.bad()
    if capabilities & _P41 and r.remaining >= 4:
        return EofPacket(r.u16(), r.u16())
    return EofPacket(0, 0)


class Reply(IntEnum):
    """What the first packet of a reply is (see `classify_reply`)."""

    OK = 0
    ERR = 1
    EOF = 2  # 0xFE outside authentication (not a valid first packet of a command reply)
    LOCAL_INFILE = 3  # 0xFB: the server asks the client for a file (LOAD DATA LOCAL)
    RESULT_SET = 4  # a column count: a text result set follows
    AUTH_SWITCH = 5  # 0xFE during authentication
    AUTH_MORE_DATA = 6  # 0x01 during authentication


def classify_reply(payload: Buffer, *, auth: bool = False) -> Reply:
    """Classify the *first* packet of a server reply by its first byte; ``auth`` for the
    connection phase (after the HandshakeResponse or an AuthSwitchResponse). Inside a result set
    the bytes mean other things (a row may start with 0xFB or 0x00): use `ResultSetReader`."""
    if not len(payload):
        raise MySQLProtocolError("empty packet from the server")
    b0 = payload[0]
    if b0 == 0x00:
        return Reply.OK
    if b0 == 0xFF:
        return Reply.ERR
    if auth:
        if b0 == 0xFE:
            return Reply.AUTH_SWITCH
        if b0 == 0x01:
            return Reply.AUTH_MORE_DATA
        raise MySQLProtocolError(f"unexpected packet 0x{b0:02x} during authentication")
    if b0 == 0xFE:
        return Reply.EOF
    if b0 == 0xFB:
        return Reply.LOCAL_INFILE
    return Reply.RESULT_SET


# ---------------------------------------------------------------------------------------------
# Connection phase


@dataclass(frozen=True, slots=True)
class HandshakeV10:
    """The server greeting."""

    server_version: str
    connection_id: int
    auth_data: bytes  # the scramble (parts 1 and 2, without the NUL): 20 bytes in practice
    capabilities: int  # up to 64 bits: MariaDB's extended capabilities from the reserved bytes
    charset: int = Charset.UTF8MB4_GENERAL_CI
    status: int = _S.SERVER_STATUS_AUTOCOMMIT
    auth_plugin: str = "mysql_native_password"  # "" without CLIENT_PLUGIN_AUTH

    @property
    def is_mariadb(self) -> bool:
        return "MariaDB" in self.server_version or not self.capabilities & CLIENT_MYSQL

    def build(self) -> bytes:
        caps = self.capabilities
        low, ext = caps & 0xFFFFFFFF, caps >> 32
        if ext and low & CLIENT_MYSQL:
            raise ValueError("MariaDB extended capabilities need CLIENT_LONG_PASSWORD (CLIENT_MYSQL) clear")
        data = self.auth_data
        if len(data) < 8:
            raise ValueError("auth data must be at least 8 bytes")
        parts = [b"\x0a", nul_str(_enc(self.server_version)), _U32.pack(self.connection_id), data[:8], b"\0",
                 _U16.pack(low & 0xFFFF), _SMALL[self.charset], _U16.pack(self.status), _U16.pack(low >> 16),
                 _SMALL[len(data) + 1] if caps & _C.CLIENT_PLUGIN_AUTH else b"\0",
                 b"\0" * 6 + _U32.pack(ext)]  # MariaDB: 6 filler bytes + extended capabilities
        if caps & _C.CLIENT_SECURE_CONNECTION:
            parts.append((data[8:] + b"\0").ljust(13, b"\0"))  # $len = MAX(13, len(auth data) - 8)
        if caps & _C.CLIENT_PLUGIN_AUTH:
            parts.append(nul_str(_enc(self.auth_plugin)))
        return b"".join(parts)


def parse_handshake_v10(payload: Buffer) -> HandshakeV10:
    """The server greeting. A server that refuses the connection (too many connections, host
    blocked) sends an ERR instead: that is raised as `MySQLProtocolError` with its code/message."""
    r = _Cursor(payload, "HandshakeV10")
    version = r.u8()
    if version == 0xFF:
        err = parse_err(payload)
        raise MySQLProtocolError(err.message, err.code, err.sqlstate)
    if version != 10:
        raise MySQLProtocolError(f"unsupported server protocol version {version} (10 is required)",
                                 ER.HANDSHAKE_ERROR)
    server_version = _text(r.nul_str())
    conn_id = r.u32()
    data = r.fixed(8)
    r.u8()  # filler
    caps = r.u16()
    charset = status = 0
    plugin = b""
    if r.remaining:  # servers before 4.1 end here
        charset, status = r.u8(), r.u16()
        caps |= r.u16() << 16
        data_len = r.u8()
        reserved = r.fixed(10)
        if not caps & CLIENT_MYSQL:
            caps |= _U32.unpack_from(reserved, 6)[0] << 32
        if caps & _C.CLIENT_SECURE_CONNECTION:
            data += r.fixed(max(13, data_len - 8))
            # auth_plugin_data_len counts the trailing NUL; without it, the NUL is part 2's last byte
            data = data[:data_len - 1] if data_len > 8 else data[:-1] if data.endswith(b"\0") else data
        if caps & _C.CLIENT_PLUGIN_AUTH:
            plugin = r.nul_str(optional_nul=True)  # MySQL 5.5.7- omitted the NUL
    return HandshakeV10(server_version, conn_id, data, caps, charset, status, _text(plugin))


@dataclass(frozen=True, slots=True)
class SslRequest:
    """The 32-byte start of a HandshakeResponse41 a client sends before its TLS handshake."""

    capabilities: int
    max_packet: int = DEFAULT_MAX_PACKET_SIZE
    charset: int = Charset.UTF8MB4_GENERAL_CI

    def build(self) -> bytes:
        return _client_header(self.capabilities, self.max_packet, self.charset)


def _client_header(caps: int, max_packet: int, charset: int) -> bytes:
    low, ext = caps & 0xFFFFFFFF, caps >> 32
    if ext and low & CLIENT_MYSQL:
        raise ValueError("MariaDB extended capabilities need CLIENT_LONG_PASSWORD (CLIENT_MYSQL) clear")
    # 23 filler bytes; MariaDB puts its extended capabilities in the last 4
    return _U32.pack(low) + _U32.pack(max_packet) + _SMALL[charset] + b"\0" * 19 + _U32.pack(ext)


@dataclass(frozen=True, slots=True)
class HandshakeResponse41:
    """The client's login. ``capabilities`` are what the client asks for; the session uses them
    ANDed with what the server offered."""

    capabilities: int
    user: str
    auth_response: bytes = b""
    database: str | None = None  # sent when CLIENT_CONNECT_WITH_DB
    auth_plugin: str | None = None  # sent when CLIENT_PLUGIN_AUTH
    attributes: Mapping[str, str] = field(default_factory=dict)  # sent when CLIENT_CONNECT_ATTRS
    max_packet: int = DEFAULT_MAX_PACKET_SIZE
    charset: int = Charset.UTF8MB4_GENERAL_CI
    zstd_level: int | None = None  # sent when CLIENT_ZSTD_COMPRESSION_ALGORITHM

    def build(self) -> bytes:
        caps = self.capabilities
        parts = [_client_header(caps, self.max_packet, self.charset), nul_str(self.user.encode())]
        auth = self.auth_response
        if caps & _C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            parts.append(lenenc_str(auth))
        elif caps & _C.CLIENT_SECURE_CONNECTION:
            if len(auth) > 255:
                raise ValueError("auth response longer than 255 bytes needs CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
            parts.append(_SMALL[len(auth)] + auth)
        else:
            parts.append(nul_str(auth))
        if caps & _C.CLIENT_CONNECT_WITH_DB:
            parts.append(nul_str((self.database or "").encode()))
        if caps & _C.CLIENT_PLUGIN_AUTH:
            parts.append(nul_str((self.auth_plugin or "").encode()))
        if caps & _C.CLIENT_CONNECT_ATTRS:
            kv = b"".join(lenenc_str(_enc(k)) + lenenc_str(_enc(v)) for k, v in self.attributes.items())
            parts.append(lenenc_str(kv))
        if caps & _C.CLIENT_ZSTD_COMPRESSION_ALGORITHM:
            parts.append(_SMALL[self.zstd_level if self.zstd_level is not None else 3])
        return b"".join(parts)


def parse_client_handshake(payload: Buffer) -> SslRequest | HandshakeResponse41:
    """The client's first packet: an `SslRequest` (32 bytes with CLIENT_SSL) or its login. The
    pre-4.1 HandshakeResponse320 is refused. Trailing optional fields may be missing (clients
    differ): they parse as None / empty."""
    r = _Cursor(payload, "HandshakeResponse41")
    if len(r.b) >= 2 and not r.b[1] << 8 & _P41:  # the 320 format has 2-byte capabilities
        raise MySQLProtocolError("the client uses the pre-4.1 protocol, which is not supported; "
                                 "upgrade the client", ER.NOT_SUPPORTED_AUTH_MODE)
    if len(r.b) < 32:
        raise r.bad("truncated")
    caps, max_packet, charset = r.u32(), r.u32(), r.u8()
    filler = r.fixed(23)
    if not caps & CLIENT_MYSQL:
        caps |= _U32.unpack_from(filler, 19)[0] << 32
    if len(r.b) == 32:
        if not caps & _C.CLIENT_SSL:
            raise r.bad("truncated")
        return SslRequest(caps, max_packet, charset)
    user = r.utf8(r.nul_str(), "user name")
    if caps & _C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = r.lenenc_str()
    elif caps & _C.CLIENT_SECURE_CONNECTION:
        auth = r.fixed(r.u8())
    else:
        auth = r.nul_str()
    database = plugin = None
    if caps & _C.CLIENT_CONNECT_WITH_DB and r.remaining:
        database = r.utf8(r.nul_str(), "database name")
    if caps & _C.CLIENT_PLUGIN_AUTH and r.remaining:
        plugin = r.utf8(r.nul_str(optional_nul=True), "plugin name")
    attrs: dict[str, str] = {}
    if caps & _C.CLIENT_CONNECT_ATTRS and r.remaining:
        kv = _Cursor(r.lenenc_str(), "HandshakeResponse41")
        while kv.remaining:
            k = kv.lenenc_str()
            attrs[_text(k)] = _text(kv.lenenc_str())
    zstd = r.u8() if caps & _C.CLIENT_ZSTD_COMPRESSION_ALGORITHM and r.remaining else None
    return HandshakeResponse41(caps, user, auth, database, plugin, attrs, max_packet, charset, zstd)


@dataclass(frozen=True, slots=True)
class AuthSwitchRequest:
    """0xFE + plugin name + plugin data (for the two SHA/native plugins: 20-byte scramble + NUL)."""

    plugin: str
    data: bytes = b""

    @property
    def scramble(self) -> bytes:
        """``data`` without the trailing NUL that native/caching_sha2 add to the scramble."""
        return self.data[:-1] if self.data.endswith(b"\0") else self.data

    def build(self) -> bytes:
        return b"\xfe" + nul_str(self.plugin.encode()) + self.data


def parse_auth_switch_request(payload: Buffer) -> AuthSwitchRequest:
    r = _Cursor(payload, "AuthSwitchRequest")
    if r.u8() != 0xFE:
        raise r.bad()
    if not r.remaining:  # pre-4.1 "old password" request: a lone 0xFE
        return AuthSwitchRequest("mysql_old_password")
    plugin = r.utf8(r.nul_str(), "plugin name")
    return AuthSwitchRequest(plugin, r.rest())


@dataclass(frozen=True, slots=True)
class AuthMoreData:
    """0x01 + data: e.g. caching_sha2_password's fast-auth result (0x03 / 0x04) or a public key."""

    data: bytes

    def build(self) -> bytes:
        return b"\x01" + self.data


def parse_auth_more_data(payload: Buffer) -> AuthMoreData:
    r = _Cursor(payload, "AuthMoreData")
    if r.u8() != 0x01:
        raise r.bad()
    return AuthMoreData(r.rest())


@dataclass(frozen=True, slots=True)
class AuthSwitchResponse:
    """The client's answer to an AuthSwitchRequest or AuthMoreData: the bare response bytes."""

    data: bytes

    def build(self) -> bytes:
        return self.data


def parse_auth_switch_response(payload: Buffer) -> AuthSwitchResponse:
    return AuthSwitchResponse(bytes(payload))


# ---------------------------------------------------------------------------------------------
# Commands

_COM_PING = b"\x0e"
_COM_QUIT = b"\x01"
_COM_RESET_CONNECTION = b"\x1f"


def com_ping() -> bytes:
    return _COM_PING


def com_quit() -> bytes:
    return _COM_QUIT


def com_reset_connection() -> bytes:
    return _COM_RESET_CONNECTION


def com_init_db(schema: str) -> bytes:
    return b"\x02" + schema.encode()


def parse_com_init_db(payload: Buffer) -> str:
    r = _Cursor(payload, "COM_INIT_DB")
    if r.u8() != Command.COM_INIT_DB:
        raise r.bad()
    return r.utf8(r.rest(), "schema name")


@dataclass(frozen=True, slots=True)
class QueryAttribute:
    """One query attribute (CLIENT_QUERY_ATTRIBUTES): ``value`` is its binary-protocol encoding
    without a length prefix (the bytes of a string, 8 little-endian bytes of a LONGLONG...)."""

    name: str
    value: bytes | None  # None: NULL
    type: int = ColumnType.VAR_STRING
    unsigned: bool = False


@dataclass(frozen=True, slots=True)
class ComQuery:
    sql: str
    attributes: tuple[QueryAttribute, ...] = ()

    def build(self, capabilities: int = 0) -> bytes:
        sql = self.sql.encode()
        if not capabilities & _C.CLIENT_QUERY_ATTRIBUTES:
            if self.attributes:
                raise ValueError("query attributes need CLIENT_QUERY_ATTRIBUTES")
            return b"\x03" + sql
        attrs = self.attributes
        parts = [b"\x03", lenenc_int(len(attrs)), b"\x01"]  # parameter count, parameter set count = 1
        if attrs:
            bitmap = bytearray((len(attrs) + 7) // 8)
            for i, a in enumerate(attrs):
                if a.value is None:
                    bitmap[i >> 3] |= 1 << (i & 7)
            parts += (bytes(bitmap), b"\x01")  # new_params_bind_flag: types and names follow
            for a in attrs:
                parts += (_U16.pack(a.type | (0x8000 if a.unsigned else 0)), lenenc_str(a.name.encode()))
            parts += (_binary_value(a.type, a.value) for a in attrs if a.value is not None)
        parts.append(sql)
        return b"".join(parts)


def parse_com_query(payload: Buffer, capabilities: int = 0) -> ComQuery:
    """COM_QUERY → `ComQuery`. SQL that is not valid UTF-8 is `MySQLProtocolError` with
    ER_INVALID_CHARACTER_STRING (the stream is intact: answer ERR and go on)."""
    r = _Cursor(payload, "COM_QUERY")
    if r.u8() != Command.COM_QUERY:
        raise r.bad()
    attrs: list[QueryAttribute] = []
    if capabilities & _C.CLIENT_QUERY_ATTRIBUTES:
        count = r.lenenc_int()
        if r.lenenc_int() != 1:
            raise r.bad("parameter set count must be 1")
        if count:
            nulls = r.fixed((count + 7) // 8)
            if r.u8() != 1:
                raise r.bad("query attributes without types")
            types = [(r.u16(), r.lenenc_str()) for _ in range(count)]
            for i, (t, name) in enumerate(types):
                null = nulls[i >> 3] >> (i & 7) & 1
                value = None if null else _read_binary_value(r, t & 0xFF)
                attrs.append(QueryAttribute(r.utf8(name, "attribute name"), value, t & 0xFF, bool(t & 0x8000)))
    sql = r.utf8(r.rest(), "query", ER.INVALID_CHARACTER_STRING)
    return ComQuery(sql, tuple(attrs))


_T = ColumnType
_BINARY_FIXED = {_T.NULL: 0, _T.TINY: 1, _T.SHORT: 2, _T.YEAR: 2, _T.LONG: 4, _T.INT24: 4, _T.FLOAT: 4,
                 _T.LONGLONG: 8, _T.DOUBLE: 8}
_BINARY_TEMPORAL = frozenset((_T.DATE, _T.DATETIME, _T.TIMESTAMP, _T.TIME))  # 1-byte length + fields


def _binary_value(t: int, v: bytes) -> bytes:
    size = _BINARY_FIXED.get(t)
    if size is not None:
        if len(v) != size:
            raise ValueError(f"a {ColumnType(t).name} value is {size} bytes, not {len(v)}")
        return v
    if t in _BINARY_TEMPORAL:
        return _SMALL[len(v)] + v
    return lenenc_str(v)


def _read_binary_value(r: _Cursor, t: int) -> bytes:
    size = _BINARY_FIXED.get(t)
    if size is not None:
        return r.fixed(size)
    if t in _BINARY_TEMPORAL:
        return r.fixed(r.u8())
    return r.lenenc_str()


# ---------------------------------------------------------------------------------------------
# Text result sets


def column_count(n: int, capabilities: int = 0) -> bytes:
    """The first packet of a result set (with the metadata-follows byte, 1, when negotiated)."""
    return lenenc_int(n) + (b"\x01" if capabilities & _METADATA_FLAG else b"")


def parse_column_count(payload: Buffer, capabilities: int = 0) -> tuple[int, bool]:
    """(column count, whether column definitions follow: False only when the server skipped them
    under CLIENT_OPTIONAL_RESULTSET_METADATA / MARIADB_CLIENT_CACHE_METADATA)."""
    r = _Cursor(payload, "column count")
    n = r.lenenc_int()
    follows = r.u8() != 0 if capabilities & _METADATA_FLAG else True
    if r.remaining or n == 0:
        raise r.bad()
    return n, follows


@dataclass(frozen=True, slots=True)
class ColumnDefinition:
    """ColumnDefinition41."""

    name: str
    type: int = ColumnType.VAR_STRING
    charset: int = Charset.UTF8MB4_GENERAL_CI
    column_length: int = 0
    flags: int = 0
    decimals: int = 0
    schema: str = ""
    table: str = ""
    org_table: str = ""
    org_name: str = ""
    catalog: str = "def"
    extended_metadata: bytes = b""  # MariaDB, with MARIADB_CLIENT_EXTENDED_METADATA

    def build(self, capabilities: int = 0) -> bytes:
        parts = [lenenc_str(_enc(s)) for s in
                 (self.catalog, self.schema, self.table, self.org_table, self.name, self.org_name)]
        if capabilities & _C.MARIADB_CLIENT_EXTENDED_METADATA:
            parts.append(lenenc_str(self.extended_metadata))
        parts.append(b"\x0c" + _U16.pack(self.charset) + _U32.pack(self.column_length)
                     + _SMALL[self.type] + _U16.pack(self.flags) + _SMALL[self.decimals] + b"\0\0")
        return b"".join(parts)


def parse_column_definition(payload: Buffer, capabilities: int = 0) -> ColumnDefinition:
    r = _Cursor(payload, "column definition")
    catalog, schema, table, org_table, name, org_name = (_text(r.lenenc_str()) for _ in range(6))
    ext = r.lenenc_str() if capabilities & _C.MARIADB_CLIENT_EXTENDED_METADATA else b""
    if r.lenenc_int() != 0x0C or r.remaining < 12:  # later bytes: COM_FIELD_LIST's default value
        raise r.bad("fixed-length fields")
    charset, length, type_, flags, decimals = struct.unpack_from("<HIBHB", r.b, r.pos)
    return ColumnDefinition(name, type_, charset, length, flags, decimals, schema, table, org_table,
                            org_name, catalog, ext)


RowValue = Union[bytes, str, None]


def text_row(values: Sequence[RowValue]) -> bytes:
    """A text-protocol row: length-encoded strings, 0xFB for NULL (str values go as UTF-8)."""
    parts = []
    for v in values:
        if v is None:
            parts.append(b"\xfb")
        else:
            if type(v) is str:
                v = v.encode()
            parts.append(lenenc_int(len(v)))
            parts.append(v)
    return b"".join(parts)


def parse_text_row(payload: Buffer, columns: int | None = None) -> list[bytes | None]:
    """A text-protocol row → values (bytes, None for NULL); ``columns`` checks the count."""
    b = payload if type(payload) is bytes else bytes(payload)
    values: list[bytes | None] = []
    pos, n = 0, len(b)
    try:
        while pos < n:
            v, pos = read_lenenc_str(b, pos)
            values.append(v)
    except MySQLProtocolError:
        raise MySQLProtocolError("malformed text row") from None
    if columns is not None and len(values) != columns:
        raise MySQLProtocolError(f"malformed text row: {len(values)} values for {columns} columns")
    return values


def text_result_set(columns: Sequence[ColumnDefinition], rows: Iterable[Sequence[RowValue]], *,
                    capabilities: int = _P41, status: int = _S.SERVER_STATUS_AUTOCOMMIT,
                    warnings: int = 0, seq: int = 1) -> bytes:
    """A whole framed result-set reply (column count, definitions, [EOF], rows, EOF or 0xFE OK),
    e.g. for a query the proxy answers itself; ``seq`` is the reply's first sequence id."""
    deprecate = capabilities & _C.CLIENT_DEPRECATE_EOF
    payloads = [column_count(len(columns), capabilities)]
    payloads += (c.build(capabilities) for c in columns)
    if not deprecate:
        payloads.append(EofPacket(warnings, status).build(capabilities))
    payloads += (text_row(r) for r in rows)
    end = OkPacket(status=status, warnings=warnings, header=0xFE) if deprecate else EofPacket(warnings, status)
    payloads.append(end.build(capabilities))
    return frame_all(payloads, seq)[0]


@dataclass(slots=True)
class Result:
    """One result of a reply, as kept by ``ResultSetReader(keep=True)``: an OK (no columns) or a
    result set with its terminator's values."""

    columns: list[ColumnDefinition] = field(default_factory=list)
    rows: list[list[bytes | None]] = field(default_factory=list)
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = 0
    warnings: int = 0
    info: str = ""


_FIRST, _COLUMNS, _COLUMNS_EOF, _ROWS, _DONE = range(5)


class ResultSetReader:
    """Follows the server's reply to one text-protocol command (COM_QUERY, COM_PING,
    COM_RESET_CONNECTION, COM_INIT_DB...) and tells when it is complete.

    A reply is OK or ERR, or a result set: column count, column definitions, [EOF unless
    CLIENT_DEPRECATE_EOF], rows, then EOF (or an OK with header 0xFE under DEPRECATE_EOF) or ERR.
    A terminator with SERVER_MORE_RESULTS_EXISTS is followed by another result (multi-statements,
    CALL); an ERR ends the reply. ``feed(data)`` returns the wire bytes of the reply's complete
    packets, unchanged, to forward and/or cache; ``done`` is set after the last one. Then:

    - ``status``: the last status flags the server sent. SERVER_STATUS_IN_TRANS means a pooler
      must keep this server connection. An ERR carries no status, so ``status`` keeps the last
      known one (pass the connection's previous status to `reset`); an OK to COM_PING reports it.
    - ``error``: the `ErrPacket` that ended the reply, if any; ``ok``: the last OK packet seen.
    - ``result_count``, ``row_count``; with ``keep=True``, ``results`` holds every `Result`.

    Packets after the end of the reply (a pipelined next reply) are kept: `reset` readies the
    reader for the next command and the next ``feed`` (``feed(b"")`` is fine) goes on from them.
    Sequence ids are checked from ``first_seq`` (1 after a one-packet command; None: unchecked).
    LOAD DATA LOCAL (0xFB) is refused with `MySQLProtocolError`: the proxy never offers
    CLIENT_LOCAL_FILES, so a server asking for a file is out of step. After a
    `MySQLProtocolError` the connection is unusable.
    """

    def __init__(self, capabilities: int, *, reader: PacketReader | None = None, keep: bool = False,
                 status: int = 0, first_seq: int | None = 1) -> None:
        self.reader = reader if reader is not None else PacketReader()
        self.capabilities = capabilities
        self.keep = keep
        self._deprecate_eof = bool(capabilities & _C.CLIENT_DEPRECATE_EOF)
        self._leftover = b""
        self.status = int(status)
        self.reset(first_seq=first_seq)

    def reset(self, *, status: int | None = None, first_seq: int | None = 1) -> None:
        """Ready for the reply to the next command; ``status`` defaults to the current one."""
        if status is not None:
            self.status = int(status)
        self.done = False
        self.error: ErrPacket | None = None
        self.ok: OkPacket | None = None
        self.warnings = 0
        self.result_count = 0
        self.row_count = 0
        self.results: list[Result] = []
        self._state = _FIRST
        self._columns_left = 0
        self._seq = first_seq
        if self._leftover:
            self.reader.unread(self._leftover)
            self._leftover = b""

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & _S.SERVER_STATUS_IN_TRANS)

    def feed(self, data: Buffer) -> memoryview:
        """Wire bytes of this reply's packets completed by ``data`` (empty if none)."""
        reader = self.reader
        pkts = reader.feed(data)
        if not pkts:
            return _EMPTY
        view = reader.view
        i = 0 if self.done else self._consume(reader, pkts)
        if i < len(pkts):
            self._leftover += view[pkts[i][1]:pkts[-1][2]]
        return view[pkts[0][1]:pkts[i - 1][2]] if i else _EMPTY

    def rest(self) -> bytes:
        """Bytes received after the reply (complete packets and a partial one), handed back."""
        rest = self._leftover + self.reader.rest()
        self._leftover = b""
        return rest

    def _consume(self, reader: PacketReader, pkts: list[Packet]) -> int:
        buf = reader.buf
        state = self._state
        expect = self._seq
        deprecate = self._deprecate_eof
        keep = self.keep
        i, n = 0, len(pkts)
        while i < n:
            pkt = pkts[i]
            seq, s, e = pkt
            i += 1
            single = e - s < _PART
            if expect is not None:
                first = seq if single else (seq - reader.parts(pkt) + 1) & 0xFF
                if first != expect:
                    raise _out_of_order(expect, first)
                expect = (seq + 1) & 0xFF
            if e - s == 4:
                raise MySQLProtocolError("empty packet in a reply")
            b0 = buf[s + 4]
            if state == _ROWS:  # the hot path
                if b0 == 0xFE and single:  # a row starting 0xFE has a value of 16 MiB+: not single
                    if e - s == 9 and not deprecate and self.capabilities & _P41:  # the usual EOF
                        state = self._finish(buf[s + 7] | buf[s + 8] << 8, buf[s + 5] | buf[s + 6] << 8, None)
                    else:
                        state = self._end_result(reader.payload(pkt))
                elif b0 == 0xFF:
                    state = self._err(reader.payload(pkt))
                else:
                    self.row_count += 1
                    if keep:
                        self.results[-1].rows.append(parse_text_row(reader.payload(pkt)))
            elif state == _FIRST:
                state = self._first(b0, reader.payload(pkt))
            elif b0 == 0xFF:  # ERR instead of a column definition or the EOF after them
                state = self._err(reader.payload(pkt))
            elif state == _COLUMNS:
                if keep:
                    self.results[-1].columns.append(parse_column_definition(reader.payload(pkt), self.capabilities))
                self._columns_left -= 1
                if not self._columns_left:
                    state = _ROWS if deprecate else _COLUMNS_EOF
            elif state == _COLUMNS_EOF:
                if b0 != 0xFE or not single:
                    raise MySQLProtocolError("malformed result set: expected an EOF packet after the columns")
                if e - s == 9 and self.capabilities & _P41:  # the usual 5-byte EOF: read it in place
                    self.status = buf[s + 7] | buf[s + 8] << 8
                else:
                    self.status = int(parse_eof(reader.payload(pkt), self.capabilities).status)
                state = _ROWS
            if state == _DONE:
                self.done = True
                break
        self._state = state
        self._seq = expect
        return i

    def _first(self, b0: int, payload: Buffer) -> int:
        if b0 == 0x00:
            ok = parse_ok(payload, self.capabilities)
            self.ok = ok
            if self.keep:
                self.results.append(Result())
            return self._finish(ok.status, ok.warnings, ok)
        if b0 == 0xFF:
            return self._err(payload)
        if b0 == 0xFB:
            raise MySQLProtocolError("the server asked for a local file (LOAD DATA LOCAL INFILE), "
                                     "which is not supported", ER.NOT_SUPPORTED_YET)
        if b0 == 0xFE:
            raise MySQLProtocolError("malformed reply: unexpected EOF packet")
        count, follows = parse_column_count(payload, self.capabilities)
        if self.keep:
            self.results.append(Result())
        self._columns_left = count if follows else 0
        if self._columns_left:
            return _COLUMNS
        return _ROWS if self._deprecate_eof else _COLUMNS_EOF

    def _end_result(self, payload: Buffer) -> int:
        if self._deprecate_eof:
            ok = parse_ok(payload, self.capabilities)
            self.ok = ok
            return self._finish(ok.status, ok.warnings, ok)
        eof = parse_eof(payload, self.capabilities)
        return self._finish(eof.status, eof.warnings, None)

    def _finish(self, status: int, warnings: int, ok: OkPacket | None) -> int:
        self.status = int(status)
        self.warnings = warnings
        self.result_count += 1
        if self.keep:
            r = self.results[-1]
            r.status, r.warnings = status, warnings
            if ok is not None:
                r.affected_rows, r.last_insert_id, r.info = ok.affected_rows, ok.last_insert_id, ok.info
        return _FIRST if status & _MORE else _DONE

    def _err(self, payload: Buffer) -> int:
        self.error = parse_err(payload)
        self.status &= ~_S.SERVER_MORE_RESULTS_EXISTS  # an ERR ends the reply, whatever came before
        return _DONE
