"""The one frame-to-view builder: protocol clips (verify, predict) and sliding windows (features).

Frames stream past once (:mod:`.decode` sources). A frame is resized and cropped as soon as it
arrives, kept only while a window that is still open needs it, and each window is cut
(``[crops, T, c, c, 3]`` uint8) when its last frame has arrived, so memory follows the windows
being built, never the video's length. A *plan* says which frames a window takes:

* :class:`ClipPlan`: the protocol's clips of a video of known length (``protocol.frame_indices``);
* :class:`SlidingPlan`: windows at 0, S, 2S, ... (and a tail window) over a video of unknown length;
* :func:`snippet_plan`: N windows evenly spread over a video of known length.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np

from ..errors import VmzconvError
from . import protocol as P
from .decode import DecodeError, Source

CROPS = ("center", "none", "three")


class Shaper:
    """Resize (protocol) and crop one frame; crop corners are worked out once, from the first frame."""

    def __init__(self, p: P.Protocol, crop: str | None, path: str):
        self.p, self.path = p, path
        self.crop = crop or ("three" if p.num_crops == 3 else "center")
        self.size: tuple | None = None
        self.boxes: list = []

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        try:
            frame = P.resize(rgb, self.p)
        except VmzconvError as e:
            raise DecodeError(f"{self.path}: {e}") from None
        if self.size is None:
            self.size = frame.shape
            if self.crop != "none":
                h, w = frame.shape[:2]
                self.boxes = P.crop_boxes(w, h, replace(self.p, num_crops=3 if self.crop == "three" else 1))
        elif frame.shape != self.size:
            raise DecodeError(f"{self.path}: frames change size mid-video ({self.size[1]}x{self.size[0]}, then "
                              f"{frame.shape[1]}x{frame.shape[0]})")
        if self.crop == "none":
            return frame[None]
        c = self.p.crop_size
        return np.stack([frame[y:y + c, x:x + c] for x, y in self.boxes])      # [crops, c, c, 3]


class ShortVideo(Exception):
    """The stream ended before a planned frame: it has ``frames`` frames, not what its header claimed."""

    def __init__(self, frames: int):
        super().__init__(frames)
        self.frames = frames


def cut(frames: Source, plan, shape: Callable[[np.ndarray], np.ndarray]) -> Iterator[tuple[object, np.ndarray]]:
    """(window, uint8 [crops, T, c, c, 3]) for each window of ``plan``, as soon as its frames are in."""
    buf: dict[int, np.ndarray] = {}
    n = 0
    for i, get in frames:
        if plan.wants(i):
            buf[i] = shape(get())
        n = i + 1
        for w in plan.complete(n):
            yield w, np.stack([buf[j] for j in plan.indices(w)], axis=1)
        for j in [j for j in buf if not plan.still_needed(j)]:
            del buf[j]
    for w in plan.end(n, buf):
        yield w, np.stack([buf[j] for j in plan.indices(w)], axis=1)


class IndexPlan:
    """Windows given up front as frame indices ``idx`` [windows, clip_len] over a video of known length;
    window = its row number. A count per frame index and a heap of each window's last frame keep the
    work per frame small however many windows there are (``--num-snippets`` allows many)."""

    def __init__(self, idx: np.ndarray):
        self.idx = idx
        self.count = Counter(int(i) for i in self.idx.reshape(-1))
        self.pending = [(int(last), k) for k, last in enumerate(self.idx.max(axis=1))] if len(self.idx) else []
        heapq.heapify(self.pending)

    def wants(self, i: int) -> bool:
        return i in self.count

    def indices(self, k: int):
        return [int(i) for i in self.idx[k]]

    def complete(self, n: int) -> list[int]:
        done = []
        while self.pending and self.pending[0][0] < n:         # windows in order of their last frame, then row
            _, k = heapq.heappop(self.pending)
            done.append(k)
            for i in self.idx[k]:
                i = int(i)
                self.count[i] -= 1
                if not self.count[i]:
                    del self.count[i]
        return done

    def still_needed(self, i: int) -> bool:
        return i in self.count

    def end(self, n: int, buf) -> list[int]:
        if self.pending:
            raise ShortVideo(n)
        return []


class ClipPlan(IndexPlan):
    """The protocol's clips over a video of ``total`` frames; window = clip number."""

    def __init__(self, total: int, p: P.Protocol):
        super().__init__(P.frame_indices(total, p))           # [clips, clip_len], already wrapped mod total


def clip_views(frames: Source, total: int, p: P.Protocol, path: str) -> np.ndarray:
    """uint8 views [V, T, c, c, 3] of the protocol's clips, V = crop * num_clips + clip (FormatShape's order)."""
    plan = ClipPlan(total, p)
    clips = dict(cut(frames, plan, Shaper(p, None, path)))
    out = np.stack([clips[k] for k in range(len(plan.idx))], axis=1)      # [crops, clips, T, c, c, 3]
    return np.ascontiguousarray(out.reshape(-1, *out.shape[2:]))


TAILS = ("pad", "shift", "drop")


@dataclass(frozen=True)
class Windows:
    """The windows ``features`` cuts from a video of ``n`` frames (:meth:`layout` is the rule; the plans
    below stream it). Sliding: starts 0, S, 2S, ... while ``start + span <= n``, then by ``tail`` one
    more window when frames after the last one would be left out (S <= span): ``pad`` starts it at the
    next S and repeats the last frame, ``shift`` ends it at the last frame (it overlaps the window
    before), ``drop`` leaves those frames out. A video shorter than one span gives one window whose
    missing frames repeat the last one. ``num_snippets`` N instead: exactly N windows, starts evenly
    spread from 0 to ``n - span`` (one window: centred), as BMN/BSN-style localisation expects."""

    clip_len: int
    frame_interval: int
    stride: int
    crop: str                 # center | none | three
    fps: float | None         # resample to this rate first
    protocol: P.Protocol      # its resize / short side / crop size shape each frame
    tail: str = "pad"
    num_snippets: int | None = None

    @property
    def span(self) -> int:
        return (self.clip_len - 1) * self.frame_interval + 1

    def _window(self, start: int, n: int) -> tuple:
        idx = [min(start + i * self.frame_interval, n - 1) for i in range(self.clip_len)]
        return start, min(start + self.span, n) - 1, idx

    def layout(self, n: int) -> list[tuple]:
        """(start frame, last real frame, frame indices) of each window of a video of ``n`` frames."""
        if n < 1:
            return []
        if self.num_snippets:
            if n < self.span:
                starts = [0] * self.num_snippets
            elif self.num_snippets == 1:
                starts = [(n - self.span) // 2]
            else:
                starts = [int(s) for s in np.floor(np.linspace(0, n - self.span, self.num_snippets) + 0.5)]
            return [self._window(s, n) for s in starts]
        if n < self.span:
            return [self._window(0, n)]
        out = [self._window(s, n) for s in range(0, n - self.span + 1, self.stride)]
        last_end, nxt = out[-1][0] + self.span - 1, out[-1][0] + self.stride
        if last_end < n - 1 and nxt <= n - 1 and self.tail != "drop":
            out.append(self._window(nxt if self.tail == "pad" else n - self.span, n))
        return out

    def record(self) -> dict:
        p = self.protocol
        return {"clip_len": self.clip_len, "frame_interval": self.frame_interval, "stride": self.stride,
                "crop": self.crop, "fps": self.fps, "short_side": p.short_side, "crop_size": p.crop_size,
                "resize": list(p.resize) if p.resize else None, "tail": self.tail, "num_snippets": self.num_snippets}


class SlidingPlan:
    """:class:`Windows` (sliding) over a stream of unknown length; window = (start frame, end frame,
    indices). Frames are kept only while a window may still take them: under ``drop`` those a still-open
    window samples; under ``pad``/``shift`` every frame from the next start (``shift``: and the last
    span), since the tail window's frames are known only at the end."""

    def __init__(self, w: Windows):
        self.w, self.start, self.n, self.emitted = w, 0, 0, 0

    def wants(self, n: int) -> bool:
        w = self.w            # a frame that a still-open window takes (start + i * interval)
        if w.tail != "drop":
            return True
        return any((n - s) % w.frame_interval == 0 for s in range(self.start, n + 1, w.stride) if n < s + w.span)

    def indices(self, window) -> list[int]:
        return window[2]

    def complete(self, n: int) -> list:
        w, out = self.w, []
        self.n = n
        while self.start + w.span <= n:
            idx = [self.start + i * w.frame_interval for i in range(w.clip_len)]
            out.append((self.start, idx[-1], idx))
            self.start += w.stride
        self.emitted += len(out)
        return out

    def still_needed(self, i: int) -> bool:
        if self.w.tail == "shift":
            return i >= min(self.start, self.n - self.w.span)
        return i >= self.start

    def end(self, n: int, buf) -> list:
        w = self.w
        if n == 0:
            return []
        if w.tail != "drop":                       # the tail window (or a short video's one), by the rule
            return w.layout(n)[self.emitted:]
        if self.start == 0 and n < w.span:         # shorter than one window: repeat the last kept frame
            last = max(buf)
            return [(0, n - 1, [min(i * w.frame_interval, last) for i in range(w.clip_len)])]
        return []


def snippet_plan(layout: list[tuple], clip_len: int) -> IndexPlan:
    """``--num-snippets``: the windows (``Windows.layout``) of a video of known length, as a plan."""
    return IndexPlan(np.asarray([idx for _, _, idx in layout], dtype=np.int64).reshape(-1, clip_len))


def item_views(item, p: P.Protocol, filename_tmpl: str = "img_{:05d}.jpg", audio: str | None = None,
               flow: bool = False):
    """uint8 views [V, T, c, c, 3] of one annotation item (a video file or a rawframe folder). ``audio``
    ("need", or "silent": zeros for a file without an audio stream) also gives each view its clip's log-mels:
    an :class:`inference.AVViews`. ``flow``: float32 optical flow [V, T, c, c, 2] from T + 1 frames a clip."""
    if flow:
        from .flow import GAP, flow_views

        views, _ = _item_views(item, replace(p, clip_len=p.clip_len + GAP), filename_tmpl)
        return flow_views(views)
    views, total = _item_views(item, p, filename_tmpl)
    if audio is None:
        return views
    from ..inference import AVViews
    from .audio import Track

    if item.kind != "video":
        raise DecodeError(f"{item.path}: a rawframe folder has no audio for an audio-visual model")
    track = Track(item.path, total, (p.clip_len - 1) * p.frame_interval + 1, audio == "silent")
    starts = P.frame_indices(total, p)[:, 0]
    clips = track.clips(starts)                                   # [clips, 1, 100, 40]
    crops = views.shape[0] // len(starts)
    return AVViews(views, np.ascontiguousarray(np.tile(clips, (crops, 1, 1, 1))), track.silent)


def _item_views(item, p: P.Protocol, filename_tmpl: str) -> tuple[np.ndarray, int]:
    from .decode import open_video, rawframes

    if item.kind != "video":
        if not item.total_frames or item.total_frames < 1:
            raise DecodeError(f"{item.path}: the list gives {item.total_frames} frames")
        needed = sorted(ClipPlan(item.total_frames, p).count)
        return clip_views(rawframes(item.path, needed, filename_tmpl), item.total_frames, p, item.path), \
            item.total_frames
    with open_video(item.path) as video:
        total = video.claimed or video.count()
        if total < 1:
            raise DecodeError(f"{item.path}: no decodable frames")
        try:
            return clip_views(video.frames(), total, p, item.path), total
        except ShortVideo as short:                 # the header claimed more frames than the stream holds
            total = short.frames
    if total < 1:
        raise DecodeError(f"{item.path}: no decodable frames")
    with open_video(item.path) as video:
        return clip_views(video.frames(), total, p, item.path), total
