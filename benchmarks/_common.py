"""Helpers shared by the benchmarks: run a snippet in a fresh process, report wall time and peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time


def run_measured(code: str, *args: str) -> dict:
    """Run ``code`` in a new interpreter; it must print one JSON line. Adds the child's peak RSS."""
    wrapper = textwrap.dedent("""
        import json, resource, sys, time
        _t0 = time.perf_counter()
        {code}
        _res = dict(result)
        _res["process_seconds"] = round(time.perf_counter() - _t0, 3)
        with open("/proc/self/status") as _f:    # VmHWM: ru_maxrss would carry the parent's peak over fork+exec
            _res["peak_rss_mib"] = round(next(int(l.split()[1]) for l in _f if l.startswith("VmHWM:")) / 1024, 1)
        print(json.dumps(_res))
    """).format(code=textwrap.indent(textwrap.dedent(code), "").strip().replace("\n", "\n"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = round(wall, 3)           # the whole process: interpreter start, imports, exit
    return res


def run_wall(cmd: list[str]) -> float:
    """Wall seconds of a whole command (a fresh process), as a user waits for it."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{out.stderr}")
    return round(wall, 3)


def write_pickles(specs: list[tuple[str, str, int, int]]) -> None:
    """Write VMZ-format pickles [(path, family, depth, seed)] in a child process.

    Linux keeps a process's peak RSS across fork + exec, so a parent that had built big arrays
    would inflate every measured child; generating the data elsewhere keeps the parent small.
    """
    code = ("import sys, json\nfrom vmzconv.synth import seeded_blobs, write_vmz_pickle\n"
            "for path, fam, depth, seed in json.loads(sys.argv[1]):\n"
            "    write_vmz_pickle(path, seeded_blobs(fam, depth, 400, seed))\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(specs)], check=True)
