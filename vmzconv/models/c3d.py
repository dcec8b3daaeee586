"""VMZ's C3D as a plain PyTorch module (the ``pytorch`` layout): no library holds it.

VMZ's ``c2/lib/models/c3d_model.py`` differs from the C3D of the 2015 paper and from MMAction2's: every
3x3x3 conv keeps its bias *and* is followed by a BatchNorm (eps 1e-3) and a ReLU, and pool5 is unpadded,
so a 16x112x112 clip leaves 512x1x3x3 = 4608 values for fc6 (MMAction2 pads pool5 to 8192). Module names
follow the Caffe2 blobs: ``conv1a`` + ``bn1a`` ... ``conv5b`` + ``bn5b``, ``fc6``, ``fc7`` and the
classifier ``fc8`` (``last_out_L{N}``). The card's ``build`` lines define the same keys with torch alone
(``targets.recipe``); this class adds the stage-by-stage interface the run-time and ``parity --trace`` use.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch
from .trunk import BN_EPS

CONVS = (("1a", 64), ("2a", 128), ("3a", 256), ("3b", 256), ("4a", 512), ("4b", 512), ("5a", 512), ("5b", 512))
POOL_AFTER = {"1a": (1, 2, 2), "2a": (2, 2, 2), "3b": (2, 2, 2), "4b": (2, 2, 2), "5b": (2, 2, 2)}
FC = 4096
POOL5 = 512 * 3 * 3


class C3D(nn.Module):
    """``pool5_pad`` (a fault, to show parity catches MMAction2's padded pool5) pads pool5 in H and W."""

    def __init__(self, num_classes: int, *, bn_eps: float = BN_EPS, pool5_pad: bool = False, in_channels: int = 3):
        super().__init__()
        cin = in_channels
        for name, cout in CONVS:
            self.add_module(f"conv{name}", nn.Conv3d(cin, cout, 3, padding=1))
            self.add_module(f"bn{name}", nn.BatchNorm3d(cout, eps=bn_eps))
            if name in POOL_AFTER:
                k = POOL_AFTER[name]
                pad = (0, 1, 1) if name == "5b" and pool5_pad else 0
                self.add_module(f"pool{name[0]}", nn.MaxPool3d(k, k, pad))
            cin = cout
        self.fc6 = nn.Linear(POOL5, FC)
        self.fc7 = nn.Linear(FC, FC)
        self.fc8 = nn.Linear(FC, num_classes)

    has_head = True

    def stages(self, x: torch.Tensor):
        """Yields ("pool1", out) ... ("pool5", out), the reference's stage names."""
        for name, _ in CONVS:
            x = torch.relu(self.get_submodule(f"bn{name}")(self.get_submodule(f"conv{name}")(x)))
            if name in POOL_AFTER:
                x = self.get_submodule(f"pool{name[0]}")(x)
                yield f"pool{name[0]}", x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """pool5 -> fc7's ReLU output (dropout is the identity at test time): the vector the classifier reads."""
        x = x.flatten(1)
        if x.shape[1] != self.fc6.in_features:
            raise ValueError(f"pool5 gives {x.shape[1]} values per clip, fc6 takes {self.fc6.in_features} "
                             "(VMZ's C3D is built for 16x112x112 clips, with an unpadded pool5)")
        return torch.relu(self.fc7(torch.relu(self.fc6(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for _, x in self.stages(x):
            pass
        return self.pooled(x)

    def classifier(self) -> nn.Linear:
        return self.fc8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.features(x))


def build(arch: Arch, *, bn_eps: float = BN_EPS, pool5_pad: bool = False, pool=None) -> C3D:
    return C3D(arch.num_classes, bn_eps=bn_eps, pool5_pad=pool5_pad)
