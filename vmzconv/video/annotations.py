"""Annotation lists: MMAction2 video lists, rawframe lists, and the Kinetics val list."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..blobs import short_repr
from ..errors import InputError

MAX_FRAMES = 10_000_000           # a rawframe folder's frame count (over 4 days at 25 fps)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ogv")


@dataclass(frozen=True)
class Item:
    index: int             # position in the annotation file
    name: str              # what the list calls it (path, frame dir or video id)
    label: int
    path: str              # video file or frame folder
    kind: str              # "video" or "rawframes"
    total_frames: int | None = None


def _split(line: str) -> list[str]:
    return [f for f in re.split(r"[,\s]+", line.strip()) if f]


def _video_index(root: Path) -> dict[str, str]:
    """video id (file stem) -> path, for every video file under root."""
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTENSIONS:
                index.setdefault(stem, os.path.join(dirpath, f))
    return index


def read(ann: str | Path, data_root: str | Path, fmt: str = "auto", unlabelled_ok: bool = False,
         allow_outside_root: bool = False) -> list[Item]:
    """Parse ``ann``; ``fmt`` is videos (``path label``), rawframes (``dir total label``),
    kinetics (``video_id, num_frames, label``: a video file found under ``data_root`` by id,
    or a frame folder of that name), or auto (by the number of fields)."""
    ann, root = Path(ann), Path(data_root)
    try:
        lines = ann.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{ann}: cannot read the annotation list: {e}") from None
    if not root.is_dir():
        raise InputError(f"{root}: --data-root is not a folder")
    items: list[Item] = []
    videos: dict[str, str] | None = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{ann}:{lineno}"
        if "\x00" in line:
            raise InputError(f"{where}: a NUL byte in the line — not a path; refused")
        fields = _split(line)
        kind = fmt
        if fmt == "auto":
            kind = "videos" if len(fields) == 2 else "rawframes" if len(fields) == 3 else "?"
            if len(fields) == 1 and unlabelled_ok:          # a plain list of videos (features)
                items.append(Item(len(items), fields[0], -1, str(root / fields[0]), "video"))
                continue
        try:
            if kind == "videos" and len(fields) == 2:
                name, label = fields[0], int(fields[1])
                items.append(Item(len(items), name, label, str(root / name), "video"))
                continue
            if kind in ("rawframes", "kinetics") and len(fields) == 3:
                name, total, label = fields[0], int(fields[1]), int(fields[2])
                if not 1 <= total <= MAX_FRAMES:
                    raise InputError(f"{where}: total_frames {fields[1][:24]} is not a frame count (1 to {MAX_FRAMES:,})")
                folder = root / name
                if folder.is_dir():
                    items.append(Item(len(items), name, label, str(folder), "rawframes", total))
                    continue
                if videos is None:
                    videos = _video_index(root)
                path = videos.get(Path(name).name) or videos.get(name)
                if path is None:
                    raise InputError(f"{where}: {name}: no frame folder or video file under {root}")
                items.append(Item(len(items), name, label, path, "video", total))
                continue
        except ValueError:
            pass
        raise InputError(f"{where}: cannot parse {short_repr(line.strip())} as a {fmt if fmt != 'auto' else 'video or rawframe'} "
                         "list line (path label | frame_dir total_frames label | video_id, num_frames, label)")
    if not items:
        raise InputError(f"{ann}: no annotations")
    if not allow_outside_root:
        top = os.path.realpath(root)
        for it in items:
            if os.path.commonpath([top, os.path.realpath(it.path)]) != top:
                raise InputError(f"{ann}: {it.name!r} lies outside --data-root {root} "
                                 "(pass --allow-outside-root to read it anyway)")
    return items


def label_names(path: str | Path | None) -> list[str] | None:
    """A label map: one class name per line (line i = class i), optionally ``index name``."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the label map: {e}") from None
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"^(\d+)[,\s]+(.+)$", line)
        names.append(m.group(2) if m else line)
    return names
