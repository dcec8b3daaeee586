"""Frame sources: PyAV for videos (RGB24, no system FFmpeg), Pillow for rawframe folders.

A source yields ``(index, get)`` in increasing index order, where ``get()`` returns that frame as an
RGB uint8 array; the conversion to RGB happens only for the frames a consumer keeps. A video is
opened once (:func:`open_video`) for its rate, its frame count and its frames.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError

Source = Iterator[tuple[int, Callable[[], np.ndarray]]]


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

    def frames(self, fps: float | None = None) -> Source:
        """Every frame in order; with ``fps``, resampled to that rate: output frame k is the decoded
        frame whose timestamp is nearest to k / fps, for every k / fps before the video's end."""
        if fps is not None and not self.rate:
            raise DecodeError(f"{self.path}: the video does not say its frame rate")
        rate = self.rate or 1.0
        n = 0
        try:
            if fps is None:
                for frame in self.container.decode(self.stream):
                    yield n, frame_getter(frame)
                    n += 1
                return
            prev, prev_t, k = None, 0.0, 0
            for frame in self.container.decode(self.stream):
                t = float(frame.time) if frame.time is not None else n / rate
                n += 1
                if prev is not None:
                    get = frame_getter(prev)
                    while k / fps < (prev_t + t) / 2:           # targets nearer to the previous frame
                        yield k, get
                        k += 1
                prev, prev_t = frame, t
            if prev is not None:
                get, end = frame_getter(prev), prev_t + 1.0 / rate
                while k / fps < end - 1e-9:
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


@contextlib.contextmanager
def open_video(path: str):
    """The video at ``path``, opened once, as a :class:`Video`."""
    import av

    if not os.path.exists(path) or os.path.isdir(path):          # a named pipe is a fine source
        raise DecodeError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except _av_errors() as e:
        raise DecodeError(f"{path}: cannot open video: {e}") from None
    with container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
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
            try:
                with Image.open(f) as im:
                    return np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise DecodeError(f"{f}: cannot read frame: {e}") from None

        yield i, get
