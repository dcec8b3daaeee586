"""``vmzconv features``: clip-level features of whole (untrimmed) videos, in sliding windows.

Windows start at frames 0, S, 2S, ... while ``start + span <= num_frames`` with ``span = (clip_len -
1) * frame_interval + 1`` and ``S = stride`` (default ``clip_len * frame_interval``); a video shorter
than one span gives one window whose missing frames repeat the last frame. Frames are streamed: a
window is cut as soon as its last frame is decoded, so a long video never sits in memory. Each
video's rows go to ``NAME.npy`` (float32 [windows, D]) with a sidecar ``NAME.json`` (options,
checkpoint sha256, windows), written atomically; a video whose sidecar matches is skipped, so a
killed run resumes. ``index.csv`` (and ``features.h5`` with ``--format h5``) covers every video.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, OutputError, VmzconvError
from .files import write_atomic
from .verify import annotations, decode
from .verify import protocol as P

LAYERS = ("pool", "logits", "probs")
CROPS = ("center", "none", "three")
FORMATS = ("npy", "h5")
INDEX_HEADER = ["video", "row", "start_frame", "end_frame", "start_sec", "end_sec", "fps"]


@dataclass(frozen=True)
class Windows:
    clip_len: int
    frame_interval: int
    stride: int
    crop: str                 # center | none | three
    fps: float | None         # resample to this rate first
    protocol: P.Protocol      # its resize / short side / crop size shape each frame

    @property
    def span(self) -> int:
        return (self.clip_len - 1) * self.frame_interval + 1

    def starts(self, num_frames: int) -> list[int]:
        """Window start frames for a video of ``num_frames`` frames (the rule in the module docstring)."""
        if num_frames < self.span:
            return [0]
        return list(range(0, num_frames - self.span + 1, self.stride))

    def record(self) -> dict:
        p = self.protocol
        return {"clip_len": self.clip_len, "frame_interval": self.frame_interval, "stride": self.stride,
                "crop": self.crop, "fps": self.fps, "short_side": p.short_side, "crop_size": p.crop_size,
                "resize": list(p.resize) if p.resize else None}


def _crops(frame: np.ndarray, w: Windows, boxes: list) -> np.ndarray:
    """[crops, h, w, 3] of one resized frame (``boxes``: the crop corners, the same for every frame)."""
    if w.crop == "none":
        return frame[None]
    c = w.protocol.crop_size
    return np.stack([frame[y:y + c, x:x + c] for x, y in boxes])


def _boxes(frame: np.ndarray, w: Windows) -> list:
    """Crop corners for frames of this size, worked out once per video."""
    if w.crop == "none":
        return []
    h, wd = frame.shape[:2]
    return P.crop_boxes(wd, h, replace(w.protocol, num_crops=3 if w.crop == "three" else 1))


def window_chunks(path: str, w: Windows, batch: int):
    """(uint8 views [B * crops, T, h, w, 3], info) for the windows of one video, ``batch`` windows at a
    time, cut while the video streams past; info = {fps, windows: [(start, end_frame)], crops}."""
    rate = w.fps or decode.video_rate(path)
    span, step = w.span, w.frame_interval
    buf: dict[int, np.ndarray] = {}
    pending: list = []
    start, n, boxes = 0, 0, None

    def chunk():
        try:
            views = np.concatenate([v for _, _, v in pending])
        except ValueError:
            raise decode.DecodeError(f"{path}: frames change size mid-video") from None
        info = {"fps": rate, "windows": [(s, e) for s, e, _ in pending], "crops": int(pending[0][2].shape[0])}
        pending.clear()
        return views, info

    for frame in decode.iter_frames(path, w.fps):
        # keep a frame only if a window that is still open takes it (start + i * interval)
        if any((n - s) % step == 0 for s in range(start, n + 1, w.stride) if n < s + span):
            frame = P.resize(frame, w.protocol)
            if boxes is None:
                boxes = _boxes(frame, w)
            buf[n] = _crops(frame, w, boxes)
        n += 1
        while start + span <= n:
            idx = [start + i * step for i in range(w.clip_len)]
            pending.append((start, idx[-1], np.stack([buf[j] for j in idx], axis=1)))    # [crops, T, h, w, 3]
            start += w.stride
            for j in [j for j in buf if j < start]:
                del buf[j]
            if len(pending) == batch:
                yield chunk()
    if n == 0:
        raise decode.DecodeError(f"{path}: no decodable frames")
    if start == 0 and n < span:           # shorter than one window: its missing frames repeat the last one
        last = max(buf)
        idx = [min(i * step, last) for i in range(w.clip_len)]
        pending.append((0, n - 1, np.stack([buf[j] for j in idx], axis=1)))
    if pending:
        yield chunk()


@dataclass
class Options:
    ckpt: str
    videos: list                       # video paths, or empty with ann + data_root
    out_dir: str
    ann: str | None = None
    data_root: str | None = None
    arch: str | None = None
    layer: str = "pool"
    crop: str = "center"
    stride: int | None = None
    fps: float | None = None
    fmt: str = "npy"
    batch: int = 8
    workers: int | None = None
    device: str | None = None
    precision: str = "fp32"
    threads: int | None = None
    force: bool = False
    skip_bad: bool = False
    quiet: bool = False
    norm: str | None = None
    mean: list | None = None
    std: list | None = None
    protocol_overrides: dict | None = None


@dataclass
class Summary:
    out_dir: str
    videos: int
    done: int
    skipped: dict
    windows: int
    dim: int | None
    index: str | None
    h5: str | None


def _items(opts: Options) -> list:
    if opts.videos:
        return [annotations.Item(i, str(v), -1, str(v), "video") for i, v in enumerate(opts.videos)]
    if not (opts.ann and opts.data_root):
        raise InputError("features: give videos, or --ann LIST with --data-root DIR")
    return annotations.read(opts.ann, opts.data_root, "auto", unlabelled_ok=True)     # labels are not used


def _names(items) -> list[str]:
    names = [Path(it.path).stem for it in items]
    seen: dict[str, str] = {}
    for it, name in zip(items, names):
        if name in seen:
            raise InputError(f"{it.path} and {seen[name]} would both be written as {name}.npy; rename one")
        seen[name] = it.path
    return names


def run(opts: Options) -> Summary:
    """Extract features for every video (this rank's share under torchrun); returns what was written."""
    from .verify.runner import barrier, dist_info, mean_std, setup_device

    rank, world = dist_info()
    try:
        return _run(opts, rank, world, setup_device, barrier, mean_std)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(opts: Options, rank: int, world: int, setup_device, barrier, mean_std) -> Summary:
    import torch

    from .inference import Engine, stream
    from .load import load_converted

    if opts.layer not in LAYERS or opts.crop not in CROPS or opts.fmt not in FORMATS:
        raise VmzconvError(f"--layer {LAYERS}, --crop {CROPS}, --format {FORMATS}")
    out_dir = Path(opts.out_dir)
    items = _items(opts)
    names = _names(items)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from None
    from .files import check_writable

    check_writable(out_dir, str(out_dir))
    device = setup_device(opts.device, world)
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // world))
    conv = load_converted(opts.ckpt, opts.arch)
    if opts.layer != "pool" and not conv.target.has_head:
        raise InputError(f"{opts.ckpt}: a backbone-only ({conv.target.name}) file has no classifier; use --layer pool")
    over = dict(opts.protocol_overrides or {})
    protocol = P.Protocol.from_card(conv.meta.get("input"), **over)
    stride = opts.stride or protocol.clip_len * protocol.frame_interval
    if stride < 1:
        raise VmzconvError("--stride must be at least 1")
    wins = Windows(protocol.clip_len, protocol.frame_interval, stride, opts.crop, opts.fps, protocol)
    if opts.crop == "three" and protocol.resize and min(protocol.resize) != protocol.crop_size:
        raise VmzconvError(f"--crop three needs the short side equal to --crop-size ({protocol.crop_size}); "
                           f"the frames are resized to {protocol.resize[0]}x{protocol.resize[1]}")
    mean, std = mean_std(opts, conv.meta)
    record = {"vmzconv_version": __version__, "checkpoint_sha256": conv.sha256, "arch": conv.arch.name,
              "layer": opts.layer, "windows": wins.record(), "mean": mean, "std": std}
    parts = out_dir / (".vmzconv-parts" if opts.fmt == "h5" else "")
    parts.mkdir(exist_ok=True)
    mine = list(range(rank, len(items), world))
    todo = [i for i in mine if opts.force or not _fresh(parts, names[i], record)]
    engine = Engine(device, opts.precision, opts.batch * (3 if opts.crop == "three" else 1))
    model = engine.prepare(conv.model)
    fn = model.features if opts.layer == "pool" else model
    from tqdm import tqdm

    bar = tqdm(unit="window", desc="features", file=sys.stderr, disable=opts.quiet or rank != 0 or not sys.stderr.isatty())
    acc: dict[int, list] = {}
    skipped: dict[int, str] = {}
    load = functools.partial(_item_chunks, w=wins, batch=opts.batch)
    try:
        for out in stream(engine, fn, [items[i] for i in todo], load, mean, std, opts.workers):
            i = out.item.index
            if out.done:
                if out.error is not None:
                    if not opts.skip_bad:
                        raise InputError(f"{out.error} — pass --skip-bad to skip unreadable videos")
                    skipped[i] = out.error
                    acc.pop(i, None)
                    continue
                rows, info_windows, fps = _gather(acc.pop(i, []), opts.layer)
                _write_video(parts, names[i], rows, info_windows, fps, record)
                continue
            c = out.info["crops"]
            value = out.value.reshape(-1, c, out.value.shape[-1]).mean(dim=1)
            acc.setdefault(i, []).append((value, out.info))
            bar.update(value.shape[0])
    finally:
        bar.close()
    barrier(world)
    index = h5 = None
    if rank == 0:
        index, h5, total, dim = _finish(out_dir, parts, names, items, skipped, record, opts.fmt, world)
    else:
        total, dim = 0, None
    barrier(world)
    return Summary(str(out_dir), len(items), len(mine) - len(skipped), {items[i].path: r for i, r in skipped.items()},
                   total, dim, index, h5)


def _item_chunks(item, w: Windows, batch: int):
    return window_chunks(item.path, w, batch)


def _gather(chunks: list, layer: str):
    import torch

    rows = torch.cat([v for v, _ in chunks]) if chunks else torch.zeros(0, 0)
    if layer == "probs":
        rows = torch.softmax(rows, dim=1)
    windows = [w for _, info in chunks for w in info["windows"]]
    fps = chunks[0][1]["fps"] if chunks else None
    return rows.numpy().astype(np.float32), windows, fps


def _fresh(parts: Path, name: str, record: dict) -> bool:
    try:
        side = json.loads((parts / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    return side.get("record") == record and (parts / f"{name}.npy").is_file()


def _write_video(parts: Path, name: str, rows: np.ndarray, windows: list, fps: float, record: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, rows)
    write_atomic(parts / f"{name}.npy", lambda f: f.write(buf.getvalue()))
    side = {"record": record, "fps": fps, "windows": [list(w) for w in windows], "shape": list(rows.shape)}
    text = json.dumps(side, indent=1)
    write_atomic(parts / f"{name}.json", lambda f: f.write(text.encode()))     # last: it marks the video done


def _finish(out_dir: Path, parts: Path, names, items, skipped: dict, record: dict, fmt: str, world: int):
    """index.csv over every video of the run (and features.h5), written once every rank is done."""
    rows, total, dim, done = [], 0, None, []
    for i, name in enumerate(names):
        try:
            side = json.loads((parts / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue                               # skipped (here or on another rank)
        fps = side["fps"]
        for r, (s, e) in enumerate(side["windows"]):
            rows.append([name, r, s, e, f"{s / fps:.6f}", f"{(e + 1) / fps:.6f}", f"{fps:.6f}"])
        total += len(side["windows"])
        dim = side["shape"][1] if len(side["shape"]) == 2 else dim
        done.append(name)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_HEADER)
    writer.writerows(rows)
    index = out_dir / "index.csv"
    write_atomic(index, lambda f: f.write(text.getvalue().encode()))
    if skipped:
        lines = "".join(f"{items[i].path!r}: {reason}\n" for i, reason in sorted(skipped.items()))
        write_atomic(out_dir / "skipped.txt", lambda f: f.write(lines.encode()))
    h5 = None
    if fmt == "h5":
        h5 = out_dir / "features.h5"
        write_atomic(h5, lambda f: _write_h5(f.name, parts, done, record))
    return str(index), (str(h5) if h5 else None), total, dim


def _write_h5(path: str, parts: Path, names: list, record: dict) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["options"] = json.dumps(record, sort_keys=True)
        for name in names:
            side = json.loads((parts / f"{name}.json").read_text())
            ds = h5.create_dataset(name, data=np.load(parts / f"{name}.npy"))
            ds.attrs["fps"] = side["fps"]
            ds.attrs["windows"] = np.asarray(side["windows"], dtype=np.int64).reshape(-1, 2)
