"""ir-/ip-CSN with MMAction2's module names (Recognizer3D + ResNet3dCSN + I3DHead).

``state_dict()`` keys and shapes are exactly MMAction2's (``backbone.conv1.conv.weight``,
``backbone.layer1.0.conv2.0.bn.running_var``, ..., ``cls_head.fc_cls.bias``,
``num_batches_tracked`` included), so a checkpoint that loads here with
``strict=True`` loads into MMAction2 the same way. Composed like torchvision's
video ResNet: a stem, a bottleneck, and the conv2 builder that differs between
the two families.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch

BN_EPS = 1e-3        # Caffe2 SpatialBN epsilon in every VMZ call site (not PyTorch's 1e-5)
PLANES = (64, 128, 256, 512)
EXPANSION = 4


class ConvModule(nn.Module):
    """mmcv ConvModule: ``conv`` (no bias) -> ``bn`` -> optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1,
                 relu: bool = True, bn_eps: float = BN_EPS):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=bn_eps)
        self.with_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu_(x) if self.with_relu else x


def csn_conv2(family: str, planes: int, stride, bn_eps: float) -> nn.Sequential:
    """The 3x3x3 part of a CSN bottleneck.

    ir: [channel-wise 3x3x3 + BN + ReLU]
    ip: [1x1x1 + BN (no ReLU), channel-wise 3x3x3 + BN + ReLU]
    """
    depthwise = ConvModule(planes, planes, 3, stride=stride, padding=1, groups=planes, bn_eps=bn_eps)
    if family == "ir":
        return nn.Sequential(depthwise)
    if family == "ip":
        return nn.Sequential(ConvModule(planes, planes, 1, relu=False, bn_eps=bn_eps), depthwise)
    raise ValueError(f"family must be 'ir' or 'ip', not {family!r}")


class CSNBottleneck3d(nn.Module):
    def __init__(self, family: str, cin: int, planes: int, stride: int, bn_eps: float):
        super().__init__()
        cout = planes * EXPANSION
        self.conv1 = ConvModule(cin, planes, 1, bn_eps=bn_eps)
        self.conv2 = csn_conv2(family, planes, stride, bn_eps)
        self.conv3 = ConvModule(planes, cout, 1, relu=False, bn_eps=bn_eps)
        if stride != 1 or cin != cout:
            self.downsample = ConvModule(cin, cout, 1, stride=stride, relu=False, bn_eps=bn_eps)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        return torch.relu_(out + identity)


class ResNet3dCSN(nn.Module):
    """MMAction2's CSN backbone: stem conv (kT,7,7)/(1,2,2), max-pool, four layers."""

    def __init__(self, family: str, layers, conv1_kt: int = 3, with_pool1: bool = True, bn_eps: float = BN_EPS):
        super().__init__()
        self.conv1 = ConvModule(3, 64, (conv1_kt, 7, 7), stride=(1, 2, 2), padding=(conv1_kt // 2, 3, 3), bn_eps=bn_eps)
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) if with_pool1 else nn.Identity()
        cin = 64
        for i, (planes, n) in enumerate(zip(PLANES, layers)):
            stride = 1 if i == 0 else 2
            blocks = [CSNBottleneck3d(family, cin if j == 0 else planes * EXPANSION, planes,
                                      stride if j == 0 else 1, bn_eps) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes * EXPANSION
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class I3DHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_cls(self.dropout(self.avg_pool(x).flatten(1)))


class Recognizer3D(nn.Module):
    """``model(clip)`` -> logits for an N x 3 x T x H x W clip (normalised, RGB)."""

    def __init__(self, backbone: ResNet3dCSN, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.cls_head = I3DHead(backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.backbone(x))


def build_backbone(arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS) -> ResNet3dCSN:
    return ResNet3dCSN(arch.family, arch.layers, arch.conv1_kt, with_pool1=with_pool1, bn_eps=bn_eps)


def build_recognizer(arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS) -> Recognizer3D:
    return Recognizer3D(build_backbone(arch, with_pool1, bn_eps), arch.num_classes)
