"""Frames for one annotation item: PyAV for videos (RGB24, no system FFmpeg), Pillow for rawframes."""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from . import protocol as P
from .annotations import Item


class DecodeError(InputError):
    """A video or frame folder that cannot be read; names the file."""


def _decode_video(path: str, p: P.Protocol) -> tuple[np.ndarray, int]:
    """Decode what the sampler needs: frames up to the last needed index, RGB only for needed ones."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError(f"{path}: cannot open video: {e}") from None
    with container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        claimed = stream.frames or 0
        kept = []                          # VideoFrames (YUV) up to the last needed index
        needed = P.frame_indices(claimed, p) if claimed > 0 else None
        last = int(needed.max()) if needed is not None else None
        try:
            for frame in container.decode(stream):
                kept.append(frame)
                if last is not None and len(kept) > last:
                    break
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"{path}: decoding failed after {len(kept)} frames: {e}") from None
    if not kept:
        raise DecodeError(f"{path}: no decodable frames")
    total = claimed
    if needed is None or len(kept) <= last:        # no frame count, or fewer frames than claimed
        total = len(kept)
        needed = P.frame_indices(total, p)
    rgb = {}
    out = []
    for i in needed.reshape(-1):
        i = int(i)
        if i not in rgb:
            rgb[i] = P.resize(kept[i].to_ndarray(format="rgb24"), p)
        out.append(rgb[i])
    return np.stack(out), total


def _decode_rawframes(item: Item, p: P.Protocol, tmpl: str) -> tuple[np.ndarray, int]:
    from PIL import Image, UnidentifiedImageError

    total = item.total_frames
    if not total or total < 1:
        raise DecodeError(f"{item.path}: the list gives {total} frames")
    needed = P.frame_indices(total, p) + 1      # RawframeDataset start_index = 1
    cache, out = {}, []
    for i in needed.reshape(-1):
        i = int(i)
        if i not in cache:
            f = os.path.join(item.path, tmpl.format(i))
            try:
                with Image.open(f) as im:
                    cache[i] = P.resize(np.asarray(im.convert("RGB")), p)
            except (OSError, UnidentifiedImageError) as e:
                raise DecodeError(f"{f}: cannot read frame: {e}") from None
        out.append(cache[i])
    return np.stack(out), total


def load_views(item: Item, p: P.Protocol, filename_tmpl: str = "img_{:05d}.jpg") -> np.ndarray:
    """uint8 views [V, T, crop, crop, 3] for one item, V = crop * num_clips + clip."""
    if item.kind == "video":
        if not os.path.exists(item.path) or os.path.isdir(item.path):     # a named pipe is a fine source
            raise DecodeError(f"{item.path}: no such video file")
        frames, _ = _decode_video(item.path, p)
    else:
        frames, _ = _decode_rawframes(item, p, filename_tmpl)
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise DecodeError(f"{item.path}: frames change size mid-video ({sorted(sizes)[:2]})")
    return P.views(frames, p)


def video_rate(path: str) -> float:
    """The video stream's average frame rate (frames per second)."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError(f"{path}: cannot open video: {e}") from None
    if not rate:
        raise DecodeError(f"{path}: the video does not say its frame rate (use --fps)")
    return float(rate)


def iter_frames(path: str, fps: float | None = None):
    """Every RGB frame of a whole video, in order, streamed (a long video never sits in memory). With
    ``fps``, frames are resampled to that rate: output frame k is the decoded frame whose timestamp is
    nearest to k / fps, for every k / fps before the video's end."""
    import av

    if not os.path.exists(path) or os.path.isdir(path):
        raise DecodeError(f"{path}: no such video file")
    rate = video_rate(path)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError(f"{path}: cannot open video: {e}") from None
    produced = 0
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        prev, prev_t, k, n = None, 0.0, 0, 0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else n / rate
                n += 1
                if fps is None:
                    produced += 1
                    yield frame.to_ndarray(format="rgb24")
                    continue
                if prev is not None:
                    mid = (prev_t + t) / 2
                    rgb = None
                    while k / fps < mid:                 # targets nearer to the previous frame
                        rgb = prev.to_ndarray(format="rgb24") if rgb is None else rgb
                        produced += 1
                        yield rgb
                        k += 1
                prev, prev_t = frame, t
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"{path}: decoding failed after {n} frames: {e}") from None
        if fps is not None and prev is not None:
            end = prev_t + 1.0 / rate
            rgb = None
            while k / fps < end - 1e-9:
                rgb = prev.to_ndarray(format="rgb24") if rgb is None else rgb
                produced += 1
                yield rgb
                k += 1
    if not produced:
        raise DecodeError(f"{path}: no decodable frames")
