"""`vmzconv export`: ONNX graphs checked in ONNX Runtime against the PyTorch model before they are kept."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")          # the test command installs the [onnx] extra; see README
ort = pytest.importorskip("onnxruntime")

from vmzconv import parity  # noqa: E402

from .conftest import GOLDEN, assert_one_line_error, golden_blobs  # noqa: E402

CASES = {"ircsn": 50, "ipcsn": 50, "r2plus1d": 18, "r3d": 18}


@pytest.fixture(scope="module")
def golden_ckpts(module_dir, vmz_pickle):
    """The genuine-Caffe2 golden weights (recipe GOLDEN-1), converted without parity (compared below)."""
    from vmzconv.convert import convert

    out = {}
    folder = module_dir
    for family, depth in CASES.items():
        src = vmz_pickle.custom(f"golden_{family}_{depth}.pkl", golden_blobs(family, depth))
        out[family] = folder / f"{family}.pth"
        convert(src, out[family], check_parity=False, card=False)
    return out


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", ["ircsn", pytest.param("ipcsn", marks=pytest.mark.slow),
                                    pytest.param("r2plus1d", marks=pytest.mark.slow)])
def test_golden_caffe2_logits_through_onnx_runtime(golden_ckpts, cli, tmp_path, family):
    out = tmp_path / f"{family}.onnx"
    res = cli("export", golden_ckpts[family], out, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["passed"]
    caffe2 = np.load(GOLDEN / f"{family}_r{CASES[family]}_L400.caffe2_logits.npy")
    clip = parity.fixed_clip(8, 224 if "csn" in family else 112)
    (got,) = session(out).run(["logits"], {"video": clip})
    assert np.abs(got - caffe2).max() <= 1e-4
    assert (np.argsort(-got[0])[:5] == np.argsort(-caffe2[0])[:5]).all()


def test_r3d_golden_dynamic_batch_and_size_metadata_and_card(golden_ckpts, cli, tmp_path):
    out = tmp_path / "r3d.onnx"
    res = cli("export", golden_ckpts["r3d"], out, "--dynamic", "--output", "both")
    assert res.exit_code == 0, res.stderr
    assert "PASS" in res.stdout and "1x3x16x144x144" in res.stdout         # the second size was proven too
    caffe2 = np.load(GOLDEN / "r3d_r18_L400.caffe2_logits.npy")
    sess = session(out)
    logits, feats = sess.run(["logits", "features"], {"video": parity.fixed_clip(8, 112)})
    assert np.abs(logits - caffe2).max() <= 1e-4 and feats.shape == (1, 512)
    three = sess.run(["logits"], {"video": parity.fixed_clip(8, 112, n=3)})[0]    # batch 3 on a batch-1 trace
    assert three.shape == (3, 400) and np.abs(three[0] - logits[0]).max() <= 1e-5
    other = sess.run(["logits"], {"video": parity.fixed_clip(16, 96)})[0]        # another T and H
    from vmzconv.load import load_converted
    import torch

    with torch.no_grad():
        want = load_converted(golden_ckpts["r3d"]).model(torch.from_numpy(parity.fixed_clip(16, 96))).numpy()
    assert np.abs(other - want).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["arch"] == "r3d_r18" and json.loads(props["num_classes"]) == 400
    assert len(props["source_sha256"]) == 64 and json.loads(props["proof"])["passed"] is True
    card = json.loads((tmp_path / "r3d.onnx.json").read_text())
    assert card["source_sha256"] == props["source_sha256"] and card["input"]["shape"] == ["N", 3, "T", "H", "W"]


def test_a_corrupted_graph_is_caught_and_nothing_is_written(golden_ckpts, cli, tmp_path, monkeypatch):
    from onnx import numpy_helper

    from vmzconv import graph as export_mod

    real = export_mod.to_onnx

    def perturbed(*args, **kwargs):
        proto = real(*args, **kwargs)
        init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))     # the largest weight
        arr = numpy_helper.to_array(init) * np.float32(1.05)    # all taps: at T=1 the outer ones meet only padding
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return proto

    monkeypatch.setattr(export_mod, "to_onnx", perturbed)
    res = cli("export", golden_ckpts["r3d"], tmp_path / "bad.onnx")
    assert_one_line_error(res, "does not compute what the PyTorch model does", "nothing was written", code=1)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_is_one_line(golden_ckpts, cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # as if it were not installed
    res = cli("export", golden_ckpts["r3d"], tmp_path / "x.onnx")
    assert_one_line_error(res, "needs the optional extra 'onnx'", "pip install 'vmzconv[onnx]'")
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_are_refused(golden_ckpts, cli, tmp_path):
    assert_one_line_error(cli("export", golden_ckpts["r3d"], tmp_path / "x.pth"), "must end in .onnx")
    (tmp_path / "y.onnx").write_bytes(b"keep me")
    assert_one_line_error(cli("export", golden_ckpts["r3d"], tmp_path / "y.onnx"), "already exists")
    assert (tmp_path / "y.onnx").read_bytes() == b"keep me"
    assert_one_line_error(cli("export", golden_ckpts["r3d"], tmp_path / "z.onnx", "--opset", "7"), "--opset 7")


def test_the_proof_tolerance_scales_with_large_outputs():
    """fp32 rounding grows with the logits: a CSN-152 whose logits reach ~1e2 differs from ONNX Runtime by
    ~1e-4 without anything wrong, so the bound is 1e-4 x max(1, max |output|); a real error still fails."""
    import torch
    from onnx import numpy_helper

    from vmzconv import export as export_mod
    from vmzconv import graph

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 7)
            with torch.no_grad():
                self.fc.weight.copy_(torch.arange(21.0).reshape(7, 3) * 3e3)

        def forward(self, video):
            return self.fc(video.mean(dim=(2, 3, 4)))

    module = Big().eval()
    clip = np.random.default_rng(0).standard_normal((1, 3, 8, 32, 32)).astype(np.float32)
    proto = graph.to_onnx(module, clip, ["logits"], False, graph.max_exporter_opset())
    proof = export_mod.prove(proto, module, [clip], ["logits"])
    check = proof.checks[0]
    assert check["tolerance"] > 1e-4 and check["tolerance"] == pytest.approx(1e-4 * np.abs(module(
        torch.from_numpy(clip)).detach().numpy()).max())
    assert proof.passed
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.001), init.name))
    assert not export_mod.prove(proto, module, [clip], ["logits"]).passed
