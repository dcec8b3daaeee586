"""Parity: the converted model, the NumPy reference, and genuine Caffe2 agree; injected faults fail."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vmzconv import checkpoint, parity, reference
from vmzconv.arch import Arch, detect
from vmzconv.blobs import read_blobs
from vmzconv.convert import map_blobs
from vmzconv.errors import CheckError
from vmzconv.mapping import builtin_table_path
from vmzconv.models import build_model, fill, logits

from .conftest import GOLDEN, assert_one_line_error, golden_blobs


@pytest.mark.parametrize("family", ["ircsn", "ipcsn"])
def test_genuine_caffe2_logits_are_reproduced(vmz_pickle, cli, tmp_path, family):
    caffe2 = np.load(GOLDEN / f"{family}_r50_L400.caffe2_logits.npy")
    assert caffe2.shape == (1, 400)
    src = vmz_pickle.custom(f"golden_{family}.pkl", golden_blobs(family))
    out = tmp_path / "golden.pth"
    res = cli("convert", src, out)
    assert res.exit_code == 0, res.stderr
    clip = parity.fixed_clip(8, 224)
    state, _ = checkpoint.load(out)
    model = build_model("mmaction2", Arch(family, 50, 400))
    model.load_state_dict(state, strict=True)
    ours = logits(model, clip)
    ref = reference.forward(read_blobs(src).arrays, family, 50, 400, clip)
    assert np.abs(ours - caffe2).max() <= 1e-5
    assert np.abs(ref - caffe2).max() <= 1e-5
    assert (np.argsort(-ours[0])[:5] == np.argsort(-caffe2[0])[:5]).all()


def test_fixed_clip_is_the_documented_formula():
    clip = parity.fixed_clip(8, 32)
    j = np.arange(clip.size, dtype=np.float64)
    want = (np.sin(0.013 * j + 0.5) + 0.5 * np.cos(0.0071 * j)).astype(np.float32).reshape(1, 3, 8, 32, 32)
    assert clip.dtype == np.float32 and np.array_equal(clip, want)


def test_compare_rules():
    ref = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert parity.compare(ref + 5e-5, ref).passed
    v = parity.compare(ref + np.array([[0, 0, 0, 0, 0, 2e-4]]), ref)
    assert not v.passed and v.worst_class == 5 and "exceeds" in v.reason
    swapped = ref.copy()
    swapped[0, 3], swapped[0, 4] = 1.00001, 0.99999      # ranks 4 and 5 trade places: within tol, top-5 differs
    ref2 = ref.copy()
    ref2[0, 3], ref2[0, 4] = 0.99999, 1.00001
    v = parity.compare(swapped, ref2)
    assert v.max_abs_diff < 1e-4 and not v.top5_identical and not v.passed
    nan = ref.copy()
    nan[0, 2] = np.nan
    assert not parity.compare(nan, ref).passed and "NaN" in parity.compare(ref, nan).reason
    assert not parity.compare(np.full_like(ref, np.inf), ref).passed


def test_reference_imports_no_torch():
    code = ("import sys, vmzconv.reference, vmzconv.parity; "
            "assert 'torch' not in sys.modules and 'vmzconv.mapping' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def fault_table(tmp_path, family: str, old: str, new: str):
    text = builtin_table_path(family, "mmaction2").read_text()
    assert old in text
    path = tmp_path / f"fault.{family}.toml"
    path.write_text(text.replace(old, new))
    return path


SWAP = '{ bn = "backbone.conv1.bn", suffixes = { "_s" = "%s", "_b" = "%s", "_rm" = "%s", "_riv" = "%s" } }'
FAULTS = {
    "bn scale and bias swapped (stem)": ("ircsn", '"conv1_spatbn_relu" = { bn = "backbone.conv1.bn" }',
                                         '"conv1_spatbn_relu" = ' + SWAP % ("bias", "weight", "running_mean", "running_var")),
    "running mean and variance swapped (stem)": ("ircsn", '"conv1_spatbn_relu" = { bn = "backbone.conv1.bn" }',
                                                 '"conv1_spatbn_relu" = ' + SWAP % ("weight", "bias", "running_var", "running_mean")),
    "ip 1x1x1 and depthwise BNs swapped": (
        "ipcsn",
        '"comp_{i}_spatbn_2_middle" = { bn = "backbone.layer{L}.{j}.conv2.0.bn" }',
        '"comp_{i}_spatbn_2_middle" = { bn = "backbone.layer{L}.{j}.conv2.1.bn" }'),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_mapping_faults_fail_parity(vmz_pickle, cli, tmp_path_factory, tmp_path, fault):
    family, old, new = FAULTS[fault]
    table = fault_table(tmp_path_factory.mktemp("tables"), family, old, new)
    if "ip 1x1x1" in fault:   # swap both directions so every entry is still filled exactly once
        text = table.read_text().replace('"comp_{i}_spatbn_2" = { bn = "backbone.layer{L}.{j}.conv2.1.bn" }',
                                         '"comp_{i}_spatbn_2" = { bn = "backbone.layer{L}.{j}.conv2.0.bn" }')
        table.write_text(text)
    out = tmp_path / "out.pth"
    res = cli("convert", vmz_pickle(family, 50), out, "--mapping", table, "--parity-clip", "8,64")
    assert_one_line_error(res, "parity FAILED", "max |logit diff|", "nothing was written", code=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # the same table with parity off does write: the mapping itself is "valid", only parity catches it
    assert cli("convert", vmz_pickle(family, 50), out, "--mapping", table, "--no-parity").exit_code == 0


@pytest.mark.parametrize("fault", [{"bn_eps": 1e-5}, {"pool": False}])
def test_injected_model_faults_fail_parity(vmz_pickle, fault):
    """Faults in the PyTorch model (reached through the builder, not convert()) that load strictly."""
    blobs = read_blobs(vmz_pickle("ircsn", 50))
    a = detect(blobs)
    _, _, mapped = map_blobs(blobs, a, "mmaction2")
    model = fill(build_model("mmaction2", a, empty=True, **fault), mapped.state_dict)
    verdict = parity.run(blobs, a, model, clip_size=(8, 96))
    assert not verdict.passed and "exceeds" in verdict.reason
    with pytest.raises(CheckError, match=r"parity FAILED .* at class"):
        parity.require(verdict, "x.pkl")


def test_parity_command_on_pth_and_safetensors(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("ipcsn", 50)
    for name in ("a.pth", "a.safetensors"):
        out = tmp_path / name
        assert cli("convert", src, out, "--no-parity").exit_code == 0
        res = cli("parity", src, out, "--json", "--parity-clip", "8,96")
        assert res.exit_code == 0, res.stderr
        verdict = json.loads(res.stdout)
        assert verdict["passed"] and verdict["clip"] == [1, 3, 8, 96, 96] and verdict["arch"] == "ipcsn_r50"


def test_parity_command_catches_a_tampered_file(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("ircsn", 50)
    out = tmp_path / "t.pth"
    assert cli("convert", src, out, "--no-parity").exit_code == 0
    obj = torch.load(out, weights_only=True)
    obj["state_dict"]["backbone.layer3.1.conv2.0.bn.running_var"] *= 1.5
    torch.save(obj, out)
    res = cli("parity", src, out)
    assert res.exit_code == 1 and "FAIL" in res.stdout
    assert_one_line_error(res, "parity FAILED", code=1)


def test_bad_parity_clip_is_refused(vmz_pickle, cli, tmp_path):
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "o.pth", "--parity-clip", "4,224")
    assert_one_line_error(res, "T >= 8")
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "o.pth", "--parity-clip", "eight")
    assert_one_line_error(res, "T,H")
