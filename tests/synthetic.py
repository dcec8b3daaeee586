"""Tiny synthetic video datasets (PyAV-encoded) for the tests, the demo and the benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frames(label: int, n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    """n RGB frames [n, h, w, 3] uint8: a class-coloured moving gradient plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = np.array([(37 * label) % 256, (91 * label + 40) % 256, (53 * label + 90) % 256], np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        wave = 0.5 + 0.5 * np.sin((x + 3 * t) / 7.0 + (y - 2 * t) / 5.0 + label)
        img = wave[..., None] * colour[None, None, :] + rng.normal(0, 8, (h, w, 3))
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_video(path: str | Path, rgb: np.ndarray, fps: int = 25, codec: str = "mpeg4") -> Path:
    import av

    path = Path(path)
    n, h, w, _ = rgb.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for img in rgb:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_rawframes(folder: str | Path, rgb: np.ndarray, tmpl: str = "img_{:05d}.jpg") -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(rgb, start=1):
        Image.fromarray(img).save(folder / tmpl.format(i), quality=95)
    return folder
