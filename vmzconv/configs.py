"""What a converted file is used with next: a complete MMAction2 1.x config (test, or fine-tuning), or for
the layouts MMAction2 cannot hold, plain PyTorch lines that fine-tune it. ``vmzconv config`` prints them;
``convert --print-config`` prints the test config (the same text).

Every MMAction2 config here is executed by the tests with MMAction2's own ``Config.fromfile`` +
``MODELS.build`` + ``init_weights()``. Two backbone options matter and MMAction2's ``ResNet3d`` defaults
both to True: ``pretrained2d`` (True would inflate 2-D weights: none of ours load, the mismatch is only
logged) and ``with_pool2`` (True adds a temporal max-pool VMZ never had). Both are False here, as in
MMAction2's own ``_base_/models/ircsn_r152.py``.

Fine-tuning numbers are MMAction2's for a VMZ-pretrained CSN
(``configs/recognition/csn/ircsn_ig65m-pretrained-r152-bnfrozen_8xb12-32x2x1-58e_kinetics400-rgb.py``):
SGD lr 5e-4 for 8 GPUs x 12 clips (``auto_scale_lr`` base 96), momentum 0.9, weight decay 1e-4, gradient
clip 40, linear warm-up from 0.1 over 16 epochs, steps at 32 and 48 of 58 epochs, validation every 3;
BN frozen (``norm_eval=True, bn_frozen=True``); clips 32 x 2, resize short side 256, RandomResizedCrop,
224, flip. MMAction2 has no config for VMZ's R3D; it gets the same recipe.
"""

from __future__ import annotations

from pathlib import Path

from . import arch as arch_mod
from .checkpoint import load_meta
from .errors import InputError, VmzconvError
from .targets import recipe

MMACTION2 = ("mmaction2", "mmaction2-backbone")
FINETUNE = dict(lr=5e-4, batch=12, gpus=8, epochs=58, warmup_epochs=16, milestones=(32, 48), val_interval=3,
                clip_len=32, frame_interval=2, short_side=256, crop=224)


def _py(value) -> str:
    """A config value as MMAction2's Python configs write it."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_py(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _card(path: str | Path) -> tuple[dict, arch_mod.Arch]:
    from .load import check_card

    meta = load_meta(path)
    check_card(path, meta)
    if not meta.get("arch") or not meta.get("target"):
        raise InputError(f"{path}: no vmzconv meta (arch, target) in this file; configs are printed for files "
                         "vmzconv converted")
    return meta, arch_mod.arch_from_card(meta)


def _backbone(a: arch_mod.Arch, pretrained: str | None, frozen_bn: bool) -> dict:
    csn = a.fam.mmaction2["type"] == "ResNet3dCSN"
    backbone = dict(a.fam.mmaction2) | {"depth": a.depth, "pretrained2d": False, "with_pool2": False,
                                        "norm_eval": frozen_bn,
                                        "norm_cfg": {"type": "BN3d", "requires_grad": csn or not frozen_bn,
                                                     "eps": 1e-3}}
    if frozen_bn and csn:                 # ResNet3dCSN's own switch; ResNet3d freezes through norm_cfg instead
        backbone["bn_frozen"] = True
    if a.conv1_kt != 3:
        backbone["conv1_kernel"] = (a.conv1_kt, 7, 7)
    if a.flow:
        backbone["in_channels"] = a.in_channels
    if a.fam.simple_only and a.depth not in (18, 34):     # BasicBlock3d at VMZ's other depths: depth 18's block,
        backbone["depth"], backbone["stage_blocks"] = 18, tuple(a.layers)      # VMZ's block counts
    backbone["pretrained"] = pretrained
    return backbone


def _model(a: arch_mod.Arch, backbone: dict, classes: int, inp: dict) -> dict:
    return {"type": "Recognizer3D", "backbone": backbone,
            "cls_head": {"type": "I3DHead", "num_classes": classes, "in_channels": a.feature_dim,
                         "spatial_type": "avg", "dropout_ratio": 0.5, "init_std": 0.01, "average_clips": "prob"},
            "data_preprocessor": {"type": "ActionDataPreprocessor", "mean": inp["mean"], "std": inp["std"],
                                  "format_shape": "NCTHW"},
            "test_cfg": {"max_testing_views": 10}}


def _decode() -> list[str]:
    return ["    dict(type='PyAVInit'),   # MMAction2's own configs use DecordInit/DecordDecode when decord is installed"]


def test_config(path: str | Path) -> str:
    """The MMAction2 1.x test config of a converted recognizer (the card's protocol and normalisation); for
    the other layouts, the lines that build the model in its library and load the file."""
    meta, a = _card(path)
    path = str(Path(path).resolve())
    inp, target = meta["input"], meta["target"]
    if target not in MMACTION2:
        load = (f"from safetensors.torch import load_file\nmodel.load_state_dict(load_file({path!r}), strict=True)"
                if path.endswith(".safetensors") else
                f"import torch\nmodel.load_state_dict(torch.load({path!r}, weights_only=True)['state_dict'], strict=True)")
        audio = ("\n# audio: N x 1 x 100 x 40 VMZ log-mels (vmzconv.video.audio; the card's input.audio), "
                 "model(video, audio)" if a.fam.av else "")
        return (f"# {target}: build the model, then load the file strictly\n{recipe(target, a)}\n{load}\n"
                f"# input: RGB, NCTHW, 0-255, mean {inp['mean']}, std {inp['std']}{audio}")
    zoo_info = meta.get("zoo")
    lines = [f"# MMAction2 1.x config for {Path(path).name} ({a.name}, {a.num_classes} classes); save it as a "
             ".py file and run: python tools/test.py THIS.py " + (path if target == "mmaction2" else "CKPT"),
             "_base_ = ['mmaction::_base_/default_runtime.py']   # in a checkout: '../../_base_/default_runtime.py'"]
    if zoo_info and zoo_info.get("mmaction2_config_norm") not in (None, "vmz"):
        lines.append(f"# The published MMAction2 config for this model normalises with {zoo_info['mmaction2_config_norm']} "
                     f"mean/std {zoo_info['mmaction2_config_mean_std']}; VMZ trained it with the values below.")
    backbone = _backbone(a, path if target == "mmaction2-backbone" else None, frozen_bn=False)
    lines.append("model = " + _py(_model(a, backbone, a.num_classes, inp)))
    if target == "mmaction2":
        lines.append(f"load_from = {path!r}")
    if a.flow:                            # no MMAction2 pipeline computes VMZ's flow input from a video
        lines += [f"# An optical-flow model ({a.in_channels} channels): MMAction2's pipelines decode RGB frames, or read "
                  "8-bit flow images that are not VMZ's input (Farneback, unbounded, see the card's input.flow), so no "
                  "test pipeline is printed; `vmzconv verify` / `predict` / `features` compute VMZ's flow. The model "
                  "above takes flow clips [N, 2, T, H, W], normalised by its data_preprocessor."]
        return "\n".join(lines)
    lines += _test_part(inp)
    lines.append(f"# MMAction2 0.x instead: img_norm_cfg = dict(mean={inp['mean']}, std={inp['std']}, to_bgr=False)")
    return "\n".join(lines)


def _test_part(p: dict) -> list[str]:
    """MMAction2 1.x test pipeline, loader, evaluator and loop for the card's protocol."""
    resize = (f"dict(type='Resize', scale=({p['resize'][0]}, {p['resize'][1]}), keep_ratio=False)" if p.get("resize")
              else f"dict(type='Resize', scale=(-1, {p['short_side']}))")
    crop = (f"dict(type='ThreeCrop', crop_size={p['crop_size']})" if p["num_crops"] == 3
            else f"dict(type='CenterCrop', crop_size={p['crop_size']})")
    lines = []
    if p.get("protocol") == "vmz":
        lines.append("# VMZ's own test spaced clip starts as floor(k*(F-span)/(n-1)); MMAction2's SampleFrames rounds "
                     "instead (a frame apart at most); `vmzconv verify` does VMZ's.")
    return lines + [
        "dataset_type = 'VideoDataset'",
        "data_root_val = 'data/kinetics400/videos_val'                      # your videos",
        "ann_file_test = 'data/kinetics400/kinetics400_val_list_videos.txt'  # 'path label' per line",
        "test_pipeline = [",
        *_decode(),
        f"    dict(type='SampleFrames', clip_len={p['clip_len']}, frame_interval={p['frame_interval']}, "
        f"num_clips={p['num_clips']}, test_mode=True),",
        "    dict(type='PyAVDecode'),",
        f"    {resize},",
        f"    {crop},",
        "    dict(type='FormatShape', input_format='NCTHW'),",
        "    dict(type='PackActionInputs')]",
        "test_dataloader = dict(batch_size=1, num_workers=2, persistent_workers=True,",
        "    sampler=dict(type='DefaultSampler', shuffle=False),",
        "    dataset=dict(type=dataset_type, ann_file=ann_file_test, data_prefix=dict(video=data_root_val),",
        "                 pipeline=test_pipeline, test_mode=True))",
        "test_evaluator = dict(type='AccMetric')",
        "test_cfg = dict(type='TestLoop')",
    ]


def finetune_config(path: str | Path, num_classes: int, ann_train: str | None = None, ann_val: str | None = None,
                    data_root: str | None = None) -> str:
    """A training config that starts from the converted backbone with a new ``num_classes``-class head; for
    layouts MMAction2 cannot hold, runnable PyTorch lines that do the same."""
    if not isinstance(num_classes, int) or not 1 <= num_classes <= 1_000_000:
        raise VmzconvError(f"--num-classes must be 1 to 1000000, not {num_classes!r}")
    meta, a = _card(path)
    path = str(Path(path).resolve())
    if meta["target"] == "mmaction2":
        raise InputError(f"{path}: an MMAction2 recognizer file; MMAction2's backbone.pretrained= loads backbone-"
                         "relative keys only (this file's start with 'backbone.', so nothing would load): convert the "
                         "pickle again with --target mmaction2-backbone and print the config for that file")
    if a.fam.av:
        raise InputError(f"{path}: an audio-visual file; fine-tune its visual tower like any backbone (convert the "
                         "pickle with --tower visual and print the config for that file)")
    if meta["target"] not in MMACTION2:
        return _torch_finetune(path, a, meta["target"], num_classes, meta["input"])
    inp, f = meta["input"], FINETUNE
    root = data_root or "data/my_dataset/videos"
    train, val = ann_train or "data/my_dataset/train_list.txt", ann_val or "data/my_dataset/val_list.txt"
    model = _model(a, _backbone(a, path, frozen_bn=True), num_classes, inp)
    return "\n".join([
        f"# MMAction2 1.x fine-tuning config: {a.name} backbone from {Path(path).name} (BN frozen, eps 1e-3), a new "
        f"{num_classes}-class head.",
        "# Numbers: MMAction2's configs/recognition/csn/ircsn_ig65m-pretrained-r152-bnfrozen_8xb12-32x2x1-58e_"
        "kinetics400-rgb.py" + (" (MMAction2 has no VMZ R3D config: the same recipe)." if a.family == "r3d" else "."),
        "# Run: python tools/train.py THIS.py   (lists: 'path label' per line, paths under the data root)",
        "_base_ = ['mmaction::_base_/default_runtime.py']   # in a checkout: '../../_base_/default_runtime.py'",
        "model = " + _py(model),
        "dataset_type = 'VideoDataset'",
        f"data_root = {root!r}",
        f"ann_file_train = {train!r}",
        f"ann_file_val = {val!r}",
        "train_pipeline = [",
        *_decode(),
        f"    dict(type='SampleFrames', clip_len={f['clip_len']}, frame_interval={f['frame_interval']}, num_clips=1),",
        "    dict(type='PyAVDecode'),",
        f"    dict(type='Resize', scale=(-1, {f['short_side']})),",
        "    dict(type='RandomResizedCrop'),",
        f"    dict(type='Resize', scale=({f['crop']}, {f['crop']}), keep_ratio=False),",
        "    dict(type='Flip', flip_ratio=0.5),",
        "    dict(type='FormatShape', input_format='NCTHW'),",
        "    dict(type='PackActionInputs')]",
        "val_pipeline = [",
        *_decode(),
        f"    dict(type='SampleFrames', clip_len={f['clip_len']}, frame_interval={f['frame_interval']}, num_clips=1, "
        "test_mode=True),",
        "    dict(type='PyAVDecode'),",
        f"    dict(type='Resize', scale=(-1, {f['short_side']})),",
        f"    dict(type='CenterCrop', crop_size={f['crop']}),",
        "    dict(type='FormatShape', input_format='NCTHW'),",
        "    dict(type='PackActionInputs')]",
        f"train_dataloader = dict(batch_size={f['batch']}, num_workers=8, persistent_workers=True,",
        "    sampler=dict(type='DefaultSampler', shuffle=True),",
        "    dataset=dict(type=dataset_type, ann_file=ann_file_train, data_prefix=dict(video=data_root),",
        "                 pipeline=train_pipeline))",
        "val_dataloader = dict(batch_size=1, num_workers=8, persistent_workers=True,",
        "    sampler=dict(type='DefaultSampler', shuffle=False),",
        "    dataset=dict(type=dataset_type, ann_file=ann_file_val, data_prefix=dict(video=data_root),",
        "                 pipeline=val_pipeline, test_mode=True))",
        "val_evaluator = dict(type='AccMetric')",
        f"train_cfg = dict(type='EpochBasedTrainLoop', max_epochs={f['epochs']}, val_begin=1, "
        f"val_interval={f['val_interval']})",
        "val_cfg = dict(type='ValLoop')",
        "test_cfg = dict(type='TestLoop')",
        "param_scheduler = [",
        f"    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end={f['warmup_epochs']}),",
        f"    dict(type='MultiStepLR', begin=0, end={f['epochs']}, by_epoch=True, milestones={list(f['milestones'])}, "
        "gamma=0.1)]",
        f"optim_wrapper = dict(optimizer=dict(type='SGD', lr={f['lr']}, momentum=0.9, weight_decay=1e-4),",
        "                     clip_grad=dict(max_norm=40, norm_type=2))",
        "default_hooks = dict(checkpoint=dict(interval=2, max_keep_ckpts=5))",
        "find_unused_parameters = True",
        f"auto_scale_lr = dict(enable=False, base_batch_size={f['batch'] * f['gpus']})   # lr {f['lr']} is for "
        f"{f['gpus']} GPUs x {f['batch']} clips",
    ])


def _torch_finetune(path: str, a: arch_mod.Arch, target: str, num_classes: int, inp: dict) -> str:
    """Plain PyTorch (vmzconv's own model of the file) with a new head and BN frozen, as MMAction2's recipe."""
    f = FINETUNE
    head = {"torchvision": "fc", "pytorchvideo": "blocks.5.proj", "pytorch": "fc8"}[target]
    return "\n".join([
        f"# Fine-tune {a.name} ({target} layout) in plain PyTorch"
        + ("" if a.fam.mmaction2 is None else " (for MMAction2, convert with --target mmaction2-backbone)")
        + f": a new "
        f"{num_classes}-class head, BN frozen (eval mode, no grad), the rest trained with MMAction2's CSN recipe "
        f"(SGD lr {f['lr']} for {f['gpus'] * f['batch']} clips a step, momentum 0.9, weight decay 1e-4, "
        f"gradient clip 40).",
        "# Input clips: float32 [N, 3, T, H, W], RGB on 0-255; train_step normalises them as VMZ did.",
        "import torch",
        "from torch import nn",
        "from vmzconv.load import load_converted",
        "",
        f"model = load_converted({path!r}).model",
        f"parent = {('model.get_submodule(' + repr(head.rsplit('.', 1)[0]) + ')') if '.' in head else 'model'}",
        f"setattr(parent, {head.rsplit('.', 1)[-1]!r}, nn.Linear({a.feature_dim}, {num_classes}))   # the new head",
        "for m in model.modules():",
        "    if isinstance(m, nn.BatchNorm3d):          # frozen BN: statistics and affine parameters stay",
        "        m.eval()",
        "        m.weight.requires_grad_(False)",
        "        m.bias.requires_grad_(False)",
        f"optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr={f['lr']}, momentum=0.9, "
        "weight_decay=1e-4)",
        "",
        f"mean = torch.tensor({list(inp['mean'])}).view(1, 3, 1, 1, 1)",
        f"std = torch.tensor({list(inp['std'])}).view(1, 3, 1, 1, 1)",
        "",
        "def train_step(clips, labels):",
        "    clips = (clips - mean) / std",
        "    model.train()",
        "    for m in model.modules():                  # model.train() would let BN move again",
        "        if isinstance(m, nn.BatchNorm3d):",
        "            m.eval()",
        "    loss = nn.functional.cross_entropy(model(clips), labels)",
        "    optimizer.zero_grad()",
        "    loss.backward()",
        "    nn.utils.clip_grad_norm_(model.parameters(), 40)",
        "    optimizer.step()",
        "    return float(loss.detach())",
    ])
