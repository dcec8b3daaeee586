"""Score a converted checkpoint on an annotation list, the way MMAction2 tests.

Around the shared run (``vmzconv.run.open_run``) this adds only what verify needs: the per-video
softmax-then-mean, a resumable cache, torchrun sharding (each rank takes every world_size-th video;
rank 0 gathers, so the metrics equal a single-process run), metrics, expectations and the report.
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

from ..errors import CheckError, InputError, OutputError, VmzconvError
from ..files import check_writable, write_atomic
from ..run import Norm, Run, RuntimeOptions, open_run
from ..video import annotations
from ..video.protocol import Protocol
from ..video.windows import item_views
from . import metrics


@dataclass
class Options:
    ckpt: str
    ann: str
    data_root: str
    ann_format: str = "auto"
    arch: str | None = None
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    norm: Norm = field(default_factory=Norm)
    protocol_overrides: dict = field(default_factory=dict)
    filename_tmpl: str = "img_{:05d}.jpg"
    label_map: str | None = None
    cache: str | None = None
    skip_bad: bool = False
    warmup: int = 5
    quiet: bool = False
    allow_outside_root: bool = False
    out: str | None = None               # MMAction2's --out JSON
    report: str | None = None            # the JSON report
    expect_top1: float | None = None     # percent
    expect_top5: float | None = None
    expect_published: bool = False
    tolerance: float = 0.5               # percentage points
    force: bool = False                  # replace an --out/--report file vmzconv did not write


@dataclass
class Outcome:
    metrics: dict
    probs: list                          # per video in annotation order (None where skipped)
    report: dict                         # empty on a non-zero torchrun rank
    checks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def failed(self) -> list:
        return [c for c in self.checks if not c["passed"]]


# -- cache ----------------------------------------------------------------------------------------


class Cache:
    """Per-video probabilities. The folder is keyed by checkpoint, protocol, normalisation, runtime,
    precision, the annotation list's *content* and the data root; each entry by its line and the video's
    identity (name, size, modification time, inode), so an edited list or a replaced video is recomputed,
    never served another video's probabilities. A reused entry must be whole: float64, one finite
    probability per class, summing to 1."""

    def __init__(self, opts: Options, run: Run):
        self.dir: Path | None = None
        self.corrupt = 0
        self.classes = run.conv.arch.num_classes
        if opts.cache:
            key = json.dumps({"ckpt": run.conv.sha256, "protocol": run.protocol.to_dict(), "mean": run.mean,
                              "std": run.std, "runtime": run.engine.runtime,
                              "precision": run.engine.effective_precision,
                              "ann_sha256": hashlib.sha256(Path(opts.ann).read_bytes()).hexdigest(),
                              "data_root": os.path.realpath(opts.data_root)}, sort_keys=True)
            self.dir = Path(opts.cache) / hashlib.sha256(key.encode()).hexdigest()[:16]
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.dir}: cannot create the --cache folder: {e.strerror or e}") from None

    def _file(self, it) -> Path | None:
        if self.dir is None:
            return None
        try:
            st = os.stat(it.path)
            ident = f"{it.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        except OSError:
            ident = f"{it.name}\0missing"
        return self.dir / f"{it.index}-{hashlib.sha256(ident.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.npy"

    def get(self, it) -> np.ndarray | None:
        """A cached entry; an unreadable or malformed one counts as missing (recomputed, and counted)."""
        f = self._file(it)
        if f is None or not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            arr = None
        if (arr is None or arr.dtype != np.float64 or arr.shape != (self.classes,) or not np.isfinite(arr).all()
                or abs(float(arr.sum()) - 1.0) > 1e-3):
            self.corrupt += 1
            return None
        return arr

    def put(self, it, arr: np.ndarray) -> None:
        f = self._file(it)
        if f is not None:
            write_atomic(f, lambda fh: np.save(fh, arr))


# -- the run --------------------------------------------------------------------------------------


def _ours(path: Path, flag: str) -> bool:
    """Whether ``path`` holds what verify writes for ``flag`` (so a rerun may replace it)."""
    try:
        if path.stat().st_size > 1 << 30:
            return False
        obj = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if flag == "--out":
        return isinstance(obj, list) and all(v is None or isinstance(v, list) for v in obj)
    return isinstance(obj, dict) and {"checkpoint", "metrics", "protocol"} <= set(obj)


def check_outputs(opts: Options, items) -> None:
    """--out and --report: never one of the run's inputs, never a file vmzconv did not write (unless
    --force), and in a folder that takes a new file."""
    inputs = {os.path.realpath(p) for p in (opts.ckpt, opts.ann, opts.label_map) if p}
    inputs |= {os.path.realpath(it.path) for it in items}
    for flag, path in (("--out", opts.out), ("--report", opts.report)):
        if not path:
            continue
        path = Path(path)
        if os.path.realpath(path) in inputs:
            raise OutputError(f"{path}: {flag} is one of this run's inputs; refused")
        if path.is_dir():
            raise OutputError(f"{path}: {flag} is a folder")
        if path.exists() and not opts.force and not _ours(path, flag):
            raise OutputError(f"{path}: exists and is not a vmzconv verify {flag} file; refused (--force replaces it)")
        check_writable(path.resolve().parent, str(path))
    if opts.out and opts.report and os.path.realpath(opts.out) == os.path.realpath(opts.report):
        raise OutputError(f"{opts.out}: --out and --report name the same file")


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


def run(opts: Options) -> Outcome:
    """Verify ``opts.ckpt``: check everything checkable first, run, write ``--out``/``--report``, and
    compare with the expectations (the caller raises on :attr:`Outcome.failed`)."""
    t_start = time.perf_counter()
    items = annotations.read(opts.ann, opts.data_root, opts.ann_format, allow_outside_root=opts.allow_outside_root)
    check_outputs(opts, items)                              # fail before the (long) run, not after
    basis = None
    if opts.expect_published and opts.expect_top1 is None:
        opts.expect_top1, opts.expect_top5, basis = published_expectation(opts.ckpt)
    names = annotations.label_names(opts.label_map)
    need = f"{opts.ckpt}: a backbone-only file has no classifier to verify"
    with open_run(opts.ckpt, opts.arch, opts.runtime, "logits", opts.protocol_overrides, opts.norm, need,
                  opts.quiet) as r:
        check_items(items, r.conv.arch.num_classes, opts.skip_bad, opts.ann)
        local = _evaluate(opts, r, items)
        parts = r.gather(local)
        outcome = Outcome({}, [], {})
        if r.rank == 0:
            outcome = _report(opts, r, items, names, parts, time.perf_counter() - t_start)
            if basis is not None:
                outcome.warnings = basis_differences(basis, r.protocol, r.mean, r.std)
                outcome.report["published_basis"] = basis
        r.barrier()
    if outcome.report:
        outcome.checks = check_expectations(outcome.metrics, opts.expect_top1, opts.expect_top5, opts.tolerance)
        outcome.report["expectations"] = outcome.checks
        if opts.out:
            write_json(opts.out, outcome.probs)
        if opts.report:
            write_json(opts.report, outcome.report)
    return outcome


def _evaluate(opts: Options, r: Run, items) -> dict:
    """This rank's share: softmax per view, mean over views, per video (cached ones are not recomputed)."""
    from tqdm import tqdm

    cache = Cache(opts, r)
    mine = items[r.rank::r.world]
    probs: dict[int, np.ndarray] = {}
    for it in mine:
        hit = cache.get(it)
        if hit is not None:
            probs[it.index] = hit
    todo = [it for it in mine if it.index not in probs]
    labels = {it.index: it.label for it in items}
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(r.device)
    bar = tqdm(total=len(mine), initial=len(probs), unit="video", desc="verify", file=sys.stderr,
               disable=opts.quiet or r.rank != 0 or not sys.stderr.isatty())
    skipped: dict[int, str] = {}
    silent: set[int] = set()
    hits = sum(int(np.argmax(v) == labels[i]) for i, v in probs.items())
    infer_s, infer_n, seen = 0.0, 0, 0
    load = functools.partial(item_views, p=r.protocol, filename_tmpl=opts.filename_tmpl, audio=r.audio,
                             flow=r.flow)
    try:
        for out in r.stream(todo, load):
            index = out.item.index
            if out.done:
                bar.update(1)
                if out.error is None:
                    continue
                skipped[index] = out.error
                if not opts.skip_bad and r.world == 1:
                    break
                continue
            seen += 1
            if seen > opts.warmup:
                infer_s += out.seconds
                infer_n += 1
            arr = torch.softmax(out.value, dim=1).mean(dim=0).numpy().astype(np.float64)
            probs[index] = arr
            if out.silent:
                silent.add(index)
            cache.put(out.item, arr)
            hits += int(np.argmax(arr) == labels[index])
            bar.set_postfix_str(f"top-1 {100.0 * hits / max(1, len(probs)):.1f}%")
    finally:
        bar.close()
    peak = int(torch.cuda.max_memory_allocated(r.device) // 2**20) if r.device.type == "cuda" else None
    return {"probs": {i: v.tolist() for i, v in probs.items()}, "skipped": skipped, "cached": len(mine) - len(todo),
            "infer": (infer_s, infer_n), "peak": peak, "corrupt_cache": cache.corrupt, "silent": sorted(silent)}


def _report(opts: Options, r: Run, items, names, parts: list[dict], wall: float) -> Outcome:
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
    conv = r.conv
    report = {
        "checkpoint": {"file": str(opts.ckpt), "sha256": conv.sha256, "arch": conv.arch.name,
                       "target": conv.target.name},
        "annotations": {"file": str(opts.ann), "videos": len(items), "evaluated": len(done),
                        "skipped": len(all_skipped), "from_cache": sum(p["cached"] for p in parts),
                        "cache_entries_recomputed": sum(p["corrupt_cache"] for p in parts)},
        "skipped": [{"video": items[i].name, "reason": reason} for i, reason in sorted(all_skipped.items())],
        "protocol": r.protocol.to_dict() | {"mean": r.mean, "std": r.std},
        "metrics": m,
        **r.describe(),
        "timings": {
            "wall_seconds": round(wall, 3),
            "end_to_end_video_per_s": round(len(done) / wall, 4) if wall else None,
            "inference_video_per_s": round(infer_n / infer_s * r.world, 4) if infer_s else None,
            "inference_videos_timed": infer_n, "warmup_videos_excluded": opts.warmup,
            "peak_gpu_memory_mib": max(peaks) if peaks else None,
        },
    }
    silent = sorted({int(i) for p in parts for i in p.get("silent", [])})
    if silent:                      # audio-visual model, --silent-audio: these videos had no sound
        report["silent_audio"] = [items[i].name for i in silent]
    if names:
        report["predictions"] = {items[i].name: names[int(np.argmax(v))] if int(np.argmax(v)) < len(names) else None
                                 for i, v in sorted(all_probs.items())}
    return Outcome(m, [all_probs.get(it.index) for it in items], report)


def published_expectation(ckpt: str | Path) -> tuple[float, float | None, dict]:
    """Top-1/top-5 (%) published for a known zoo checkpoint (MMAction2's re-measurement, else VMZ's) and how
    they were measured: MMAction2's with its config's normalisation and the card's protocol (MMAction2's
    test settings), VMZ's with VMZ's own."""
    from ..checkpoint import load_meta
    from ..load import check_card
    from ..zoo import NORMS

    meta = load_meta(ckpt)
    check_card(ckpt, meta)
    zoo_info = meta.get("zoo") or {}
    acc = zoo_info.get("published_accuracy") or {}
    who = "mmaction2" if "mmaction2_top1" in acc else "vmz"
    if f"{who}_top1" not in acc:
        raise VmzconvError(f"{ckpt}: no published accuracy in its meta (not a known VMZ zoo file)")
    norm = (zoo_info.get("mmaction2_config_mean_std") if who == "mmaction2" else None) or NORMS["vmz"]
    protocol = {f: (list(v) if isinstance(v, tuple) else v)
                for f, v in Protocol.from_card(meta.get("input")).to_dict().items()}
    basis = {"measured_by": who, "mean": list(norm["mean"]), "std": list(norm["std"]), "protocol": protocol}
    return acc[f"{who}_top1"], acc.get(f"{who}_top5"), basis


def basis_differences(basis: dict, protocol, mean, std) -> list[str]:
    """What this run does differently from how the published numbers were measured (empty: like for like)."""
    out = []
    for name, ours, theirs in (("mean", mean, basis["mean"]), ("std", std, basis["std"])):
        if any(abs(float(a) - float(b)) > 0.01 for a, b in zip(ours, theirs)):
            out.append(f"{name} {_short(theirs)} (this run: {_short(ours)})")
    for f, theirs in basis["protocol"].items():
        ours = getattr(protocol, f)
        ours = list(ours) if isinstance(ours, tuple) else ours
        if ours != theirs:
            out.append(f"{f} {theirs} (this run: {ours})")
    if not out:
        return []
    who = "MMAction2's re-measurement" if basis["measured_by"] == "mmaction2" else "VMZ's"
    return [f"--expect-published: the published numbers ({who}) were measured with {'; '.join(out)}; the comparison "
            "is not like for like"]


def _short(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


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
