"""Model-only inference speed and peak GPU memory, MMAction2's way against vmzconv's fast path.

One "video" = 30 views of 32x256x256 (MMAction2's CSN test sample: 10 clips x 3 crops), batch 1
video, synchronised timers, warm-up excluded (MMAction2's tools/analysis/benchmark.py rule); peak
`torch.cuda.max_memory_allocated()` in MiB. MMAction2's way: fp32, contiguous, eager. Ours: bf16
autocast, channels-last-3d, BN folded into the convs, cuDNN autotune. Agreement: per-video
probabilities of the fast path against fp32 on synthetic views (max |dp|, top-1 agreement).
Writes benchmarks/results/gpu-<device>.json and prints a table. Needs a CUDA device.

    python benchmarks/gpu.py [--videos 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

ARCHS = ["ircsn_r50", "ircsn_r152", "ipcsn_r152", "r2plus1d_r34", "r2plus1d_r152"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--views", type=int, default=30)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device; none is visible here")
    from vmzconv.arch import parse_arch_name
    from vmzconv.convert import convert
    from vmzconv.inference import Engine
    from vmzconv.load import load_converted
    from vmzconv.synth import seeded_blobs, write_vmz_pickle

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    results = {"device": name, "driver": torch.version.cuda, "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "views_per_video": args.views, "videos": args.videos,
               "warmup": args.warmup, "command": " ".join(["python", *sys.argv]), "rows": []}
    print(f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'arch':<15}{'way':<22}{'video/s':>9}{'peak MiB':>10}{'max |dp|':>10}{'top-1 agree':>12}")
    with tempfile.TemporaryDirectory() as d:
        for arch in ARCHS:
            family, depth = parse_arch_name(arch)
            size = (32, 256) if "csn" in family else (32, 112)
            pkl, pth = os.path.join(d, f"{arch}.pkl"), os.path.join(d, f"{arch}.pth")
            write_vmz_pickle(pkl, seeded_blobs(family, depth))
            convert(pkl, pth, check_parity=False, card=False)
            gen = torch.Generator(device="cpu").manual_seed(0)
            views = torch.randint(0, 256, (args.views, size[0], size[1], size[1], 3), dtype=torch.uint8, generator=gen)
            mean, std = [110.201, 100.64, 95.9966], [58.1489, 56.4701, 55.3324]
            probs = {}
            for way, engine in (("mmaction2 fp32 eager", Engine(dev, "fp32", args.views)),
                                ("vmzconv bf16 fast", Engine(dev, "bf16", args.views))):
                model = load_converted(pth).model
                if way.startswith("mmaction2"):
                    model = model.eval().to(dev)
                    torch.backends.cudnn.benchmark = False
                else:
                    model = engine.prepare(model)
                torch.cuda.reset_peak_memory_stats(dev)
                times = []
                for i in range(args.warmup + args.videos):
                    torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    out = engine.run(model, views, mean, std)
                    torch.cuda.synchronize(dev)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                probs[way] = torch.softmax(out, dim=1).mean(0)
                vps = 1.0 / statistics.mean(times)
                peak = torch.cuda.max_memory_allocated(dev) // 2**20
                row = {"arch": arch, "way": way, "video_per_s": round(vps, 3), "peak_mib": int(peak)}
                if way.startswith("vmzconv"):
                    ref = probs["mmaction2 fp32 eager"]
                    row["max_abs_dp"] = float((probs[way] - ref).abs().max())
                    row["top1_agree"] = bool(probs[way].argmax() == ref.argmax())
                results["rows"].append(row)
                print(f"{arch:<15}{way:<22}{vps:>9.2f}{peak:>10}{row.get('max_abs_dp', float('nan')):>10.2e}"
                      f"{str(row.get('top1_agree', '')):>12}")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = os.path.join(os.path.dirname(__file__), "results", f"gpu-{slug}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
