"""The known VMZ pickles (``zoo.toml``): which file is which, and what it should reach."""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

NORMS = {
    "vmz": {"mean": [110.201, 100.64, 95.9966], "std": [58.1489, 56.4701, 55.3324]},
    # MMAction2's "VMZ" constants (torchvision video mean/std x 255) differ from VMZ's by < 0.01.
    "imagenet": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
}


@functools.lru_cache(maxsize=1)
def entries() -> tuple[dict, ...]:
    raw = tomllib.loads((Path(__file__).parent / "zoo.toml").read_text())
    return tuple(raw["model"])


def _fid(name: str) -> str | None:
    """VMZ's run id, ``f<digits>`` before ``.pkl`` (two released names have a space, or %20, before it)."""
    m = re.search(r"(?:^|[^0-9a-z])(f\d{6,})\.pkl$", name.strip().lower().replace("%20", " "))
    return m.group(1) if m else None


def lookup(filename: str) -> dict | None:
    """The zoo entry for a pickle file name (case-insensitive; by its f<id> when renamed)."""
    name = Path(filename).name.lower()
    for e in entries():
        if e["file"].lower() == name:
            return dict(e)
    fid = _fid(name)
    hits = [e for e in entries() if fid and _fid(e["file"]) == fid]
    return dict(hits[0]) if len(hits) == 1 else None


def published_accuracy(entry: dict) -> dict:
    return {k: entry[k] for k in ("vmz_top1", "vmz_top5", "vmz_clip_top1", "mmaction2_top1", "mmaction2_top5")
            if k in entry}
