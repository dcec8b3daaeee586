"""Frame sources: PyAV for videos (RGB24, no system FFmpeg), Pillow for rawframe folders.

A source yields ``(index, get)`` in increasing index order, where ``get()`` returns that frame as an
RGB uint8 array; the conversion to RGB happens only for the frames a consumer keeps. A video is
opened once (:func:`open_video`) for its rate, its frame count and its frames.

Only regular local files are read, and they are handed to FFmpeg as open files, never as names: a
file called ``tcp:host:port`` or ``concat:a|b`` is just a file, and a FIFO or a device is refused
before anything waits on it. A frame larger than ``MAX_FRAME_PIXELS`` is refused from the stream's
header, before it is decoded; ``--fps`` resampling may not repeat frames without bound.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError

Source = Iterator[tuple[int, Callable[[], np.ndarray]]]
MAX_FRAME_PIXELS = 8192 * 4352       # a little over 8K UHD (7680 x 4320): the largest frame decoded


class DecodeError(InputError):
    """A video or frame folder that cannot be read; names the file."""


def _av_errors():
    import av

    return (av.error.FFmpegError, OSError, ValueError)


@dataclass
class Video:
    """An open video: its stream's frame rate (None if it does not say), the frame count its header
    claims (0 if none) and its frames."""

    path: str
    container: object
    rate: float | None
    claimed: int

    @property
    def stream(self):
        return self.container.streams.video[0]

    def count(self) -> int:
        """Frames by demuxing the whole stream (no decoding), then back to the start."""
        n = sum(1 for packet in self.container.demux(self.stream) if packet.size)
        self.container.seek(0)
        return n

    def count_at(self, fps: float | None) -> int:
        """The frames :meth:`frames` will give: demuxed (no decoding) at the stream's own rate, decoded
        (no conversion) when resampled; then back to the start."""
        if fps is None:
            return self.count()
        n = sum(1 for _ in self.frames(fps))
        self.container.seek(0)
        return n

    def _checked(self, frame):
        if frame.width * frame.height > MAX_FRAME_PIXELS:
            raise DecodeError(f"{self.path}: a {frame.width}x{frame.height} frame is larger than vmzconv decodes "
                              f"({MAX_FRAME_PIXELS:,} pixels)")
        return frame

    def frames(self, fps: float | None = None) -> Source:
        """Every frame in order; with ``fps``, resampled to that rate: output frame k is the decoded
        frame whose timestamp is nearest to k / fps, for every k / fps before the video's end. Each
        decoded frame may stand for at most a few times its share (``fps / rate``) of output frames: a
        timestamp that jumps far ahead is refused, not filled with millions of copies."""
        if fps is not None and not self.rate:
            raise DecodeError(f"{self.path}: the video does not say its frame rate")
        rate = self.rate or 1.0
        n = 0
        try:
            if fps is None:
                for frame in self.container.decode(self.stream):
                    yield n, frame_getter(self._checked(frame))
                    n += 1
                return
            share = math.ceil(fps / rate)
            prev, prev_t, k = None, 0.0, 0

            def bounded(k: int, t: float) -> None:
                if k > 8 * share * n + 256:
                    raise DecodeError(f"{self.path}: timestamps jump to {t:.6g} s after {n} frames; resampling to "
                                      f"{fps:g} fps would repeat frames without end — refused")

            for frame in self.container.decode(self.stream):
                t = float(frame.time) if frame.time is not None else n / rate
                n += 1
                if prev is not None:
                    get = frame_getter(self._checked(prev))
                    while k / fps < (prev_t + t) / 2:           # targets nearer to the previous frame
                        bounded(k, t)
                        yield k, get
                        k += 1
                prev, prev_t = frame, t
            if prev is not None:
                get, end = frame_getter(self._checked(prev)), prev_t + 1.0 / rate
                while k / fps < end - 1e-9:
                    bounded(k, end)
                    yield k, get
                    k += 1
        except _av_errors() as e:
            raise DecodeError(f"{self.path}: decoding failed after {n} frames: {e}") from None


def frame_getter(frame) -> Callable[[], np.ndarray]:
    """A PyAV frame's RGB24 array, converted on the first call only."""
    cache: list = []

    def get() -> np.ndarray:
        if not cache:
            cache.append(frame.to_ndarray(format="rgb24"))
        return cache[0]

    return get


def check_regular_file(path: str, what: str = "video file") -> None:
    """A regular local file, or a one-line refusal (a folder, a FIFO, a device, a socket, nothing)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):          # ValueError: a NUL byte in the name
        raise DecodeError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise DecodeError(f"{path}: not a regular file ({kind}) — refused")


@contextlib.contextmanager
def open_container(path: str):
    """PyAV's container of the regular file at ``path``, read through a Python file object so that FFmpeg
    never interprets the name (no URL protocols); one-line errors naming the file."""
    import av

    check_regular_file(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DecodeError(f"{path}: cannot open video: {e.strerror or e}") from None
    with f:
        try:
            container = av.open(f, mode="r")
        except _av_errors() as e:
            raise DecodeError(f"{path}: cannot open video: {e}") from None
        with container:
            yield container


@contextlib.contextmanager
def open_video(path: str):
    """The video at ``path``, opened once, as a :class:`Video`: a regular file, read through a Python file
    object so that FFmpeg never interprets the name (no URL protocols)."""
    with open_container(path) as container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
        if w * h > MAX_FRAME_PIXELS:
            raise DecodeError(f"{path}: its {w}x{h} frames are larger than vmzconv decodes "
                              f"({MAX_FRAME_PIXELS:,} pixels)")
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        yield Video(path, container, float(rate) if rate else None, int(stream.frames or 0))


def rawframes(folder: str, indices, tmpl: str) -> Source:
    """Frames ``indices`` (0-based, increasing) of a rawframe folder, whose files are numbered from 1
    (MMAction2's RawframeDataset ``start_index``)."""
    from PIL import Image, UnidentifiedImageError

    for i in indices:
        f = os.path.join(folder, tmpl.format(i + 1))

        def get(f=f) -> np.ndarray:
            check_regular_file(f, "frame file")
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None   # ours, stricter, is checked below
            try:
                im = Image.open(f)
            except (OSError, UnidentifiedImageError) as e:
                raise DecodeError(f"{f}: cannot read frame: {e}") from None
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            try:
                with im:
                    if im.width * im.height > MAX_FRAME_PIXELS:       # before Pillow decodes (or warns)
                        raise DecodeError(f"{f}: a {im.width}x{im.height} frame is larger than vmzconv decodes "
                                          f"({MAX_FRAME_PIXELS:,} pixels)")
                    return np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                raise DecodeError(f"{f}: cannot read frame: {e}") from None

        yield i, get
