"""Score a converted checkpoint on an annotation list, the way MMAction2 tests.

Around the shared inference stream (``vmzconv.inference``) this adds only what verify needs:
the per-video softmax-then-mean, a resumable cache, torchrun sharding (each rank takes every
world_size-th video; rank 0 gathers, so the metrics equal a single-process run), metrics and
the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckError, InputError, VmzconvError
from ..files import write_atomic
from ..inference import Engine, pick_device, stream
from ..load import load_converted
from ..zoo import NORMS
from . import annotations, decode, metrics
from .protocol import Protocol


@dataclass
class Options:
    ckpt: str
    ann: str
    data_root: str
    ann_format: str = "auto"
    arch: str | None = None
    protocol: Protocol | None = None     # None: the checkpoint card's, with protocol_overrides on top
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
    protocol_overrides: dict = field(default_factory=dict)
    allow_outside_root: bool = False


@dataclass
class Outcome:
    metrics: dict
    probs: list                          # per video in annotation order (None where skipped)
    report: dict


def mean_std(opts: Options, meta: dict) -> tuple[list, list]:
    if opts.norm:
        base = NORMS[opts.norm]
        mean, std = base["mean"], base["std"]
    else:
        inp = meta.get("input") or {}
        mean, std = inp.get("mean", NORMS["vmz"]["mean"]), inp.get("std", NORMS["vmz"]["std"])
    return list(opts.mean or mean), list(opts.std or std)


# -- distributed ----------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def setup_device(name: str | None, world: int) -> torch.device:
    """The device of this rank; under torchrun also the process group (nccl on CUDA, gloo on CPU)."""
    device = pick_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def gather(local: dict, rank: int, world: int) -> list[dict] | None:
    """Every rank's ``local`` on rank 0 (None elsewhere)."""
    if world == 1:
        return [local]
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    return parts


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# -- cache ----------------------------------------------------------------------------------------


class Cache:
    """Per-video probabilities keyed by checkpoint, protocol, normalisation, precision and data."""

    def __init__(self, opts: Options, sha: str, mean, std):
        self.dir: Path | None = None
        self.corrupt = 0
        if opts.cache:
            key = json.dumps({"ckpt": sha, "protocol": opts.protocol.to_dict(), "mean": mean, "std": std,
                              "precision": opts.precision, "ann": os.path.abspath(opts.ann),
                              "data_root": os.path.abspath(opts.data_root)}, sort_keys=True)
            self.dir = Path(opts.cache) / hashlib.sha256(key.encode()).hexdigest()[:16]
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, index: int) -> np.ndarray | None:
        """A cached entry; an unreadable or malformed one counts as missing (recomputed, and counted)."""
        f = self.dir / f"{index}.npy" if self.dir else None
        if f is None or not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            arr = None
        if arr is None or arr.dtype != np.float64 or arr.ndim != 1 or not np.isfinite(arr).all():
            self.corrupt += 1
            return None
        return arr

    def put(self, index: int, arr: np.ndarray) -> None:
        if self.dir is not None:
            write_atomic(self.dir / f"{index}.npy", lambda f: np.save(f, arr))


# -- the run --------------------------------------------------------------------------------------


def run(opts: Options) -> Outcome:
    rank, world = dist_info()
    try:
        return _run(opts, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def check_items(items, classes: int, skip_bad: bool, ann) -> None:
    """Before the first forward: every label is a class of the model, every video file exists."""
    bad = [it for it in items if not 0 <= it.label < classes]
    if bad:
        raise InputError(f"{ann}: {bad[0].name}: label {bad[0].label} is not a class of this {classes}-class model"
                         + (f" ({len(bad)} such lines)" if len(bad) > 1 else ""))
    missing = [it for it in items if it.kind == "video" and not os.path.exists(it.path)]
    if missing and not skip_bad:
        raise InputError(f"{missing[0].path}: no such video file"
                         + (f" ({len(missing)} of the list's videos are missing)" if len(missing) > 1 else "")
                         + " — fix the list or pass --skip-bad")


def _load(opts: Options):
    conv = load_converted(opts.ckpt, opts.arch)
    if not conv.target.has_head:
        raise InputError(f"{opts.ckpt}: a backbone-only ({conv.target.name}) file has no classifier to verify")
    return conv


def _evaluate(opts: Options, engine: Engine, model, todo, labels: dict, cache: Cache, mean, std, bar,
              probs: dict) -> tuple[dict, float, int]:
    """Stream ``todo`` through the model: softmax per view, mean over views. Returns (skipped, seconds, timed)."""
    skipped: dict[int, str] = {}
    hits = sum(int(np.argmax(v) == labels[i]) for i, v in probs.items())
    infer_s, infer_n, seen = 0.0, 0, 0
    load = functools.partial(decode.load_views, p=opts.protocol, filename_tmpl=opts.filename_tmpl)
    for out in stream(engine, model, todo, load, mean, std, opts.workers):
        index = out.item.index
        if out.done:
            bar.update(1)
            if out.error is None:
                continue
            skipped[index] = out.error
            if not opts.skip_bad and dist_info()[1] == 1:
                break
            continue
        seen += 1
        if seen > opts.warmup:
            infer_s += out.seconds
            infer_n += 1
        arr = torch.softmax(out.value, dim=1).mean(dim=0).numpy().astype(np.float64)
        probs[index] = arr
        cache.put(index, arr)
        hits += int(np.argmax(arr) == labels[index])
        bar.set_postfix_str(f"top-1 {100.0 * hits / max(1, len(probs)):.1f}%")
    return skipped, infer_s, infer_n


def _run(opts: Options, rank: int, world: int) -> Outcome:
    device = setup_device(opts.device, world)
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // world))
    t_start = time.perf_counter()
    items = annotations.read(opts.ann, opts.data_root, opts.ann_format, allow_outside_root=opts.allow_outside_root)
    names = annotations.label_names(opts.label_map)
    conv = _load(opts)
    check_items(items, conv.arch.num_classes, opts.skip_bad, opts.ann)
    if opts.protocol is None:
        opts.protocol = Protocol.from_card(conv.meta.get("input"), **opts.protocol_overrides)
    mean, std = mean_std(opts, conv.meta)
    cache = Cache(opts, conv.sha256, mean, std)
    engine = Engine(device, opts.precision, opts.max_views)
    model = engine.prepare(conv.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    mine = items[rank::world]
    probs: dict[int, np.ndarray] = {}
    for it in mine:
        hit = cache.get(it.index)
        if hit is not None:
            probs[it.index] = hit
    todo = [it for it in mine if it.index not in probs]
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=len(probs), unit="video", desc="verify", file=sys.stderr,
               disable=opts.quiet or rank != 0 or not sys.stderr.isatty())
    labels = {it.index: it.label for it in items}
    try:
        skipped, infer_s, infer_n = _evaluate(opts, engine, model, todo, labels, cache, mean, std, bar, probs)
    finally:
        bar.close()
    peak = int(torch.cuda.max_memory_allocated(device) // 2**20) if device.type == "cuda" else None
    local = {"probs": {i: v.tolist() for i, v in probs.items()}, "skipped": skipped, "cached": len(mine) - len(todo),
             "infer": (infer_s, infer_n), "peak": peak, "corrupt_cache": cache.corrupt}
    parts = gather(local, rank, world)
    if rank != 0:
        barrier(world)
        return Outcome({}, [], {})
    outcome = _report(opts, items, names, parts, conv, mean, std, device, engine, world,
                      time.perf_counter() - t_start)
    barrier(world)
    return outcome


def _report(opts: Options, items, names, parts: list[dict], conv, mean, std, device, engine: Engine, world: int,
            wall: float) -> Outcome:
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
    m = metrics.evaluate(scores, np.array([it.label for it in done]))
    report = {
        "checkpoint": {"file": str(opts.ckpt), "sha256": conv.sha256, "arch": conv.arch.name,
                       "target": conv.target.name},
        "annotations": {"file": str(opts.ann), "videos": len(items), "evaluated": len(done),
                        "skipped": len(all_skipped), "from_cache": sum(p["cached"] for p in parts),
                        "cache_entries_recomputed": sum(p["corrupt_cache"] for p in parts)},
        "skipped": [{"video": items[i].name, "reason": r} for i, r in sorted(all_skipped.items())],
        "protocol": opts.protocol.to_dict() | {"mean": mean, "std": std},
        "metrics": m,
        "device": str(device), "world_size": world, "precision": opts.precision if engine.amp else "fp32",
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
    return Outcome(m, [all_probs.get(it.index) for it in items], report)


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
