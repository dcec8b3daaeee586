"""`vmzconv bulk` on 4 ir-CSN-50 pickles at --jobs 1 and --jobs 2 (parity on), against one `convert`.

Each run is a fresh `python -m vmzconv ...` process; wall time covers everything
(worker start-up included). Peak RSS is the largest of the run's processes
(RUSAGE_CHILDREN after it exits), i.e. the heaviest worker.

    python benchmarks/bulk.py [--files 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest process this command ran."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(after, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_pickles

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        write_pickles([(str(src / f"ircsn50_{i}.pkl"), "ircsn", 50, i) for i in range(args.files)])
        vmz = [sys.executable, "-m", "vmzconv"]
        # one convert first: RUSAGE_CHILDREN only grows, so measure the lightest thing first
        single_wall, single_rss = timed(vmz + ["convert", str(src / "ircsn50_0.pkl"), str(Path(tmp) / "one.pth")])
        print(f"{args.files} x ir-CSN-50 ({(src / 'ircsn50_0.pkl').stat().st_size / 2**20:.0f} MiB each), parity on")
        print(f"{'run':<28}{'wall s':>10}{'peak RSS MiB':>16}")
        print(f"{'single convert (1 file)':<28}{single_wall:>10.1f}{single_rss:>16.0f}")
        walls, busy = {}, {}
        for jobs in (1, 2):
            out = Path(tmp) / f"out{jobs}"
            walls[jobs], rss = timed(vmz + ["bulk", str(src), str(out), "--jobs", str(jobs), "-q"])
            rows = json.loads((out / "report.json").read_text())["rows"]
            busy[jobs] = sum(r["seconds"] for r in rows) / jobs
            peaks = ", ".join(f"{r['worker_peak_rss_mib']:.0f}" for r in rows)
            print(f"{f'bulk --jobs {jobs}':<28}{walls[jobs]:>10.1f}{rss:>16.0f}   worker peak after each file: {peaks}")
        print(f"speed-up --jobs 2 vs 1: {walls[1] / walls[2]:.2f}x wall; "
              f"{busy[1] / busy[2]:.2f}x on the conversions alone (sum of per-file seconds / jobs)")


if __name__ == "__main__":
    main()
