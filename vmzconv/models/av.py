"""VMZ's audio-visual networks (``c2/lib/models/audio_visual_model.py``, ``create_av_resnet``) as one module of
vmzconv's own (the ``av`` layout): no library holds VMZ's audio tower.

* ``visual``: the visual family's trunk in torchvision's ``VideoResNet`` names (``visual.stem``,
  ``visual.layer1`` ...), so it can be cut out; with G-Blend heads its ``fc`` is ``v_last_out_L{N}``.
* ``audio``: VMZ's audio ResNet on log-mels [N, 1, 100, 40] (``builder/audio_model.py``): ``conv1`` (3x3, with a
  bias, no BN or ReLU after it), ``layer0`` (three simple blocks 16 -> 32, the first striding 2), ``layer1-4``
  (the visual depth's blocks: simple for 18/34, bottleneck for 50+, each stage's first block striding 2 with a
  projection), then a max over the 4x2 map; with G-Blend heads its ``fc`` is ``a_last_out_L{N}``.
* the fusion: ``fc1`` (``av_fc1``) on [visual, audio] concatenated, ReLU, ``fc2`` (``av_fc2``), ReLU, ``fc``.

``model(video, audio)`` gives the joint logits; ``model.heads(video, audio)`` every head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch
from .layouts import torchvision
from .trunk import BN_EPS, Residual

AUDIO_STEM = 16
AUDIO_PRE = ((16, 32, True), (32, 32, False), (32, 32, False))
SHALLOW = ((64, 64), (128, 128), (256, 256), (512, 512))
DEEP = ((256, 64), (512, 128), (1024, 256), (2048, 512))


def _conv_bn(cin: int, cout: int, k: int, stride: int, relu: bool, eps: float) -> nn.Sequential:
    mods = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*mods, *([nn.ReLU(inplace=True)] if relu else []))


def _block(cin: int, cout: int, base: int, stride: int, simple: bool, eps: float) -> Residual:
    if simple:
        kids = [("conv1", _conv_bn(cin, cout, 3, stride, True, eps)), ("conv2", _conv_bn(cout, cout, 3, 1, False, eps))]
    else:
        kids = [("conv1", _conv_bn(cin, base, 1, 1, True, eps)), ("conv2", _conv_bn(base, base, 3, stride, True, eps)),
                ("conv3", _conv_bn(base, cout, 1, 1, False, eps))]
    main = [k for k, _ in kids]
    if stride != 1 or cin != cout:
        kids.append(("downsample", _conv_bn(cin, cout, 1, stride, False, eps)))
    return Residual(kids, main, ["downsample"] if len(kids) > len(main) else [], relu_name="relu")


class AudioResNet(nn.Module):
    """``pool`` "avg" is a fault (VMZ max-pools): it exists to show that parity catches it."""

    def __init__(self, depth: int, layers: tuple, num_classes: int | None, bn_eps: float = BN_EPS, pool: str = "max"):
        super().__init__()
        simple = depth in (18, 34)
        self.conv1 = nn.Conv2d(1, AUDIO_STEM, 3, 1, 1)
        self.layer0 = nn.Sequential(*(_block(i, o, o, 2 if d else 1, True, bn_eps) for i, o, d in AUDIO_PRE))
        cin = AUDIO_PRE[-1][1]
        for li, (n, (cout, base)) in enumerate(zip(layers, SHALLOW if simple else DEEP), start=1):
            blocks = []
            for j in range(n):
                blocks.append(_block(cin, cout, base, 2 if j == 0 else 1, simple, bn_eps))
                cin = cout
            self.add_module(f"layer{li}", nn.Sequential(*blocks))
        self.pool = nn.MaxPool2d((4, 2), 1) if pool == "max" else nn.AvgPool2d((4, 2), 1)
        self.width = cin
        if num_classes:
            self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector [N, C] (a_final_avg)."""
        x = self.conv1(x)
        for i in range(5):
            x = self.get_submodule(f"layer{i}")(x)
        x = self.pool(x)
        if x.shape[2:] != (1, 1):
            raise ValueError(f"the audio tower needs 1 x 100 x 40 log-mels (VMZ's a_final_avg pools a 4x2 map); "
                             f"this input leaves {x.shape[2] + 3}x{x.shape[3] + 1}")
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class AVModel(nn.Module):
    """Faults for the parity tests: ``swap_concat`` ([audio, visual] into fc1), ``fc1_relu=False``,
    ``audio_pool="avg"``."""

    has_head = True

    def __init__(self, arch: Arch, *, bn_eps: float = BN_EPS, pool: bool | None = None, swap_concat: bool = False,
                 fc1_relu: bool = True, audio_pool: str = "max"):
        super().__init__()
        self.gblend = arch.gblend
        self.visual = torchvision(arch.visual, pool=pool, bn_eps=bn_eps, head=arch.gblend)
        self.audio = AudioResNet(arch.depth, arch.layers, arch.num_classes if arch.gblend else None, bn_eps, audio_pool)
        width = arch.feature_dim
        self.fc1 = nn.Linear(2 * width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc = nn.Linear(width, arch.num_classes)
        self._swap, self._fc1_relu = swap_concat, fc1_relu

    def fused(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """av_fc2's ReLU output: what the joint classifier reads."""
        y = self.fc1(torch.cat([a, v] if self._swap else [v, a], dim=1))
        y = torch.relu(y) if self._fc1_relu else y
        return torch.relu(self.fc2(y))

    def towers(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.visual.features(video), self.audio.features(audio)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fused(*self.towers(video, audio)))

    def heads(self, video: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"joint", "audio", "visual"} logits (G-Blend files; others have "joint" only)."""
        v, a = self.towers(video, audio)
        out = {"joint": self.fc(self.fused(v, a))}
        if self.gblend:
            out["audio"], out["visual"] = self.audio.fc(a), self.visual.classifier()(v)
        return out

    def layer(self, name: str, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """A feature layer: "pool" (the visual tower's pooled vector), "audio", "fused", or "logits"."""
        v, a = self.towers(video, audio)
        if name == "pool":
            return v
        if name == "audio":
            return a
        fused = self.fused(v, a)
        return fused if name == "fused" else self.fc(fused)


def build(arch: Arch, **faults) -> AVModel:
    return AVModel(arch, **faults)
