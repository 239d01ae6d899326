"""Shared pieces of the fuzz targets (tests/fuzz/): the example budget and byte mutations.

Every target is a hypothesis test with ``derandomize=True`` (the same examples on every run, so
CI is reproducible) and a fixed number of examples chosen so the whole fuzz set runs in well
under a minute on a loaded two-core box. For a long local run raise the budget:

    HD_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/fuzz -q           # x examples per target
    HD_FUZZ_EXAMPLES=20000 HD_FUZZ_SEED=7 .venv/bin/python -m pytest tests/fuzz  # other examples

``HD_FUZZ_EXAMPLES`` replaces each target's own count; ``HD_FUZZ_SEED`` turns derandomization
off and seeds hypothesis instead (a failure prints the seed and the shrunk input). No example
database is kept: a failure is reproduced by the same run, not by a file in the checkout.

Mutations: hypothesis's own byte strings rarely reach the interesting states of a parser
(a length field that agrees with the rest, a valid count followed by a short list...), so the
targets start from valid messages made by the builders and damage them with the operations a
fuzzer like AFL uses: bit flips, interesting values written over single bytes and 16/32-bit
fields, insertions, deletions, duplications and truncation.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Sequence, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

_EXAMPLES = os.environ.get("HD_FUZZ_EXAMPLES")
_SEED = os.environ.get("HD_FUZZ_SEED")


def fuzz(examples: int) -> Callable[[T], T]:
    """Hypothesis settings for one fuzz target: ``examples`` by default (HD_FUZZ_EXAMPLES
    overrides), derandomized unless HD_FUZZ_SEED is set, no deadline (a loaded box is slow, and a
    hang is caught by pytest-timeout, not by timing examples)."""
    n = int(_EXAMPLES) if _EXAMPLES else examples
    conf = settings(max_examples=n, deadline=None, derandomize=_SEED is None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much],
                    print_blob=True)

    def apply(test: T) -> T:
        test = conf(test)  # type: ignore[assignment]
        if _SEED is not None:
            from hypothesis import seed
            test = seed(int(_SEED))(test)  # type: ignore[assignment]
        return test

    return apply


# ------------------------------------------------------------------------ mutations

INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF)
INTERESTING_16 = (0, 1, 0x7FFF, 0x8000, 0xFFFF)
INTERESTING_32 = (0, 1, 3, 4, 5, 8, 12, 0x7F, 0xFFFF, 0xFFFFFF, 0x1000000, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFF, 0xFFFFFFFE)

_ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING_8)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("u16"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING_16), st.booleans()),
    st.tuples(st.just("u32"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING_32), st.booleans()),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("dup"), st.integers(0, 1 << 16), st.integers(1, 32)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
)


def mutate(data: bytes, ops: Sequence[tuple]) -> bytes:
    """Apply mutation operations (as drawn from `mutations`) to ``data``; positions wrap."""
    b = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1]
        n = len(b)
        if kind == "insert":
            p = pos % (n + 1)
            b[p:p] = op[2]
            continue
        if not n:
            continue
        p = pos % n
        if kind == "flip":
            b[p] ^= 1 << op[2]
        elif kind == "byte":
            b[p] = op[2]
        elif kind == "u16" and n >= 2:
            p = pos % (n - 1)
            b[p:p + 2] = struct.pack(">H" if op[3] else "<H", op[2])
        elif kind == "u32" and n >= 4:
            p = pos % (n - 3)
            b[p:p + 4] = struct.pack(">I" if op[3] else "<I", op[2])
        elif kind == "delete":
            del b[p:p + op[2]]
        elif kind == "dup":
            b[p:p] = b[p:p + op[2]]
        elif kind == "truncate":
            del b[p:]
    return bytes(b)


def mutations(max_ops: int = 4) -> st.SearchStrategy[list[tuple]]:
    """Zero to ``max_ops`` mutation operations (zero: the valid input itself, which must pass)."""
    return st.lists(_ops, max_size=max_ops)


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length + 1, sorted, deduplicated)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


cuts = st.lists(st.integers(0, 1 << 20), max_size=8)
