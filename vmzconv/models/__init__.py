"""Reference PyTorch models: one trunk (``trunk.py``) under each output layout's names (``layouts.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..arch import Arch
from ..targets import get_target
from . import av, c3d, layouts
from .trunk import BN_EPS, VideoResNet

__all__ = ["BN_EPS", "BUILDERS", "VideoResNet", "build_model", "fill", "fold_bn", "logits"]

# Target.layout -> the function that renders the trunk under that library's module names.
BUILDERS = {"mmaction2": layouts.mmaction2, "mmaction2_backbone": layouts.mmaction2_backbone,
            "torchvision": layouts.torchvision, "pytorchvideo": layouts.pytorchvideo, "pytorch": c3d.build, "av": av.build}


def build_model(target: str, arch: Arch, empty: bool = False, **faults) -> VideoResNet:
    """The reference model of ``arch`` in ``target``'s layout. ``empty`` builds it on the meta
    device (shapes only, no memory), to be filled with :func:`fill`. ``faults`` (``pool``,
    ``bn_eps``; C3D's ``pool5_pad``) change the PyTorch side only: they exist to show that parity catches them, and
    to reproduce a consumer that builds the model differently (``parity --trace --bn-eps``)."""
    t = get_target(target)
    t.check(arch.family, arch.name)
    build = BUILDERS[t.layout]
    if empty:
        with torch.device("meta"):
            return build(arch, **faults)
    return build(arch, **faults)


def fill(model: nn.Module, state_dict) -> nn.Module:
    """Load ``state_dict`` with ``strict=True``, adopting its tensors instead of copying them."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@torch.no_grad()
def logits(model: VideoResNet, clip: np.ndarray, head: dict | None = None) -> np.ndarray:
    """float32 logits of ``model`` on ``clip``; a headless model uses ``head`` (the dropped classifier:
    roles ``head.weight`` and ``head.bias``) after global average pooling."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    if model.has_head:
        return model(x).numpy()
    if not head:
        raise ValueError("a backbone-only model needs the classifier blobs for parity")
    return torch.nn.functional.linear(model.features(x), torch.as_tensor(np.asarray(head["head.weight"])),
                                      torch.as_tensor(np.asarray(head["head.bias"]))).numpy()


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Inference only: fold every BatchNorm3d that directly follows a Conv3d (in any layout's containers)
    into that conv's weight and a bias, and replace the BN by an identity. Same function, fewer ops."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv3d):
                conv = conv[-1]                     # a (2+1)-D or ip builder: its last conv feeds the BN
            if not (isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d)):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
            parent._modules[b] = nn.Identity()
    return model
