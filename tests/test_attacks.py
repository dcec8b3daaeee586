"""The hostile-pickle corpus: every file refused, with words that name the construct, and no side effect."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmzconv.blobs import read_blobs
from vmzconv.errors import VmzconvError

from .conftest import assert_one_line_error

ATTACKS = Path(__file__).parent / "attacks"
MANIFEST = json.loads((ATTACKS / "manifest.json").read_text())
ENV = "VMZCONV_PWNED"


def test_the_corpus_is_current():
    assert len(MANIFEST) >= 40
    assert sorted(p.name for p in ATTACKS.glob("*.pkl")) == sorted(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_attack_is_refused_without_side_effects(name, cli, tmp_path):
    spec = MANIFEST[name]
    canary = Path(spec["canary"]) if spec["canary"] else None
    if canary is not None and canary.exists():
        canary.unlink()
    os.environ.pop(ENV, None)
    with pytest.raises(VmzconvError) as info:
        read_blobs(ATTACKS / name)
    assert spec["refusal_contains"] in str(info.value)
    assert str(ATTACKS / name) in str(info.value)
    res = cli("inspect", ATTACKS / name)                   # the CLI: one line, exit 2, no traceback
    assert_one_line_error(res, spec["refusal_contains"])
    assert res.stderr.rstrip("\n").isprintable(), "attacker bytes reached the terminal unescaped"
    res = cli("convert", ATTACKS / name, tmp_path / "out.pth")
    assert_one_line_error(res, spec["refusal_contains"])
    assert list(tmp_path.iterdir()) == []
    assert canary is None or not canary.exists(), f"{name} ran its payload"
    assert ENV not in os.environ


def test_the_payloads_are_real(tmp_path):
    """Two of the files, given to the standard unpickler in a child process, do run their payload."""
    import subprocess
    import sys

    for name in ("os_system_global_p2.pkl", "inst_os_system.pkl"):
        canary = Path(MANIFEST[name]["canary"])
        canary.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(ATTACKS / name)!r}, 'rb'))"],
                       capture_output=True, timeout=60)
        assert canary.exists()
        canary.unlink()


def test_every_hostile_file_is_answered_within_5_s_and_500_mib(tmp_path):
    """In a child with hard limits: address space at most 500 MiB above what the interpreter and numpy
    already hold, and CPU time capped; each file must be refused in under 5 s of wall time."""
    import subprocess
    import sys

    code = f"""
import json, resource, sys, time
from pathlib import Path
from vmzconv.blobs import read_blobs
from vmzconv.errors import VmzconvError
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
floor_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
limit = vm_bytes() + 500 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, (120, 120))
worst = 0.0
for path in sorted(Path({str(ATTACKS)!r}).glob("*.pkl")):
    t0 = time.perf_counter()
    try:
        read_blobs(path)
        raise SystemExit(f"{{path.name}}: read without a refusal")
    except VmzconvError:
        pass
    worst = max(worst, time.perf_counter() - t0)
    assert time.perf_counter() - t0 < 5.0, path.name
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"worst_s": worst, "rss_above_floor_mib": (peak - floor_rss) / 1024}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["worst_s"] < 5.0 and figures["rss_above_floor_mib"] < 500, figures
    print(figures)
