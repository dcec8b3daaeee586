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
