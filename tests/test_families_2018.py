"""VMZ's 2018 families (R2D, fR2D, MC2-5, rMC2-5, 18 layers): detection, conversion with parity, genuine-
Caffe2 logits (MC3-18, R2D-18), the published parameter counts, the card's build lines in torchvision's
own classes, the faults parity must catch, and the commands that run them."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from vmzconv import parity, reference, zoo
from vmzconv.arch import Arch
from vmzconv.models import build_model

from . import torchvision_video
from .conftest import GOLDEN, assert_one_line_error, golden_blobs, run_cli
from .synthetic import frames, write_video

FAMS = ("r2d", "r2df", "mc2", "mc3", "mc4", "mc5", "rmc2", "rmc3", "rmc4", "rmc5")


def test_parameter_counts_are_the_published_table():
    """models.md's Params (M) column for every 2018 entry (and R3D-18 / R(2+1)D-18), within its rounding."""
    rows = [e for e in zoo.entries() if "params_m" in e and e["arch"] != "c3d"]      # C3D: test_c3d.py
    assert len(rows) == 24
    for e in rows:
        family = e["arch"].split("_r")[0]
        a = Arch(family, 18, 400, e["clip_len"] if family == "r2d" else None)
        model = build_model("torchvision", a, empty=True)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - e["params_m"]) < 0.1, (e["file"], count, e["params_m"])
    assert len(reference.blob_specs("mc3", 18, 400)) == len(reference.blob_specs("r2d", 18, 400)) == 102


def _convert(vmz_pickle, tmp_path, fam: str, *extra) -> tuple:
    """A seeded depth-18 pickle of ``fam`` (removed after the test) converted by the CLI with parity, in the
    family's default layout (a 32x32 parity clip keeps the float64 reference quick; the golden test runs
    at 112). Returns (checkpoint path, the --json summary)."""
    from vmzconv.synth import seeded_blobs

    src = vmz_pickle.custom(f"{fam}_seeded.pkl", seeded_blobs(fam, 18))
    out = tmp_path / f"{fam}.pth"
    arch = ("--arch", "mc2_r18") if fam == "mc2" else ()        # shapes shared with R2D on 3-frame clips
    res = run_cli("convert", src, out, "--json", "-q", "--parity-clip", "8,32", *arch, *extra)
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


@pytest.mark.parametrize("fam", FAMS)
def test_each_family_is_detected_converted_proven_and_built_by_its_card(vmz_pickle, tmp_path, fam):
    """Detected from the blobs, converted with parity; the card's `build` lines, run against torchvision's
    own classes (VideoResNet, BasicBlock, Conv3DSimple, Conv3DNoTemporal, mc3_18: the wheel's source), build
    a model that loads the file strictly and gives the converted model's logits."""
    from vmzconv.load import load_converted

    path, summary = _convert(vmz_pickle, tmp_path, fam)
    assert summary["arch"] == f"{fam}_r18" and summary["target"] == "torchvision"
    assert summary["parity"]["passed"] and summary["parity"]["max_abs_diff"] <= 1e-4
    card = json.loads(path.with_name(path.name + ".json").read_text())
    assert card["input"]["clip_len"] == 8 and card["input"]["resize"] == [171, 128]
    if fam == "r2d":
        assert card["conv1_temporal_kernel"] == 8
    if torchvision_video.load() is None:
        pytest.skip("the torchvision wheel is not in .venv/wheels (the test command downloads it)")
    ns: dict = {}
    exec(card["build"], ns)                                          # noqa: S102 (our own card)
    model = ns["model"].eval()
    assert type(model).__module__ == "torchvision.models.video.resnet", type(model)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    clip = torch.from_numpy(parity.fixed_clip(8, 56))
    with torch.no_grad():
        theirs = model(clip).numpy()
        ours = load_converted(path).model.eval()(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()


@pytest.mark.parametrize("fam,golden", [("mc3", "mc3_r18_L400_T8"), ("r2d", "r2d_r18_L400_T8")])
def test_genuine_caffe2_logits_are_reproduced(vmz_pickle, cli, tmp_path, fam, golden):
    """Genuine Caffe2 (VMZ's own graph code) on recipe GOLDEN-1: the reference and the converted model
    within 1e-4 of max |logit| (these logits reach 1.9e3 and 1.4e2, so parity's absolute 1e-4 is scaled)."""
    caffe2 = np.load(GOLDEN / f"{golden}.caffe2_logits.npy")
    scale = float(np.abs(caffe2).max())
    blobs = golden_blobs(fam, 18)
    src = vmz_pickle.custom(f"golden_{fam}.pkl", blobs)
    out = tmp_path / "g.pth"
    res = cli("convert", src, out, "--no-parity")                       # the reference is compared below
    assert res.exit_code == 0, res.stderr
    clip = parity.fixed_clip(8, 112)
    ref = reference.forward(blobs, fam, 18, 400, clip)
    from vmzconv.load import load_converted

    with torch.no_grad():
        ours = load_converted(out).model.eval()(torch.from_numpy(clip)).numpy()
    for got in (ref, ours):
        assert np.abs(got - caffe2).max() <= 1e-4 * scale
        assert (np.argsort(-got[0])[:5] == np.argsort(-caffe2[0])[:5]).all()
    resnet = torchvision_video.load()
    if fam == "mc3" and resnet is not None:               # torchvision's own mc3_18, BN eps set as the card says
        model = resnet.mc3_18(num_classes=400).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.eps = 1e-3
        model.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
        with torch.no_grad():
            assert np.abs(model(torch.from_numpy(clip)).numpy() - caffe2).max() <= 1e-4 * scale


def test_ambiguous_blobs_ask_for_arch_and_arch_decides(vmz_pickle, cli, tmp_path):
    """R2D on 3-frame clips and MC2 share every shape (conv1 3x7x7, 2-D stages): the one-line error names
    both, and --arch settles it; the two convert to different models (R2D's conv1 is unpadded in time)."""
    from vmzconv.synth import seeded_blobs

    src = vmz_pickle.custom("r2d_l3.pkl", seeded_blobs("r2d", 18, conv1_kt=3))
    res = cli("convert", src, tmp_path / "x.pth", "--no-parity")
    assert_one_line_error(res, "R2D (r2d_r18)", "MC2 (mc2_r18)", "--arch")
    assert not (tmp_path / "x.pth").exists()
    named = vmz_pickle.custom("mc2_d18_l8.pkl", seeded_blobs("mc2", 18))     # a released name decides
    res = cli("convert", named, tmp_path / "named.pth", "--json", "--no-parity")
    assert res.exit_code == 0 and json.loads(res.stdout)["arch"] == "mc2_r18", res.stderr
    for arch in ("r2d_r18", "mc2_r18"):
        res = cli("convert", src, tmp_path / f"{arch}.pth", "--arch", arch, "--json", "--parity-clip", "8,112")
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["arch"] == arch and json.loads(res.stdout)["parity"]["passed"]


def test_mc3_is_not_r3d(vmz_pickle, cli, tmp_path):
    from vmzconv.synth import seeded_blobs

    res = cli("convert", vmz_pickle.custom("mc3.pkl", seeded_blobs("mc3", 18)), tmp_path / "x.pth", "--arch", "r3d_r18")
    assert_one_line_error(res, "--arch r3d_r18", "mc3_r18")


def _parity_of(fam, change):
    """Parity, against the reference, of the converted model after ``change`` (a wrong port)."""
    from vmzconv.arch import resolve
    from vmzconv.blobs import Blobs
    from vmzconv.convert import map_blobs
    from vmzconv.models import fill
    from vmzconv.synth import seeded_blobs

    blobs = Blobs(f"{fam}.pkl", seeded_blobs(fam, 18))
    a = resolve(blobs, f"{fam}_r18")
    model = fill(build_model("torchvision", a, empty=True), map_blobs(blobs, a, "torchvision")[2].state_dict)
    assert parity.run(blobs, a, model, clip_size=(8, 56)).passed          # right as converted
    change(model)
    return parity.run(blobs, a, model, clip_size=(8, 56))


def test_an_r2d_stem_padded_in_time_fails_parity():
    def pad(model):
        model.stem[0].padding = (4, 3, 3)
    v = _parity_of("r2d", pad)
    assert not v.passed and "exceeds" in v.reason


def test_a_2d_stage_striding_in_time_fails_parity():
    def stride(model):                                  # MC3's layer2 is 2-D: VMZ never strides it in time
        model.layer2[0].conv1[0].stride = (2, 2, 2)
        model.layer2[0].downsample[0].stride = (2, 2, 2)
    v = _parity_of("mc3", stride)
    assert not v.passed and "exceeds" in v.reason


def test_predict_features_and_export_run_them(vmz_pickle, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames(3, 20, 96, 72))
    small = ("--num-clips", "2", "--threads", "1", "--workers", "0")
    files = {fam: _convert(vmz_pickle, tmp_path, fam, "--no-parity")[0] for fam in ("mc3", "r2d", "rmc3")}
    for fam in ("mc3", "r2d"):
        res = run_cli("predict", files[fam], video, "--json", *small)
        assert res.returncode == 0, res.stderr
        top = json.loads(res.stdout)[0]["top"]
        assert len(top) == 5 and all(0 < t["probability"] < 1 and t["name"] for t in top)
    res = run_cli("features", files["r2d"], video, "--out-dir", tmp_path / "f", "--threads", "1", "--workers", "0")
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "f" / "v.npy").shape == (3, 512)        # 20 frames, 8-frame windows + tail
    res = run_cli("export", files["rmc3"], tmp_path / "m.onnx")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("fam,depth", [("mc3", 10), ("rmc4", 16), ("r2df", 101), ("r2d", 16)])
def test_other_depths_of_vmz_builder_convert_with_parity(vmz_pickle, tmp_path, fam, depth):
    """create_mcx / create_rmcx / create_r2df / create_r2d accept BLOCK_CONFIG's 10, 16, 18, 26, 34, 50, 101 and
    152 and always build simple blocks with the shallow widths (so 101 is 33 simple blocks, 512-d, not a
    bottleneck network; 26 and 50 are 18's and 34's networks): detected from the block count, converted with
    parity, and the card's torchvision lines build the same model."""
    from vmzconv.load import load_converted
    from vmzconv.synth import seeded_blobs

    src = vmz_pickle.custom(f"{fam}_d{depth}.pkl", seeded_blobs(fam, depth))
    out = tmp_path / "m.pth"
    res = run_cli("convert", src, out, "--json", "-q", "--parity-clip", "8,32")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["arch"] == f"{fam}_r{depth}" and summary["parity"]["passed"]
    conv = load_converted(out)
    assert conv.arch.kind == "simple" and conv.arch.feature_dim == 512
    assert len(reference.blob_specs(fam, depth, 400)) == len(seeded_blobs(fam, depth))
    resnet = torchvision_video.load()
    if resnet is None:
        pytest.skip("the torchvision wheel is not in .venv/wheels (the test command downloads it)")
    card = json.loads(out.with_name("m.pth.json").read_text())
    ns: dict = {}
    exec(card["build"], ns)                                          # noqa: S102 (our own card)
    ns["model"].load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    clip = torch.from_numpy(parity.fixed_clip(8, 56))
    with torch.no_grad():
        theirs, ours = ns["model"].eval()(clip).numpy(), conv.model(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()

