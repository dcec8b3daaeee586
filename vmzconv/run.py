"""``open_run``: the one set-up behind the commands that run a converted model (verify, predict, features).

It opens the converted file, checks that it has what the command needs (a classifier, or not),
settles the test protocol (the card's, with the user's overrides) and the mean/std, picks the
device and the thread count, joins the torchrun process group when there is one, and builds the
engine of the chosen runtime (``inference.py``). The commands then only stream their items
through :meth:`Run.stream` and report; :meth:`Run.gather` brings every rank's results to rank 0.
Nothing here knows about metrics, caches, windows or reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import InputError, VmzconvError
from .text import safe
from .zoo import NORMS

# A runtime is an engine in runtimes.py (torch's in inference.py) plus its name here; "auto" picks one.
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16")
# Views per forward pass by device. On the CPU batching buys no speed and each 32x256x256 view costs
# ~0.45 GiB more (ir-CSN-50 predict, 30 views: 1 view 997 MiB and 34.9 s, 30 views 13.7 GiB and 54.2 s;
# benchmarks/memory.py); on a GPU the 30 views of one video go in one pass.
DEFAULT_MAX_VIEWS = {"cpu": 1, "cuda": 30}


@dataclass
class RuntimeOptions:
    """How a command runs its model: the options every running command shares (``--device``,
    ``--precision``, ``--max-views``, ``--workers``, ``--threads``, ``--runtime``)."""

    device: str | None = None            # cpu, cuda, cuda:N; default: cuda when available
    precision: str = "fp32"              # fp32 | fp16 | bf16
    max_views: int | None = None         # views per forward pass; default: DEFAULT_MAX_VIEWS by device
    workers: int | None = None           # decoding processes; default min(4, cores - 1)
    threads: int | None = None           # CPU threads per process; default cores / processes
    runtime: str = "auto"                # auto | torch | onnxruntime | openvino
    graph_cache: str | None = None       # where ONNX graphs are kept (default: the user cache folder)
    silent_audio: bool = False           # audio-visual models: zeros for a video without an audio stream


@dataclass
class Norm:
    """Input normalisation the user asked for (None: the checkpoint card's)."""

    preset: str | None = None            # "vmz" | "imagenet"
    mean: list | None = None
    std: list | None = None

    def resolve(self, meta: dict, channels: int = 3) -> tuple[list, list]:
        if self.preset:
            mean, std = NORMS[self.preset]["mean"], NORMS[self.preset]["std"]
        else:
            inp = meta.get("input") or {}
            mean, std = inp.get("mean", NORMS["vmz"]["mean"]), inp.get("std", NORMS["vmz"]["std"])
        mean, std = list(self.mean or mean), list(self.std or std)
        if len(mean) != channels or len(std) != channels:
            raise VmzconvError(f"mean {mean} / std {std}: this model takes {channels} input channels "
                               f"({'optical flow x, y' if channels == 2 else 'one value each'})")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise VmzconvError(f"mean {mean} / std {std}: every value must be finite and every std positive")
        return mean, std


# -- torchrun ------------------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's variables, checked before any rendezvous."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 0, 1
    try:
        world = int(raw)
    except ValueError:
        raise VmzconvError(f"WORLD_SIZE={raw[:40]!r} is not a number (torchrun sets it)") from None
    if world <= 1:
        return 0, 1
    try:
        rank = int(os.environ["RANK"])
    except KeyError:
        raise VmzconvError(f"WORLD_SIZE={world} but RANK is not set (start ranks with torchrun)") from None
    except ValueError:
        raise VmzconvError(f"RANK={os.environ['RANK'][:40]!r} is not a number") from None
    if not 0 <= rank < world:
        raise VmzconvError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return rank, world


def _setup_device(name: str | None, world: int):
    """The device of this rank; under torchrun also the process group (nccl on CUDA, gloo on CPU)."""
    import torch

    from .inference import pick_device

    device = pick_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    conv: object                         # load.Converted
    protocol: object                     # video.protocol.Protocol
    mean: list
    std: list
    engine: object                       # inference.Engine
    rank: int
    world: int
    workers: int | None
    notes: list = field(default_factory=list)
    audio: str | None = None             # audio-visual models: "need" (an audio stream) or "silent" (zeros if none)
    flow: bool = False                   # optical-flow models: views are flow computed from clip_len + 1 frames

    @property
    def device(self):
        return self.engine.device

    def stream(self, items, load):
        """Each item's outputs (``inference.Output``), ``load(item)`` decoding in worker processes."""
        from .inference import stream

        return stream(self.engine, items, load, self.mean, self.std, self.workers)

    def gather(self, local: dict) -> list[dict] | None:
        """Every rank's ``local`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [local]
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        return parts

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def describe(self) -> dict:
        return {"runtime": self.engine.runtime, "precision": self.engine.effective_precision,
                "device": str(self.device), "world_size": self.world}


def default_threads(world: int = 1) -> int:
    """CPU threads per process when --threads is not given: OMP_NUM_THREADS when the user set it (a whole
    number), else the cores shared among the processes."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and 1 <= int(env) <= 4096:
        return int(env)
    return max(1, (os.cpu_count() or 1) // world)


@contextlib.contextmanager
def open_run(ckpt: str | Path, arch: str | None, rt: RuntimeOptions, output: str = "logits",
             protocol_overrides: dict | None = None, norm: Norm | None = None, needs_head: str | None = None,
             quiet: bool = False):
    """The shared set-up of a run (see the module docstring); ``output`` is what the model function
    returns: ``logits`` or ``features`` (the pooled vector; audio-visual models also ``audio`` and
    ``fused``). ``needs_head``: the message for a backbone-only file, when the command needs a classifier.
    ``rt.silent_audio``: an audio-visual model gets zeros for a video without an audio stream (else that video
    is an error)."""
    import torch

    from .inference import make_engine
    from .load import load_converted
    from .video.protocol import Protocol

    if rt.runtime not in RUNTIMES:
        raise VmzconvError(f"--runtime {rt.runtime!r}: one of {', '.join(RUNTIMES)}")
    if rt.precision not in PRECISIONS:
        raise VmzconvError(f"--precision {rt.precision!r}: one of {', '.join(PRECISIONS)}")
    rank, world = dist_info()
    try:
        device = _setup_device(rt.device, world)
        if rt.max_views is None:
            rt = replace(rt, max_views=DEFAULT_MAX_VIEWS[device.type])
        torch.set_num_threads(rt.threads or default_threads(world))
        conv = load_converted(ckpt, arch)
        if (needs_head or output == "logits") and not conv.target.has_head:
            raise InputError(needs_head or f"{ckpt}: a backbone-only ({conv.target.name}) file has no classifier")
        protocol = Protocol.from_card(conv.meta.get("input"), **(protocol_overrides or {}))
        mean, std = (norm or Norm()).resolve(conv.meta, conv.arch.in_channels)
        if conv.arch.flow and (conv.arch.in_channels != 2 or protocol.frame_interval != 1):
            raise InputError(f"{ckpt}: an optical-flow model runs here on VMZ's 2-channel flow between consecutive "
                             f"frames (this one: {conv.arch.in_channels} channels, frame interval "
                             f"{protocol.frame_interval})")
        notes: list[str] = list(conv.notes)
        if output in ("audio", "fused") and not conv.arch.fam.av:
            raise InputError(f"{ckpt}: --layer {output} is for audio-visual files; this is {conv.arch.name}")
        engine = make_engine(conv, rt, device, output, notes)
        for note in notes:
            if rank == 0 and not quiet:
                print(f"vmzconv: note: {safe(note)}", file=sys.stderr)
        audio = ("silent" if rt.silent_audio else "need") if conv.arch.fam.av else None
        yield Run(conv, protocol, mean, std, engine, rank, world, rt.workers, notes, audio, conv.arch.flow)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
