"""Read a VMZ Caffe2 ``.pkl`` into named float32 arrays, safely.

The file is interpreted by :mod:`vmzconv.picklevm` (no code runs); each array
record it yields is validated here (little-endian float32/float64/int32/int64,
byte count equal to shape x itemsize, C or Fortran order) and built with
``np.frombuffer`` over the file's own bytes.
"""

from __future__ import annotations

import hashlib
import math
import reprlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import picklevm
from .errors import InputError, UnsafePickleError

_DTYPES = {"f4": np.dtype("<f4"), "f8": np.dtype("<f8"), "i4": np.dtype("<i4"), "i8": np.dtype("<i8")}
_MAX_ELEMENTS = 1 << 40
_MAX_DIMS = 32
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxtuple, _SHORT.maxstring, _SHORT.maxother = 3, 8, 40, 40


def short_repr(value) -> str:
    """A bounded repr of attacker data: never recurses deeper than 3 levels, never longer than a line."""
    return _SHORT.repr(value)


@dataclass
class Blobs:
    """Unscoped blob name -> array, with what the reader noticed on the way."""

    source: str
    arrays: dict[str, np.ndarray]
    sha256: str = ""
    size: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def names(self) -> list[str]:
        return list(self.arrays)


class _HashingReader:
    """Reads a file sequentially and hashes every byte that passes, on a second thread.

    hashlib releases the GIL for large updates, so hashing the (100+ MB) input
    overlaps with interpreting it. Small reads are batched; the buffers handed
    over are never modified afterwards.
    """

    _BATCH = 1 << 20

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vmzconv-sha256")
        self.small = bytearray()
        self.jobs = []

    _MAX_PENDING = 16        # at most ~16 MiB waiting for the hashing thread: the queue never outgrows it

    def _hash(self, data) -> None:
        self.jobs.append(self.pool.submit(self.sha.update, data))
        if len(self.jobs) > self._MAX_PENDING:
            self.jobs.pop(0).result()

    def _flush(self) -> None:
        if self.small:
            self._hash(bytes(self.small))
            self.small.clear()

    def _update(self, data) -> None:
        if len(data) >= 1 << 16:
            self._flush()
            self._hash(data)
        else:
            self.small += data
            if len(self.small) >= self._BATCH:
                self._flush()

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self._update(b)
        return b

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self._update(buf if n == len(buf) else bytes(memoryview(buf)[:n]))
        return n

    def readline(self, limit: int) -> bytes:
        b = self.f.readline(limit)
        self._update(b)
        return b

    def finish(self) -> str:
        """Hash the rest of the file (bytes after STOP count too) and return the digest."""
        while chunk := self.f.read(self._BATCH):
            self._update(chunk)
        return self.close()

    def close(self) -> str:
        self._flush()
        for job in self.jobs:
            job.result()
        self.pool.shutdown()
        return self.sha.hexdigest()


def read_blobs(path: str | Path, max_bytes: int | None = None) -> Blobs:
    """Read ``path`` (a Python-2 or Python-3 pickle of Caffe2 blobs), streaming: the file is read once.

    Array memory beyond the file's own bytes (float64 casts, Fortran-order copies) is counted, and
    the read is refused before it passes ``max_bytes`` (default: 4 x the file size)."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _sniff_wrong_file(f.read(4096), source, f)
            f.seek(0)
            reader = _HashingReader(f)
            try:
                budget = picklevm.Budget(source, max_bytes if max_bytes is not None else 4 * size)
                top = picklevm.load_stream(reader, size, source, budget)
                if f.read(1):          # STOP is the end of the file: appended data is refused, not hashed
                    raise InputError(f"{source}: {size - f.tell() + 1} bytes after the pickle's end (STOP) — "
                                     "appended data or a second pickle; refused")
                sha = reader.finish()
            finally:
                reader.close()
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a folder, not a file") from None
    except OSError as e:
        raise InputError(f"{source}: cannot read: {e.strerror or e}") from None
    blobs = _to_blobs(top, source, budget)
    blobs.sha256, blobs.size = sha, size
    return blobs


def _to_blobs(top, source: str, budget: picklevm.Budget) -> Blobs:
    raw = _blob_dict(top, source)
    notes: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in raw.items():
        name = key.rsplit("/", 1)[-1]
        if name in arrays:
            raise InputError(f"{source}: blobs {origin[name]!r} and {key!r} both name {name!r} once scopes are "
                             "stripped — which one the model uses is ambiguous")
        origin[name] = key
        if name != key:
            notes.append(f"scope stripped: {key!r} -> {name!r}")
        arr = _array(value, name, source, budget)
        if arr.dtype == np.float64:
            budget.take(arr.size * 4, f"blob {name!r} (float64 cast)")
            arr = arr.astype(np.float32)
            notes.append(f"{name}: float64 cast to float32")
        arrays[name] = arr
    return Blobs(source=source, arrays=arrays, notes=_summarise(notes))


def _summarise(notes: list[str]) -> list[str]:
    """Collapse per-blob notes of the same kind so a report stays short."""
    scoped = [n for n in notes if n.startswith("scope stripped")]
    rest = [n for n in notes if not n.startswith("scope stripped")]
    if scoped:
        rest.insert(0, f"scope prefixes stripped from {len(scoped)} blob names (e.g. {scoped[0][16:]})")
    return rest


def _blob_dict(top, source: str) -> dict:
    if not isinstance(top, dict):
        raise InputError(f"{source}: the pickle holds a {type(top).__name__}, not a dict of blobs")
    for key in ("blobs", b"blobs"):
        if key in top:
            top = top[key]
            if not isinstance(top, dict):
                raise InputError(f"{source}: 'blobs' holds a {type(top).__name__}, not a dict")
            break
    out = {}
    for key, value in top.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if not isinstance(key, str):
            raise InputError(f"{source}: blob key {key!r} is not a string")
        out[key] = value
    _sniff_wrong_dict(out, source)
    return out


def _array(value, name: str, source: str, budget: picklevm.Budget) -> np.ndarray:
    if not isinstance(value, picklevm.ArrayStub):
        raise InputError(f"{source}: blob {name!r} is a {type(value).__name__}, not a numpy array")
    where = f"{source}: blob {name!r}"
    if not value.built:
        raise UnsafePickleError(f"{where}: ndarray without state")
    dtype = _dtype(value.dtype, where)
    shape = value.shape
    if len(shape) > _MAX_DIMS:
        raise UnsafePickleError(f"{where}: {len(shape)} dimensions (at most {_MAX_DIMS})")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_ELEMENTS for d in shape):
        raise UnsafePickleError(f"{where}: bad shape {short_repr(shape)}")
    count = math.prod(shape)
    if count > _MAX_ELEMENTS:
        raise UnsafePickleError(f"{where}: shape {shape} declares {count} elements")
    buf = _buffer(value.data, where)
    budget.take(len(buf), f"blob {name!r}")
    if len(buf) != count * dtype.itemsize:
        raise InputError(
            f"{where}: shape {list(shape)} x {dtype.itemsize} bytes needs {count * dtype.itemsize} bytes, "
            f"the file holds {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=dtype)
    if value.fortran and len(shape) > 1:
        budget.take(len(buf), f"blob {name!r}")
        return np.ascontiguousarray(arr.reshape(shape[::-1]).T)
    return arr.reshape(shape)


def _dtype(stub, where: str) -> np.dtype:
    if not isinstance(stub, picklevm.DtypeStub):
        raise UnsafePickleError(f"{where}: dtype is not a numpy.dtype record")
    code = stub.code
    if code not in _DTYPES:
        raise UnsafePickleError(
            f"{where}: dtype {code!r} refused (only little-endian float32/float64/int32/int64 are read)"
        )
    state = stub.state
    if state is None:
        raise UnsafePickleError(f"{where}: dtype {code!r} without state")
    if len(state) not in (8, 9) or state[0] not in (3, 4):
        raise UnsafePickleError(f"{where}: dtype {short_repr(code)} has an unexpected state {short_repr(state)}")
    order, subarray, names, fields, elsize, align, flags = state[1:8]
    if order not in ("<", "="):
        raise UnsafePickleError(f"{where}: dtype {code!r} byte order {short_repr(order)} refused (little-endian only)")
    if subarray is not None or names is not None or fields is not None:
        raise UnsafePickleError(f"{where}: structured or sub-array dtype refused")
    if elsize != -1 or align != -1 or flags != 0 or (len(state) == 9 and state[8] is not None):
        raise UnsafePickleError(f"{where}: dtype {code!r} with inconsistent size/alignment/flags refused")
    return _DTYPES[code]


def _buffer(data, where: str):
    if isinstance(data, picklevm.Raw):
        return data.buf
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        try:
            return data.encode("latin-1")
        except UnicodeEncodeError:
            raise InputError(f"{where}: array data is not a byte string") from None
    if isinstance(data, list):
        raise UnsafePickleError(f"{where}: array data is a list (object array) — refused")
    raise UnsafePickleError(f"{where}: array data is a {type(data).__name__}")


def _sniff_wrong_file(data: bytes, source: str, f) -> None:
    """Name the common wrong downloads (``data`` is the file's head) before interpreting them."""
    if not data:
        raise InputError(f"{source}: the file is empty")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in head[:256]:
        raise InputError(f"{source}: this looks like an HTML page, not a pickle — was the download a web page?")
    if data[:4] == b"PK\x03\x04":
        try:
            f.seek(0)
            names = zipfile.ZipFile(f).namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n.endswith("data.pkl") for n in names):
            raise InputError(
                f"{source}: this is a PyTorch checkpoint (torch.save zip), not a Caffe2 pickle — "
                "it may already be converted; `vmzconv parity`/`verify` read .pth files"
            )
        if any(n.endswith(".npy") for n in names):
            raise InputError(f"{source}: this is a numpy .npz archive, not a Caffe2 pickle")
        raise InputError(f"{source}: this is a zip archive, not a Caffe2 pickle")
    if data[:14] == b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19":
        raise InputError(f"{source}: this is a legacy PyTorch checkpoint (torch.save), not a Caffe2 pickle")
    if data[:2] == b"\x1f\x8b":
        raise InputError(f"{source}: this is a gzip file, not a pickle — decompress it first (gunzip)")
    if len(data) > 9 and data[8:10] in (b'{"', b"{ ") and int.from_bytes(data[:8], "little") < (1 << 27):
        raise InputError(f"{source}: this is a safetensors file (a converted checkpoint?), not a Caffe2 pickle — "
                         "`vmzconv parity`/`verify` read it")
    if data[:6] == b"\x93NUMPY":
        raise InputError(f"{source}: this is a numpy .npy file, not a Caffe2 pickle")
    if data[:1] not in b"\x80(}]cKJI" and _looks_like_text(data[:512]):
        raise InputError(f"{source}: this is a text file, not a pickle")


def _looks_like_text(chunk: bytes) -> bool:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _sniff_wrong_dict(blobs: dict, source: str) -> None:
    keys = set(blobs)
    if {"state_dict", "meta"} & keys or any(k.startswith(("backbone.", "module.")) for k in keys):
        raise InputError(f"{source}: this is a PyTorch/MMAction2 state dict, not a Caffe2 pickle")
