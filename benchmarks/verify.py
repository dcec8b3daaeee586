"""`verify` throughput: decoding + preprocessing per worker, and the model on one device.

* decode: synthetic 10-second 340x256 videos (250 frames, mpeg4), MMAction2's CSN test protocol
  (10 clips x 32 frames x interval 2, short side 256, 3 crops of 256): views/s and video/s for one
  worker process (the DataLoader runs --workers of these side by side).
* model: forward of --views views of 3 x T x S x S (default 32 x 256, one chunk) for --arch on
  CUDA if present (with --precision), else CPU fp32; synchronised timers, warm-up excluded; on
  CUDA also peak memory (torch.cuda.max_memory_allocated // 2**20).

    python benchmarks/verify.py [--videos 4] [--arch ircsn_r152] [--views 2] [--frames 32] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the tests' synthetic-video helper

from tests.synthetic import frames, write_video  # noqa: E402
from vmzconv.arch import Arch, parse_arch_name  # noqa: E402
from vmzconv.models import build_model  # noqa: E402
from vmzconv.video.annotations import Item  # noqa: E402
from vmzconv.video.protocol import Protocol, normalise  # noqa: E402
from vmzconv.video.windows import item_views  # noqa: E402


def bench_decode(n_videos: int) -> None:
    p = Protocol()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_video(Path(tmp) / f"v{i}.mp4", frames(i, 250, 340, 256, seed=i)) for i in range(n_videos)]
        item_views(Item(0, "warm", 0, str(paths[0]), "video"), p)
        t0 = time.perf_counter()
        for i, path in enumerate(paths):
            v = item_views(Item(i, path.name, 0, str(path), "video"), p)
        dt = time.perf_counter() - t0
    n_views = n_videos * p.views
    print(f"decode+preprocess, 1 worker: {n_videos} videos of 250 frames 340x256 -> {tuple(v.shape)} uint8 views each; "
          f"{n_views / dt:.1f} views/s = {n_videos / dt:.2f} video/s")


def bench_model(arch_name: str, views: int, t: int, s: int, precision: str, reps: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fam, depth = parse_arch_name(arch_name)
    model = build_model("mmaction2", Arch(fam, depth, 400)).eval().to(device)
    x8 = torch.randint(0, 256, (views, t, s, s, 3), dtype=torch.uint8, device=device)
    amp = device.type == "cuda" and precision != "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last_3d)
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def step():
        x = normalise(x8, [110.2, 100.6, 96.0], [58.1, 56.5, 55.3])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return torch.softmax(model(x).float(), 1).mean(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    per_view = min(times) / views
    print(f"model {arch_name} on {device} ({precision if amp else 'fp32'}, {torch.get_num_threads()} CPU threads): "
          f"{views} views of 3x{t}x{s}x{s} per forward, {per_view * 1000:.0f} ms/view -> "
          f"{1 / (30 * per_view):.3f} video/s at 30 views/video")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() // 2**20} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--arch", default="ircsn_r152")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    bench_decode(args.videos)
    bench_model(args.arch, args.views, args.frames, args.size, args.precision, args.reps)


if __name__ == "__main__":
    main()
