"""Write VMZ-format checkpoints the way Caffe2's Python 2 tools did.

``minidb_to_pickle.py`` ran under Python 2 and wrote ``{"blobs": {name: ndarray}}``
with cPickle protocol 2. Python 3's pickler cannot produce that byte stream
(py2 ``str`` keys and array data become SHORT_BINSTRING/BINSTRING; arrays go
through ``numpy.core.multiarray._reconstruct`` and a ``numpy.dtype`` REDUCE +
BUILD), so this module emits the opcodes directly. It powers the demo and the
tests; no real VMZ file is needed anywhere.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from . import reference


class _Py2Writer:
    """Emits py2 cPickle protocol-2 opcodes, memoising like cPickle."""

    def __init__(self, out: io.BufferedIOBase):
        self.out = out
        self.memo: dict[object, int] = {}

    def w(self, b: bytes) -> None:
        self.out.write(b)

    def put(self, key=None) -> None:
        idx = len(self.memo)
        self.memo[key if key is not None else ("anon", idx)] = idx
        self.w(b"q" + struct.pack("<B", idx) if idx < 256 else b"r" + struct.pack("<I", idx))

    def get(self, key) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        self.w(b"h" + struct.pack("<B", idx) if idx < 256 else b"j" + struct.pack("<I", idx))
        return True

    def string(self, s: bytes, memo: bool = True) -> None:
        key = ("str", s)
        if memo and len(s) < 64 and self.get(key):
            return
        if len(s) < 256:
            self.w(b"U" + struct.pack("<B", len(s)) + s)
        else:
            self.w(b"T" + struct.pack("<i", len(s)) + s)
        self.put(key if memo and len(s) < 64 else None)

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.w(b"K" + struct.pack("<B", v))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        else:
            self.w(b"J" + struct.pack("<i", v))

    def global_(self, module: str, name: str) -> None:
        key = ("global", module, name)
        if self.get(key):
            return
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        self.put(key)

    def tuple(self, items) -> None:
        items = list(items)
        if 1 <= len(items) <= 3:
            for it in items:
                self.value(it)
            self.w(b"\x84\x85\x86\x87"[len(items):len(items) + 1])
        elif not items:
            self.w(b")")
        else:
            self.w(b"(")
            for it in items:
                self.value(it)
            self.w(b"t")
        self.put()

    def value(self, v) -> None:
        if v is None:
            self.w(b"N")
        elif isinstance(v, bool):
            self.w(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            self.int(v)
        elif isinstance(v, bytes):
            self.string(v)
        elif isinstance(v, tuple):
            self.tuple(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        else:
            raise TypeError(type(v))

    def dtype(self, dt: np.dtype) -> None:
        self.global_("numpy", "dtype")
        self.tuple((dt.str[1:].encode(), 0, 1))
        self.w(b"R")
        self.put()
        self.tuple((3, b"<", None, None, None, -1, -1, 0))
        self.w(b"b")

    def array(self, a: np.ndarray) -> None:
        fortran = a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.tuple((0,))
        self.string(b"b")
        self.w(b"\x87")  # TUPLE3: (ndarray, (0,), 'b')
        self.put()
        self.w(b"R")
        self.put()
        self.w(b"(")
        self.int(1)
        self.tuple(a.shape)
        self.dtype(a.dtype.newbyteorder("<"))
        self.value(bool(fortran))
        raw = (a.T if fortran else a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        self.string(raw, memo=False)
        self.w(b"t")
        self.put()
        self.w(b"b")

    def dict(self, d: dict) -> None:
        self.w(b"}")
        self.put()
        items = list(d.items())
        for start in range(0, len(items), 1000):  # cPickle's BATCHSIZE
            chunk = items[start:start + 1000]
            if len(chunk) > 1:
                self.w(b"(")
            for k, v in chunk:
                self.string(k.encode("latin-1"))
                if isinstance(v, dict):
                    self.dict(v)
                else:
                    self.value(v)
            self.w(b"u" if len(chunk) > 1 else b"s")


def dumps_py2(obj: dict) -> bytes:
    """``obj`` (a dict of str -> ndarray, or {"blobs": {...}}) as py2 cPickle protocol 2."""
    buf = io.BytesIO()
    writer = _Py2Writer(buf)
    buf.write(b"\x80\x02")
    writer.dict(obj)
    buf.write(b".")
    return buf.getvalue()


def write_vmz_pickle(path: str | Path, arrays: dict[str, np.ndarray], wrap: bool = True) -> Path:
    """Write ``arrays`` as a VMZ checkpoint (``{"blobs": arrays}`` unless ``wrap=False``)."""
    path = Path(path)
    path.write_bytes(dumps_py2({"blobs": arrays} if wrap else arrays))
    return path


def seeded_blobs(family: str, depth: int, classes: int = 400, seed: int = 0,
                 conv1_kt: int | None = None, in_channels: int = 3, gblend: bool = True) -> dict[str, np.ndarray]:
    """Random but well-scaled VMZ blobs: He-scaled convs, BN near identity, positive variances (``in_channels``
    2: an optical-flow model's stem; ``gblend``: an audio-visual model's G-Blend heads)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in reference.blob_specs(family, depth, classes, conv1_kt, gblend=gblend, in_channels=in_channels):
        role = reference.blob_role(name)
        if role in ("conv_weight", "fc_weight"):
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif role == "bn_s":
            a = rng.uniform(0.5, 1.0, shape)
        elif role == "bn_riv":
            a = rng.uniform(0.5, 2.0, shape)
        else:  # BN running mean, BN and FC bias
            a = rng.normal(0.0, 0.1, shape)
        out[name] = a.astype(np.float32)
    return out


def tone_frames(n: int, w: int = 160, h: int = 120, seed: int = 0) -> np.ndarray:
    """n RGB frames [n, h, w, 3] uint8: a moving gradient with noise (the demo's video)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        wave = 0.5 + 0.5 * np.sin((x + 3 * t) / 7.0 + (y - 2 * t) / 5.0)
        img = wave[..., None] * np.array([200, 120, 60], np.float32) + rng.normal(0, 8, (h, w, 3))
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_video_with_audio(path: str | Path, rgb: np.ndarray, samples: np.ndarray | None, fps: int = 25,
                           sample_rate: int = 44100, codec: str = "aac") -> Path:
    """An MP4 (mpeg4 video) with an audio track: ``codec`` "aac" (stereo, both channels ``samples``) or
    "pcm_s16le" (mono; in a .mov or .mkv); ``samples`` None writes no audio stream."""
    import av

    path = Path(path)
    n, h, w, _ = rgb.shape
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = None
        if samples is not None:
            audio = container.add_stream(codec, rate=sample_rate)
            audio.layout = "stereo" if codec == "aac" else "mono"
        for img in rgb:
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            x = np.asarray(samples, np.float32)
            for start in range(0, len(x), 1024):
                part = x[start:start + 1024]
                if codec == "aac":
                    frame = av.AudioFrame.from_ndarray(np.stack([part, part]), format="fltp", layout="stereo")
                else:
                    frame = av.AudioFrame.from_ndarray((np.clip(part, -1, 1) * 32767).astype(np.int16)[None],
                                                       format="s16", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path
