"""CSN with the module names of two other PyTorch homes for VMZ weights.

* ``torchvision``: VMZ's own PyTorch hub port (``pt/vmz/models/csn.py``, torchvision
  ``VideoResNet``): ``stem.0/1``, ``layerL.j.conv1.0/1``, ``conv2.0`` (ir: the depthwise
  conv; ip: ``conv2.0.0/1/2`` = 1x1x1 conv, BN, depthwise conv), ``conv2.1`` (BN),
  ``conv3.0/1``, ``downsample.0/1``, ``fc``.
* ``pytorchvideo``: ``create_csn`` (ir-CSN only): ``blocks.0.conv/norm``,
  ``blocks.i.res_blocks.j.branch1_conv/branch1_norm`` and ``branch2.conv_a/norm_a/conv_b/
  norm_b/conv_c/norm_c``, ``blocks.5.proj``.

Both set BN eps to 1e-3 (pytorchvideo's own default of 1e-5 is the classic trap) and
pool globally before the classifier, as the MMAction2 layout does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch
from .csn import BN_EPS, EXPANSION, PLANES


def _bn(c: int, eps: float) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, eps=eps)


def _stem_pool(with_pool1: bool) -> nn.Module:
    return nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) if with_pool1 else nn.Identity()


def _stem_conv(kt: int) -> nn.Conv3d:
    return nn.Conv3d(3, 64, (kt, 7, 7), (1, 2, 2), (kt // 2, 3, 3), bias=False)


def _depthwise(planes: int, stride: int) -> nn.Conv3d:
    return nn.Conv3d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)


def _pointwise(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 1, stride=stride, bias=False)


# -- torchvision / VMZ hub -----------------------------------------------------------


class TVBottleneck(nn.Module):
    def __init__(self, family: str, cin: int, planes: int, stride: int, eps: float):
        super().__init__()
        cout = planes * EXPANSION
        self.conv1 = nn.Sequential(_pointwise(cin, planes), _bn(planes, eps), nn.ReLU(inplace=True))
        if family == "ir":
            middle = _depthwise(planes, stride)
        else:  # VMZ's IPConv3DDepthwise: 1x1x1 conv, BN, depthwise conv (no ReLU inside)
            middle = nn.Sequential(_pointwise(planes, planes), _bn(planes, eps), _depthwise(planes, stride))
        self.conv2 = nn.Sequential(middle, _bn(planes, eps), nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(_pointwise(planes, cout), _bn(cout, eps))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(_pointwise(cin, cout, stride), _bn(cout, eps))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class TVVideoResNet(nn.Module):
    def __init__(self, arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS):
        super().__init__()
        self.stem = nn.Sequential(_stem_conv(arch.conv1_kt), _bn(64, bn_eps), nn.ReLU(inplace=True),
                                  _stem_pool(with_pool1))
        cin = 64
        for i, (planes, n) in enumerate(zip(PLANES, arch.layers)):
            blocks = []
            for j in range(n):
                blocks.append(TVBottleneck(arch.family, cin, planes, 2 if (i > 0 and j == 0) else 1, bn_eps))
                cin = planes * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.avgpool(x).flatten(1))


# -- pytorchvideo create_csn -----------------------------------------------------------


class PTVStem(nn.Module):
    def __init__(self, kt: int, with_pool1: bool, eps: float):
        super().__init__()
        self.conv = _stem_conv(kt)
        self.norm = _bn(64, eps)
        self.activation = nn.ReLU()
        self.pool = _stem_pool(with_pool1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation(self.norm(self.conv(x))))


class PTVBottleneckBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int, eps: float):
        super().__init__()
        self.conv_a = _pointwise(cin, inner)
        self.norm_a = _bn(inner, eps)
        self.act_a = nn.ReLU()
        self.conv_b = _depthwise(inner, stride)
        self.norm_b = _bn(inner, eps)
        self.act_b = nn.ReLU()
        self.conv_c = _pointwise(inner, cout)
        self.norm_c = _bn(cout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class PTVResBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int, eps: float):
        super().__init__()
        if stride != 1 or cin != cout:
            self.branch1_conv = _pointwise(cin, cout, stride)
            self.branch1_norm = _bn(cout, eps)
        else:
            self.branch1_conv = self.branch1_norm = None
        self.branch2 = PTVBottleneckBlock(cin, inner, cout, stride, eps)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(self.branch2(x) + shortcut)


class PTVResStage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.res_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class PTVHead(nn.Module):
    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.proj = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x).flatten(1))


class PTVNet(nn.Module):
    def __init__(self, arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS):
        super().__init__()
        blocks: list[nn.Module] = [PTVStem(arch.conv1_kt, with_pool1, bn_eps)]
        cin = 64
        for i, (planes, n) in enumerate(zip(PLANES, arch.layers)):
            stage = []
            for j in range(n):
                stage.append(PTVResBlock(cin, planes, planes * EXPANSION, 2 if (i > 0 and j == 0) else 1, bn_eps))
                cin = planes * EXPANSION
            blocks.append(PTVResStage(stage))
        blocks.append(PTVHead(cin, arch.num_classes))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_torchvision(arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS) -> TVVideoResNet:
    return TVVideoResNet(arch, with_pool1, bn_eps)


def build_pytorchvideo(arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS) -> PTVNet:
    return PTVNet(arch, with_pool1, bn_eps)
