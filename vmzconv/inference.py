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
        """On the device, in eval mode; the fast path (bf16/fp16 on CUDA) also folds BN into the convs."""
        model = model.eval().to(self.device)
        if self.amp:
            from .models import fold_bn

            model = fold_bn(model)
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


class _Chunks(torch.utils.data.IterableDataset):
    """Items split over the DataLoader's workers (item i goes to worker i mod n); ``load(item)`` gives the
    item's uint8 views as one array, or as an iterator of (views, info) chunks (a long video's windows,
    a few at a time). A bad item is a value, never a worker traceback: the consumer decides."""

    def __init__(self, items, load: Callable):
        self.items, self.load = items, load

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, len(self.items), n):
            try:
                produced = self.load(self.items[i])
                chunks = [(produced, None)] if isinstance(produced, np.ndarray) else produced
                for views, extra in chunks:
                    yield i, torch.from_numpy(np.ascontiguousarray(views)), extra, None, False
            except VmzconvError as e:
                yield i, None, None, str(e), True
                continue
            yield i, None, None, None, True


@dataclass
class Output:
    item: object
    value: torch.Tensor | None       # [V, D] float32 on the CPU, for one chunk of the item's views
    error: str | None
    seconds: float                    # model time for this chunk (device-synchronised)
    info: object = None               # what load() attached to the chunk (e.g. its windows)
    done: bool = False                # the item's last message: no value, maybe an error


def stream(engine: Engine, fn: Callable, items: list, load: Callable, mean, std,
           workers: int | None = None) -> Iterator[Output]:
    """For each item, one :class:`Output` per chunk of views, then one with ``done`` (carrying the error
    if the item could not be read). ``load(item)`` runs in ``workers`` processes; ``fn`` (the model, or
    ``model.features``) runs on each chunk through ``engine``. Items of different workers interleave;
    each item's messages arrive in order."""
    workers = default_workers() if workers is None else workers
    workers = min(workers, len(items))
    loader = torch.utils.data.DataLoader(
        _Chunks(items, load), batch_size=None, num_workers=workers, pin_memory=engine.device.type == "cuda",
        prefetch_factor=2 if workers else None, persistent_workers=False)
    for i, views, info, err, done in loader:
        if done:
            yield Output(items[i], None, err, 0.0, None, True)
            continue
        engine.synchronize()
        t0 = time.perf_counter()
        out = engine.run(fn, views, mean, std)
        engine.synchronize()
        yield Output(items[i], out, None, time.perf_counter() - t0, info)
