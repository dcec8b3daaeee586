"""One video ResNet for every VMZ family, composed like torchvision's ``VideoResNet``.

The trunk is described as data first: a stem and, per block, its convolution units, where a
*unit* is a chain of convolutions with a BN (and optionally a ReLU) between them, then an
outer BN and an optional ReLU. Families differ only in the builder of the block's
spatiotemporal unit (``conv_maker``) and in the stem:

* ``channelwise`` (ir-CSN): one channel-wise 3x3x3 conv.
* ``ip_channelwise`` (ip-CSN): 1x1x1 conv, BN (no ReLU), channel-wise 3x3x3 conv.
* ``2plus1d`` (R(2+1)D): spatial 1x3x3 conv to VMZ's middle width, BN, ReLU, temporal 3x1x1 conv.
* ``3d`` (R3D): one dense 3x3x3 conv.
* ``2d`` (a 2-D stage of R2D, fR2D, MCx, rMCx): one 1x3x3 conv that never strides in time.

A family may give each stage its own maker (``Family.stages``: MC3 = 3d, 2d, 2d, 2d).

A layout (``layouts.py``) then turns these units into modules with the names its library
uses; the forward pass is the same for all of them (:class:`VideoResNet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Arch

BN_EPS = 1e-3          # Caffe2 SpatialBN epsilon at every VMZ call site (PyTorch's default is 1e-5)
STEM_WIDTH = 64
R2PLUS1D_STEM_MIDDLE = 45      # hard-coded in VMZ, not the middle-width formula
SHALLOW = ((64, 64), (128, 128), (256, 256), (512, 512))        # (output, base) per layer, depth 18/34
DEEP = ((256, 64), (512, 128), (1024, 256), (2048, 512))         # depth 50+


@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    kernel: tuple
    stride: tuple = (1, 1, 1)
    padding: tuple = (0, 0, 0)
    groups: int = 1

    def module(self) -> nn.Conv3d:
        return nn.Conv3d(self.cin, self.cout, self.kernel, self.stride, self.padding, groups=self.groups, bias=False)


@dataclass(frozen=True)
class Unit:
    """convs[0], BN, [ReLU], convs[1], ... then the outer BN and, if ``relu``, a ReLU."""

    convs: tuple[Conv, ...]
    inner_relu: tuple[bool, ...] = ()
    relu: bool = True

    @property
    def cout(self) -> int:
        return self.convs[-1].cout


@dataclass(frozen=True)
class BlockSpec:
    units: tuple[Unit, ...]        # conv1, conv2[, conv3]
    shortcut: Conv | None          # projection (+ BN, no ReLU) when width or stride change


def _t3(v) -> tuple:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def middle_width(cin: int, cout: int, kt: int = 3, kh: int = 3, kw: int = 3) -> int:
    """VMZ's (2+1)-D middle width (``add_conv``): int(kt*cin*cout*kh*kw / (cin*kh*kw + kt*cout)), per conv."""
    return int(kt * cin * cout * kh * kw / (cin * kh * kw + kt * cout))


# -- conv makers: the block's spatiotemporal unit -----------------------------------------------


def channelwise(cin: int, cout: int, stride: int, relu: bool) -> Unit:
    assert cin == cout, "a channel-wise conv keeps its width"
    return Unit((Conv(cin, cout, _t3(3), _t3(stride), _t3(1), groups=cin),), (), relu)


def ip_channelwise(cin: int, cout: int, stride: int, relu: bool) -> Unit:
    assert cin == cout, "a channel-wise conv keeps its width"
    return Unit((Conv(cin, cin, _t3(1)), Conv(cin, cout, _t3(3), _t3(stride), _t3(1), groups=cout)), (False,), relu)


def conv_2plus1d(cin: int, cout: int, stride: int, relu: bool) -> Unit:
    m = middle_width(cin, cout)
    return Unit((Conv(cin, m, (1, 3, 3), (1, stride, stride), (0, 1, 1)),
                 Conv(m, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0))), (True,), relu)


def conv_3d(cin: int, cout: int, stride: int, relu: bool) -> Unit:
    return Unit((Conv(cin, cout, _t3(3), _t3(stride), _t3(1)),), (), relu)


def conv_2d(cin: int, cout: int, stride: int, relu: bool) -> Unit:
    """torchvision's Conv3DNoTemporal: 1x3x3, strides in H and W only."""
    return Unit((Conv(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1)),), (), relu)


CONV_MAKERS = {"channelwise": channelwise, "ip_channelwise": ip_channelwise, "2plus1d": conv_2plus1d, "3d": conv_3d,
               "2d": conv_2d}
TEMPORAL_STRIDE = {"2d": False}          # a 2-D stage never strides in time, nor does its shortcut


def stem_unit(arch: Arch) -> Unit:
    kt = arch.conv1_kt
    if arch.fam.stem == "2plus1d":
        m = R2PLUS1D_STEM_MIDDLE
        return Unit((Conv(arch.in_channels, m, (1, 7, 7), (1, 2, 2), (0, 3, 3)),
                     Conv(m, STEM_WIDTH, (kt, 1, 1), (1, 1, 1), (kt // 2, 0, 0))), (True,), True)
    return Unit((Conv(arch.in_channels, STEM_WIDTH, (kt, 7, 7), (1, 2, 2), (arch.stem_temporal_pad, 3, 3)),), (), True)


def block_specs(arch: Arch) -> list[list[BlockSpec]]:
    """Per layer, per block: the units and the shortcut, in VMZ's order and widths."""
    widths = SHALLOW if arch.kind == "simple" else DEEP
    layers, cin = [], STEM_WIDTH
    for i, (n, (cout, base)) in enumerate(zip(arch.layers, widths)):
        kind = arch.fam.stage_kinds[i]
        make, t_stride = CONV_MAKERS[kind], TEMPORAL_STRIDE.get(kind, True)
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            if arch.kind == "simple":
                units = (make(cin, cout, stride, True), make(cout, cout, 1, False))
            else:
                units = (Unit((Conv(cin, base, _t3(1)),)), make(base, base, stride, True),
                         Unit((Conv(base, cout, _t3(1)),), (), False))
            short_stride = (stride if t_stride else 1, stride, stride)
            shortcut = Conv(cin, cout, _t3(1), short_stride) if (stride != 1 or cin != cout) else None
            blocks.append(BlockSpec(units, shortcut))
            cin = cout
        layers.append(blocks)
    return layers


def pool1() -> nn.MaxPool3d:
    return nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))


# -- modules shared by the layouts -------------------------------------------------------------


class Chain(nn.Module):
    """Named children run in order (an ``nn.Sequential`` whose names are the layout's)."""

    def __init__(self, children: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, module in children:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


class Residual(nn.Module):
    """ReLU(main(x) + shortcut(x)); children are registered in the layout's order (it fixes the
    state_dict's key order), ``main``/``shortcut`` name which of them run on each path."""

    def __init__(self, children: list[tuple[str, nn.Module]], main: list[str], shortcut: list[str],
                 relu_name: str | None = None):
        super().__init__()
        for name, module in children:
            self.add_module(name, module)
        if relu_name:
            self.add_module(relu_name, nn.ReLU(inplace=True))
        self._main, self._shortcut = list(main), list(shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        for name in self._shortcut:
            identity = self.get_submodule(name)(identity)
        out = x
        for name in self._main:
            out = self.get_submodule(name)(out)
        return torch.relu_(out + identity)


class VideoResNet(nn.Module):
    """stem -> blocks -> global average -> classifier, over modules a layout registered under its
    own names. ``stem``, ``blocks`` and ``fc`` are dotted paths into the module tree, so every layout
    shares this forward pass, :meth:`features` (the pooled vector) and :meth:`stages` (the output of
    the stem and of every block, for ``parity --trace``)."""

    def __init__(self, children: list[tuple[str, nn.Module]], stem: list[str], blocks: list[tuple[str, str]],
                 fc: str | None):
        super().__init__()
        for name, module in children:
            self.add_module(name, module)
        self.stem_paths, self.block_paths, self.fc_path = list(stem), list(blocks), fc

    def stages(self, x: torch.Tensor):
        """Yields ("stem", out), then ("layerL.j", out) for every residual block."""
        for path in self.stem_paths:
            x = self.get_submodule(path)(x)
        yield "stem", x
        for name, path in self.block_paths:
            x = self.get_submodule(path)(x)
            yield name, x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output -> the vector the classifier reads: the global average."""
        return x.mean(dim=(2, 3, 4))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The globally pooled vector [N, C] that feeds the classifier."""
        for _, x in self.stages(x):
            pass
        return self.pooled(x)

    @property
    def has_head(self) -> bool:
        return self.fc_path is not None

    def classifier(self) -> nn.Linear:
        return self.get_submodule(self.fc_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_path is None:        # a backbone: the last feature map, as MMAction2's backbones return it
            for _, x in self.stages(x):
                pass
            return x
        return self.classifier()(self.features(x))
