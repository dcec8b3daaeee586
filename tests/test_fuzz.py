"""Hypothesis fuzzing of the reader and converter on mutated VMZ-format pickles.

Truncation, bit flips, splices of two seeds, and opcode mutations (an opcode byte replaced,
dropped or duplicated) of the seed corpus (tests/fuzz_seeds, plus the genuine Python-2 files);
and files built to hurt a reader: containers nested up to 20,000 deep as keys or values, many
keys that hash alike, one memoised string referenced thousands of times (as values, keys, or
through _codecs.encode). Every case must end in a VmzconvError — never another exception — leave
no output file, and finish within 5 s. CI runs 7 x 86 cases; `pytest -m fuzz` runs the long mode
(VMZCONV_FUZZ_EXAMPLES, default 3,000 per strategy, 21,000 in all).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmzconv.convert import convert
from vmzconv.errors import VmzconvError

HERE = Path(__file__).parent
SEEDS = sorted((HERE / "fuzz_seeds").glob("*.pkl")) + sorted((HERE / "fixtures" / "py2").glob("*.pkl"))
SEED_BYTES = [p.read_bytes() for p in SEEDS]
OPCODES = sorted({op.code.encode("latin-1") for op in pickletools.opcodes})
CI_EXAMPLES = 86                      # x 7 strategies: ~600 cases in CI
LONG_EXAMPLES = int(os.environ.get("VMZCONV_FUZZ_EXAMPLES", "3000"))


def op_positions(data: bytes) -> list[int]:
    try:
        return [pos for _, _, pos in pickletools.genops(data)]
    except Exception:
        return [0]


POSITIONS = [op_positions(d) for d in SEED_BYTES]


@st.composite
def truncated(draw):
    i = draw(st.integers(0, len(SEED_BYTES) - 1))
    data = SEED_BYTES[i]
    return data[:draw(st.integers(0, len(data) - 1))]


@st.composite
def bit_flipped(draw):
    data = bytearray(SEED_BYTES[draw(st.integers(0, len(SEED_BYTES) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def spliced(draw):
    a = SEED_BYTES[draw(st.integers(0, len(SEED_BYTES) - 1))]
    b = SEED_BYTES[draw(st.integers(0, len(SEED_BYTES) - 1))]
    return a[:draw(st.integers(0, len(a)))] + b[draw(st.integers(0, len(b))):]


@st.composite
def opcode_mutated(draw):
    i = draw(st.integers(0, len(SEED_BYTES) - 1))
    data, positions = bytearray(SEED_BYTES[i]), POSITIONS[i]
    for _ in range(draw(st.integers(1, 3))):
        pos = positions[draw(st.integers(0, len(positions) - 1))]
        if pos >= len(data):
            continue
        kind = draw(st.sampled_from(["replace", "drop", "duplicate"]))
        if kind == "replace":
            data[pos:pos + 1] = draw(st.sampled_from(OPCODES))
        elif kind == "drop":
            del data[pos]
        else:
            data[pos:pos] = data[pos:pos + 1]
    return bytes(data)


def _s2(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b


@st.composite
def nested_containers(draw):
    """A dict whose key or value is a container nested up to 20,000 deep (tuples, lists, frozensets)."""
    depth = draw(st.integers(1, 20000))
    kind = draw(st.sampled_from(["tuple", "list", "frozenset", "mixed"]))
    if kind == "tuple":
        obj = b"N" + b"\x85" * depth
    elif kind == "list":
        obj = b"]" * depth + b"a" * (depth - 1)
    elif kind == "frozenset":
        obj = b"N" + b"\x85" * depth + b"(\x91"                       # MARK, one item, FROZENSET... reordered below
        obj = b"(" + b"N" + b"\x85" * depth + b"\x91"
    else:
        obj = b"".join(draw(st.sampled_from([b"]N\x85a", b"N\x85", b")"])) for _ in range(min(depth, 3000))) + b"N"
    as_key = draw(st.booleans())
    pair = (obj + _s2(b"v")) if as_key else (_s2(b"k") + obj)
    return b"\x80\x02}" + pair + b"s."


@st.composite
def colliding_keys(draw):
    """Many keys that hash alike: ints (multiples of 2**61 - 1), tuples of them, or repeated long strings."""
    n = draw(st.integers(1, 20000))
    kind = draw(st.sampled_from(["int", "tuple", "longstr"]))
    if kind == "int":
        items = b"".join(pickle.dumps(k * (2**61 - 1), 2)[2:-1] + b"N" for k in range(1, n + 1))
    elif kind == "tuple":
        items = b"".join(pickle.dumps((k * (2**61 - 1),), 2)[2:-1] + b"N" for k in range(1, n + 1))
    else:
        items = b"X" + struct.pack("<I", 2000) + b"k" * 2000 + b"q\x00N" + b"h\x00N" * n
    return b"\x80\x02}(" + items + b"u."


@st.composite
def memo_references(draw):
    """One memoised string used again and again: as values, as keys, or through _codecs.encode."""
    size = draw(st.integers(1, 1 << 20))
    n = draw(st.integers(1, 2000))
    kind = draw(st.sampled_from(["values", "keys", "encode"]))
    head = b"\x80\x02X" + struct.pack("<I", size) + b"a" * size + b"q\x00"
    if kind == "values":
        body = b"0}(" + b"".join(_s2(str(i).encode()) + b"h\x00" for i in range(n)) + b"u"
    elif kind == "keys":
        body = b"0}(" + b"h\x00N" * n + b"u"
    else:
        body = b"".join(b"c_codecs\nencode\nh\x00X\x06\x00\x00\x00latin1\x86R0" for _ in range(n)) + b"N"
    return head + body + b"."


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.pkl", Path(tmp) / "out.pth"
        src.write_bytes(data)
        t0 = time.perf_counter()
        with pytest.raises(VmzconvError):
            convert(src, out, check_parity=False, card=False)
        assert time.perf_counter() - t0 < 5.0
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["in.pkl"]


STRATEGIES = {"truncate": truncated(), "bitflip": bit_flipped(), "splice": spliced(), "opcode": opcode_mutated(),
              "nested": nested_containers(), "colliding": colliding_keys(), "memo": memo_references()}


def _fuzz_test(n: int):
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(name, data):
        check(data.draw(STRATEGIES[name]))
    return run


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_fuzz(name):
    _fuzz_test(CI_EXAMPLES)(name)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_fuzz_long(name):
    _fuzz_test(LONG_EXAMPLES)(name)


def test_seeds_themselves_are_readable_but_not_models():
    from vmzconv.blobs import read_blobs

    for path in SEEDS:
        assert len(read_blobs(path)) >= 5, path
        check(path.read_bytes())
