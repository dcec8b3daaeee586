"""Videos in, model outputs out: the engines (one per runtime) and the stream behind every command that
runs a model.

An :class:`Engine` takes uint8 views [V, T, H, W, 3], normalises them (``video.protocol.normalise``)
and runs them ``max_views`` at a time, returning float32 [V, D] on the CPU. Runtimes:

* ``torch``: the PyTorch model itself (CUDA autocast for fp16/bf16, which also folds BN).
* ``onnxruntime`` / ``openvino``: the ONNX graph from ``export``'s code path (dynamic N, T, H, W),
  cached by checkpoint sha256 and graph options, and proven against the PyTorch model on a fixed
  clip the first time it is used (``runtimes.py``). A runtime that is missing, fails to load the
  graph, or fails the proof falls back to torch with a one-line note.

``auto`` takes, on the CPU, the fastest installed fp32 runtime as ``benchmarks/runtime.py`` measured
it here (OpenVINO, then ONNX Runtime, then torch); on CUDA, torch. A DataLoader decodes and crops
ahead in worker processes (uint8 views, so little crosses the process boundary).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import VmzconvError
from .video.protocol import normalise

CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")     # fastest first, as benchmarks/runtime.py measured
# What an audio-visual model gives for each run output (AVModel.layer): the visual tower's pooled vector,
# the audio tower's, the fusion's (av_fc2), the joint logits.
AV_LAYERS = {"features": "pool", "audio": "audio", "fused": "fused", "logits": "logits"}


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
class AVViews:
    """An audio-visual model's input for V views: uint8 video [V, T, H, W, 3] and float32 log-mels
    [V, 1, 100, 40] (``video/audio.py``); ``silent``: the file had no audio stream (zeros, --silent-audio)."""

    video: np.ndarray
    audio: np.ndarray
    silent: bool = False


class Engine:
    """Runs views through one runtime: normalise, chunks of ``max_views``, float32 [V, D] on the CPU. An
    audio-visual model's views come as a (video, log-mels) pair; the log-mels are not normalised."""

    runtime = "?"

    def __init__(self, device: torch.device, precision: str, max_views: int):
        self.device, self.precision, self.max_views = device, precision, max_views

    @property
    def effective_precision(self) -> str:
        return self.precision

    def forward(self, clip: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def run(self, views, mean, std) -> torch.Tensor:
        audio = None
        if isinstance(views, (tuple, list)):
            views, audio = views
            audio = torch.as_tensor(audio).to(self.device, non_blocking=True)
        x = torch.as_tensor(views).to(self.device, non_blocking=True)
        outs = [self.forward(normalise(x[s:s + self.max_views], mean, std),
                             *(() if audio is None else (audio[s:s + self.max_views],))).float()
                for s in range(0, x.shape[0], self.max_views)]
        return torch.cat(outs).cpu()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def has_channelwise_convs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv3d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


class TorchEngine(Engine):
    """The PyTorch model (``fn``: the model, or its ``features``) on the device. On CUDA: channels-last-3d,
    and with fp16/bf16 autocast and BN folded into the convs. On the CPU, a model with channel-wise convs
    (CSN) also gets folded BN and channels-last-3d: 0.73x the time per view at 8x224 and 0.42x at
    32x224 for ir-CSN-152 (benchmarks/runtime.py); R(2+1)D and R3D do not gain (0.99x, 1.08x), so
    they run as they are."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, output: str, device: torch.device, precision: str = "fp32",
                 max_views: int = 30):
        super().__init__(device, precision, max_views)
        model = model.eval().to(device)
        self.channels_last = device.type == "cuda" or has_channelwise_convs(model)
        if self.amp or (device.type == "cpu" and self.channels_last):
            from .models import fold_bn

            model = fold_bn(model)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        av = hasattr(model, "audio")
        if self.channels_last:                  # (an audio-visual model: its video tower; the audio one is 2-D)
            (model.visual if av else model).to(memory_format=torch.channels_last_3d)
        self.model = model
        if av:
            self.fn: Callable = model if output == "logits" else functools.partial(model.layer, AV_LAYERS[output])
        else:
            self.fn = model.features if output == "features" else model

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.precision != "fp32"

    @property
    def effective_precision(self) -> str:
        return self.precision if self.amp else "fp32"

    def forward(self, clip: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last:
            clip = clip.contiguous(memory_format=torch.channels_last_3d)
        args = (clip,) if audio is None else (clip, audio)
        if self.amp:
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            with torch.autocast("cuda", dtype=dtype):
                return self.fn(*args)
        return self.fn(*args)


def make_engine(conv, rt, device: torch.device, output: str, notes: list) -> Engine:
    """The engine of ``rt.runtime`` for ``conv``'s model (falling back to torch with a note in ``notes``)."""
    from . import runtimes

    torch_engine = lambda: TorchEngine(conv.model, output, device, rt.precision, rt.max_views)  # noqa: E731
    wanted = rt.runtime
    if device.type == "cuda":
        if wanted not in ("auto", "torch"):
            notes.append(f"--runtime {wanted} runs on the CPU only; using torch on {device}")
        return torch_engine()
    if rt.precision == "fp16":
        raise VmzconvError("--precision fp16 is for CUDA; on the CPU use fp32 or bf16 (with --runtime openvino)")
    candidates = [r for r in CPU_PREFERENCE if runtimes.installed(r)] if wanted == "auto" else [wanted]
    for name in candidates:
        if name == "torch":
            break
        if not runtimes.installed(name):
            notes.append(f"--runtime {name}: its package is not installed ({runtimes.EXTRA[name]}); using torch")
            break
        engine = runtimes.open_engine(name, conv, rt, output, notes)
        if engine is not None:
            return engine
        if wanted != "auto":
            break
    if rt.precision == "bf16":
        notes.append("--precision bf16 on the CPU needs --runtime openvino; torch runs fp32")
    return torch_engine()


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
                chunks = [(produced, None)] if isinstance(produced, (np.ndarray, AVViews)) else produced
                for views, extra in chunks:
                    silent = isinstance(views, AVViews) and views.silent
                    if isinstance(views, AVViews):
                        views = (torch.from_numpy(np.ascontiguousarray(views.video)), torch.from_numpy(views.audio))
                    else:
                        views = torch.from_numpy(np.ascontiguousarray(views))
                    yield i, views, extra, None, False, silent
            except VmzconvError as e:
                yield i, None, None, str(e), True, False
                continue
            yield i, None, None, None, True, False


@dataclass
class Output:
    item: object
    value: torch.Tensor | None       # [V, D] float32 on the CPU, for one chunk of the item's views
    error: str | None
    seconds: float                    # model time for this chunk (device-synchronised)
    info: object = None               # what load() attached to the chunk (e.g. its windows)
    done: bool = False                # the item's last message: no value, maybe an error
    silent: bool = False              # an audio-visual model ran on zeros for audio (no audio stream)


def stream(engine: Engine, items: list, load: Callable, mean, std, workers: int | None = None) -> Iterator[Output]:
    """For each item, one :class:`Output` per chunk of views, then one with ``done`` (carrying the error
    if the item could not be read). ``load(item)`` runs in ``workers`` processes; the engine runs each
    chunk. Items of different workers interleave; each item's messages arrive in order."""
    workers = default_workers() if workers is None else workers
    workers = min(workers, len(items))
    loader = torch.utils.data.DataLoader(
        _Chunks(items, load), batch_size=None, num_workers=workers, pin_memory=engine.device.type == "cuda",
        prefetch_factor=2 if workers else None, persistent_workers=False)
    for i, views, info, err, done, silent in loader:
        if done:
            yield Output(items[i], None, err, 0.0, None, True)
            continue
        engine.synchronize()
        t0 = time.perf_counter()
        out = engine.run(views, mean, std)
        engine.synchronize()
        yield Output(items[i], out, None, time.perf_counter() - t0, info, silent=bool(silent))
