"""The safe reader: genuine Python-2 files, Python-3 pickles, and what it refuses."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from vmzconv import synth
from vmzconv.blobs import read_blobs

from .conftest import blobs_from_bytes
from vmzconv.errors import InputError, UnsafePickleError, VmzconvError

from .conftest import FIXTURES

PY2 = FIXTURES / "py2"


def py2_expected() -> dict[str, np.ndarray]:
    """The closed forms of tests/fixtures/py2/make_py2_fixtures.py, recomputed here."""
    return {
        "conv1_w": (np.arange(2 * 3 * 3 * 7 * 7, dtype=np.float64) * 0.001 - 0.3).astype(np.float32).reshape(2, 3, 3, 7, 7),
        "conv1_spatbn_relu_s": np.linspace(0.5, 1.5, 2).astype(np.float32),
        "conv1_spatbn_relu_riv": np.array([1.25, 0.75], dtype=np.float32),
        "last_out_L5_w": np.sin(np.arange(15, dtype=np.float64)).reshape(5, 3).astype(np.float32),
        "fortran_w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ITER": np.array([123456789012], dtype=np.int64),
        "comp_0_conv_1_w_momentum": np.full((2, 2), -1.5, dtype=np.float32),
    }


@pytest.mark.parametrize("name", ["py27_np116_proto0.pkl", "py27_np116_proto1.pkl", "py27_np116_proto2.pkl",
                                  "py27_np116_bare_proto2.pkl"])
def test_genuine_python2_files_load_bit_exactly(name):
    blobs = read_blobs(PY2 / name)
    expected = py2_expected()
    assert sorted(blobs.names()) == sorted(expected)
    for key, want in expected.items():
        got = blobs[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key          # bit-exact
    assert any("float64 cast to float32" in n for n in blobs.notes)
    assert any("gpu_0/comp_0_conv_1_w_momentum" in n for n in blobs.notes)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_python3_pickles_of_every_protocol(protocol):
    arrays = {"a_w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.array([1.5, -2.0]),
              "big": np.linspace(-1, 1, 5000, dtype=np.float32), "f": np.asfortranarray(np.eye(3, 4, dtype=np.float32)),
              "i": np.array([7], dtype=np.int32)}
    blobs = blobs_from_bytes(pickle.dumps({"blobs": arrays}, protocol=protocol), "py3.pkl")
    for key, want in arrays.items():
        want = want.astype(np.float32) if want.dtype == np.float64 else want
        np.testing.assert_array_equal(blobs[key], want)
        assert blobs[key].dtype == want.dtype


def test_py2_writer_matches_what_pickle_itself_reads():
    arrays = synth.seeded_blobs("ircsn", 50)
    data = synth.dumps_py2({"blobs": arrays})
    assert data[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in data
    via_pickle = pickle.loads(data, encoding="latin1")["blobs"]
    ours = blobs_from_bytes(data, "x.pkl")
    assert len(ours) == len(via_pickle) == 267
    for key, arr in via_pickle.items():
        assert ours[key].tobytes() == arr.tobytes()


def test_variants_scoped_leftovers_float64_and_bare_dict():
    arrays = {"gpu_0/conv1_w": np.ones((2, 2), np.float64), "gpu_0/ITER": np.array([3], np.int64)}
    for wrap in (True, False):
        data = synth.dumps_py2({"blobs": arrays} if wrap else arrays)
        blobs = blobs_from_bytes(data, "v.pkl")
        assert blobs.names() == ["conv1_w", "ITER"]
        assert blobs["conv1_w"].dtype == np.float32 and (blobs["conv1_w"] == 1).all()
        assert any("float64 cast" in n for n in blobs.notes)
        assert any("scope prefixes stripped" in n for n in blobs.notes)


def test_two_blobs_that_unscope_to_one_name_are_an_error_naming_both():
    """A zeroed duplicate classifier under a scope must not be silently preferred (both sides would use it)."""
    arrays = {"gpu_0/last_out_L400_w": np.zeros((2, 2), np.float32), "last_out_L400_w": np.ones((2, 2), np.float32)}
    with pytest.raises(InputError, match=r"'gpu_0/last_out_L400_w' and 'last_out_L400_w' both name 'last_out_L400_w'"):
        blobs_from_bytes(synth.dumps_py2({"blobs": arrays}), "dup.pkl")


def _refused(data: bytes, *fragments, kind=UnsafePickleError):
    with pytest.raises(kind) as info:
        blobs_from_bytes(data, "evil.pkl")
    for frag in fragments:
        assert frag in str(info.value)
    return info.value


def test_os_system_global_is_refused_and_never_called(tmp_path):
    canary = tmp_path / "canary"
    payload = f"touch {canary}".encode()
    data = b"\x80\x02cos\nsystem\n" + b"U" + bytes([len(payload)]) + payload + b"\x85R."
    _refused(data, "os.system", "allowlist")
    assert not canary.exists()
    # the same bytes really are an attack: the stdlib would have run it
    pickle.loads(data)
    assert canary.exists()


def test_builtins_eval_via_stack_global_is_refused(monkeypatch):
    monkeypatch.delenv("VMZCONV_CANARY", raising=False)
    code = "__import__('os').environ.__setitem__('VMZCONV_CANARY', '1')"
    data = pickle.dumps(None, protocol=4)[:2] + b"\x8c\x08builtins\x8c\x04eval\x93" + \
        b"\x8c" + bytes([len(code)]) + code.encode() + b"\x85R."
    _refused(data, "builtins.eval")
    assert "VMZCONV_CANARY" not in os.environ


@pytest.mark.parametrize("code,state,fragment", [
    ("f4", (3, ">", None, None, None, -1, -1, 0), "byte order"),
    ("O8", (3, "|", None, None, None, -1, -1, 63), "'O8' refused"),
    ("V8", (3, "|", None, ("a",), {"a": 1}, 8, 1, 16), "'V8' refused"),
    ("f4", (3, "<", None, ("a",), {"a": 1}, -1, -1, 0), "structured"),
    ("f4", (3, "<", None, None, None, 8, -1, 0), "inconsistent"),
])
def test_crafted_dtypes_are_refused(code, state, fragment):
    _refused(one_array(code.encode(), state), fragment)


def one_array(code: bytes, dtype_state: tuple, raw: bytes = bytes(8), shape: bytes = b"K\x02\x85") -> bytes:
    """A py2-style pickle {'x': ndarray} with a chosen dtype code and dtype state."""
    state = pickle.dumps(dtype_state, protocol=2)[2:-1]
    return (b"\x80\x02}U\x01xcnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01" + shape + b"cnumpy\ndtype\nU" + bytes([len(code)]) + code + b"K\x00K\x01\x87R"
            + state + b"b\x89T" + struct.pack("<i", len(raw)) + raw + b"tbs.")


def test_one_array_helper_is_valid_when_the_dtype_is():
    blobs = blobs_from_bytes(one_array(b"f4", (3, "<", None, None, None, -1, -1, 0)), "ok.pkl")
    assert blobs["x"].tolist() == [0.0, 0.0]


def test_declared_shape_must_match_the_bytes():
    data = synth.dumps_py2({"x": np.zeros((2, 3), np.float32)})
    bad = data.replace(b"K\x02K\x03\x86", b"K\x04K\x03\x86")
    err = _refused(bad, "'x'", "[4, 3]", "needs 48 bytes", "holds 24", kind=InputError)
    assert isinstance(err, VmzconvError)


def test_truncated_file_is_an_input_error():
    data = synth.dumps_py2(synth.seeded_blobs("ircsn", 50))
    for cut in (1, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(InputError, match="truncated|not a readable"):
            blobs_from_bytes(data[:cut], "t.pkl")
