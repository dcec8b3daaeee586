"""Parity cost: the NumPy float64 reference and the PyTorch float32 model on the default clip, and what
`parity --trace` (every stage compared) costs beside a plain parity run.

    python benchmarks/parity.py [--repeat 3] [--clip 8,224]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vmzconv import parity, reference
from vmzconv.arch import Arch
from vmzconv.blobs import Blobs
from vmzconv.convert import map_blobs
from vmzconv.models import logits
from vmzconv.synth import seeded_blobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clip", default="8,224")
    args = ap.parse_args()
    t, h = parity.parse_clip(args.clip)
    clip = parity.fixed_clip(t, h)
    print(f"clip 1x3x{t}x{h}x{h}, torch threads {torch.get_num_threads()}, median of {args.repeat}")
    print(f"{'arch':<12}{'reference s':>14}{'pytorch s':>12}{'max |diff|':>14}{'parity s':>11}{'trace s':>10}{'ratio':>8}")
    for family in ("ircsn", "ipcsn"):
        a = Arch(family, 152, 400)
        blobs = Blobs("bench.pkl", seeded_blobs(family, 152))
        model, _, _ = map_blobs(blobs, a, "mmaction2")
        ref_t, mod_t, par_t, tr_t = [], [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = reference.forward(blobs.arrays, family, 152, 400, clip)
            t1 = time.perf_counter()
            ours = logits(model, clip)
            t2 = time.perf_counter()
            parity.run(blobs, a, model, clip_size=(t, h))
            t3 = time.perf_counter()
            tr = parity.trace(blobs, a, model, clip_size=(t, h))
            t4 = time.perf_counter()
            ref_t.append(t1 - t0)
            mod_t.append(t2 - t1)
            par_t.append(t3 - t2)
            tr_t.append(t4 - t3)
            assert tr.first_divergent is None
        diff = float(abs(ours - ref).max())
        p, q = statistics.median(par_t), statistics.median(tr_t)
        print(f"{a.name:<12}{statistics.median(ref_t):>14.2f}{statistics.median(mod_t):>12.2f}{diff:>14.2e}"
              f"{p:>11.2f}{q:>10.2f}{q / p:>8.2f}")


if __name__ == "__main__":
    main()
