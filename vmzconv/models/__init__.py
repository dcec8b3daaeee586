"""Reference PyTorch models: one trunk (``trunk.py``) under each output layout's names (``layouts.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..arch import Arch
from ..targets import get_target
from .trunk import BN_EPS, VideoResNet

__all__ = ["BN_EPS", "VideoResNet", "build_model", "fill", "logits"]


def build_model(target: str, arch: Arch, empty: bool = False, **faults) -> VideoResNet:
    """The reference model of ``arch`` in ``target``'s layout. ``empty`` builds it on the meta
    device (shapes only, no memory), to be filled with :func:`fill`. ``faults`` (``pool``,
    ``bn_eps``) change the PyTorch side only: they exist to show that parity catches them, and
    to reproduce a consumer that builds the model differently (``parity --trace --bn-eps``)."""
    t = get_target(target)
    if empty:
        with torch.device("meta"):
            return t.build(arch, **faults)
    return t.build(arch, **faults)


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
