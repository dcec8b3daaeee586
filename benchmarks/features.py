"""Feature-extraction throughput on the CPU (and CUDA when present): windows/s end to end, decode and
model time separately, peak RSS. Demo weights; a synthetic 10-second 320x240 video at 25 fps.

    python benchmarks/features.py [--seconds 10] [--arch ircsn_r152 --arch r2plus1d_r34]

Each run is a fresh process and its time includes opening the run (an ONNX runtime reads and compiles the
cached graph): use a long enough video for throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import run_measured, write_pickles  # noqa: E402

CASES = [("ircsn", 152, 32, 2, 224), ("r2plus1d", 34, 8, 1, 112)]    # family, depth, clip_len, interval, crop

CHILD = """
import sys, time, torch
from vmzconv.features import Options, run, window_chunks
from vmzconv.run import RuntimeOptions
from vmzconv.video.protocol import Protocol
from vmzconv.video.windows import Windows
ckpt, video, out, L, I, S, device, runtime, cache = sys.argv[1:10]
L, I, S = int(L), int(I), int(S)
p = Protocol(clip_len=L, frame_interval=I, num_clips=1, short_side=S, crop_size=S, num_crops=1)
w = Windows(L, I, L * I, "center", None, p)
t0 = time.perf_counter()
n = sum(len(info["windows"]) for _, info in window_chunks(video, w, 8))
decode_s = time.perf_counter() - t0
t0 = time.perf_counter()
over = dict(clip_len=L, frame_interval=I, short_side=S, crop_size=S)
rt = RuntimeOptions(device=device, workers=0, runtime=runtime, graph_cache=cache)
run(Options(ckpt, [video[:-4] + "_warm.mp4"], out + "_warm", batch=8, quiet=True, runtime=rt, protocol_overrides=over))
t0 = time.perf_counter()          # the graph export and the runtime's proof happened in the warm-up run
res = run(Options(ckpt, [video], out, batch=8, quiet=True, runtime=rt, protocol_overrides=over))
wall = time.perf_counter() - t0
result = dict(windows=n, decode_s=round(decode_s, 2), end_to_end_s=round(wall, 2),
              model_s=round(wall - decode_s, 2), windows_per_s=round(n / wall, 3), threads=torch.get_num_threads())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--arch", action="append", choices=[f"{f}_r{d}" for f, d, *_ in CASES],
                    help="repeatable (default: every case)")
    args = ap.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as d:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.synthetic import frames, write_video

        video = os.path.join(d, "v.mp4")
        write_video(video, frames(3, 25 * args.seconds, 320, 240), fps=25)
        write_video(os.path.join(d, "v_warm.mp4"), frames(3, 80, 320, 240), fps=25)
        print(f"video {args.seconds} s, 320x240, 25 fps; centre crop; batch 8 windows; workers 0 (decode and model "
              "in turn, so model s = end to end - decode)")
        print(f"{'arch':<14}{'clip':>9}{'device':>7}{'runtime':>13}{'windows':>9}{'decode s':>10}{'model s':>9}"
              f"{'total s':>9}{'windows/s':>11}{'peak RSS MiB':>14}")
        for fam, depth, L, I, S in CASES:
            if args.arch and f"{fam}_r{depth}" not in args.arch:
                continue
            pkl, ckpt = os.path.join(d, f"{fam}{depth}.pkl"), os.path.join(d, f"{fam}{depth}.pth")
            write_pickles([(pkl, fam, depth, 0)])
            run_measured("from vmzconv.convert import convert\nconvert(sys.argv[1], sys.argv[2], check_parity=False)\n"
                         "result = {}", pkl, ckpt)
            for dev in devices:
                for runtime in (("torch", "onnxruntime", "openvino") if dev == "cpu" else ("torch",)):
                    r = run_measured(CHILD, ckpt, video, os.path.join(d, f"out_{fam}_{dev}_{runtime}"), str(L), str(I),
                                     str(S), dev, runtime, os.path.join(d, "cache"))
                    print(f"{fam}_r{depth:<6}{f'{L}x{S}':>9}{dev:>7}{runtime:>13}{r['windows']:>9}{r['decode_s']:>10}"
                          f"{r['model_s']:>9}{r['end_to_end_s']:>9}{r['windows_per_s']:>11}{r['peak_rss_mib']:>14}")


if __name__ == "__main__":
    main()
