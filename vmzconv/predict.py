"""``vmzconv predict``: what is in this video? The checkpoint's recorded test protocol (as ``verify``
runs it: softmax per view, mean over views), top-k classes with names."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .run import Norm, RuntimeOptions, open_run
from .video import annotations
from .video.protocol import Protocol
from .video.windows import item_views

# Built-in class names by class count (IG-65M's 359 pretraining classes have no public names).
BUILTIN_LABELS = {400: "kinetics400.txt", 487: "sports1m.txt"}


def class_names(num_classes: int, labels_file: str | None = None) -> list[str] | None:
    """--labels FILE, else the built-in list for 400 (Kinetics-400) or 487 (Sports-1M) classes, else None."""
    if labels_file:
        names = annotations.label_names(labels_file)
        if len(names) != num_classes:
            raise InputError(f"{labels_file}: {len(names)} names for a {num_classes}-class model")
        return names
    if num_classes not in BUILTIN_LABELS:
        return None
    path = Path(__file__).parent / "labels" / BUILTIN_LABELS[num_classes]
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass
class Prediction:
    video: str
    probs: np.ndarray           # averaged probabilities, one per class
    top: list                   # [(index, name or None, probability)]
    silent_audio: bool = False  # an audio-visual model ran on zero log-mels (no audio stream, --silent-audio)


def predict(ckpt: str, videos: list[str], arch: str | None = None, top_k: int = 5, labels: str | None = None,
            protocol_overrides: dict | None = None, norm: Norm | None = None,
            runtime: RuntimeOptions | None = None) -> tuple[list[Prediction], Protocol, object, dict]:
    """Top-k classes of each video; also the protocol, the converted file and how it ran (``Run.describe``)."""
    import torch

    missing = [v for v in videos if not os.path.exists(v) or os.path.isdir(v)]
    if missing:
        raise InputError(f"{missing[0]}: no such video file")
    need = (f"{ckpt}: a backbone-only checkpoint has no classifier to predict with "
            "(`vmzconv features --layer pool` gives its features)")
    with open_run(ckpt, arch, runtime or RuntimeOptions(), "logits", protocol_overrides, norm, need) as r:
        names = class_names(r.conv.arch.num_classes, labels)
        items = [annotations.Item(i, v, -1, v, "video") for i, v in enumerate(videos)]
        probs: dict[int, np.ndarray] = {}
        silent: set[int] = set()
        for out in r.stream(items, functools.partial(item_views, p=r.protocol, audio=r.audio, flow=r.flow)):
            if out.done:
                if out.error:
                    raise InputError(out.error)
                continue
            probs[out.item.index] = torch.softmax(out.value, dim=1).mean(dim=0).numpy().astype(np.float64)
            if out.silent:
                silent.add(out.item.index)
        how = r.describe()
    results = []
    for it in items:
        pr = probs[it.index]
        order = np.argsort(-pr, kind="stable")[:top_k]
        results.append(Prediction(it.path, pr, [(int(c), names[c] if names else None, float(pr[c])) for c in order],
                                  it.index in silent))
    return results, r.protocol, r.conv, how
