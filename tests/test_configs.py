"""`vmzconv config` and `convert --print-config`: every MMAction2 config vmzconv prints is executed here by
MMAction2 1.2.0's own ``Config.fromfile`` + ``MODELS.build`` + ``init_weights()`` (the `mmaction` extra plus
``pip install --no-deps mmaction2==1.2.0``), and the plain-PyTorch fine-tuning lines are run as printed."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch

from vmzconv import checkpoint, parity

from .conftest import GOLDEN, golden_blobs, mmaction_registries as _mmaction
from .synthetic import frames, write_video


@pytest.fixture(scope="module")
def mm():
    return _mmaction()


@pytest.fixture(scope="module")
def converted(module_dir, vmz_pickle):
    """Converted files, made once: the golden ir-CSN-50 (GOLDEN-1 weights) as a recognizer and as a backbone,
    a seeded ip-CSN-152 and R3D-18 backbone and recognizer."""
    from vmzconv.convert import convert

    golden = vmz_pickle.custom("golden_ircsn_cfg.pkl", golden_blobs("ircsn"))
    out = {}
    for key, src, target in [("ircsn50", golden, "mmaction2-backbone"), ("ircsn50-rec", golden, "mmaction2"),
                             ("ipcsn152", vmz_pickle("ipcsn", 152), "mmaction2-backbone"),
                             ("r3d18", vmz_pickle("r3d", 18, keep=True), "mmaction2-backbone"),
                             ("r3d18-rec", vmz_pickle("r3d", 18, keep=True), "mmaction2")]:
        out[key] = module_dir / f"{key}.pth"
        convert(src, out[key], target=target, check_parity=False)
    vmz_pickle.evict_large()
    return out


def _config(cli, tmp_path, *args):
    from mmengine.config import Config

    res = cli("config", *args)
    assert res.exit_code == 0, res.stderr
    ast.parse(res.stdout)                                     # stdout holds the config and nothing else
    path = tmp_path / "cfg.py"
    path.write_text(res.stdout)
    return Config.fromfile(str(path)), res.stdout


def _build(mm, cfg):
    model = mm[1].build(cfg.model)
    model.init_weights()
    return model


def _golden_logits(features: torch.Tensor) -> np.ndarray:
    """Backbone features [N, C, T, H, W] through VMZ's own average pool and FC (the golden pickle's)."""
    blobs = golden_blobs("ircsn")
    w, b = torch.from_numpy(blobs["last_out_L400_w"]), torch.from_numpy(blobs["last_out_L400_b"])
    return (features.mean((2, 3, 4)) @ w.T + b).detach().numpy()


def _assert_golden(ours: np.ndarray) -> None:
    caffe2 = np.load(GOLDEN / "ircsn_r50_L400.caffe2_logits.npy")
    assert np.abs(ours - caffe2).max() <= 1e-4 * max(1.0, np.abs(caffe2).max())
    assert (np.argsort(-ours[0])[:5] == np.argsort(-caffe2[0])[:5]).all()


@pytest.mark.parametrize("key", ["ircsn50", "ipcsn152", "r3d18"])
def test_finetune_config_starts_from_every_converted_tensor(mm, cli, converted, tmp_path, key):
    cfg, text = _config(cli, tmp_path, converted[key], "--finetune", "--num-classes", 7)
    for name in ("train_dataloader", "val_dataloader", "val_evaluator", "optim_wrapper", "param_scheduler",
                 "train_cfg", "val_cfg", "test_cfg"):
        assert name in cfg, name
    bb = cfg.model.backbone
    assert (bb.pretrained2d, bb.with_pool2, bb.norm_eval, bb.norm_cfg.eps) == (False, False, True, 1e-3)
    assert "ircsn_ig65m-pretrained-r152-bnfrozen" in text           # where the numbers come from
    model = _build(mm, cfg)
    assert model.cls_head.fc_cls.out_features == 7
    model.train()                                                   # BN frozen: eval mode, no affine grad
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    state, _ = checkpoint.load(converted[key])
    own = model.backbone.state_dict()
    assert set(state) == set(own)
    for name, tensor in state.items():                              # every tensor, not merely the shapes
        assert torch.equal(own[name], tensor), name
    if key == "ircsn50":                                           # golden: genuine Caffe2's logits
        model.eval()
        with torch.no_grad():
            _assert_golden(_golden_logits(model.backbone(torch.from_numpy(parity.fixed_clip(8, 224)))))


def test_finetune_keeps_bn_frozen_and_trains(mm, cli, converted, tmp_path):
    """In train mode BN statistics do not move and BN affine parameters take no gradient; conv weights do.
    Then one MMAction2 ``train_step`` on a two-video dataset built by the printed pipeline (clips made
    shorter and smaller here only to keep the suite fast)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper

    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(2):
        write_video(videos / f"v{k}.mp4", frames(k, 20, 96, 72, seed=k))
    ann = tmp_path / "train.txt"
    ann.write_text("v0.mp4 0\nv1.mp4 3\n")
    cfg, _ = _config(cli, tmp_path, converted["ircsn50"], "--finetune", "--num-classes", 4,
                     "--ann-train", ann, "--ann-val", ann, "--data-root", videos)
    model = _build(mm, cfg)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv3d)]
    assert bns and convs and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in (m.weight, m.bias))
    assert all(m.weight.requires_grad for m in convs)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    conv_before = convs[5].weight.detach().clone()

    pipeline = cfg.train_dataloader.dataset.pipeline
    sample = next(t for t in pipeline if t.type == "SampleFrames")
    sample.clip_len = 8
    for t in pipeline:
        if t.type == "Resize" and t.get("keep_ratio") is False:
            t.scale = (64, 64)
    dataset = mm[2].build(cfg.train_dataloader.dataset)
    assert len(dataset) == 2
    batch = pseudo_collate([dataset[0], dataset[1]])
    assert batch["inputs"][0].shape == (1, 3, 8, 64, 64)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    log = model.train_step(batch, optim)
    assert np.isfinite(float(log["loss"]))
    for m, (mean, var) in zip(bns, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert not torch.equal(convs[5].weight.detach(), conv_before)               # the convs did train
    assert all(m.weight.grad is None for m in bns)


@pytest.mark.parametrize("key", ["ircsn50-rec", "ircsn50", "r3d18-rec"])
def test_test_config_builds_loads_and_runs_its_pipeline(mm, cli, converted, tmp_path, key):
    """The test config (= convert --print-config's): built, the file loaded strictly, the printed test
    pipeline run on a video; the golden recognizer reproduces genuine Caffe2's logits through it."""
    from mmengine.runner import load_checkpoint

    cfg, text = _config(cli, tmp_path, converted[key])
    bb = cfg.model.backbone
    assert (bb.pretrained2d, bb.with_pool2, bb.norm_eval) == (False, False, False)
    model = _build(mm, cfg)
    state, meta = checkpoint.load(converted[key])
    if key.endswith("-rec"):
        assert cfg.load_from == str(converted[key].resolve())
        load_checkpoint(model, cfg.load_from, strict=True)
    own = model.state_dict()
    prefix = "" if key.endswith("-rec") else "backbone."
    for name, tensor in state.items():
        assert torch.equal(own[prefix + name], tensor), name
    if key == "ircsn50-rec":
        model.eval()
        with torch.no_grad():
            feats = model.backbone(torch.from_numpy(parity.fixed_clip(8, 224)))
            _assert_golden(model.cls_head(feats).numpy())

    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", frames(1, 30, 96, 72))
    (tmp_path / "list.txt").write_text("a.mp4 1\n")
    ds = cfg.test_dataloader.dataset
    ds.ann_file, ds.data_prefix = str(tmp_path / "list.txt"), dict(video=str(tmp_path / "videos"))
    item = mm[2].build(ds)[0]
    p = meta["input"]
    assert item["inputs"].shape == (p["num_clips"] * p["num_crops"], 3, p["clip_len"], p["crop_size"],
                                    p["crop_size"])


def test_print_config_is_config_test(cli, vmz_pickle, tmp_path):
    src = vmz_pickle("r3d", 18, keep=True)
    res = cli("convert", src, tmp_path / "a.pth", "--no-parity", "--print-config", "--no-card")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split("\n\n", 1)[1].rstrip() == cli("config", tmp_path / "a.pth").stdout.rstrip()


def test_recognizer_file_is_refused_for_finetuning(cli, converted):
    res = cli("config", converted["r3d18-rec"], "--finetune", "--num-classes", 5)
    assert res.exit_code == 2 and "--target mmaction2-backbone" in res.stderr and not res.stdout


def test_plain_pytorch_finetune_lines_run_as_printed(cli, vmz_pickle, tmp_path):
    """R(2+1)D (no MMAction2 model): the printed lines run, with the new head, BN frozen, convs training."""
    out = tmp_path / "r21d.pth"
    assert cli("convert", vmz_pickle("r2plus1d", 18, keep=True), out, "--no-parity", "--no-card",
               "--target", "torchvision").exit_code == 0
    res = cli("config", out, "--finetune", "--num-classes", 3)
    assert res.exit_code == 0, res.stderr
    ns: dict = {}
    exec(compile(res.stdout, "<printed>", "exec"), ns)                        # noqa: S102 (our own output)
    model = ns["model"]
    assert model.fc.out_features == 3
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    stats = [m.running_mean.clone() for m in bns]
    conv = model.layer1[0].conv1[0][0].weight.detach().clone()
    loss = ns["train_step"](torch.rand(2, 3, 4, 32, 32) * 255, torch.tensor([0, 2]))
    assert np.isfinite(loss)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    assert not torch.equal(model.layer1[0].conv1[0][0].weight.detach(), conv)


@pytest.mark.parametrize("family,depth", [("mc3", 18), ("rmc4", 18), ("r2df", 18), ("mc3", 10), ("rmc2", 16)])
def test_2018_families_in_mmaction2_compute_the_converted_logits(mm, cli, vmz_pickle, tmp_path, family, depth):
    """MC3, rMC4 and fR2D as MMAction2 ResNet3d recognizers (per-stage inflate and temporal strides, the
    family's stem kernel; at VMZ's depths 10 and 16, depth 18's BasicBlock3d with VMZ's stage_blocks): the
    printed test config, built by MMAction2, loads the file strictly and gives vmzconv's logits; R2D (an
    unpadded clip-long stem) is refused for MMAction2 in one line."""
    from mmengine.runner import load_checkpoint

    from vmzconv.load import load_converted
    from vmzconv.synth import seeded_blobs

    src = vmz_pickle.custom(f"{family}.pkl", seeded_blobs(family, depth))
    out = tmp_path / f"{family}.pth"
    res = cli("convert", src, out, "--target", "mmaction2", "--parity-clip", "8,32")
    assert res.exit_code == 0, res.stderr
    cfg, _ = _config(cli, tmp_path, out)
    model = _build(mm, cfg)
    load_checkpoint(model, cfg.load_from, strict=True)
    model.eval()
    clip = torch.from_numpy(parity.fixed_clip(8, 56))
    with torch.no_grad():
        theirs = model.cls_head(model.backbone(clip)).numpy()
        ours = load_converted(out).model.eval()(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()
    res = cli("convert", vmz_pickle.custom("r2d.pkl", seeded_blobs("r2d", 18)), tmp_path / "r2d.pth",
              "--target", "mmaction2", "--no-parity")
    assert res.exit_code == 2 and "unpadded" in res.stderr and not (tmp_path / "r2d.pth").exists()


def test_an_optical_flow_r3d_in_mmaction2_takes_two_channels(mm, cli, vmz_pickle, tmp_path):
    """An R3D with a 2-channel stem: the printed config's ResNet3d has in_channels=2 and the flow mean/std,
    loads the file strictly and gives vmzconv's logits; no RGB test pipeline is printed for it."""
    from mmengine.runner import load_checkpoint

    from vmzconv.load import load_converted
    from vmzconv.synth import seeded_blobs

    src = vmz_pickle.custom("r3d_flow.pkl", seeded_blobs("r3d", 18, in_channels=2))
    out = tmp_path / "flow.pth"
    assert cli("convert", src, out, "--target", "mmaction2", "--parity-clip", "8,32").exit_code == 0
    cfg, text = _config(cli, tmp_path, out)
    assert cfg.model.backbone.in_channels == 2 and "test_pipeline" not in text and "optical-flow" in text
    assert list(cfg.model.data_preprocessor.mean) == [0.0046635, 0.0046261]
    model = _build(mm, cfg)
    load_checkpoint(model, cfg.load_from, strict=True)
    model.eval()
    clip = torch.from_numpy(parity.fixed_clip(8, 56, c=2))
    with torch.no_grad():
        theirs = model.cls_head(model.backbone(clip)).numpy()
        ours = load_converted(out).model.eval()(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()
