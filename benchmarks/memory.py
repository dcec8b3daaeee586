"""Peak memory of the commands that run models: by --max-views, and by video length.

1. ``--max-views`` (views per forward): ``predict`` with ir-CSN-50 under MMAction2's CSN protocol (10 clips
   x 3 crops of 32 x 256 x 256) for a few values, with torch and OpenVINO: peak RSS and seconds. The CPU
   default comes from this table.
2. Length: synthetic 1080p videos (25 fps) of two lengths through ``predict``, ``verify`` and ``features``
   (R3D-18, its VMZ protocol): the peak RSS must not follow the length.

Each run is a fresh process; peak RSS is its VmHWM.

    python benchmarks/memory.py [--part views|length] [--seconds 30,120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
from click.testing import CliRunner
from vmzconv.cli import main
t0 = time.perf_counter()
res = CliRunner().invoke(main, sys.argv[1:], catch_exceptions=False)
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) // 1024
print(json.dumps({"code": res.exit_code, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": hwm,
                  "err": res.stderr[-300:]}))
"""


def measure(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["code"] != 0:
        raise SystemExit(f"vmzconv {' '.join(map(str, args))}: {out['err']}")
    return out


def demo(arch: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "vmzconv", "demo", "--arch", arch, "--out-dir", str(folder)], check=True,
                   capture_output=True)
    return folder / f"demo_{arch}.pth"


def hd_video(path: Path, seconds: int, w: int = 1920, h: int = 1080, fps: int = 25) -> Path:
    """A moving pattern, encoded frame by frame (the whole video never sits in memory here either)."""
    import av

    y, x = np.mgrid[0:h, 0:w]
    base = ((x // 40 + y // 40) % 2 * 160 + 40).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(seconds * fps):
            img = np.stack([np.roll(base, 4 * t, axis=1), np.roll(base, 2 * t, axis=0), base], axis=-1)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def part_views(d: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import frames, write_video

    ckpt = demo("ircsn_r50", d / "ir50")
    video = write_video(d / "short.mp4", frames(0, 80, 340, 256))
    print("predict, ir-CSN-50, 30 views of 32x256x256 (10 clips x 3 crops), 2 threads, workers 0")
    print(f"{'runtime':<10}{'--max-views':>12}{'seconds':>9}{'peak RSS MiB':>14}")
    for runtime in ("torch", "openvino"):
        for views in (1, 3, 10, 30):
            r = measure("predict", ckpt, video, "--runtime", runtime, "--max-views", views, "--workers", "0",
                        "--graph-cache", d / "cache")
            print(f"{runtime:<10}{views:>12}{r['seconds']:>9}{r['peak_rss_mib']:>14}")


def part_length(d: Path, lengths: list[int]) -> None:
    ckpt = demo("r3d_r18", d / "r3d")
    print("R3D-18 (VMZ protocol: 10 clips x 8 frames, 171x128, crop 112), 1920x1080 mpeg4 at 25 fps, workers 0")
    print(f"{'video':<10}{'command':<10}{'seconds':>9}{'peak RSS MiB':>14}")
    for sec in lengths:
        t0 = time.perf_counter()
        video = hd_video(d / f"hd{sec}.mp4", sec)
        print(f"{sec} s: {video.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - t0:.0f} s")
        (d / "list.txt").write_text(f"{video.name} 0\n")
        common = ["--workers", "0", "--runtime", "torch"]
        runs = {"predict": ["predict", ckpt, video, *common],
                "verify": ["verify", ckpt, "--ann", d / "list.txt", "--data-root", d, *common, "-q", "--force"],
                "features": ["features", ckpt, video, "--out-dir", d / f"feat{sec}", *common, "-q"]}
        for name, args in runs.items():
            r = measure(*args)
            print(f"{f'{sec} s':<10}{name:<10}{r['seconds']:>9}{r['peak_rss_mib']:>14}")
        video.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["views", "length", "both"], default="both")
    ap.add_argument("--seconds", default="30,120", help="video lengths for the length part")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.part in ("views", "both"):
            part_views(d)
        if args.part in ("length", "both"):
            part_length(d, [int(s) for s in args.seconds.split(",")])


if __name__ == "__main__":
    main()
