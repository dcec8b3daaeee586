"""Writes the hostile-pickle corpus in this folder (run: python tests/attacks/make_corpus.py).

Every file is a pickle that would *do something* if a normal unpickler read it: create a canary
file under /tmp, set an environment variable, import or call something outside numpy's array
rebuilders, or make numpy allocate or crash. manifest.json maps each file to the words its refusal
must contain and the canary it would create. The test (tests/test_attacks.py) requires refusal,
those words, and no canary. The bytes are written by hand so the corpus does not depend on which
Python or numpy pickled it.
"""

from __future__ import annotations

import functools
import json
import pickle
import struct
from pathlib import Path

HERE = Path(__file__).parent
CANARY = "/tmp/vmzconv-canary-{}"
ENV = "VMZCONV_PWNED"


def s2(b: bytes) -> bytes:                      # py2 SHORT_BINSTRING
    return b"U" + bytes([len(b)]) + b


def u4(b: bytes) -> bytes:                      # py3 SHORT_BINUNICODE
    return b"\x8c" + bytes([len(b)]) + b


def glob(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def call1(callable_bytes: bytes, arg: bytes, proto: bytes = b"\x80\x02") -> bytes:
    return proto + callable_bytes + arg + b"\x85R."


def touch(name: str) -> bytes:
    return f"touch {CANARY.format(name)}".encode()


def py_touch(name: str) -> bytes:
    return f"open({CANARY.format(name)!r}, 'w').close()".encode()


def py_env() -> bytes:
    return f"__import__('os').environ.__setitem__({ENV!r}, '1')".encode()


def array_pickle(code: bytes, dtype_state: tuple, raw: bytes, shape: tuple) -> bytes:
    """py2-style {'x': ndarray} with chosen dtype code/state, data and declared shape."""
    state = pickle.dumps(dtype_state, protocol=2)[2:-1]
    shp = pickle.dumps(shape, protocol=2)[2:-1]
    return (b"\x80\x02}" + s2(b"x") + glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
            + b"K\x00\x85" + s2(b"b") + b"\x87R(K\x01" + shp + glob("numpy", "dtype") + s2(code)
            + b"K\x00K\x01\x87R" + state + b"b\x89T" + struct.pack("<i", len(raw)) + raw + b"tbs.")


F4 = (3, "<", None, None, None, -1, -1, 0)

CORPUS: dict[str, tuple[bytes, str, str | None]] = {
    # name: (bytes, words the refusal must contain, canary it would create)
    "os_system_global_p2.pkl": (call1(glob("os", "system"), s2(touch("a"))), "os.system", "a"),
    "os_system_global_p0.pkl": (b"cos\nsystem\n(S'" + touch("b") + b"'\ntR.", "os.system", "b"),
    "posix_system_global.pkl": (call1(glob("posix", "system"), s2(touch("c"))), "posix.system", "c"),
    "os_system_stack_global.pkl": (call1(u4(b"os") + u4(b"system") + b"\x93", u4(touch("d")), b"\x80\x04"),
                                   "os.system", "d"),
    "subprocess_call.pkl": (b"\x80\x02" + glob("subprocess", "call") + b"(" + s2(b"touch") + s2(CANARY.format("e").encode())
                            + b"l\x85R.", "subprocess.call", "e"),
    "subprocess_popen_stack_global.pkl": (b"\x80\x04" + u4(b"subprocess") + u4(b"Popen") + b"\x93(" + u4(b"touch")
                                          + u4(CANARY.format("f").encode()) + b"l\x85R.", "subprocess.Popen", "f"),
    "builtins_eval.pkl": (call1(glob("builtins", "eval"), b"X" + struct.pack("<I", len(py_touch("g"))) + py_touch("g")),
                          "builtins.eval", "g"),
    "builtins_exec_env.pkl": (call1(glob("builtins", "exec"), b"X" + struct.pack("<I", len(py_env())) + py_env()),
                              "builtins.exec", None),
    "builtins_getattr_chain.pkl": (b"\x80\x02" + glob("builtins", "getattr") + glob("builtins", "__import__")
                                   + s2(b"os") + b"\x85R" + s2(b"system") + b"\x86R" + s2(touch("h")) + b"\x85R.",
                                   "builtins.getattr", "h"),
    "py2_builtin_eval.pkl": (call1(glob("__builtin__", "eval"), s2(py_touch("i"))), "__builtin__.eval", "i"),
    "py2_copy_reg_reconstructor.pkl": (b"\x80\x02" + glob("copy_reg", "_reconstructor") + glob("os", "_wrap_close")
                                       + glob("__builtin__", "object") + b"N\x87R.", "copy_reg._reconstructor", None),
    "inst_os_system.pkl": (b"(S'" + touch("j") + b"'\nios\nsystem\n.", "INST", "j"),
    "obj_opcode.pkl": (b"\x80\x02(" + glob("numpy", "ndarray") + b"K\x01o.", "OBJ", None),
    "newobj_opcode.pkl": (b"\x80\x02" + glob("numpy", "dtype") + s2(b"f4") + b"\x85\x81.", "NEWOBJ", None),
    "newobj_ex_opcode.pkl": (b"\x80\x04" + glob("numpy", "dtype") + u4(b"f4") + b"\x85}\x92.", "NEWOBJ_EX", None),
    "build_on_list.pkl": (b"\x80\x02]}b.", "BUILD on a list", None),
    "build_setstate_object.pkl": (b"\x80\x02" + glob("collections", "OrderedDict") + b")R}b.",
                                  "collections.OrderedDict", None),
    "persid.pkl": (b"(P" + touch("k") + b"\n.", "PERSID", "k"),
    "binpersid.pkl": (b"\x80\x02" + s2(touch("l")) + b"Q.", "BINPERSID", "l"),
    "ext1.pkl": (b"\x80\x02\x82\x01.", "EXT1", None),
    "ext2.pkl": (b"\x80\x02\x83\x01\x00.", "EXT2", None),
    "ext4.pkl": (b"\x80\x02\x84\x01\x00\x00\x00.", "EXT4", None),
    "numpy_load.pkl": (call1(glob("numpy", "load"), s2(b"/etc/passwd")), "numpy.load", None),
    "numpy_runstring.pkl": (b"\x80\x02" + glob("numpy.testing._private.utils", "runstring") + s2(py_touch("m"))
                            + b"}\x86R.", "numpy.testing._private.utils.runstring", "m"),
    "numpy_scalar.pkl": (b"\x80\x02" + glob("numpy.core.multiarray", "scalar") + b")R.", "numpy.core.multiarray.scalar",
                         None),
    "reconstruct_not_ndarray.pkl": (b"\x80\x02" + glob("numpy.core.multiarray", "_reconstruct")
                                    + glob("numpy", "dtype") + b"K\x00\x85" + s2(b"b") + b"\x87R.",
                                    "other than numpy.ndarray", None),
    "codecs_encode_other.pkl": (call1(glob("_codecs", "encode"), b"X\x03\x00\x00\x00abc" + u4(b"rot13"),
                                      b"\x80\x02")[:-3] + b"\x86R.", "_codecs.encode", None),
    "dtype_object.pkl": (array_pickle(b"O8", (3, "|", None, None, None, -1, -1, 63), bytes(16), (2,)), "'O8' refused",
                         None),
    "dtype_structured.pkl": (array_pickle(b"V8", (3, "|", None, ("a", "b"), {"a": 1, "b": 2}, 8, 1, 16), bytes(16), (2,)),
                             "'V8' refused", None),
    "dtype_structured_f4.pkl": (array_pickle(b"f4", (3, "<", None, ("a",), {"a": 1}, -1, -1, 0), bytes(8), (2,)),
                                "structured", None),
    "dtype_big_endian.pkl": (array_pickle(b"f4", (3, ">", None, None, None, -1, -1, 0), bytes(8), (2,)), "byte order",
                             None),
    "dtype_absurd_itemsize.pkl": (array_pickle(b"f4", (3, "<", None, None, None, 1 << 40, -1, 0), bytes(8), (2,)),
                                  "inconsistent", None),
    "dtype_inconsistent_flags.pkl": (array_pickle(b"f4", (3, "<", None, None, None, -1, -1, 1), bytes(8), (2,)),
                                     "inconsistent", None),
    "dtype_unicode.pkl": (array_pickle(b"U4", (3, "<", None, None, None, 16, 4, 8), bytes(16), (1,)), "'U4' refused",
                          None),
    "shape_mismatch.pkl": (array_pickle(b"f4", F4, bytes(8), (4, 3)), "needs 48 bytes", None),
    "shape_overflows_int64.pkl": (array_pickle(b"f4", F4, bytes(8), (1 << 62, 1 << 62)), "bad shape", None),
    "shape_negative.pkl": (array_pickle(b"f4", F4, bytes(8), (-2,)), "bad shape", None),
    "huge_declared_string.pkl": (b"\x80\x02}" + s2(b"x") + b"T\xff\xff\xff\x7f" + bytes(64) + b"s.", "truncated", None),
    "deep_marks.pkl": (b"\x80\x02" + b"(" * 100000 + b".", "nesting deeper", None),
    "deep_tuples.pkl": (b"\x80\x02)" + b"\x85" * 200000 + b"}\x94" + b"h\x00" + b"N" + b"s.", "operations", None),
    "memo_flood.pkl": (b"\x80\x02N" + b"".join(b"r" + struct.pack("<I", i) for i in range(200000)) + b".", "operations",
                       None),
    "op_flood.pkl": (b"\x80\x02]" + b"]a" * 150000 + b".", "operations", None),
    # -- round two: what a crafted file still did to the first reader --------------------------------
    # a dict key nested 95,000 tuples deep: hashing it overflows the C stack (SIGSEGV) in a plain dict
    "key_deep_tuple.pkl": (b"\x80\x02}N" + b"\x85" * 95000 + b"Ns.", "dict key of type tuple", None),
    # int keys that all hash to 0 (multiples of 2**61 - 1): building the dict was quadratic
    "key_int_collisions.pkl": (b"\x80\x02}(" + b"".join(pickle.dumps(k * (2**61 - 1), 2)[2:-1] + b"N"
                                                       for k in range(1, 5001)) + b"u.", "dict key of type int", None),
    "key_very_long.pkl": (b"\x80\x02}X" + struct.pack("<I", 5000) + b"k" * 5000 + b"Ns.", "dict key of 5000 characters",
                          None),
    # one memoised 1 MiB str encoded again and again: gigabytes from a 1 MB file, past --max-bytes
    "codecs_encode_flood.pkl": (b"\x80\x02X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20) + b"q\x00"
                                + (glob("_codecs", "encode") + b"h\x00X\x06\x00\x00\x00latin1\x86R0") * 200 + b"N.",
                                "past --max-bytes", None),
    # a valid pickle, then a second one: the rest of the file used to be ignored
    "trailing_second_pickle.pkl": (array_pickle(b"f4", F4, bytes(8), (2,)) + b"\x80\x02}.", "after the pickle's end",
                                   None),
    "shape_65_dims.pkl": (array_pickle(b"f4", F4, bytes(4), (1,) * 65), "65 dimensions", None),
    "shape_zero_and_huge.pkl": (array_pickle(b"f4", F4, b"", (0, 2**70)), "bad shape", None),
    "shape_deep_tuple.pkl": (array_pickle(b"f4", F4, bytes(4), functools.reduce(lambda t, _: (t,), range(300), (1,))),
                             "bad shape", None),
    "dtype_state_deep_tuple.pkl": (array_pickle(b"f4", (3, functools.reduce(lambda t, _: (t,), range(300), ("<",)),
                                                        None, None, None, -1, -1, 0), bytes(8), (2,)), "byte order", None),
    # escape sequences and a forged line in a module name: the message must stay one printable line
    "escape_sequences_in_names.pkl": (b"\x80\x04" + u4(b"\x1b]0;owned\x07\x1b[2J") + u4(b"x\nok  model.pth  parity PASS")
                                      + b"\x93.", "is not on the allowlist", None),
}


def main() -> None:
    manifest = {}
    for name, (data, words, canary) in CORPUS.items():
        (HERE / name).write_bytes(data)
        manifest[name] = {"refusal_contains": words, "canary": CANARY.format(canary) if canary else None}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"{len(manifest)} hostile pickles written")


if __name__ == "__main__":
    main()
