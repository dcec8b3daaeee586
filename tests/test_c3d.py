"""VMZ's C3D (c2/lib/models/c3d_model.py): genuine-Caffe2 logits, the card's plain-PyTorch build lines in a
fresh interpreter, the padded-pool5 fault parity must catch, MMAction2's C3D refused for the reason its
source gives, and the commands that run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vmzconv import parity, reference, zoo
from vmzconv.arch import Arch
from vmzconv.blobs import read_blobs
from vmzconv.models import build_model

from .conftest import GOLDEN, assert_one_line_error, golden_blobs, mmaction_registries, run_cli
from .synthetic import frames, write_video

CLASSES = 487


@pytest.fixture(scope="module")
def golden(module_dir):
    """Recipe GOLDEN-1 for C3D at 487 classes (fc6_b, fc7_b on the FC-bias row), converted as bulk converts a
    mixed folder (its --parity-clip is for the ResNets: C3D keeps 16x112, with a note). Parity is run below
    against the reference computed once here (the float64 C3D costs ~7 s); the ~260 MB pickle and file go
    with the module."""
    from vmzconv.convert import convert
    from vmzconv.synth import write_vmz_pickle

    blobs = golden_blobs("c3d", 8, CLASSES)
    src = write_vmz_pickle(module_dir / "c3d_golden.pkl", blobs)
    out = module_dir / "c3d.pth"
    res = convert(src, out, parity_clip=(8, 32), clip_for_resnets_only=True, check_parity=False)
    assert any("fixes its parity clip at 16,112" in n for n in res.notes)
    clip = parity.fixed_clip(16, 112)
    return dict(src=src, out=out, blobs=blobs, clip=clip, ref=reference.forward(blobs, "c3d", 8, CLASSES, clip))


def test_genuine_caffe2_logits_are_reproduced(golden):
    """Genuine Caffe2 ran VMZ's c3d_model.create_model on the recipe: the float64 reference and the converted
    model reproduce its 487 logits within 1e-4 of max |logit| (they land near 1e-7)."""
    caffe2 = np.load(GOLDEN / "c3d_L487_T16.caffe2_logits.npy")
    assert len(golden["blobs"]) == 54
    scale = float(np.abs(caffe2).max())
    from vmzconv.load import load_converted

    conv = load_converted(golden["out"])
    assert conv.arch.name == "c3d" and conv.target.name == "pytorch"
    with torch.no_grad():
        ours = conv.model(torch.from_numpy(golden["clip"])).numpy()
    for got in (golden["ref"], ours):
        assert np.abs(got - caffe2).max() <= 1e-4 * scale
        assert (np.argsort(-got[0])[:5] == np.argsort(-caffe2[0])[:5]).all()
    assert parity.compare(ours, golden["ref"]).passed                  # parity as convert runs it


def test_card_build_lines_in_a_fresh_interpreter_load_strictly_and_agree(golden):
    """The card's `build` lines use torch alone: run in a new Python, the model loads the file with
    strict=True and gives the converted model's logits."""
    card = json.loads(golden["out"].with_name(golden["out"].name + ".json").read_text())
    assert "import torch" in card["build"] and "vmzconv" not in card["build"]
    assert card["input"]["clip_len"] == 16 and card["input"]["crop_size"] == 112
    np.save(golden["out"].parent / "clip.npy", golden["clip"])
    script = card["build"] + f"""
import numpy as np
model.load_state_dict(torch.load({str(golden['out'])!r}, weights_only=True)["state_dict"], strict=True)
with torch.no_grad():
    out = model.eval()(torch.from_numpy(np.load({str(golden['out'].parent / 'clip.npy')!r})))
np.save({str(golden['out'].parent / 'theirs.npy')!r}, out.numpy())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    theirs = np.load(golden["out"].parent / "theirs.npy")
    assert np.abs(theirs - golden["ref"]).max() <= 1e-4 * np.abs(golden["ref"]).max()


def test_padded_pool5_fails_parity_at_pool5(golden):
    """MMAction2's C3D pads pool5 (0, 1, 1): the same weights in such a model leave 512x1x4x4 values, parity
    fails (not a crash) and the trace names pool5."""
    from vmzconv.load import load_converted

    bad = load_converted(golden["out"], pool5_pad=True).model
    blobs = read_blobs(golden["src"])
    trace = parity.trace(blobs, Arch("c3d", 8, CLASSES), bad, clip_size=(16, 112))
    assert not trace.passed and not trace.verdict.passed
    assert trace.first_divergent == "pool5" and "pool5" in trace.hint
    assert "8192" in trace.verdict.reason and "4608" in trace.verdict.reason
    assert [s.name for s in trace.stages] == ["pool1", "pool2", "pool3", "pool4", "pool5", "head"]
    assert not any(s.divergent for s in trace.stages[:4])


def test_mmaction2_is_refused_for_the_reason_its_source_gives(golden, tmp_path):
    """MMAction2 1.2.0's own C3D, built with BN as VMZ's: pool5 pads H and W, fc6 takes 8192, the convs have
    no bias. So --target mmaction2 (and the backbone) is a one-line refusal saying so, and nothing is written."""
    _, MODELS, _ = mmaction_registries()
    theirs = MODELS.build(dict(type="C3D", norm_cfg=dict(type="BN3d")))
    assert theirs.fc6.in_features == 8192 and theirs.pool5.padding == (0, 1, 1)
    assert theirs.conv1a.conv.bias is None
    for target in ("mmaction2", "mmaction2-backbone"):
        res = run_cli("convert", golden["src"], tmp_path / "x.pth", "--target", target, "--no-parity")
        assert_one_line_error(res, "cannot hold c3d", "pool5", "8192", "4608", "bias", "--target pytorch")
    res = run_cli("convert", golden["src"], tmp_path / "x.pth", "--parity-clip", "8,112")
    assert_one_line_error(res, "16,112")
    assert list(tmp_path.iterdir()) == []


def test_parameter_count_is_the_published_one():
    """models.md and model_zoo.md: C3D 64.9 M parameters at 400 classes (convs with biases, fc6-8; BN is not counted)."""
    (row,) = [e for e in zoo.entries() if e["arch"] == "c3d" and "params_m" in e]
    model = build_model("pytorch", Arch("c3d", 8, 400), empty=True)
    count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bn")) / 1e6
    assert abs(count - row["params_m"]) < 0.1           # 64.95: the table truncates
    assert len([e for e in zoo.entries() if e["arch"] == "c3d"]) == 4


def test_config_lines_run_as_printed(golden):
    """`vmzconv config` of a C3D file: the card's class, then a strict load of the file; run as printed."""
    res = run_cli("config", golden["out"])
    assert res.returncode == 0, res.stderr
    ns: dict = {}
    exec(res.stdout, ns)                                             # noqa: S102 (our own printed lines)
    with torch.no_grad():
        got = ns["model"].eval()(torch.from_numpy(golden["clip"])).numpy()
    assert np.abs(got - golden["ref"]).max() <= 1e-4 * np.abs(golden["ref"]).max()


def test_finetune_lines_train_a_step(golden):
    """`vmzconv config --finetune` for C3D: plain PyTorch lines (a new fc8, BN frozen) that run as printed."""
    res = run_cli("config", golden["out"], "--finetune", "--num-classes", "5")
    assert res.returncode == 0, res.stderr
    ns: dict = {}
    exec(res.stdout, ns)                                             # noqa: S102 (our own printed lines)
    before = ns["model"].bn1a.running_mean.clone()
    loss = ns["train_step"](torch.rand(2, 3, 16, 112, 112) * 255, torch.tensor([0, 4]))
    assert np.isfinite(loss) and ns["model"].fc8.out_features == 5
    assert torch.equal(ns["model"].bn1a.running_mean, before)        # frozen BN


def test_predict_and_features_run_c3d(golden, tmp_path):
    """The run-time commands take C3D's 16-frame clips: predict (two clips) and features (one 4096-d fc7
    row per window) on a tiny PyAV video."""
    video = write_video(tmp_path / "v.mp4", frames(3, 24, 160, 120))
    res = run_cli("predict", golden["out"], video, "--num-clips", "2", "--json")
    assert res.returncode == 0, res.stderr
    (pred,) = json.loads(res.stdout)
    assert len(pred["top"]) == 5 and pred["top"][0]["probability"] > 0
    res = run_cli("features", golden["out"], video, "--out-dir", tmp_path / "f", "--num-snippets", "1")
    assert res.returncode == 0, res.stderr
    feats = np.load(next((tmp_path / "f").rglob("*.npy")))
    assert feats.shape == (1, 4096) and (feats >= 0).all()
