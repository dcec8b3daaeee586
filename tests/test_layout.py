"""The reference models have exactly MMAction2's state_dict layout."""

from __future__ import annotations

import pytest
import torch

from vmzconv.arch import Arch
from vmzconv.models import build_model

from .conftest import GOLDEN

# MMAction2 CSN metafile / module structure: entries incl. num_batches_tracked, and trainable
# parameters incl. the 400-class fc (metafile `Parameters` where MMAction2 publishes one).
COUNTS = {
    ("ircsn", 152): (932, 777, 29_703_568),
    ("ipcsn", 152): (1232, 1027, 33_016_592),
    ("ircsn", 50): (320, 267, 13_131_152),
    ("ipcsn", 50): (416, 347, 14_396_176),
    ("ircsn", 101): (626, 522, 22_213_776),
    ("ipcsn", 101): (824, 687, 24_601_616),
}


@pytest.mark.parametrize("family,depth", sorted(COUNTS))
def test_entry_and_parameter_counts(family, depth):
    model = build_model("mmaction2", Arch(family, depth, 400))
    sd = model.state_dict()
    entries, without_nbt, params = COUNTS[family, depth]
    assert len(sd) == entries
    assert sum(not k.endswith("num_batches_tracked") for k in sd) == without_nbt
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(v.dtype == torch.int64 and v.dim() == 0 for k, v in sd.items() if k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("family", ["ircsn", "ipcsn"])
def test_r152_key_list_and_shapes_are_pinned(family):
    lines = (GOLDEN / f"mmaction2_{family}_r152.keys.txt").read_text().splitlines()
    pinned = [ln for ln in lines if not ln.startswith("#")]
    model = build_model("mmaction2", Arch(family, 152, 400))
    ours = [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]
    assert ours == pinned


@pytest.mark.parametrize("key,shape,family", [
    ("backbone.conv1.conv.weight", (64, 3, 3, 7, 7), "ircsn"),
    ("backbone.layer1.0.conv1.conv.weight", (64, 64, 1, 1, 1), "ircsn"),
    ("backbone.layer1.0.conv2.0.conv.weight", (64, 1, 3, 3, 3), "ircsn"),
    ("backbone.layer1.0.downsample.conv.weight", (256, 64, 1, 1, 1), "ircsn"),
    ("backbone.layer2.0.conv1.conv.weight", (128, 256, 1, 1, 1), "ircsn"),
    ("backbone.layer2.0.downsample.conv.weight", (512, 256, 1, 1, 1), "ircsn"),
    ("backbone.layer4.2.conv3.bn.running_var", (2048,), "ircsn"),
    ("backbone.layer3.35.conv2.1.conv.weight", (256, 1, 3, 3, 3), "ipcsn"),
    ("backbone.layer3.35.conv2.0.conv.weight", (256, 256, 1, 1, 1), "ipcsn"),
    ("cls_head.fc_cls.weight", (400, 2048), "ipcsn"),
])
def test_documented_example_keys(key, shape, family):
    sd = build_model("mmaction2", Arch(family, 152, 400)).state_dict()
    assert tuple(sd[key].shape) == shape


def test_module_semantics_match_mmaction2():
    """BN eps 1e-3 everywhere; stem, pool and strides as ResNet3dCSN builds them."""
    model = build_model("mmaction2", Arch("ipcsn", 50, 400))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    stem = model.backbone.conv1.conv
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 7, 7), (1, 2, 2), (1, 3, 3))
    pool = model.backbone.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == ((1, 3, 3), (1, 2, 2), (0, 1, 1))
    assert [model.backbone.get_submodule(f"layer{i}.0.conv2.1.conv").stride for i in (1, 2, 3, 4)] == \
        [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert model.backbone.layer1[0].conv2[0].with_relu is False      # ip 1x1x1: BN, no ReLU
    assert model.backbone.layer1[0].conv3.with_relu is False
    out = model.eval()(torch.zeros(2, 3, 8, 64, 64))
    assert out.shape == (2, 400)
