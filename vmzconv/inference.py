"""Videos in, model outputs out: the one inference path behind ``verify``, ``predict`` and ``features``.

A DataLoader decodes and crops ahead in worker processes (uint8 views, so little crosses the
process boundary); the main process normalises on the device and runs the views in chunks of
``max_views`` (autocast on CUDA when asked). Nothing here knows about metrics, caches or reports.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import VmzconvError
from .verify.protocol import normalise

PRECISIONS = ("fp32", "fp16", "bf16")


def pick_device(name: str | None) -> torch.device:
    """``name`` (cpu, cuda, cuda:N), or cuda when available, else cpu."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise VmzconvError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VmzconvError(f"--device {name}: this torch has no usable CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise VmzconvError(f"--device {name}: only cpu and cuda are supported")
    return device


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


@dataclass
class Engine:
    """How views run through a model: device, precision (autocast on CUDA only), views per forward."""

    device: torch.device
    precision: str = "fp32"
    max_views: int = 30

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise VmzconvError(f"--precision {self.precision!r}: one of {', '.join(PRECISIONS)}")

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.precision != "fp32"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.eval().to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            model = model.to(memory_format=torch.channels_last_3d)
        return model

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], views, mean, std) -> torch.Tensor:
        """``fn`` on uint8 views [V, T, H, W, 3], ``max_views`` at a time; float32 [V, D] on the CPU."""
        x = torch.as_tensor(views).to(self.device, non_blocking=True)
        outs = []
        for s in range(0, x.shape[0], self.max_views):
            clip = normalise(x[s:s + self.max_views], mean, std)
            if self.device.type == "cuda":
                clip = clip.contiguous(memory_format=torch.channels_last_3d)
            with self._autocast():
                outs.append(fn(clip).float())
        return torch.cat(outs).cpu()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Views(torch.utils.data.Dataset):
    """item -> (key, uint8 views, None) or (key, None, error text): a bad video is a value, never a
    worker traceback; the consumer decides what to do with it."""

    def __init__(self, items, load: Callable):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            return i, torch.from_numpy(np.ascontiguousarray(self.load(item))), None
        except VmzconvError as e:
            return i, None, str(e)


def _first(batch):
    return batch[0]


@dataclass
class Output:
    item: object
    value: torch.Tensor | None       # [V, D] float32, CPU
    error: str | None
    seconds: float                    # model time for this item (device-synchronised)


def stream(engine: Engine, fn: Callable, items: list, load: Callable, mean, std,
           workers: int | None = None) -> Iterator[Output]:
    """One :class:`Output` per item, in order: ``load(item)`` (in ``workers`` processes) gives its uint8
    views, ``fn`` (e.g. the model, or ``model.features``) runs on them through ``engine``."""
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _Views(items, load), batch_size=1, shuffle=False, num_workers=workers, collate_fn=_first,
        pin_memory=engine.device.type == "cuda", prefetch_factor=2 if workers else None, persistent_workers=False)
    for i, views, err in loader:
        if views is None:
            yield Output(items[i], None, err, 0.0)
            continue
        engine.synchronize()
        t0 = time.perf_counter()
        out = engine.run(fn, views, mean, std)
        engine.synchronize()
        yield Output(items[i], out, None, time.perf_counter() - t0)
