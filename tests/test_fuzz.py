"""Hypothesis fuzzing of the reader and converter on mutated VMZ-format pickles.

Truncation, bit flips, splices of two seeds, and opcode mutations (an opcode byte replaced,
dropped or duplicated) of the seed corpus (tests/fuzz_seeds, plus the genuine Python-2 files).
Every case must end in a VmzconvError — never another exception — leave no output file, and
finish quickly. CI runs 4 x 150 cases; `pytest -m fuzz` runs the long mode (VMZCONV_FUZZ_EXAMPLES,
default 5,000 per strategy, 20,000 in all).
"""

from __future__ import annotations

import os
import pickletools
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
CI_EXAMPLES = 150
LONG_EXAMPLES = int(os.environ.get("VMZCONV_FUZZ_EXAMPLES", "5000"))


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


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.pkl", Path(tmp) / "out.pth"
        src.write_bytes(data)
        t0 = time.perf_counter()
        with pytest.raises(VmzconvError):
            convert(src, out, check_parity=False, card=False)
        assert time.perf_counter() - t0 < 5.0
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["in.pkl"]


STRATEGIES = {"truncate": truncated(), "bitflip": bit_flipped(), "splice": spliced(), "opcode": opcode_mutated()}


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
