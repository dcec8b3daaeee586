"""Test-time sampling and spatial transforms, as MMAction2 1.x (default) or VMZ's Caffe2 tools do them.

MMAction2 1.x (``mmaction/datasets/transforms``), read from the source:

* ``SampleFrames(test_mode=True)``: span ``(clip_len - 1) * interval + 1``,
  ``max_offset = max(F - span, 0)``; with n > 1 clips ``offset_k = round(k * max_offset / (n - 1))``
  (``np.round``: halves go to the even neighbour), one clip -> ``max_offset // 2``; frame
  ``offset + i * interval``, wrapped ``mod F`` (``out_of_bound_opt='loop'``).
* ``Resize(scale=(-1, S), keep_ratio=True)``: factor ``S / short side``, new size
  ``int(x * factor + 0.5)``, ``cv2.resize(..., INTER_LINEAR)`` on uint8 RGB frames.
* ``ThreeCrop(C)``: along the long side offsets ``[0, 2*step, step]``, ``step = (L - C) // 2``
  (left/top, right/bottom, middle); the short side must equal C.
* ``FormatShape('NCTHW')``: view index = crop * n_clips + clip.

VMZ (``--protocol vmz``; its R(2+1)D/R3D scripts also resize to a fixed 171x128, ``--resize``): clip k starts at ``floor(k * (F - R) / (n - 1))`` with R the same span
(0 for one clip; ``max(F - R, 0)`` for short videos, which VMZ itself would skip); crops at
``j * (L - C) // 2`` for j = 0, 1, 2 (left, centre, right).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..errors import VmzconvError

# Upper bounds on what a protocol (from the command line or a checkpoint's card) may ask for: far above any
# published protocol (32 frames, 10 clips x 3 crops of 256), far below what exhausts a machine.
LIMITS = {"clip_len": 1024, "frame_interval": 256, "num_clips": 1000, "short_side": 4096, "crop_size": 4096}
MAX_RESIZE_SIDE = 8192
MAX_RESIZED_PIXELS = 4096 * 4096                 # one frame after resizing
MAX_VIEW_BYTES = 2 << 30                         # one video's uint8 views, all clips and crops


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Protocol:
    name: str = "mmaction2"          # or "vmz"
    clip_len: int = 32
    frame_interval: int = 2
    num_clips: int = 10
    short_side: int = 256
    crop_size: int = 256
    num_crops: int = 3
    resize: tuple | None = None      # (W, H): resize ignoring the aspect ratio (VMZ's video_res_type 0)

    def __post_init__(self):
        if self.name not in ("mmaction2", "vmz"):
            raise VmzconvError(f"unknown protocol {str(self.name)[:40]!r} (mmaction2 or vmz)")
        for field, top in LIMITS.items():
            v = getattr(self, field)
            if not _is_int(v) or not 1 <= v <= top:
                raise VmzconvError(f"{field} must be a whole number from 1 to {top}, not {str(v)[:40]!r}")
        if not _is_int(self.num_crops) or self.num_crops not in (1, 3):
            raise VmzconvError(f"num_crops must be 1 (centre) or 3, not {str(self.num_crops)[:40]!r}")
        if self.resize is not None:
            if (not isinstance(self.resize, (list, tuple)) or len(self.resize) != 2
                    or not all(_is_int(v) and 1 <= v <= MAX_RESIZE_SIDE for v in self.resize)):
                raise VmzconvError(f"resize takes WxH, each 1 to {MAX_RESIZE_SIDE}, not {str(self.resize)[:40]!r}")
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
            if self.crop_size > min(self.resize):
                raise VmzconvError(f"--crop-size {self.crop_size} is larger than --resize {self.resize[0]}x{self.resize[1]}")
        elif self.crop_size > self.short_side:
            raise VmzconvError(f"--crop-size {self.crop_size} is larger than --short-side {self.short_side}")
        size = self.views * self.clip_len * self.crop_size ** 2 * 3
        if size > MAX_VIEW_BYTES:
            raise VmzconvError(f"num_clips {self.num_clips} x num_crops {self.num_crops} x clip_len {self.clip_len} x "
                               f"crop_size {self.crop_size}^2 is {size / 2**30:.1f} GiB of views per video "
                               f"(at most {MAX_VIEW_BYTES / 2**30:.0f} GiB)")

    @classmethod
    def from_card(cls, recorded: dict | None, **overrides) -> "Protocol":
        """The protocol a checkpoint's card records (``meta.input``), with ``overrides`` (not None) on top;
        MMAction2's CSN protocol where the card says nothing."""
        fields = {f: v for f, v in (recorded or {}).items()
                  if f in ("clip_len", "frame_interval", "num_clips", "short_side", "crop_size", "num_crops", "resize")}
        if (recorded or {}).get("protocol"):
            fields["name"] = recorded["protocol"]
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("short_side") is not None and overrides.get("resize") is None:
            fields.pop("resize", None)        # an explicit --short-side replaces a recorded fixed size
        return cls(**fields)

    @property
    def views(self) -> int:
        return self.num_clips * self.num_crops

    def to_dict(self) -> dict:
        return asdict(self)


def clip_offsets(num_frames: int, p: Protocol) -> np.ndarray:
    span = (p.clip_len - 1) * p.frame_interval + 1
    max_offset = max(num_frames - span, 0)
    if p.name == "vmz":
        if p.num_clips == 1:
            return np.zeros(1, dtype=np.int64)
        return np.array([k * max_offset // (p.num_clips - 1) for k in range(p.num_clips)], dtype=np.int64)
    if p.num_clips > 1:
        return np.round(np.arange(p.num_clips) * (max_offset / float(p.num_clips - 1))).astype(np.int64)
    return np.array([max_offset // 2], dtype=np.int64)


def frame_indices(num_frames: int, p: Protocol) -> np.ndarray:
    """[num_clips, clip_len] 0-based frame indices (add 1 for rawframes' img_00001.jpg)."""
    if num_frames < 1:
        raise VmzconvError("a video with no frames")
    idx = clip_offsets(num_frames, p)[:, None] + np.arange(p.clip_len)[None, :] * p.frame_interval
    return np.mod(idx, num_frames)


def resized_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """mmcv.rescale_size with scale (inf, short_side): (new_w, new_h)."""
    factor = short_side / min(w, h)
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize(frame: np.ndarray, p: Protocol) -> np.ndarray:
    """To ``p.resize`` (W, H) when set, else short side ``p.short_side`` keeping the aspect ratio."""
    h, w = frame.shape[:2]
    new_w, new_h = p.resize if p.resize else resized_size(w, h, p.short_side)
    if new_w * new_h > MAX_RESIZED_PIXELS:
        raise VmzconvError(f"a {w}x{h} frame resized to {new_w}x{new_h} is larger than vmzconv resizes to "
                           f"({MAX_RESIZED_PIXELS:,} pixels)")
    if (new_w, new_h) == (w, h):
        return frame
    return cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def crop_boxes(w: int, h: int, p: Protocol) -> list[tuple[int, int]]:
    """(x, y) of each crop's top-left corner, in view order."""
    c = p.crop_size
    if p.num_crops == 1:
        return [((w - c) // 2, (h - c) // 2)]
    if h == c:
        step = (w - c) // 2
        xs = [0, 2 * step, step] if p.name == "mmaction2" else [0, step, 2 * step]
        return [(x, 0) for x in xs]
    if w == c:
        step = (h - c) // 2
        ys = [0, 2 * step, step] if p.name == "mmaction2" else [0, step, 2 * step]
        return [(0, y) for y in ys]
    raise VmzconvError(f"three crops of {c} need the short side to be {c}, the frame is {w}x{h} "
                       "(set --short-side equal to --crop-size)")


def normalise(v, mean, std):
    """Views [V, T, H, W, C] (uint8 RGB, or float32 optical flow; numpy or torch) -> float32 NCTHW
    (x - mean) / std, one mean and std per channel."""
    import torch

    t = torch.as_tensor(v)
    x = t.permute(0, 4, 1, 2, 3).float()
    c = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1, 1)
    return (x - m) / s
