"""Fuzz targets: the PostgreSQL codecs of proxy/pg/protocol.py, frontend and backend.

- `StartupReader`: streams of startup packets (SSLRequest, GSSENCRequest, CancelRequest,
  StartupMessage, a direct-TLS ClientHello), mutated and cut anywhere.
- `MessageReader`: streams of typed messages of both directions, mutated and cut anywhere.
- every payload parser (and `rename_bind` / `rename_parse`): valid payloads made by the
  builders, mutated, given as bytes, bytearray and memoryview.

What must hold for any input: only `PgProtocolError` is raised (a user-facing message; anything
else reaches the client as an internal error and a traceback in the edge's log); what is held
while a packet is incomplete stays within the limits (startup ≤ MAX_STARTUP, a typed message ≤
the reader's max_message); framing forwards exactly the bytes received, in order; a parser that
accepts a payload returns what the builder turns back into that very payload (no silent
truncation, no trailing bytes ignored), the same for every buffer type.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from hypothesis import given
from hypothesis import strategies as st

from proxy.pg import protocol as p
from proxy.pg.protocol import PgProtocolError
from tests.fuzz._fuzz import cuts, fuzz, mutate, mutations, split

# ------------------------------------------------------------------------ values

names = st.one_of(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12),
                  st.sampled_from(["", "s1", "user", "database", "application_name", "x" * 600]))
texts = st.one_of(names, st.sampled_from(["SELECT 1", "SET search_path = a", "BEGIN", "é☃"]))
values = st.one_of(st.none(), st.binary(max_size=40))
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
i16 = st.integers(-(2**15), 2**15 - 1)
fields = st.builds(p.Field, names, u32, i16, u32, i16, i32, i16)


@st.composite
def binds(draw: st.DrawFn, result_formats: bool = True) -> bytes:
    """A valid Bind: no format codes, one for all parameters, or one per parameter."""
    params = draw(st.lists(values, max_size=3))
    formats = draw(st.sampled_from([[], [draw(i16)], [draw(i16) for _ in params]]))
    results = draw(st.lists(i16, max_size=3)) if result_formats else []
    return p.bind(draw(names), draw(names), formats, params, results)


# ------------------------------------------------------------------------ StartupReader

startup_params = st.dictionaries(names.filter(bool), names, max_size=4).map(lambda d: {"user": "u", **d})
startup_packets = st.one_of(
    st.just(p.ssl_request()),
    st.just(p.gssenc_request()),
    st.builds(p.cancel_request, i32, st.binary(min_size=4, max_size=40)),
    st.builds(p.startup_message, startup_params, st.sampled_from([p.PROTOCOL_3_0, p.PROTOCOL_3_2, 3 << 16 | 7])),
)
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


@fuzz(600)
@given(st.lists(startup_packets, min_size=1, max_size=4), st.booleans(), st.booleans(), mutations(), cuts)
def test_startup_reader(packets: list[bytes], tls_first: bool, direct_tls: bool, ops: list, cut: list[int]) -> None:
    valid = b"".join(packets)
    stream = mutate((CLIENT_HELLO if tls_first else b"") + valid, ops)
    r = p.StartupReader(direct_tls=direct_tls)
    events: list[Any] = []
    try:
        for chunk in split(stream, cut):
            ev = r.feed(chunk)
            while ev is not None:
                events.append(ev)
                if isinstance(ev, p.DirectTls):
                    assert direct_tls and r.rest()[:1] == b"\x16"  # nothing consumed: the ClientHello
                    break
                ev = r.feed(b"")
            if events and isinstance(events[-1], p.DirectTls):
                break
            assert r.buffered < p.MAX_STARTUP  # never holds more than one packet's worth
    except PgProtocolError as exc:
        assert str(exc)
        return
    for ev in events:
        if isinstance(ev, p.StartupMessage):
            assert ev.user and ev.version >> 16 == 3
            assert p.StartupReader().feed(p.startup_message(ev.params, ev.version)) == ev
        elif isinstance(ev, p.CancelRequest):
            assert p.MIN_CANCEL_KEY <= len(ev.key) <= p.MAX_CANCEL_KEY
            assert p.StartupReader().feed(p.cancel_request(ev.pid, ev.key)) == ev
    if not ops and not tls_first:  # the valid stream: every packet, nothing left over
        assert len(events) == len(packets) and r.buffered == 0


# ------------------------------------------------------------------------ MessageReader

messages = st.one_of(
    st.builds(p.query, texts), st.builds(p.parse, names, texts, st.lists(u32, max_size=3)),
    binds(),
    st.builds(p.execute, names, st.integers(0, 2**31 - 1)), st.just(p.sync()), st.just(p.flush()),
    st.builds(p.describe, st.sampled_from("SP"), names), st.builds(p.data_row, st.lists(values, max_size=4)),
    st.builds(p.row_description, st.lists(fields, max_size=3)), st.builds(p.command_complete, texts),
    st.builds(p.ready_for_query, st.sampled_from("ITE")), st.builds(p.parameter_status, names, names),
    st.builds(p.error_response, st.just("ERROR"), st.just("42P01"), texts),
    st.binary(min_size=1, max_size=1).map(lambda t: t + b"\0\0\0\x04"),  # any type, empty payload
)


@fuzz(600)
@given(st.lists(messages, max_size=8), mutations(), cuts, st.sampled_from([bytes, bytearray, memoryview]),
       st.sampled_from([p.MAX_MESSAGE, 4096, 64, 4]))
def test_message_reader(msgs: list[bytes], ops: list, cut: list[int], kind: type, limit: int) -> None:
    valid = b"".join(msgs)
    stream = mutate(valid, ops)
    r = p.MessageReader(max_message=limit)
    out = bytearray()
    kept: list[tuple[memoryview, bytes]] = []
    error: PgProtocolError | None = None
    for chunk in split(stream, cut):
        try:
            batch = r.feed(kind(chunk))
        except PgProtocolError as exc:
            error = exc
            break
        for t, s, e in batch:
            (length,) = struct.unpack_from("!i", r.buf, s + 1)
            assert r.buf[s] == t and e - s == 1 + length and 4 <= length <= limit
            assert bytes(r.payload((t, s, e))) == r.buf[s + 5:e]
        if batch:
            run = r.raw(batch[0], batch[-1])
            assert bytes(run) == b"".join(r.buf[s:e] for _, s, e in batch)  # contiguous
            kept.append((run, bytes(run)))
            out += run
        assert r.buffered <= max(limit + 1, 5)  # at most one incomplete message
    assert stream.startswith(bytes(out))  # forwards what was received, in order, nothing else
    for view, copy in kept:  # views of earlier batches are never overwritten
        assert bytes(view) == copy
    if error is not None:
        assert str(error)
        try:
            r.feed(b"S\0\0\0\x04")
        except PgProtocolError as again:
            assert again is error  # the stream stays broken
        else:
            raise AssertionError("a broken reader accepted more input")
    else:
        assert len(out) + r.buffered == len(stream)
        if not ops and limit == p.MAX_MESSAGE:
            assert bytes(out) == valid


# ------------------------------------------------------------------------ payload parsers

def _payload(msg: bytes) -> bytes:
    return msg[5:]


def _auth(code: int, data: bytes) -> bytes:
    return struct.pack("!i", code) + data


# parser name -> (parser, strategy of valid payloads, payload rebuilt from the parsed value or None)
PARSERS: dict[str, tuple[Callable[[Any], Any], st.SearchStrategy[bytes], Callable[[Any], bytes] | None]] = {
    "parse": (p.parse_parse, st.builds(p.parse, names, texts, st.lists(u32, max_size=4)).map(_payload),
              lambda v: _payload(p.parse(*v))),
    "bind": (p.parse_bind, binds().map(_payload),
             lambda v: _payload(p.bind(v.portal, v.statement, v.param_formats, v.params, v.result_formats))),
    "bind_statement_name": (p.bind_statement_name, st.builds(p.bind, names, names).map(_payload), None),
    "describe": (p.parse_describe, st.builds(p.describe, st.sampled_from("SP"), names).map(_payload),
                 lambda v: _payload(p.describe(*v))),
    "close": (p.parse_close, st.builds(p.close, st.sampled_from("SP"), names).map(_payload),
              lambda v: _payload(p.close(*v))),
    "execute": (p.parse_execute, st.builds(p.execute, names, i32).map(_payload), lambda v: _payload(p.execute(*v))),
    "query": (p.parse_query, st.builds(p.query, texts).map(_payload), lambda v: _payload(p.query(v))),
    "password": (p.parse_password, st.builds(p.password_message, st.binary(max_size=40).filter(lambda b: b"\0" not in b))
                 .map(_payload), lambda v: _payload(p.password_message(v))),
    "sasl_initial_response": (p.parse_sasl_initial_response,
                              st.builds(p.sasl_initial_response, names, values).map(_payload),
                              lambda v: _payload(p.sasl_initial_response(*v))),
    "error_fields": (p.parse_error_fields, st.builds(p.error_response, st.sampled_from(["ERROR", "FATAL"]),
                                                     st.just("08P01"), texts, detail=st.none() | texts,
                                                     hint=st.none() | texts).map(_payload), None),
    "ready_for_query": (p.parse_ready_for_query, st.builds(p.ready_for_query, st.sampled_from("ITE")).map(_payload),
                        lambda v: _payload(p.ready_for_query(v))),
    "backend_key_data": (p.parse_backend_key_data,
                         st.builds(p.backend_key_data, i32, st.binary(min_size=4, max_size=40)).map(_payload),
                         lambda v: _payload(p.backend_key_data(*v))),
    "parameter_status": (p.parse_parameter_status, st.builds(p.parameter_status, names, names).map(_payload),
                         lambda v: _payload(p.parameter_status(*v))),
    "authentication": (p.parse_authentication,
                       st.one_of(st.just(p.authentication_ok()), st.just(p.authentication_cleartext()),
                                 st.builds(p.authentication_md5, st.binary(min_size=4, max_size=4)),
                                 st.builds(p.authentication_sasl, st.lists(names.filter(bool), max_size=3)),
                                 st.builds(p.authentication_sasl_continue, st.binary(max_size=40))).map(_payload),
                       lambda v: _auth(*v)),
    "sasl_mechanisms": (p.parse_sasl_mechanisms,
                        st.builds(p.authentication_sasl, st.lists(names.filter(bool), max_size=3)).map(lambda m: m[9:]),
                        lambda v: p.authentication_sasl(v)[9:]),
    "command_complete": (p.parse_command_complete, st.builds(p.command_complete, texts).map(_payload),
                         lambda v: _payload(p.command_complete(v))),
    "row_description": (p.parse_row_description, st.builds(p.row_description, st.lists(fields, max_size=3))
                        .map(_payload), lambda v: _payload(p.row_description(v))),
    "data_row": (p.parse_data_row, st.builds(p.data_row, st.lists(values, max_size=5)).map(_payload),
                 lambda v: _payload(p.data_row(v))),
    "parameter_description": (p.parse_parameter_description,
                              st.builds(p.parameter_description, st.lists(u32, max_size=4)).map(_payload),
                              lambda v: _payload(p.parameter_description(v))),
    "negotiate_protocol_version": (p.parse_negotiate_protocol_version,
                                   st.builds(p.negotiate_protocol_version, i32,
                                             st.lists(names.filter(bool), max_size=3)).map(_payload),
                                   lambda v: _payload(p.negotiate_protocol_version(*v))),
}


# Inputs a fuzz run found mishandled, each with its strict-xfail regression test in
# tests/fuzz/test_found_bugs.py; remove an entry when its test passes.
KNOWN_BUGS: set[tuple[str, bytes]] = set()  # inputs of bugs found and not fixed yet (see test_found_bugs.py)


@st.composite
def parser_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(PARSERS)))
    return name, draw(PARSERS[name][1])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, memoryview) or isinstance(b, memoryview):
        return bytes(a) == bytes(b)
    if isinstance(a, p.Bind) and isinstance(b, p.Bind):
        return _same([a.portal, a.statement, a.param_formats, a.params, a.result_formats],
                     [b.portal, b.statement, b.param_formats, b.params, b.result_formats])
    return a == b


@fuzz(1500)
@given(parser_inputs(), mutations())
def test_payload_parsers(case: tuple[str, bytes], ops: list) -> None:
    name, valid = case
    parser, _, rebuild = PARSERS[name]
    payload = mutate(valid, ops)
    results = []
    for kind in (bytes, bytearray, memoryview):
        try:
            results.append(("ok", parser(kind(payload))))
        except PgProtocolError as exc:
            assert str(exc)
            results.append(("error", str(exc)))
    assert all(_same(r, results[0]) for r in results), results  # the same for every buffer type
    status, value = results[0]
    if (name, payload) in KNOWN_BUGS:
        return
    if not ops:
        assert status == "ok", f"{name} refused its builder's payload {payload!r}: {value}"
    if status == "ok" and rebuild is not None:
        assert rebuild(value) == payload, f"{name} accepted {payload!r} as {value!r}"


@fuzz(400)
@given(binds(result_formats=False), st.builds(p.parse, names, texts, st.lists(u32, max_size=3)), names, mutations(),
       st.sampled_from([bytes, memoryview]))
def test_rename_bind_and_parse(bind: bytes, parse: bytes, new: str, ops: list, kind: type) -> None:
    """The pooler renames statements in Binds and Parses it forwards: a renamed message is the
    original with only the statement name changed, or the payload is refused."""
    for msg, rename, reparse in ((bind, p.rename_bind, p.parse_bind), (parse, p.rename_parse, p.parse_parse)):
        payload = mutate(msg[5:], ops)
        try:
            out = rename(kind(payload), new)
        except PgProtocolError:
            continue
        assert out[:1] == msg[:1] and struct.unpack_from("!i", out, 1)[0] == len(out) - 1
        try:
            before = reparse(payload)
        except PgProtocolError:
            continue  # renaming reads only the names; the rest is the server's to judge
        after = reparse(out[5:])
        if reparse is p.parse_bind:
            assert after.statement == new and _same([after.portal, after.params, after.result_formats],
                                                    [before.portal, before.params, before.result_formats])
        else:
            assert after == (new, before[1], before[2])
