"""Reference PyTorch models, one per output layout ("target")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..arch import Arch
from ..errors import ArchError
from .csn import BN_EPS, build_backbone, build_recognizer
from .other_layouts import build_pytorchvideo, build_torchvision

__all__ = ["BN_EPS", "TARGETS", "Target", "build_model", "check_target", "fill", "get_target", "logits"]


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[..., nn.Module]
    families: tuple[str, ...]
    has_head: bool
    refusal: str = ""


TARGETS = {
    "mmaction2": Target("mmaction2", build_recognizer, ("ir", "ip"), True),
    "mmaction2-backbone": Target("mmaction2-backbone", build_backbone, ("ir", "ip"), False),
    "torchvision": Target("torchvision", build_torchvision, ("ir", "ip"), True),
    "pytorchvideo": Target("pytorchvideo", build_pytorchvideo, ("ir",), True,
                           refusal="pytorchvideo's create_csn has no interaction-preserved block: its conv_b is a "
                                   "single depthwise conv, so ip-CSN's extra 1x1x1 conv + BN has nowhere to go; "
                                   "use --target torchvision or mmaction2"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ArchError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def check_target(target: str, arch: Arch) -> Target:
    t = get_target(target)
    if arch.family not in t.families:
        raise ArchError(f"target {target} cannot hold {arch.name}: {t.refusal or 'unsupported family'}")
    return t


def build_model(target: str, arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS,
                empty: bool = False) -> nn.Module:
    """The reference model for ``target``; ``empty`` builds it on the meta device (shapes only, no memory),
    to be filled with :func:`fill`."""
    t = check_target(target, arch)
    if empty:
        with torch.device("meta"):
            return t.build(arch, with_pool1=with_pool1, bn_eps=bn_eps)
    return t.build(arch, with_pool1=with_pool1, bn_eps=bn_eps)


def fill(model: nn.Module, state_dict) -> nn.Module:
    """Load ``state_dict`` with ``strict=True``, adopting its tensors instead of copying them."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@torch.no_grad()
def logits(target: str, model: nn.Module, clip: np.ndarray, head: dict | None = None) -> np.ndarray:
    """float32 logits of ``model`` on ``clip``; a headless model uses ``head`` (the dropped classifier:
    roles ``head.weight`` and ``head.bias``) after global average pooling."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    out = model(x)
    if not get_target(target).has_head:
        if not head:
            raise ArchError("a backbone-only model needs the classifier blobs for parity")
        feats = out.mean(dim=(2, 3, 4))
        out = torch.nn.functional.linear(feats, torch.tensor(np.asarray(head["head.weight"])),
                                         torch.tensor(np.asarray(head["head.bias"])))
    return out.numpy()
