"""ONNX Runtime (CPU) against PyTorch (CPU) for one view, same threads: median latency of several runs,
and where ONNX Runtime spends its time when it is the slower one (per-op profile).

    python benchmarks/export.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

CASES = [("ircsn", 152, [(8, 224), (32, 224)]), ("r2plus1d", 34, [(8, 112)])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    from vmzconv import parity
    from vmzconv.convert import convert
    from vmzconv.export import export
    from vmzconv.load import load_converted
    from vmzconv.synth import seeded_blobs, write_vmz_pickle

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads each, median of {args.repeat}")
    print(f"{'arch':<14}{'view':>10}{'pytorch ms':>12}{'onnxrt ms':>11}{'ort/pt':>8}")
    profiles = []
    with tempfile.TemporaryDirectory() as d:
        for fam, depth, sizes in CASES:
            pkl, pth, onx = (os.path.join(d, f"{fam}{depth}.{ext}") for ext in ("pkl", "pth", "onnx"))
            write_vmz_pickle(pkl, seeded_blobs(fam, depth))
            convert(pkl, pth, check_parity=False, card=False)
            export(pth, onx, dynamic=True, card=False)
            model = load_converted(pth).model
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(onx, so, providers=["CPUExecutionProvider"])
            for t, h in sizes:
                x = parity.fixed_clip(t, h)
                pt, ox = [], []
                with torch.no_grad():
                    for _ in range(args.repeat + 1):
                        t0 = time.perf_counter()
                        model(torch.from_numpy(x))
                        t1 = time.perf_counter()
                        sess.run(["logits"], {"video": x})
                        t2 = time.perf_counter()
                        pt.append(t1 - t0)
                        ox.append(t2 - t1)
                p, o = statistics.median(pt[1:]) * 1e3, statistics.median(ox[1:]) * 1e3
                print(f"{fam}_r{depth:<6}{f'{t}x{h}':>10}{p:>12.0f}{o:>11.0f}{o / p:>8.2f}")
                if o > p:
                    profiles.append((f"{fam}_r{depth} {t}x{h}", onx, x, threads))
        for name, onx, x, threads in profiles:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(d, "prof")
            sess = ort.InferenceSession(onx, so, providers=["CPUExecutionProvider"])
            sess.run(["logits"], {"video": x})
            path = sess.end_profiling()
            by_op = collections.Counter()
            for ev in json.load(open(path)):
                if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                    by_op[ev["args"].get("op_name", "?")] += ev["dur"] / 1e3
            total = sum(by_op.values())
            top = ", ".join(f"{op} {ms:.0f} ms ({ms / total:.0%})" for op, ms in by_op.most_common(4))
            print(f"ONNX Runtime profile, {name}: {top}")


if __name__ == "__main__":
    main()
