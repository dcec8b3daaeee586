"""The inference fast path's CPU-checkable part: folding BN into the convs changes no answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vmzconv import parity, synth
from vmzconv.arch import detect
from vmzconv.blobs import Blobs
from vmzconv.convert import map_blobs
from vmzconv.models import fold_bn


@pytest.mark.parametrize("family,depth,target", [("ircsn", 50, "mmaction2"), ("ipcsn", 50, "torchvision"),
                                                 ("r2plus1d", 18, "torchvision"), ("r3d", 18, "mmaction2"),
                                                 ("ircsn", 50, "pytorchvideo")])
def test_folding_bn_is_exact_within_1e5(family, depth, target):
    blobs = Blobs("m.pkl", synth.seeded_blobs(family, depth))
    a = detect(blobs)
    model = map_blobs(blobs, a, target)[0].eval()
    x = torch.from_numpy(parity.fixed_clip(8, 64 if "csn" in family else 56))
    with torch.no_grad():
        want = model(x).numpy()
        bns = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
        folded = fold_bn(model)
        assert bns > 0 and not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())     # every BN folded
        got = folded(x).numpy()
    assert np.abs(got - want).max() <= 1e-5
    assert (np.argsort(-got, axis=1)[:, :5] == np.argsort(-want, axis=1)[:, :5]).all()
