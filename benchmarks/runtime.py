"""Per-view CPU speed of every runtime vmzconv can run a converted model on, interleaved in one run.

For each model (seeded VMZ weights, converted by vmzconv): one normalised view through each contender,
round-robin (A B C ... A B C ...) so that load drifts hit all alike; the median per contender, its
ratio to eager PyTorch, the peak RSS of a separate process that holds only that contender and runs
one view (interpreter, torch and the runtime included), and its agreement with eager
(relative max |logit diff| = max |diff| / max |eager logit|, top-5 identical; for bf16 also
max |probability diff| and top-1 agreement).

Contenders: torch eager (what `--runtime torch` runs on the CPU), torch with BN folded into the
convs and channels-last-3d (a candidate for the eager path), ONNX Runtime and OpenVINO (fp32 and
bf16) on the graph `--runtime onnxruntime|openvino` uses (export's dynamic graph).

    python benchmarks/runtime.py [--reps 5] [--threads 2] [--only ircsn_r152] [--profile]

``--profile`` adds, per model, where the time goes: torch eager's operators (torch.profiler, self CPU
time) and OpenVINO fp32's layers (its own per-layer counters), by kind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmzconv import parity, synth  # noqa: E402
from vmzconv.convert import convert  # noqa: E402
from vmzconv.load import load_converted  # noqa: E402
from vmzconv.models import fold_bn  # noqa: E402

CASES = [("ircsn", 152, 8, 224), ("ircsn", 152, 32, 224), ("r2plus1d", 34, 8, 112), ("r3d", 18, 8, 112)]


NAMES = ("torch eager", "torch fold+cl3d", "onnxruntime", "openvino fp32", "openvino bf16")


def contenders(conv, cache: str, only: str | None = None) -> dict:
    """name -> function of a normalised view, for every contender installed here (or just ``only``)."""
    import copy

    from vmzconv import runtimes

    def want(name):
        return only in (None, name)

    out = {}
    if want("torch eager"):
        out["torch eager"] = lambda x: conv.model(x)
    if want("torch fold+cl3d"):
        folded = fold_bn(copy.deepcopy(conv.model)).to(memory_format=torch.channels_last_3d)
        out["torch fold+cl3d"] = lambda x: folded(x.contiguous(memory_format=torch.channels_last_3d))
    graph = runtimes.graph_file(conv, "logits", Path(cache))
    if runtimes.installed("onnxruntime") and want("onnxruntime"):
        out["onnxruntime"] = runtimes.OnnxRuntimeEngine(graph, "logits", "fp32", 30).forward
    if runtimes.installed("openvino"):
        if want("openvino fp32"):
            out["openvino fp32"] = runtimes.OpenVinoEngine(graph, "logits", "fp32", 30).forward
        if runtimes.bf16_capable() and want("openvino bf16"):
            out["openvino bf16"] = runtimes.OpenVinoEngine(graph, "logits", "bf16", 30).forward
    return out


def rss_child(ckpt: str, cache: str, name: str, t: int, h: int, threads: int) -> None:
    """Run in a fresh process: build one contender, run one view, print the peak RSS in MiB (VmHWM: the
    address space's own high-water mark; ru_maxrss would carry the forking parent's over exec)."""
    torch.set_num_threads(threads)
    fn = contenders(load_converted(ckpt), cache, only=name)[name]
    with torch.inference_mode():
        fn(torch.from_numpy(parity.fixed_clip(t, h)))
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024)


def peak_rss(ckpt, cache, name, t, h, threads) -> int:
    proc = subprocess.run([sys.executable, __file__, "--rss-child", str(ckpt), cache, name, str(t), str(h),
                           str(threads)], capture_output=True, text=True)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else -1


def profile(conv, cache: str, x: torch.Tensor) -> None:
    """Where eager torch and OpenVINO fp32 spend a view, grouped by operator / layer kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        conv.model(x)
    rows = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(t for _, t in rows)
    print("  torch eager, self CPU time by operator:")
    for key, t in rows[:8]:
        print(f"    {key:<38}{t / 1000:>9.0f} ms {100 * t / total:>6.1f}%")
    import openvino as ov

    from vmzconv import runtimes

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(runtimes.graph_file(conv, "logits", Path(cache)))), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "PERF_COUNT": True,
                                   "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    request.infer({0: x.numpy()})
    request.infer({0: x.numpy()})
    by_kind: dict[str, float] = {}
    for info in request.profiling_info:
        kind = f"{info.node_type} ({info.exec_type.split('_')[0]})"
        by_kind[kind] = by_kind.get(kind, 0.0) + info.real_time.total_seconds()
    total = sum(by_kind.values())
    print("  openvino fp32, time by layer kind (its per-layer counters):")
    for kind, t in sorted(by_kind.items(), key=lambda r: -r[1])[:8]:
        print(f"    {kind:<38}{t * 1000:>9.0f} ms {100 * t / total:>6.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="one arch name (e.g. r3d_r18)")
    ap.add_argument("--profile", action="store_true", help="per-operator breakdown for eager torch and OpenVINO")
    ap.add_argument("--rss-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        ckpt, cache, name, t, h, threads = args.rss_child
        return rss_child(ckpt, cache, name, int(t), int(h), int(threads))
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}; one view per forward; median of {args.reps} "
          "interleaved runs")
    with tempfile.TemporaryDirectory() as d:
        for family, depth, t, h in CASES:
            name = f"{family}_r{depth}"
            if args.only and args.only != name:
                continue
            pkl = synth.write_vmz_pickle(Path(d) / f"{name}.pkl", synth.seeded_blobs(family, depth, 400, 0))
            ckpt = Path(d) / f"{name}.pth"
            if not ckpt.exists():
                convert(pkl, ckpt, check_parity=False, card=False)
            conv = load_converted(ckpt)
            cache = os.path.join(d, "cache")
            fns = contenders(conv, cache)
            x = torch.from_numpy(parity.fixed_clip(t, h))
            times: dict[str, list] = {k: [] for k in fns}
            outs = {}
            with torch.inference_mode():
                for k, fn in fns.items():          # warm-up (one-time compilation, allocator) and outputs
                    outs[k] = fn(x).double()
                for _ in range(args.reps):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        fn(x)
                        times[k].append(time.perf_counter() - t0)
            peaks = {k: peak_rss(ckpt, cache, k, t, h, args.threads) for k in fns}
            ref = outs["torch eager"]
            eager = statistics.median(times["torch eager"])
            print(f"\n{name} at {t}x{h}x{h}")
            print(f"  {'runtime':<17}{'ms/view':>9}{'vs eager':>9}{'peak RSS MiB':>14}{'rel |dlogit|':>14}{'top-5':>7}"
                  f"{'max |dp|':>10}{'top-1':>7}")
            for k in fns:
                med = statistics.median(times[k])
                o = outs[k]
                rel = float((o - ref).abs().max() / ref.abs().max())
                top5 = bool((o.topk(5).indices == ref.topk(5).indices).all())
                dp = float((o.softmax(1) - ref.softmax(1)).abs().max())
                top1 = bool((o.argmax(1) == ref.argmax(1)).all())
                print(f"  {k:<17}{med * 1000:>9.0f}{med / eager:>9.2f}{peaks[k]:>14}{rel:>14.2e}"
                      f"{'same' if top5 else 'DIFF':>7}{dp:>10.2e}{'same' if top1 else 'DIFF':>7}")
            if args.profile:
                profile(conv, cache, x)
            del fns, outs, conv


if __name__ == "__main__":
    main()
