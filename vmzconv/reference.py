"""The parity oracle: VMZ's Caffe2 test-time graph for ir-/ip-CSN, in float64 NumPy.

Built from VMZ's construction rules (``c2/lib/models/r3d_model.py`` and
``builder/video_model.py``, summarised in docs/vmz-caffe2-format.md §2 and §4)
and the Caffe2 blob names. It deliberately shares nothing with the conversion
path: no torch, no mapping tables, no PyTorch model. Op semantics follow Caffe2:

* Conv: NCTHW cross-correlation, zero padding, symmetric pads, no bias;
  channel-wise (group = C) for the 3x3x3 conv of CSN blocks.
* SpatialBN (is_test): y = s * (x - rm) / sqrt(riv + 1e-3) + b (``_riv`` is the
  running variance).
* ReLU after the stem BN, after BN_1, after the BN of the 3x3x3 channel-wise
  conv, and after the residual Sum — not after ip-CSN's ``spatbn_2_middle``
  and not after a block's last BN.
* MaxPool ``pool1``: kernel (1,3,3), stride (1,2,2), pad (0,1,1).
* Head: average over T, H, W (VMZ's ``final_avg`` at 8x224x224 is exactly
  this; for other clip sizes parity compares under global pooling), then FC.

Vectorised: 1x1x1 convs are matmuls, the channel-wise conv is 27 shifted
multiply-adds, the stem conv is im2col + matmul per output frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

BN_EPS = 1e-3
# VMZ BLOCK_CONFIG for the bottleneck depths CSN supports.
BLOCK_CONFIG = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# DEEP filter config: (output width, bottleneck width) per stage.
STAGE_WIDTHS = ((256, 64), (512, 128), (1024, 256), (2048, 512))
STEM_WIDTH = 64
BN_SUFFIXES = ("_s", "_b", "_rm", "_riv")


@dataclass(frozen=True)
class Block:
    index: int        # VMZ's global comp counter
    dim_in: int
    base: int
    dim_out: int
    stride: int       # 1, or 2 on T, H and W for the first block of stages 3-5
    projection: bool


def blocks(depth: int) -> Iterator[Block]:
    """VMZ's block enumeration for a bottleneck CSN of ``depth``."""
    if depth not in BLOCK_CONFIG:
        raise ValueError(f"CSN depth must be one of {sorted(BLOCK_CONFIG)}, not {depth}")
    index, dim_in = 0, STEM_WIDTH
    for stage, n in enumerate(BLOCK_CONFIG[depth]):
        dim_out, base = STAGE_WIDTHS[stage]
        for j in range(n):
            down = stage > 0 and j == 0
            yield Block(index, dim_in, base, dim_out, 2 if down else 1, dim_in != dim_out or down)
            index, dim_in = index + 1, dim_out


def blob_role(name: str) -> str:
    """What a parameter blob is: conv_weight, fc_weight, fc_bias, or bn_<s|b|rm|riv>."""
    for sfx in BN_SUFFIXES:
        if name.endswith(sfx) and not name.startswith("last_out_L"):
            return "bn" + sfx
    if name.startswith("last_out_L"):
        return "fc_bias" if name.endswith("_b") else "fc_weight"
    return "conv_weight"


def _bn(name: str, c: int) -> list[tuple[str, tuple]]:
    return [(name + s, (c,)) for s in BN_SUFFIXES]


def blob_specs(family: str, depth: int, classes: int, conv1_kt: int = 3) -> list[tuple[str, tuple]]:
    """Every parameter blob (name, shape) a VMZ ``family`` CSN checkpoint holds, in graph order."""
    if family not in ("ir", "ip"):
        raise ValueError(f"family must be 'ir' or 'ip', not {family!r}")
    specs = [("conv1_w", (STEM_WIDTH, 3, conv1_kt, 7, 7))] + _bn("conv1_spatbn_relu", STEM_WIDTH)
    for b in blocks(depth):
        p = f"comp_{b.index}_"
        specs += [(p + "conv_1_w", (b.base, b.dim_in, 1, 1, 1))] + _bn(p + "spatbn_1", b.base)
        if family == "ir":
            specs += [(p + "conv_3_w", (b.base, 1, 3, 3, 3))] + _bn(p + "spatbn_3", b.base)
            specs += [(p + "conv_4_w", (b.dim_out, b.base, 1, 1, 1))] + _bn(p + "spatbn_4", b.dim_out)
        else:
            specs += [(p + "conv_2_middle_w", (b.base, b.base, 1, 1, 1))] + _bn(p + "spatbn_2_middle", b.base)
            specs += [(p + "conv_2_w", (b.base, 1, 3, 3, 3))] + _bn(p + "spatbn_2", b.base)
            specs += [(p + "conv_3_w", (b.dim_out, b.base, 1, 1, 1))] + _bn(p + "spatbn_3", b.dim_out)
        if b.projection:
            q = f"shortcut_projection_{b.index}"
            specs += [(q + "_w", (b.dim_out, b.dim_in, 1, 1, 1))] + _bn(q + "_spatbn", b.dim_out)
    specs += [(f"last_out_L{classes}_w", (classes, STAGE_WIDTHS[-1][0])), (f"last_out_L{classes}_b", (classes,))]
    return specs


# -- ops (NCTHW, float64) ------------------------------------------------------


def conv_pointwise(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """1x1x1 conv; the stride subsamples T, H and W."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride, ::stride]
    n, c, t, h, wd = x.shape
    out = np.matmul(w.reshape(w.shape[0], c), x.reshape(n, c, t * h * wd))
    return out.reshape(n, w.shape[0], t, h, wd)


def conv_channelwise(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """Caffe2 channel-wise 3x3x3 conv (group = C), pad 1 on every side."""
    n, c, t, h, wd = x.shape
    k = w.shape[2]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad), (pad, pad)))
    to, ho, wo = ((d + 2 * pad - k) // stride + 1 for d in (t, h, wd))
    out = np.zeros((n, c, to, ho, wo))
    for dt in range(k):
        for dh in range(k):
            for dw in range(k):
                tap = w[:, 0, dt, dh, dw].reshape(1, c, 1, 1, 1)
                out += tap * xp[:, :, dt:dt + stride * to:stride, dh:dh + stride * ho:stride, dw:dw + stride * wo:stride]
    return out


def conv_dense(x: np.ndarray, w: np.ndarray, stride: tuple, pad: tuple) -> np.ndarray:
    """Dense 3-D conv by im2col + matmul, one output frame at a time."""
    n, c, t, h, wd = x.shape
    o, _, kt, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2, (pad[2],) * 2))
    to, ho, wo = ((d + 2 * p - k) // s + 1 for d, p, k, s in zip((t, h, wd), pad, (kt, kh, kw), stride))
    w2 = w.reshape(o, -1)
    out = np.empty((n, o, to, ho, wo))
    for i in range(to):
        slab = xp[:, :, i * stride[0]:i * stride[0] + kt]
        win = np.lib.stride_tricks.sliding_window_view(slab, (kh, kw), axis=(3, 4))
        win = win[:, :, :, ::stride[1], ::stride[2]][:, :, :, :ho, :wo]      # n c kt ho wo kh kw
        cols = win.transpose(1, 2, 5, 6, 0, 3, 4).reshape(c * kt * kh * kw, n * ho * wo)
        out[:, :, i] = (w2 @ cols).reshape(o, n, ho, wo).transpose(1, 0, 2, 3)
    return out


def spatial_bn(x: np.ndarray, blobs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    s, b, rm, riv = (np.asarray(blobs[name + sfx], dtype=np.float64) for sfx in BN_SUFFIXES)
    alpha = s / np.sqrt(riv + BN_EPS)
    beta = b - alpha * rm
    return x * alpha.reshape(1, -1, 1, 1, 1) + beta.reshape(1, -1, 1, 1, 1)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


def max_pool_133(x: np.ndarray) -> np.ndarray:
    """Caffe2 MaxPool kernel (1,3,3), stride (1,2,2), pad (0,1,1); pads act as -inf."""
    n, c, t, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out = np.full((n, c, t, ho, wo), -np.inf)
    for dh in range(3):
        for dw in range(3):
            np.maximum(out, xp[:, :, :, dh:dh + 2 * ho:2, dw:dw + 2 * wo:2], out=out)
    return out


# -- the graph -------------------------------------------------------------------


def forward(blobs: Mapping[str, np.ndarray], family: str, depth: int, classes: int, clip: np.ndarray) -> np.ndarray:
    """Logits [N, classes] of the VMZ test graph on ``clip`` (N, 3, T, H, W, already normalised)."""
    def w(name: str) -> np.ndarray:
        return np.asarray(blobs[name], dtype=np.float64)

    x = np.asarray(clip, dtype=np.float64)
    kt = blobs["conv1_w"].shape[2]
    x = conv_dense(x, w("conv1_w"), (1, 2, 2), (kt // 2, 3, 3))
    x = relu(spatial_bn(x, blobs, "conv1_spatbn_relu"))
    x = max_pool_133(x)
    for b in blocks(depth):
        p = f"comp_{b.index}_"
        y = relu(spatial_bn(conv_pointwise(x, w(p + "conv_1_w")), blobs, p + "spatbn_1"))
        if family == "ir":
            y = relu(spatial_bn(conv_channelwise(y, w(p + "conv_3_w"), b.stride), blobs, p + "spatbn_3"))
            y = spatial_bn(conv_pointwise(y, w(p + "conv_4_w")), blobs, p + "spatbn_4")
        else:
            y = spatial_bn(conv_pointwise(y, w(p + "conv_2_middle_w")), blobs, p + "spatbn_2_middle")
            y = relu(spatial_bn(conv_channelwise(y, w(p + "conv_2_w"), b.stride), blobs, p + "spatbn_2"))
            y = spatial_bn(conv_pointwise(y, w(p + "conv_3_w")), blobs, p + "spatbn_3")
        if b.projection:
            q = f"shortcut_projection_{b.index}"
            x = spatial_bn(conv_pointwise(x, w(q + "_w"), b.stride), blobs, q + "_spatbn")
        x = relu(x + y)
    pooled = x.mean(axis=(2, 3, 4))
    return pooled @ w(f"last_out_L{classes}_w").T + w(f"last_out_L{classes}_b")
