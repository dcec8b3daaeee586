"""Run a converted checkpoint over an annotation list and score it.

One code path for CPU and CUDA: a DataLoader decodes and crops ahead in worker
processes (uint8), the main process normalises on the device, runs the views in
chunks of ``max_views`` (autocast on CUDA when asked), takes a softmax per view
and the mean over views. Under ``torchrun`` each rank takes every
world_size-th video and rank 0 gathers the probabilities, so the metrics are
those of a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..arch import Arch, parse_arch_name
from ..checkpoint import load as load_checkpoint
from ..files import write_atomic
from ..convert import VMZ_MEAN, VMZ_STD, guess_target
from ..errors import CheckError, InputError, VmzconvError
from ..files import sha256_file
from ..models import build_model, fill, get_target
from ..zoo import NORMS
from . import annotations, decode, metrics
from .protocol import Protocol, normalise


@dataclass
class Options:
    ckpt: str
    ann: str
    data_root: str
    ann_format: str = "auto"
    arch: str | None = None
    protocol: Protocol = field(default_factory=Protocol)
    mean: list | None = None
    std: list | None = None
    norm: str | None = None              # "vmz" | "imagenet"
    filename_tmpl: str = "img_{:05d}.jpg"
    label_map: str | None = None
    device: str | None = None            # default: cuda if available
    precision: str = "fp32"              # fp32 | fp16 | bf16 (autocast, CUDA only)
    max_views: int = 30
    workers: int | None = None
    cache: str | None = None
    skip_bad: bool = False
    warmup: int = 5
    threads: int | None = None
    quiet: bool = False


@dataclass
class Outcome:
    metrics: dict
    probs: list                          # per video in annotation order (None where skipped)
    labels: list
    skipped: list
    report: dict


# -- the model -------------------------------------------------------------------------------


def load_model(opts: Options) -> tuple[torch.nn.Module, dict, str, str]:
    """The checkpoint in its reference model; returns (model, meta, target, sha256)."""
    state, meta = load_checkpoint(opts.ckpt)
    target = meta.get("target") or guess_target(state)
    if not get_target(target).has_head:
        raise InputError(f"{opts.ckpt}: a backbone-only ({target}) file has no classifier to verify")
    if meta.get("arch"):
        arch = Arch(meta["family"], int(meta["depth"]), int(meta["num_classes"]), int(meta.get("conv1_temporal_kernel", 3)))
        if opts.arch and opts.arch != arch.name:
            raise InputError(f"{opts.ckpt}: --arch {opts.arch} but the checkpoint says {arch.name}")
    else:
        if not opts.arch:
            raise InputError(f"{opts.ckpt}: no vmzconv meta in this checkpoint; name its architecture with --arch")
        family, depth = parse_arch_name(opts.arch)
        head = next((v for k, v in state.items() if k.endswith(("fc_cls.weight", "fc.weight", "proj.weight"))), None)
        if head is None:
            raise InputError(f"{opts.ckpt}: no classifier weight found")
        conv1 = next(v for k, v in state.items() if k.endswith(("conv1.conv.weight", "stem.0.weight", "blocks.0.conv.weight")))
        arch = Arch(family, depth, int(head.shape[0]), int(conv1.shape[2]))
    model = build_model(target, arch, empty=True)
    try:
        fill(model, state)
    except RuntimeError as e:
        raise InputError(f"{opts.ckpt}: does not load strictly as {arch.name} ({target}): "
                         f"{str(e).splitlines()[0][:200]}") from None
    return model.eval(), meta, target, sha256_file(opts.ckpt)


def mean_std(opts: Options, meta: dict) -> tuple[list, list]:
    if opts.norm:
        base = NORMS[opts.norm]
        mean, std = base["mean"], base["std"]
    else:
        inp = meta.get("input") or {}
        mean, std = inp.get("mean", VMZ_MEAN), inp.get("std", VMZ_STD)
    return list(opts.mean or mean), list(opts.std or std)


# -- data ---------------------------------------------------------------------------------------


class Views(torch.utils.data.Dataset):
    def __init__(self, items, p: Protocol, tmpl: str):
        self.items, self.p, self.tmpl = items, p, tmpl

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        """Never raises for a bad video (a worker's exception would arrive as a traceback): the
        error travels as a value and the main process decides."""
        item = self.items[i]
        try:
            return item.index, torch.from_numpy(decode.load_views(item, self.p, self.tmpl)), None
        except VmzconvError as e:
            return item.index, None, str(e)


def _first(batch):
    return batch[0]


# -- distributed ----------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _init_dist(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


# -- the run --------------------------------------------------------------------------------------


def _cache_dir(opts: Options, sha: str, mean, std) -> Path | None:
    if not opts.cache:
        return None
    key = json.dumps({"ckpt": sha, "protocol": opts.protocol.to_dict(), "mean": mean, "std": std,
                      "precision": opts.precision, "ann": os.path.abspath(opts.ann),
                      "data_root": os.path.abspath(opts.data_root)}, sort_keys=True)
    d = Path(opts.cache) / hashlib.sha256(key.encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(opts: Options) -> Outcome:
    rank, world = dist_info()
    try:
        return _run(opts, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise VmzconvError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VmzconvError(f"--device {name}: this torch has no usable CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise VmzconvError(f"--device {name}: only cpu and cuda are supported")
    return device


def _run(opts: Options, rank: int, world: int) -> Outcome:
    device = _device(opts.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        _init_dist(device)
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // world))
    t_start = time.perf_counter()
    items = annotations.read(opts.ann, opts.data_root, opts.ann_format)
    names = annotations.label_names(opts.label_map)
    model, meta, target, sha = load_model(opts)
    mean, std = mean_std(opts, meta)
    cache = _cache_dir(opts, sha, mean, std)
    if opts.precision not in ("fp32", "fp16", "bf16"):
        raise VmzconvError(f"--precision {opts.precision!r}: fp32, fp16 or bf16")
    amp = device.type == "cuda" and opts.precision != "fp32"
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last_3d)
        torch.cuda.reset_peak_memory_stats(device)

    mine = items[rank::world]
    probs: dict[int, np.ndarray] = {}
    skipped: dict[int, str] = {}
    todo = []
    for it in mine:
        f = cache / f"{it.index}.npy" if cache else None
        if f is not None and f.is_file():
            probs[it.index] = np.load(f)
        else:
            todo.append(it)

    workers = opts.workers if opts.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(
        Views(todo, opts.protocol, opts.filename_tmpl), batch_size=1, shuffle=False,
        num_workers=workers, collate_fn=_first, pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None, persistent_workers=False)
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=len(probs), unit="video", desc="verify", file=sys.stderr,
               disable=opts.quiet or rank != 0 or not sys.stderr.isatty())
    labels_by_index = {it.index: it.label for it in items}
    hits = sum(int(np.argmax(v) == labels_by_index[i]) for i, v in probs.items())
    infer_s, infer_n, seen = 0.0, 0, 0
    ctx = torch.autocast("cuda", dtype=torch.float16 if opts.precision == "fp16" else torch.bfloat16) if amp \
        else torch.autocast("cpu", enabled=False)
    with torch.inference_mode():
        for index, v, err in loader:
            if v is None:
                skipped[index] = err
                bar.update(1)
                if not opts.skip_bad and world == 1:
                    break
                continue
            x = v.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            outs = []
            for s in range(0, x.shape[0], opts.max_views):
                clip = normalise(x[s:s + opts.max_views], mean, std)
                if device.type == "cuda":
                    clip = clip.contiguous(memory_format=torch.channels_last_3d)
                with ctx:
                    logits = model(clip)
                outs.append(torch.softmax(logits.float(), dim=1))
            p = torch.cat(outs).mean(dim=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            seen += 1
            if seen > opts.warmup:
                infer_s += dt
                infer_n += 1
            arr = p.cpu().numpy().astype(np.float64)
            probs[index] = arr
            if cache is not None:
                write_atomic(cache / f"{index}.npy", lambda f, a=arr: np.save(f, a))
            hits += int(np.argmax(arr) == labels_by_index[index])
            bar.update(1)
            bar.set_postfix_str(f"top-1 {100.0 * hits / max(1, len(probs)):.1f}%")
    bar.close()
    wall = time.perf_counter() - t_start
    peak_mib = int(torch.cuda.max_memory_allocated(device) // 2**20) if device.type == "cuda" else None

    local = {"probs": {i: v.tolist() for i, v in probs.items()}, "skipped": skipped, "cached": len(mine) - len(todo),
             "infer": (infer_s, infer_n), "peak": peak_mib}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank != 0:
            dist.barrier()
            return Outcome({}, [], [], [], {})
        parts = gathered
    else:
        parts = [local]
    all_probs: dict[int, list] = {}
    all_skipped: dict[int, str] = {}
    for part in parts:
        all_probs.update({int(k): v for k, v in part["probs"].items()})
        all_skipped.update({int(k): v for k, v in part["skipped"].items()})
    infer_s = sum(p["infer"][0] for p in parts)
    infer_n = sum(p["infer"][1] for p in parts)
    peaks = [p["peak"] for p in parts if p["peak"] is not None]

    if all_skipped and not opts.skip_bad:
        first = min(all_skipped)
        raise InputError(f"{all_skipped[first]} — MMAction2 scores the full list; fix the video or pass --skip-bad"
                         + (f" ({len(all_skipped)} bad videos)" if len(all_skipped) > 1 else ""))
    done = [it for it in items if it.index in all_probs]
    if not done:
        raise CheckError("no video could be evaluated")
    scores = np.array([all_probs[it.index] for it in done])
    labels = np.array([it.label for it in done])
    m = metrics.evaluate(scores, labels)
    report = {
        "checkpoint": {"file": str(opts.ckpt), "sha256": sha, "arch": meta.get("arch"), "target": target},
        "annotations": {"file": str(opts.ann), "videos": len(items), "evaluated": len(done),
                        "skipped": len(all_skipped), "from_cache": sum(p["cached"] for p in parts)},
        "skipped": [{"video": items[i].name, "reason": r} for i, r in sorted(all_skipped.items())],
        "protocol": opts.protocol.to_dict() | {"mean": mean, "std": std},
        "metrics": m,
        "device": str(device), "world_size": world, "precision": opts.precision if amp else "fp32",
        "timings": {
            "wall_seconds": round(wall, 3),
            "end_to_end_video_per_s": round(len(done) / wall, 4) if wall else None,
            "inference_video_per_s": round(infer_n / infer_s * world, 4) if infer_s else None,
            "inference_videos_timed": infer_n, "warmup_videos_excluded": opts.warmup,
            "peak_gpu_memory_mib": max(peaks) if peaks else None,
        },
    }
    if names:
        report["predictions"] = {items[i].name: names[int(np.argmax(v))] if int(np.argmax(v)) < len(names) else None
                                 for i, v in sorted(all_probs.items())}
    probs_list = [all_probs.get(it.index) for it in items]
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return Outcome(m, probs_list, [it.label for it in items], sorted(all_skipped), report)


def published_expectation(ckpt: str | Path) -> tuple[float, float | None]:
    """Top-1/top-5 (%) published for a known zoo checkpoint: MMAction2's re-measurement, else VMZ's."""
    from ..checkpoint import load_meta

    acc = ((load_meta(ckpt).get("zoo") or {}).get("published_accuracy")) or {}
    who = "mmaction2" if "mmaction2_top1" in acc else "vmz"
    if f"{who}_top1" not in acc:
        raise VmzconvError(f"{ckpt}: no published accuracy in its meta (not a known VMZ zoo file)")
    return acc[f"{who}_top1"], acc.get(f"{who}_top5")


def check_expectations(m: dict, top1: float | None, top5: float | None, tolerance: float) -> list[dict]:
    """Expected accuracies (in %) against the measured ones."""
    checks = []
    for name, want in (("top1", top1), ("top5", top5)):
        if want is not None:
            got = 100 * m[name]
            checks.append({"metric": name, "expected": want, "measured": round(got, 4), "tolerance": tolerance,
                           "passed": abs(got - want) <= tolerance})
    return checks


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    text = json.dumps(obj)
    write_atomic(path, lambda f: f.write(text.encode()))
