"""Architecture detection from blob names and shapes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vmzconv import synth
from vmzconv.arch import detect, resolve
from vmzconv.blobs import Blobs
from vmzconv.errors import ArchError


def blobs_of(arrays: dict) -> Blobs:
    return Blobs("t.pkl", dict(arrays))


@pytest.mark.parametrize("family", ["ircsn", "ipcsn"])
@pytest.mark.parametrize("depth", [50, 101, 152])
def test_detects_family_depth_and_classes(family, depth):
    a = detect(blobs_of(synth.seeded_blobs(family, depth, classes=487)))
    assert (a.family, a.depth, a.num_classes, a.conv1_kt) == (family, depth, 487, 3)
    assert a.name == f"{family}_r{depth}"


def test_conv1_temporal_kernel_5():
    assert detect(blobs_of(synth.seeded_blobs("ircsn", 50, conv1_kt=5))).conv1_kt == 5


def test_named_arch_must_agree():
    b = blobs_of(synth.seeded_blobs("ipcsn", 50, classes=359))
    assert resolve(b, "ipcsn_r50").num_classes == 359
    with pytest.raises(ArchError, match=r"--arch ircsn_r152 does not match the blobs: they look like ipcsn_r50 \(359 classes"):
        resolve(b, "ircsn_r152")


@pytest.mark.parametrize("mutate,fragment", [
    (lambda a: a.update(conv1_middle_w=np.zeros((45, 3, 1, 7, 7), np.float32)), "R(2+1)D"),
    (lambda a: a.update({"v_comp_0_conv_1_w": np.zeros(1, np.float32)}), "audio-visual"),
    (lambda a: a.pop("conv1_w"), "no conv1_w"),
    (lambda a: a.update(conv1_w=np.zeros((64, 6, 3, 7, 7), np.float32)), "frames folded into channels"),
    (lambda a: a.update(last_out_L487_w=np.zeros((487, 2048), np.float32)), "exactly one classifier"),
    (lambda a: [a.pop(k) for k in list(a) if k.startswith("comp_15_")], "15 bottleneck ir-CSN blocks"),
])
def test_unsupported_or_broken_models_are_named(mutate, fragment):
    arrays = synth.seeded_blobs("ircsn", 50)
    mutate(arrays)
    with pytest.raises(ArchError, match=re.escape(fragment)):
        detect(blobs_of(arrays))
