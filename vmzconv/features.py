"""``vmzconv features``: clip-level features of whole (untrimmed) videos, in sliding windows.

Windows start at frames 0, S, 2S, ... while ``start + span <= num_frames`` with ``span = (clip_len -
1) * frame_interval + 1`` and ``S = stride`` (default ``clip_len * frame_interval``), then one tail
window by ``--tail`` (:class:`video.windows.Windows` holds the rule); or ``--num-snippets`` N windows
spread evenly. Frames are streamed: a window is cut as soon as its last frame is decoded, so a long
video never sits in memory. Each video's rows go to ``NAME.npy`` (float32 [windows, D]) with a sidecar
``NAME.json`` (options, checkpoint sha256, windows), written atomically; a video whose sidecar matches is
skipped, so a killed run resumes. ``index.csv`` (and ``features.h5`` with ``--format h5``, which then
holds the only copy) covers every video."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, OutputError, VmzconvError
from .files import write_atomic
from .run import Norm, RuntimeOptions, open_run
from .text import safe
from .video import annotations
from .video.decode import DecodeError, open_video
from .video.windows import CROPS, TAILS, Shaper, ShortVideo, SlidingPlan, Windows, cut, snippet_plan

LAYERS = ("pool", "logits", "probs", "audio", "fused")     # audio, fused: audio-visual files only
RUN_OUTPUT = {"pool": "features", "logits": "logits", "probs": "logits", "audio": "audio", "fused": "fused"}
FORMATS = ("npy", "h5")
INDEX_HEADER = ["video", "row", "start_frame", "end_frame", "start_sec", "end_sec", "fps", "windows"]


def window_chunks(path: str, w: Windows, batch: int, audio: str | None = None, flow: bool = False):
    """(uint8 views [B * crops, T, h, w, 3], info) for the windows of one video, ``batch`` windows at a
    time, cut while the video streams past (one open of the file); info = {fps, windows: [(start,
    end_frame)], crops}. With ``audio`` (audio-visual models: "need" or "silent") the views come as an
    :class:`inference.AVViews` with each window's log-mels. ``flow``: each window reads clip_len + 1 frames
    and its views are float32 optical flow [B * crops, T, h, w, 2]."""
    if flow:
        from .video.flow import GAP, flow_views

        w = replace(w, clip_len=w.clip_len + GAP)
    with open_video(path) as video:
        rate = w.fps or video.rate
        if not rate:
            raise DecodeError(f"{path}: the video does not say its frame rate (use --fps)")
        track = None
        if w.num_snippets or audio:             # N windows spread over the whole video: its length first
            n = video.count_at(w.fps)
            if n < 1:
                raise DecodeError(f"{path}: no decodable frames")
        if audio:
            from .video.audio import Track

            track = Track(path, n, w.span, audio == "silent")
        if w.num_snippets:
            layout = w.layout(n)
            plan, where = snippet_plan(layout, w.clip_len), layout.__getitem__
        else:
            plan, where = SlidingPlan(w), (lambda window: window)
        pending: list = []

        def chunk():
            views = np.concatenate([v for _, v in pending])
            info = {"fps": rate, "windows": [(s, e) for (s, e, _), _ in pending], "crops": int(pending[0][1].shape[0])}
            pending.clear()
            if flow:
                views = flow_views(views)
            if track is not None:
                from .inference import AVViews

                clips = track.clips([s for s, _ in info["windows"]])
                views = AVViews(views, np.repeat(clips, info["crops"], axis=0), track.silent)
            return views, info

        produced = False
        try:
            for window, views in cut(video.frames(w.fps), plan, Shaper(w.protocol, w.crop, path)):
                produced = True
                pending.append((where(window), views))
                if len(pending) == batch:
                    yield chunk()
        except ShortVideo as short:
            raise DecodeError(f"{path}: {n} frames were counted but {short.frames} decoded") from None
        if not produced:
            raise DecodeError(f"{path}: no decodable frames")
        if pending:
            yield chunk()


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv",
                  ".ts")


def videos_below(folder: str) -> list[tuple[str, str]]:
    """(path, name) of every video file below ``folder`` (by suffix, links to folders not followed, names
    starting with a dot skipped), sorted; name = the path below ``folder`` without the suffix."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(VIDEO_SUFFIXES) and not f.startswith("."):
                path = os.path.join(root, f)
                rel = Path(os.path.relpath(path, folder))
                found.append((path, rel.with_suffix("").as_posix()))
    if not found:
        raise InputError(f"{folder}: no video files below it ({', '.join(VIDEO_SUFFIXES)})")
    return found


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
    tail: str = "pad"
    num_snippets: int | None = None
    recursive: bool = False
    fps: float | None = None
    fmt: str = "npy"
    batch: int = 8                     # windows per forward pass
    force: bool = False
    skip_bad: bool = False
    quiet: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    norm: Norm = field(default_factory=Norm)
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


def _items(opts: Options) -> tuple[list, list[str]]:
    """The videos and their output names: a file's name without its suffix; with ``recursive``, a
    folder's videos by their path below it (``a/x.mp4`` is ``a/x``)."""
    if not opts.videos:
        if not (opts.ann and opts.data_root):
            raise InputError("features: give videos, or --ann LIST with --data-root DIR")
        items = annotations.read(opts.ann, opts.data_root, "auto", unlabelled_ok=True)     # labels are not used
        return items, _names(items, [_name(it.path) for it in items])
    found: list[tuple[str, str]] = []
    for v in map(str, opts.videos):
        if os.path.isdir(v):
            if not opts.recursive:
                raise InputError(f"{v}: a folder; pass --recursive to take every video below it")
            found += videos_below(v)
        else:
            found.append((v, _name(v)))
    items = [annotations.Item(i, path, -1, path, "video") for i, (path, _) in enumerate(found)]
    return items, _names(items, [name for _, name in found])


def _name(path: str) -> str:
    """A video's output name: its file name without the extension (``..mp4`` gives ``__mp4``, not ``.``)."""
    stem = Path(path).stem
    return stem if stem.strip(".") else Path(path).name.replace(".", "_")


def _names(items, names: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for it, name in zip(items, names):
        if name in seen:
            raise InputError(f"{it.path} and {seen[name]} would both be written as {name}.npy; rename one"
                             + ("" if "/" in name else ", or give their folder with --recursive"))
        seen[name] = it.path
    return names


def run(opts: Options) -> Summary:
    """Extract features for every video (this rank's share under torchrun); returns what was written."""
    if opts.layer not in LAYERS or opts.crop not in CROPS or opts.fmt not in FORMATS:
        raise VmzconvError(f"--layer {LAYERS}, --crop {CROPS}, --format {FORMATS}")
    if opts.tail not in TAILS:
        raise VmzconvError(f"--tail: one of {', '.join(TAILS)}")
    if opts.num_snippets is not None and not 1 <= opts.num_snippets <= 100_000:
        raise VmzconvError("--num-snippets must be 1 to 100000")
    if opts.num_snippets and (opts.stride or opts.tail != "pad"):
        raise VmzconvError("--num-snippets places the windows itself; it goes without --stride and --tail")
    out_dir = Path(opts.out_dir)
    items, names = _items(opts)
    planned = ["index.csv", "skipped.txt"] + (["features.h5"] if opts.fmt == "h5" else
                                               [f"{n}{ext}" for n in names for ext in (".npy", ".json")])
    rt = replace(opts.runtime, max_views=opts.batch * (3 if opts.crop == "three" else 1))
    need = (f"{opts.ckpt}: a backbone-only file has no classifier; use --layer pool"
            if opts.layer in ("logits", "probs") else None)
    with open_run(opts.ckpt, opts.arch, rt, RUN_OUTPUT[opts.layer],
                  opts.protocol_overrides, opts.norm, need, opts.quiet) as r:
        # Everything checkable is checked (the checkpoint too) before the output folder is made.
        wins = _windows(opts, r.protocol)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from None
        from .files import check_writable

        check_writable(out_dir, str(out_dir))
        parts = out_dir / PARTS
        if opts.fmt == "h5" and (parts.is_symlink() or (parts.exists() and not parts.is_dir())):
            raise OutputError(f"{parts}: vmzconv keeps its per-video parts in this folder, and here it is a file or "
                              "a link; refused")
        claim_outputs(out_dir, planned, opts.force)
        return _run(opts, r, items, names, out_dir, wins)


def _windows(opts: Options, protocol) -> Windows:
    stride = opts.stride or protocol.clip_len * protocol.frame_interval
    if stride < 1:
        raise VmzconvError("--stride must be at least 1")
    if opts.crop == "three" and protocol.resize and min(protocol.resize) != protocol.crop_size:
        raise VmzconvError(f"--crop three needs the short side equal to --crop-size ({protocol.crop_size}); "
                           f"the frames are resized to {protocol.resize[0]}x{protocol.resize[1]}")
    return Windows(protocol.clip_len, protocol.frame_interval, stride, opts.crop, opts.fps, protocol, opts.tail,
                   opts.num_snippets)


def _run(opts: Options, r, items, names, out_dir: Path, wins: Windows) -> Summary:
    record = {"vmzconv_version": __version__, "checkpoint_sha256": r.conv.sha256, "arch": r.conv.arch.name,
              "layer": opts.layer, "windows": wins.record(), "mean": r.mean, "std": r.std,
              "runtime": r.engine.runtime, "precision": r.engine.effective_precision}
    parts = out_dir / (PARTS if opts.fmt == "h5" else "")
    parts.mkdir(exist_ok=True)
    rank, world = r.rank, r.world
    mine = list(range(rank, len(items), world))
    in_h5 = set() if opts.fmt != "h5" or opts.force else set(_h5_videos(out_dir, record, [names[i] for i in mine]))
    todo = [i for i in mine if opts.force or not _fresh(parts, names[i], record, in_h5)]
    from tqdm import tqdm

    bar = tqdm(unit="window", desc="features", file=sys.stderr, disable=opts.quiet or rank != 0 or not sys.stderr.isatty())
    acc: dict[int, list] = {}
    skipped: dict[int, str] = {}
    silent: set[int] = set()
    load = functools.partial(_item_chunks, w=wins, batch=opts.batch, audio=r.audio, flow=r.flow)
    try:
        for out in r.stream([items[i] for i in todo], load):
            i = out.item.index
            if out.done:
                if out.error is not None:
                    if not opts.skip_bad:
                        raise InputError(f"{out.error} — pass --skip-bad to skip unreadable videos")
                    skipped[i] = out.error
                    acc.pop(i, None)
                    continue
                rows, info_windows, fps = _gather(acc.pop(i, []))
                _write_video(parts, names[i], rows, info_windows, fps, record, i in silent)
                continue
            if out.silent:
                silent.add(i)
            c = out.info["crops"]
            value = out.value
            if opts.layer == "probs":            # softmax per view, then the crops' mean (as verify)
                value = value.float().softmax(dim=-1)
            value = value.reshape(-1, c, value.shape[-1]).mean(dim=1)
            acc.setdefault(i, []).append((value, out.info))
            bar.update(value.shape[0])
    finally:
        bar.close()
    r.barrier()
    index = h5 = None
    done = len(mine) - len(skipped)
    if rank == 0:                   # every rank's videos: counted from what is on disk, not from this rank
        index, h5, total, dim, done = _finish(out_dir, parts, names, items, skipped, record, opts.fmt, world)
    else:
        total, dim = 0, None
    r.barrier()
    return Summary(str(out_dir), len(items), done, {items[i].path: why for i, why in skipped.items()},
                   total, dim, index, h5)


def _item_chunks(item, w: Windows, batch: int, audio: str | None = None, flow: bool = False):
    return window_chunks(item.path, w, batch, audio, flow)


def _gather(chunks: list):
    import torch

    rows = torch.cat([v for v, _ in chunks]) if chunks else torch.zeros(0, 0)
    windows = [w for _, info in chunks for w in info["windows"]]
    fps = chunks[0][1]["fps"] if chunks else None
    return rows.numpy().astype(np.float32), windows, fps


OWNED = ".vmzconv-outputs"       # the names of the files features wrote in its --out-dir, one per line
PARTS = ".vmzconv-parts"         # h5 mode: the per-video arrays before they go into features.h5


def claim_outputs(out_dir: Path, names: list[str], force: bool) -> None:
    """Refuse (unless ``force``) to replace a file in ``out_dir`` that features did not write; record
    ``names`` as features' own before writing them."""
    owned_file = out_dir / OWNED
    owned: set[str] = set()
    if owned_file.exists() or owned_file.is_symlink():
        if not owned_file.is_file() or owned_file.is_symlink():
            raise OutputError(f"{owned_file}: not vmzconv's list of its outputs (a folder or a link); refused")
        try:
            owned = set(owned_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines())
        except OSError as e:
            raise OutputError(f"{owned_file}: cannot read: {e.strerror or e}") from None
    foreign = [n for n in names if n not in owned and ((out_dir / n).exists() or (out_dir / n).is_symlink())]
    if foreign and not force:
        raise OutputError(f"{out_dir / foreign[0]}: exists and was not written by vmzconv features"
                          + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                          + "; refused (--force replaces such files)")
    for n in foreign:
        if (out_dir / n).is_dir() and not (out_dir / n).is_symlink():
            raise OutputError(f"{out_dir / n}: is a folder; features writes a file there")
    for n in names:                     # --recursive names: their folders are made here, never followed
        for parent in list(Path(n).parents)[-2::-1]:
            d = out_dir / parent
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                raise OutputError(f"{d}: features writes into this folder, and here it is a file or a link; refused")
    text = "".join(f"{n}\n" for n in sorted(owned | set(names)))
    write_atomic(owned_file, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


def _fresh(parts: Path, name: str, record: dict, in_h5: set) -> bool:
    """Whether a video's outputs exist, match ``record`` and hold what the sidecar says: a truncated,
    object-typed or non-finite array, or a sidecar with a bad fps or window list, is redone. In h5 mode a
    video already in ``features.h5`` (``in_h5``, checked the same way) is done too."""
    if name in in_h5:
        return True
    try:
        side = json.loads((parts / f"{name}.json").read_text())
        rows = np.load(parts / f"{name}.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError, UnicodeDecodeError):
        return False
    if not isinstance(side, dict) or side.get("record") != record:
        return False
    return _consistent(rows, side.get("fps"), side.get("windows"), side.get("shape"))


def _consistent(rows, fps, windows, shape) -> bool:
    return (isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps < 1e6
            and isinstance(windows, list) and all(isinstance(w, list) and len(w) == 2 for w in windows)
            and rows.dtype == np.float32 and rows.ndim == 2 and list(rows.shape) == shape
            and len(windows) == rows.shape[0] and bool(np.isfinite(rows).all()))


def _h5_videos(out_dir: Path, record: dict, names: list[str]) -> dict:
    """name -> (fps, windows) of the videos an existing ``features.h5`` made with the same options holds
    (each array is read to check it, one at a time, and not kept); anything unreadable or inconsistent
    counts as absent (and is redone)."""
    path = out_dir / "features.h5"
    if not path.is_file() or path.is_symlink():
        return {}
    import h5py

    found = {}
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("options") != json.dumps(record, sort_keys=True):
                return {}
            for name in names:
                ds = h5.get(safe(name))
                if not isinstance(ds, h5py.Dataset):
                    continue
                rows = ds[()]
                fps = float(ds.attrs["fps"])
                windows = np.asarray(ds.attrs["windows"]).reshape(-1, 2).tolist()
                if _consistent(rows, fps, windows, list(rows.shape)):
                    found[name] = (fps, windows)
    except (OSError, KeyError, ValueError, TypeError):
        return {}
    return found


def _write_video(parts: Path, name: str, rows: np.ndarray, windows: list, fps: float, record: dict,
                 silent_audio: bool = False) -> None:
    (parts / name).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, rows)
    write_atomic(parts / f"{name}.npy", lambda f: f.write(buf.getvalue()))
    side = {"record": record, "fps": fps, "windows": [list(w) for w in windows], "shape": list(rows.shape)}
    if silent_audio:                               # an audio-visual model saw zeros for audio (--silent-audio)
        side["silent_audio"] = True
    text = json.dumps(side, indent=1)
    write_atomic(parts / f"{name}.json", lambda f: f.write(text.encode()))     # last: it marks the video done


def _finish(out_dir: Path, parts: Path, names, items, skipped: dict, record: dict, fmt: str, world: int):
    """index.csv over every video of the run (and features.h5), written once every rank is done. In h5
    mode the per-video parts are removed once the file holds them: no hidden copies stay behind."""
    old = _h5_videos(out_dir, record, names) if fmt == "h5" else {}
    entries = []                                   # (name, fps, windows, rows loader)
    for name in names:
        try:
            side = json.loads((parts / f"{name}.json").read_text())
            entries.append((name, side["fps"], side["windows"],
                            functools.partial(np.load, parts / f"{name}.npy", allow_pickle=False)))
        except (OSError, ValueError):
            if name in old:                        # done by an earlier run, kept in features.h5: read when copied
                fps, windows = old[name]
                entries.append((name, fps, windows, functools.partial(_h5_rows, out_dir / "features.h5", name)))
            # else: skipped (here or on another rank)
    kind = "snippets" if record["windows"].get("num_snippets") else record["windows"]["tail"]
    rows, total, dim = [], 0, None
    for name, fps, windows, load in entries:
        for r, (s, e) in enumerate(windows):
            rows.append([name, r, s, e, f"{s / fps:.6f}", f"{(e + 1) / fps:.6f}", f"{fps:.6f}", kind])
        total += len(windows)
        dim = dim if dim is not None or not windows else int(load().shape[1])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_HEADER)
    writer.writerows(rows)
    index = out_dir / "index.csv"
    # a file name that is not UTF-8 goes back to its own bytes, as the file system has it
    write_atomic(index, lambda f: f.write(text.getvalue().encode("utf-8", "surrogateescape")))
    if skipped:
        lines = "".join(safe(f"{items[i].path}: {reason}") + "\n" for i, reason in sorted(skipped.items()))
        write_atomic(out_dir / "skipped.txt", lambda f: f.write(lines.encode()))
    h5 = None
    if fmt == "h5":
        h5 = out_dir / "features.h5"
        write_atomic(h5, lambda f: _write_h5(f.name, entries, record))
        _remove_parts(parts, [name for name, *_ in entries])
    return str(index), (str(h5) if h5 else None), total, dim, len(entries)


def _h5_rows(path: Path, name: str) -> np.ndarray:
    """One video's array from a features.h5 (the old file stays in place until the new one replaces it)."""
    import h5py

    with h5py.File(path, "r") as h5:
        return h5[safe(name)][()]


def _write_h5(path: str, entries: list, record: dict) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["options"] = json.dumps(record, sort_keys=True)
        for name, fps, windows, load in entries:
            ds = h5.create_dataset(safe(name), data=load())
            ds.attrs["fps"] = fps
            ds.attrs["windows"] = np.asarray(windows, dtype=np.int64).reshape(-1, 2)


def _remove_parts(parts: Path, names: list[str]) -> None:
    """Delete the per-video parts features.h5 now holds (the sidecar first: a part without its sidecar
    is never taken as done), then the parts folder's emptied subfolders and itself."""
    for name in names:
        for ext in (".json", ".npy"):
            try:
                (parts / f"{name}{ext}").unlink()
            except FileNotFoundError:
                pass
    for root, dirs, files in os.walk(parts, topdown=False):
        try:
            os.rmdir(root)
        except OSError:
            pass                              # not empty: another run's parts, or a file not ours
