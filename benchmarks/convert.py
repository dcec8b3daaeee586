"""Conversion of an ir-CSN-152 pickle (~120 MB) and an R(2+1)D-152 pickle (~470 MB, the largest VMZ
file): vmzconv against a naive baseline.

Each contender runs in its own fresh process, contenders interleaved round by round; we report the
conversion's own time (timed inside the process, imports excluded), the whole process's wall time
(interpreter start and imports included, as a user waits), and the process's peak RSS. A process that
only imports torch and vmzconv shows the fixed cost every contender pays; the last row is the CLI
itself.

    python benchmarks/convert.py [--arch ircsn_r152 --arch r2plus1d_r152] [--repeat 3]
"""

from __future__ import annotations

import argparse
import pickle  # noqa: F401  (the baseline uses it, in its own process)
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_measured, run_wall, write_pickles  # noqa: E402

FLOOR = """
import torch
import vmzconv.convert
result = {"seconds": 0.0}
"""

VMZCONV = """
from vmzconv.convert import convert
t = time.perf_counter()
convert(sys.argv[2], sys.argv[3], check_parity=False, force=True)
result = {"seconds": round(time.perf_counter() - t, 3)}
"""

VMZCONV_PARITY = """
from vmzconv.convert import convert
t = time.perf_counter()
r = convert(sys.argv[2], sys.argv[3], force=True)
result = {"seconds": round(time.perf_counter() - t, 3), "reference_s": r.verdict.reference_seconds,
          "model_s": r.verdict.model_seconds}
"""

# The naive way (what VMZ's own converter does): build the module, pickle.load the
# whole file, copy each blob into the module's tensors, torch.save the state_dict.
# (The name list is prepared before the clock starts; no hashing, no checks, no fsync.)
BASELINE = """
import pickle, torch
from vmzconv.arch import Arch, parse_arch_name
from vmzconv.mapping import builtin_table_path, expand, load_table
from vmzconv.models import build_model
from vmzconv.targets import DEFAULT_TARGET
fam, depth = parse_arch_name(sys.argv[1])
arch = Arch(fam, depth, 400)
target = DEFAULT_TARGET[fam]
pairs = expand(load_table(builtin_table_path(fam, target)), arch).pairs
t = time.perf_counter()
model = build_model(target, arch)
with open(sys.argv[2], "rb") as f:
    blobs = pickle.load(f, encoding="latin1")["blobs"]
sd = model.state_dict()
with torch.no_grad():
    for blob, key in pairs:
        sd[key].copy_(torch.from_numpy(blobs[blob]))
torch.save({"state_dict": model.state_dict()}, sys.argv[3])
result = {"seconds": round(time.perf_counter() - t, 3)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="repeatable (default: ircsn_r152 and r2plus1d_r152)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for arch in args.arch or ["ircsn_r152", "r2plus1d_r152"]:
        bench(arch, args.repeat)


def bench(arch: str, repeat: int) -> None:
    from vmzconv.arch import parse_arch_name

    fam, depth = parse_arch_name(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{arch}.pkl"
        write_pickles([(str(src), fam, depth, 0)])
        size_mib = src.stat().st_size / 2**20
        print(f"{arch}: pickle {size_mib:.1f} MiB, {repeat} rounds, contenders interleaved, fresh process per run")
        print(f"{'contender':<36}{'in-process s':>13}{'whole process s':>17}{'peak RSS MiB':>14}{'RSS / pickle':>14}")
        rows = [("import torch + vmzconv only", FLOOR, ".pth"),
                ("baseline: pickle.load+copy+save", BASELINE, ".pth"),
                ("vmzconv convert --no-parity", VMZCONV, ".pth"),
                ("vmzconv convert --no-parity (st)", VMZCONV, ".safetensors"),
                ("vmzconv convert (with parity)", VMZCONV_PARITY, ".pth")]
        cli = [sys.executable, "-m", "vmzconv", "convert", str(src), str(Path(tmp) / "cli.pth"), "--no-parity",
               "--force", "-q"]
        runs: dict[str, list] = {label: [] for label, _, _ in rows}
        cli_walls = []
        for _ in range(repeat):                       # A B C ... A B C ...: load drifts hit every contender alike
            for label, code, suffix in rows:
                runs[label].append(run_measured(code, arch, str(src), str(Path(tmp) / f"out{suffix}")))
            cli_walls.append(run_wall(cli))
        for label, _, _ in rows:
            r = runs[label]
            secs = statistics.median(x["seconds"] for x in r)
            wall = statistics.median(x["wall_seconds"] for x in r)
            rss = max(x["peak_rss_mib"] for x in r)
            extra = ""
            if "reference_s" in r[0]:
                extra = (f"   (reference {statistics.median(x['reference_s'] for x in r):.2f} s, "
                         f"model {statistics.median(x['model_s'] for x in r):.2f} s)")
            print(f"{label:<36}{secs:>13.2f}{wall:>17.2f}{rss:>14.0f}{rss / size_mib:>14.2f}{extra}")
        print(f"{'CLI: vmzconv convert --no-parity':<36}{'':>13}{statistics.median(cli_walls):>17.2f}"
              "   (the command as a user runs it: card and all)")


if __name__ == "__main__":
    main()
