"""Output layouts: the same trunk (``trunk.py``) under each library's module names.

* ``mmaction2``: ``Recognizer3D(backbone=ResNet3dCSN | ResNet3d, cls_head=I3DHead)``: every conv
  and its BN form an mmcv ``ConvModule`` (``.conv``, ``.bn``); ResNet3dCSN's ``conv2`` is an
  ``nn.Sequential`` of them; the classifier is ``cls_head.fc_cls``. ``mmaction2-backbone`` is the
  backbone alone, with backbone-relative keys.
* ``torchvision``: ``VideoResNet``: ``stem`` is a flat Sequential (conv, BN, ReLU[, conv, BN,
  ReLU][, MaxPool]); a block's ``convK`` is ``Sequential(conv_builder, BN[, ReLU])`` where a
  multi-conv builder is itself a Sequential (``Conv2Plus1D``: conv, BN, ReLU, conv; VMZ's
  ``IPConv3DDepthwise``: conv, BN, conv); ``downsample.0/1``; ``fc``.
* ``pytorchvideo``: ``Net(blocks)``: ``blocks.0`` stem (``conv``, ``norm``), ``blocks.1-4``
  stages of ``res_blocks.j`` with ``branch1_conv/norm`` and ``branch2.conv_a/norm_a/...``,
  ``blocks.5.proj``.
"""

from __future__ import annotations

from torch import nn

from ..arch import Arch
from .trunk import BN_EPS, Chain, Residual, Unit, VideoResNet, block_specs, pool1, stem_unit


def _bn(c: int, eps: float) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, eps=eps)


def _flat(unit: Unit, eps: float) -> list[nn.Module]:
    """conv, BN, [ReLU], conv, ..., outer BN, [ReLU] as one flat list."""
    mods: list[nn.Module] = []
    for k, conv in enumerate(unit.convs):
        mods.append(conv.module())
        mods.append(_bn(conv.cout, eps))
        if (unit.inner_relu[k] if k < len(unit.inner_relu) else unit.relu):
            mods.append(nn.ReLU(inplace=True))
    return mods


def _numbered(mods: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    return [(str(i), m) for i, m in enumerate(mods)]


# -- MMAction2 ----------------------------------------------------------------------------------


class ConvModule(Chain):
    """mmcv ConvModule: ``conv`` (no bias) -> ``bn`` -> optional ReLU."""

    def __init__(self, conv: nn.Conv3d, bn: nn.BatchNorm3d, relu: bool):
        super().__init__([("conv", conv), ("bn", bn)] + ([("activate", nn.ReLU(inplace=True))] if relu else []))

    @property
    def with_relu(self) -> bool:
        return hasattr(self, "activate")


def _conv_modules(unit: Unit, eps: float) -> list[ConvModule]:
    out = []
    for k, conv in enumerate(unit.convs):
        relu = unit.inner_relu[k] if k < len(unit.inner_relu) else unit.relu
        out.append(ConvModule(conv.module(), _bn(conv.cout, eps), relu))
    return out


def mmaction2(arch: Arch, *, head: bool = True, pool: bool | None = None, bn_eps: float = BN_EPS) -> VideoResNet:
    """``head=False``: the backbone alone (``mmaction2-backbone``)."""
    pool = arch.fam.pool1 if pool is None else pool
    csn = (arch.fam.mmaction2 or {}).get("type") == "ResNet3dCSN"
    stem = _conv_modules(stem_unit(arch), bn_eps)
    assert len(stem) == 1, "MMAction2's ResNet3d stem is a single ConvModule"
    backbone: list[tuple[str, nn.Module]] = [("conv1", stem[0])] + ([("maxpool", pool1())] if pool else [])
    blocks = []
    for li, layer in enumerate(block_specs(arch), start=1):
        mods = []
        for j, spec in enumerate(layer):
            children = []
            for k, unit in enumerate(spec.units, start=1):
                cms = _conv_modules(unit, bn_eps)
                wrap = len(cms) > 1 or (csn and k == 2)          # ResNet3dCSN: conv2 is an nn.Sequential
                children.append((f"conv{k}", nn.Sequential(*cms) if wrap else cms[0]))
            if spec.shortcut is not None:
                children.append(("downsample", ConvModule(spec.shortcut.module(), _bn(spec.shortcut.cout, bn_eps), False)))
            mods.append(Residual(children, [c for c, _ in children if c != "downsample"],
                                 ["downsample"] if spec.shortcut is not None else []))
            blocks.append((f"layer{li}.{j}", f"layer{li}.{j}"))
        backbone.append((f"layer{li}", nn.Sequential(*mods)))
    stem_paths = ["conv1"] + (["maxpool"] if pool else [])
    if not head:
        return VideoResNet(backbone, stem_paths, blocks, None)
    cls_head = Chain([("fc_cls", nn.Linear(arch.feature_dim, arch.num_classes))])
    return VideoResNet([("backbone", Chain(backbone)), ("cls_head", cls_head)],
                       [f"backbone.{p}" for p in stem_paths], [(n, f"backbone.{p}") for n, p in blocks],
                       "cls_head.fc_cls")


def mmaction2_backbone(arch: Arch, **kw) -> VideoResNet:
    return mmaction2(arch, head=False, **kw)


# -- torchvision VideoResNet --------------------------------------------------------------------


def _tv_unit(unit: Unit, eps: float) -> nn.Sequential:
    if len(unit.convs) == 1:
        builder: nn.Module = unit.convs[0].module()
    else:
        inner = Unit(unit.convs, unit.inner_relu, relu=False)
        builder = nn.Sequential(*_flat(inner, eps)[:-1])            # Conv2Plus1D / IPConv3DDepthwise
    mods = [builder, _bn(unit.cout, eps)] + ([nn.ReLU(inplace=True)] if unit.relu else [])
    return nn.Sequential(*mods)


def torchvision(arch: Arch, *, pool: bool | None = None, bn_eps: float = BN_EPS, head: bool = True) -> VideoResNet:
    """``head=False``: no ``fc`` (an audio-visual model's visual tower without G-Blend heads)."""
    pool = arch.fam.pool1 if pool is None else pool
    stem = nn.Sequential(*_flat(stem_unit(arch), bn_eps), *([pool1()] if pool else []))
    children: list[tuple[str, nn.Module]] = [("stem", stem)]
    blocks = []
    for li, layer in enumerate(block_specs(arch), start=1):
        mods = []
        for j, spec in enumerate(layer):
            kids = [(f"conv{k}", _tv_unit(u, bn_eps)) for k, u in enumerate(spec.units, start=1)]
            if spec.shortcut is not None:
                kids.append(("downsample", nn.Sequential(spec.shortcut.module(), _bn(spec.shortcut.cout, bn_eps))))
            mods.append(Residual(kids, [k for k, _ in kids if k != "downsample"],
                                 ["downsample"] if spec.shortcut is not None else [], relu_name="relu"))
            blocks.append((f"layer{li}.{j}", f"layer{li}.{j}"))
        children.append((f"layer{li}", nn.Sequential(*mods)))
    if head:
        children.append(("fc", nn.Linear(arch.feature_dim, arch.num_classes)))
    return VideoResNet(children, ["stem"], blocks, "fc" if head else None)


# -- pytorchvideo Net ---------------------------------------------------------------------------


def pytorchvideo(arch: Arch, *, pool: bool | None = None, bn_eps: float = BN_EPS) -> VideoResNet:
    pool = arch.fam.pool1 if pool is None else pool
    stem = stem_unit(arch)
    assert len(stem.convs) == 1
    stem_mod = Chain([("conv", stem.convs[0].module()), ("norm", _bn(64, bn_eps)), ("activation", nn.ReLU())]
                     + ([("pool", pool1())] if pool else []))
    stages: list[tuple[str, nn.Module]] = [("0", stem_mod)]
    blocks = []
    for li, layer in enumerate(block_specs(arch), start=1):
        res = []
        for j, spec in enumerate(layer):
            branch2 = []
            for part, unit in zip("abc", spec.units):
                assert len(unit.convs) == 1, "pytorchvideo's bottleneck holds one conv per position"
                branch2 += [(f"conv_{part}", unit.convs[0].module()), (f"norm_{part}", _bn(unit.cout, bn_eps))]
                if unit.relu:
                    branch2.append((f"act_{part}", nn.ReLU()))
            kids: list[tuple[str, nn.Module]] = []
            if spec.shortcut is not None:
                kids += [("branch1_conv", spec.shortcut.module()), ("branch1_norm", _bn(spec.shortcut.cout, bn_eps))]
            kids.append(("branch2", Chain(branch2)))
            res.append(Residual(kids, ["branch2"], ["branch1_conv", "branch1_norm"] if spec.shortcut else [],
                                relu_name="activation"))
            blocks.append((f"layer{li}.{j}", f"blocks.{li}.res_blocks.{j}"))
        stages.append((str(li), Chain([("res_blocks", nn.ModuleList(res))])))
    stages.append(("5", Chain([("proj", nn.Linear(arch.feature_dim, arch.num_classes))])))
    return VideoResNet([("blocks", Chain(stages))], ["blocks.0"], blocks, "blocks.5.proj")
