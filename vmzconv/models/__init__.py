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


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[..., nn.Module]
    families: tuple[str, ...]
    has_head: bool
    description: str


TARGETS = {
    "mmaction2": Target("mmaction2", build_recognizer, ("ir", "ip"), True,
                        "MMAction2 Recognizer3D: backbone.* + cls_head.* in {state_dict, meta} (load_from=)"),
    "mmaction2-backbone": Target("mmaction2-backbone", build_backbone, ("ir", "ip"), False,
                                 "MMAction2 ResNet3dCSN backbone-relative keys, no head (backbone.pretrained=)"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ArchError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def build_model(target: str, arch: Arch, with_pool1: bool = True, bn_eps: float = BN_EPS) -> nn.Module:
    t = get_target(target)
    if arch.family not in t.families:
        raise ArchError(f"target {target} cannot hold {arch.name}")
    return t.build(arch, with_pool1=with_pool1, bn_eps=bn_eps)


@torch.no_grad()
def logits(target: str, model: nn.Module, clip: np.ndarray, head: dict | None = None) -> np.ndarray:
    """float32 logits of ``model`` on ``clip``; a headless model uses ``head`` (weight, bias) after global pooling."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    out = model(x)
    if not get_target(target).has_head:
        if not head:
            raise ArchError("a backbone-only model needs the classifier blobs for parity")
        feats = out.mean(dim=(2, 3, 4))
        out = torch.nn.functional.linear(feats, torch.from_numpy(np.asarray(head["weight"])),
                                         torch.from_numpy(np.asarray(head["bias"])))
    return out.numpy()
