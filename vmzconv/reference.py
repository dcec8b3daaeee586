"""The parity oracle: VMZ's Caffe2 test-time graph for every supported family, in float64 NumPy.

Built from VMZ's construction rules (``c2/lib/models/r3d_model.py``: ``create_model``,
``create_r3d``, BLOCK_CONFIG; ``builder/video_model.py``: ``add_bottleneck``,
``add_simple_block``, ``add_conv``, ``add_channelwise_conv``, ``add_spatial_bn``) and the Caffe2
blob names. It deliberately shares nothing with the conversion path: no torch, no mapping
tables, no PyTorch model. Op semantics follow Caffe2:

* Conv: NCTHW cross-correlation, zero padding, symmetric pads, no bias; channel-wise
  (group = C) for the 3x3x3 conv of CSN blocks; R(2+1)D's (2+1)-D conv is a spatial
  ``_middle`` conv (1x3x3) + BN + ReLU, then a temporal conv (3x1x1), with VMZ's middle width
  int(3*Cin*Cout*9 / (9*Cin + 3*Cout)) per conv (45 in the stem).
* SpatialBN (is_test): y = s * (x - rm) / sqrt(riv + 1e-3) + b (``_riv`` is the running variance).
* ReLU after every BN inside a block and after the residual Sum, never after a block's last BN
  (``spatbn_2`` of a simple block, the last ``spatbn`` of a bottleneck), and not after ip-CSN's
  ``spatbn_2_middle``.
* MaxPool ``pool1`` (CSN only): kernel (1,3,3), stride (1,2,2), pad (0,1,1).
* Strides: the first block of layers 2-4 strides 2 in T, H and W (on its spatiotemporal conv
  and its shortcut; the spatial part of a (2+1)-D conv takes the H/W stride, the temporal part
  the T stride). The 2018 families (R2D, fR2D, MCx, rMCx) build some stages from 1x3x3 convs
  (``add_simple_block(is_real_3d=False)``): those never stride in time, nor do their shortcuts.
  R2D's conv1 spans the clip (kernel = clip length) with no temporal padding.
* C3D (``c3d_model.py``): eight 3x3x3 convs with biases, each followed by BN and ReLU; max-pools
  (kernel = stride, no padding, floor) after conv1a (1x2x2) and conv2a/3b/4b/5b (2x2x2); pool5
  flattened into fc6 (4608 -> 4096), ReLU, fc7, ReLU, then the classifier.
* Head: average over T, H, W (VMZ's ``final_avg`` at the default clip is exactly this; for other
  clip sizes parity compares under global pooling), then FC.

Vectorised: 1x1x1 convs are matmuls, the channel-wise conv is 27 shifted multiply-adds, dense
convs are im2col + matmul per output frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections import abc
from typing import Iterator, Mapping

import numpy as np

BN_EPS = 1e-3
# VMZ BLOCK_CONFIG; depth 18/34 build simple blocks with the SHALLOW widths, 50+ bottlenecks with DEEP.
BLOCK_CONFIG = {10: (1, 1, 1, 1), 16: (2, 2, 2, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
                101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
SHALLOW = ((64, 64), (128, 128), (256, 256), (512, 512))           # (output width, base width) per stage
DEEP = ((256, 64), (512, 128), (1024, 256), (2048, 512))
STEM_WIDTH = 64
R2PLUS1D_STEM_MIDDLE = 45
BN_SUFFIXES = ("_s", "_b", "_rm", "_riv")
# VMZ 2018 (create_r2d, create_r2df, create_mcx, create_rmcx): R3D's blob names, with each stage's simple
# blocks 3x3x3 ("3") or 1x3x3 ("2", add_simple_block(is_real_3d=False): no temporal stride, shortcut too).
STAGES = {"r3d": "3333", "r2d": "2222", "r2df": "2222", "mc2": "2222", "mc3": "3222", "mc4": "3322", "mc5": "3332",
          "rmc2": "3333", "rmc3": "2333", "rmc4": "2233", "rmc5": "2223"}
# conv1's temporal kernel where the graph code fixes it (create_mcx 3, create_rmcx / create_r2df 1; create_r2d
# takes the clip length, 8 by default here); R3D, R(2+1)D and CSN take conv1_temporal_kernel 3 or 5.
STEM_KT = {"r2d": 8, "r2df": 1, "rmc2": 1, "rmc3": 1, "rmc4": 1, "rmc5": 1}
# Audio-visual (c2/lib/models/audio_visual_model.py, create_av_resnet): the visual family's network under "v_"
# names, VMZ's audio ResNet under "a_" names, fused by concat -> av_fc1 -> ReLU -> av_fc2 -> ReLU -> last_out_L{N};
# G-Blend files add a_last_out_L{N} / v_last_out_L{N} on each tower's pooled vector.
AV_VISUAL = {"av_ircsn": "ircsn", "av_ipcsn": "ipcsn", "av_r2plus1d": "r2plus1d", "av_r3d": "r3d"}
AUDIO_STEM = 16          # a_conv1: Conv 1 -> 16, 3x3, pad 1, with a bias, no BN or ReLU after it
AUDIO_PRE = ((16, 32, True), (32, 32, False), (32, 32, False))     # add_simple_block(in, out, down_sampling)
AUDIO_POOL = (4, 2)      # a_final_avg: MaxPool kernel [4, 2], stride 1 (the 4x2 map a 100x40 input leaves)
LOGMEL_SHAPE = (1, 100, 40)
FAMILIES = ("ircsn", "ipcsn", "r2plus1d", *STAGES, "c3d", *AV_VISUAL)
CSN = ("ircsn", "ipcsn")


@dataclass(frozen=True)
class Block:
    index: int        # VMZ's global comp counter
    dim_in: int
    base: int
    dim_out: int
    stride: int       # 1, or 2 on T, H and W for the first block of stages 3-5
    projection: bool
    simple: bool


def simple_blocks(family: str, depth: int) -> bool:
    """Simple blocks at depth 10-34, bottlenecks above; the 2018 families (add_simple_block only) at every depth."""
    return depth <= 34 or (family in STAGES and family != "r3d")


def blocks(depth: int, simple: bool | None = None) -> Iterator[Block]:
    """VMZ's block enumeration for ``depth`` (``simple``: the block kind, when the family fixes it)."""
    if depth not in BLOCK_CONFIG:
        raise ValueError(f"depth must be one of {sorted(BLOCK_CONFIG)}, not {depth}")
    simple = depth <= 34 if simple is None else simple
    index, dim_in = 0, STEM_WIDTH
    for stage, n in enumerate(BLOCK_CONFIG[depth]):
        dim_out, base = (SHALLOW if simple else DEEP)[stage]
        for j in range(n):
            down = stage > 0 and j == 0
            yield Block(index, dim_in, base, dim_out, 2 if down else 1, dim_in != dim_out or down, simple)
            index, dim_in = index + 1, dim_out


def middle(cin: int, cout: int) -> int:
    """VMZ add_conv's (2+1)-D middle width for a 3x3x3 conv (true division, then int)."""
    return int(3 * cin * cout * 3 * 3 / (cin * 3 * 3 + 3 * cout))


# C3D (c2/lib/models/c3d_model.py): VGG-style, every 3x3x3 conv (pad 1, with a bias) followed by a SpatialBN
# ("<conv>_bn") and a ReLU; max-pools without padding after conv1a (1x2x2) and conv2a, 3b, 4b, 5b (2x2x2), so a
# 16x112x112 clip leaves 512x1x3x3 = 4608 values for fc6; fc6 and fc7 (ReLU, dropout) then last_out_L{N}.
C3D_CONVS = (("conv1a", 64), ("conv2a", 128), ("conv3a", 256), ("conv3b", 256), ("conv4a", 512), ("conv4b", 512),
             ("conv5a", 512), ("conv5b", 512))
C3D_POOL_AFTER = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2),
                  "conv5b": (2, 2, 2)}
C3D_FC = 4096                 # fc6_dim = fc7_dim = 4096 (create_model's defaults)
C3D_CLIP = (16, 112)          # the input the fc6 width is built for


def blob_role(name: str) -> str:
    """What a parameter blob is: conv_weight, conv_bias (C3D, a_conv1), fc_weight, fc_bias, or bn_<s|b|rm|riv>."""
    if name.startswith(("last_out_L", "fc6_", "fc7_", "av_fc", "a_last_out_L", "v_last_out_L")):
        return "fc_bias" if name.endswith("_b") else "fc_weight"
    if name.endswith("_b") and (name[:-2] in dict(C3D_CONVS) or name == "a_conv1_b"):
        return "conv_bias"
    for sfx in BN_SUFFIXES:
        if name.endswith(sfx):
            return "bn" + sfx
    return "conv_weight"


def _bn(name: str, c: int) -> list[tuple[str, tuple]]:
    return [(name + s, (c,)) for s in BN_SUFFIXES]


def _conv_bn(conv: str, bn: str, shape: tuple) -> list[tuple[str, tuple]]:
    return [(conv, shape)] + _bn(bn, shape[0])


def _stage_of(depth: int, index: int) -> int:
    return next(i for i, end in enumerate(np.cumsum(BLOCK_CONFIG[depth])) if index < end)


def _block_specs(family: str, b: Block, depth: int = 18) -> list[tuple[str, tuple]]:
    p = f"comp_{b.index}_"
    if b.simple:
        if family in STAGES:
            kt = 3 if STAGES[family][_stage_of(depth, b.index)] == "3" else 1
            return (_conv_bn(p + "conv_1_w", p + "spatbn_1", (b.dim_out, b.dim_in, kt, 3, 3))
                    + _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.dim_out, b.dim_out, kt, 3, 3)))
        m1, m2 = middle(b.dim_in, b.dim_out), middle(b.dim_out, b.dim_out)
        return (_conv_bn(p + "conv_1_middle_w", p + "spatbn_1_middle", (m1, b.dim_in, 1, 3, 3))
                + _conv_bn(p + "conv_1_w", p + "spatbn_1", (b.dim_out, m1, 3, 1, 1))
                + _conv_bn(p + "conv_2_middle_w", p + "spatbn_2_middle", (m2, b.dim_out, 1, 3, 3))
                + _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.dim_out, m2, 3, 1, 1)))
    specs = _conv_bn(p + "conv_1_w", p + "spatbn_1", (b.base, b.dim_in, 1, 1, 1))
    if family == "ircsn":
        specs += _conv_bn(p + "conv_3_w", p + "spatbn_3", (b.base, 1, 3, 3, 3))
        specs += _conv_bn(p + "conv_4_w", p + "spatbn_4", (b.dim_out, b.base, 1, 1, 1))
        return specs
    if family == "ipcsn":
        specs += _conv_bn(p + "conv_2_middle_w", p + "spatbn_2_middle", (b.base, b.base, 1, 1, 1))
        specs += _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.base, 1, 3, 3, 3))
    elif family == "r2plus1d":
        m = middle(b.base, b.base)
        specs += _conv_bn(p + "conv_2_middle_w", p + "spatbn_2_middle", (m, b.base, 1, 3, 3))
        specs += _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.base, m, 3, 1, 1))
    else:
        specs += _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.base, b.base, 3, 3, 3))
    return specs + _conv_bn(p + "conv_3_w", p + "spatbn_3", (b.dim_out, b.base, 1, 1, 1))


def audio_blocks(depth: int) -> Iterator[Block]:
    """VMZ's audio ResNet (AudioModelBuilder, prefix "a_"): three simple blocks 16 -> 32, then the visual depth's
    block counts and widths (simple for 18/34, bottleneck for 50+), the first block of every stage striding 2 in
    both dimensions with a projection. The global counter runs on from the three."""
    simple = depth in (18, 34)
    index = 0
    for dim_in, dim_out, down in AUDIO_PRE:
        yield Block(index, dim_in, dim_out, dim_out, 2 if down else 1, down or dim_in != dim_out, True)
        index += 1
    dim_in = AUDIO_PRE[-1][1]
    for stage, n in enumerate(BLOCK_CONFIG[depth]):
        dim_out, base = (SHALLOW if simple else DEEP)[stage]
        for j in range(n):
            yield Block(index, dim_in, base, dim_out, 2 if j == 0 else 1, j == 0 or dim_in != dim_out, simple)
            index, dim_in = index + 1, dim_out


def _audio_specs(depth: int) -> list[tuple[str, tuple]]:
    specs = [("a_conv1_w", (AUDIO_STEM, 1, 3, 3)), ("a_conv1_b", (AUDIO_STEM,))]
    for b in audio_blocks(depth):
        p = f"a_comp_{b.index}_"
        if b.simple:
            specs += _conv_bn(p + "conv_1_w", p + "spatbn_1", (b.dim_out, b.dim_in, 3, 3))
            specs += _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.dim_out, b.dim_out, 3, 3))
        else:
            specs += _conv_bn(p + "conv_1_w", p + "spatbn_1", (b.base, b.dim_in, 1, 1))
            specs += _conv_bn(p + "conv_2_w", p + "spatbn_2", (b.base, b.base, 3, 3))
            specs += _conv_bn(p + "conv_3_w", p + "spatbn_3", (b.dim_out, b.base, 1, 1))
        if b.projection:
            q = f"a_shortcut_projection_{b.index}"
            specs += _conv_bn(q + "_w", q + "_spatbn", (b.dim_out, b.dim_in, 1, 1))
    return specs


def blob_specs(family: str, depth: int, classes: int, conv1_kt: int | None = None,
               gblend: bool = True, in_channels: int = 3) -> list[tuple[str, tuple]]:
    """Every parameter blob (name, shape) a VMZ ``family`` checkpoint holds, in graph order (audio-visual:
    with the G-Blend heads unless ``gblend`` is False)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if family in AV_VISUAL:
        visual = [("v_" + n, s) for n, s in blob_specs(AV_VISUAL[family], depth, classes, conv1_kt)
                  if not n.startswith("last_out_L")]
        width = (SHALLOW if depth in (18, 34) else DEEP)[-1][0]
        specs = visual + _audio_specs(depth) + [
            ("av_fc1_w", (width, 2 * width)), ("av_fc1_b", (width,)), ("av_fc2_w", (width, width)),
            ("av_fc2_b", (width,)), (f"last_out_L{classes}_w", (classes, width)), (f"last_out_L{classes}_b", (classes,))]
        if gblend:
            specs += [(f"{t}_last_out_L{classes}{s}", (classes, width) if s == "_w" else (classes,))
                      for t in "av" for s in ("_w", "_b")]
        return specs
    if family == "c3d":
        specs, cin = [], 3
        for name, cout in C3D_CONVS:
            specs += [(name + "_w", (cout, cin, 3, 3, 3)), (name + "_b", (cout,))] + _bn(name + "_bn", cout)
            cin = cout
        return specs + [("fc6_w", (C3D_FC, 512 * 3 * 3)), ("fc6_b", (C3D_FC,)), ("fc7_w", (C3D_FC, C3D_FC)),
                        ("fc7_b", (C3D_FC,)), (f"last_out_L{classes}_w", (classes, C3D_FC)),
                        (f"last_out_L{classes}_b", (classes,))]
    if family in CSN and depth in (18, 34):
        raise ValueError("CSN exists only as a bottleneck network (depth 50, 101, 152)")
    if family in STAGES and family != "r3d" and depth not in (10, 16, 18, 34, 101, 152):
        raise ValueError("the 2018 families are built here at depths 10, 16, 18, 34, 101 and 152 (26 and 50 are 18's "
                         "and 34's networks)")
    conv1_kt = conv1_kt or STEM_KT.get(family, 3)
    if family == "r2plus1d":
        m = R2PLUS1D_STEM_MIDDLE
        specs = (_conv_bn("conv1_middle_w", "conv1_middle_spatbn_relu", (m, in_channels, 1, 7, 7))
                 + _conv_bn("conv1_w", "conv1_spatbn_relu", (STEM_WIDTH, m, conv1_kt, 1, 1)))
    else:
        specs = _conv_bn("conv1_w", "conv1_spatbn_relu", (STEM_WIDTH, in_channels, conv1_kt, 7, 7))
    for b in blocks(depth, simple_blocks(family, depth)):
        specs += _block_specs(family, b, depth)
        if b.projection:
            q = f"shortcut_projection_{b.index}"
            specs += _conv_bn(q + "_w", q + "_spatbn", (b.dim_out, b.dim_in, 1, 1, 1))
    width = (SHALLOW if simple_blocks(family, depth) else DEEP)[-1][0]
    specs += [(f"last_out_L{classes}_w", (classes, width)), (f"last_out_L{classes}_b", (classes,))]
    return specs


# -- ops (NCTHW, float64) ------------------------------------------------------


def conv_pointwise(x: np.ndarray, w: np.ndarray, stride: int = 1, t_stride: int | None = None) -> np.ndarray:
    """1x1x1 conv; the stride subsamples H and W, and T (by ``t_stride`` when given)."""
    t_stride = stride if t_stride is None else t_stride
    if stride != 1 or t_stride != 1:
        x = x[:, :, ::t_stride, ::stride, ::stride]
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


def max_pool(x: np.ndarray, kernel: tuple, pad: tuple = (0, 0, 0)) -> np.ndarray:
    """Caffe2 MaxPool with stride = kernel, floor rounding; pads act as -inf (C3D's pools have none)."""
    xp = np.pad(x, ((0, 0), (0, 0), *((p, p) for p in pad)), constant_values=-np.inf)
    n, c = x.shape[:2]
    outs = [(d - k) // k + 1 for d, k in zip(xp.shape[2:], kernel)]
    out = np.full((n, c, *outs), -np.inf)
    for dt in range(kernel[0]):
        for dh in range(kernel[1]):
            for dw in range(kernel[2]):
                np.maximum(out, xp[:, :, dt:dt + kernel[0] * outs[0]:kernel[0], dh:dh + kernel[1] * outs[1]:kernel[1],
                                   dw:dw + kernel[2] * outs[2]:kernel[2]], out=out)
    return out


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


def _bn_relu(x: np.ndarray, blobs, name: str, with_relu: bool = True) -> np.ndarray:
    y = spatial_bn(x, blobs, name)
    return relu(y) if with_relu else y


def _conv_2plus1d(x, blobs, conv: str, bn: str, stride: int, with_relu: bool) -> np.ndarray:
    """``conv``_middle (1x3x3, H/W stride) + BN + ReLU, then ``conv`` (3x1x1, T stride) + BN [+ ReLU]."""
    y = conv_dense(x, _w(blobs, conv + "_middle_w"), (1, stride, stride), (0, 1, 1))
    y = _bn_relu(y, blobs, bn + "_middle")
    y = conv_dense(y, _w(blobs, conv + "_w"), (stride, 1, 1), (1, 0, 0))
    return _bn_relu(y, blobs, bn, with_relu)


def _w(blobs, name: str) -> np.ndarray:
    return np.asarray(blobs[name], dtype=np.float64)


def _block(x: np.ndarray, blobs, family: str, b: Block, depth: int = 18) -> np.ndarray:
    p = f"comp_{b.index}_"
    s = b.stride
    ts = s                                    # the stride in time: none in a 2-D stage (nor its shortcut)
    if b.simple and family in STAGES:
        real_3d = STAGES[family][_stage_of(depth, b.index)] == "3"
        ts, tp = (s, 1) if real_3d else (1, 0)
        y = _bn_relu(conv_dense(x, _w(blobs, p + "conv_1_w"), (ts, s, s), (tp, 1, 1)), blobs, p + "spatbn_1")
        y = _bn_relu(conv_dense(y, _w(blobs, p + "conv_2_w"), (1, 1, 1), (tp, 1, 1)), blobs, p + "spatbn_2", False)
    elif b.simple:
        y = _conv_2plus1d(x, blobs, p + "conv_1", p + "spatbn_1", s, True)
        y = _conv_2plus1d(y, blobs, p + "conv_2", p + "spatbn_2", 1, False)
    else:
        y = _bn_relu(conv_pointwise(x, _w(blobs, p + "conv_1_w")), blobs, p + "spatbn_1")
        if family == "ircsn":
            y = _bn_relu(conv_channelwise(y, _w(blobs, p + "conv_3_w"), s), blobs, p + "spatbn_3")
            last = "4"
        elif family == "ipcsn":
            y = _bn_relu(conv_pointwise(y, _w(blobs, p + "conv_2_middle_w")), blobs, p + "spatbn_2_middle", False)
            y = _bn_relu(conv_channelwise(y, _w(blobs, p + "conv_2_w"), s), blobs, p + "spatbn_2")
            last = "3"
        elif family == "r2plus1d":
            y = _conv_2plus1d(y, blobs, p + "conv_2", p + "spatbn_2", s, True)
            last = "3"
        else:
            y = _bn_relu(conv_dense(y, _w(blobs, p + "conv_2_w"), (s,) * 3, (1,) * 3), blobs, p + "spatbn_2")
            last = "3"
        y = _bn_relu(conv_pointwise(y, _w(blobs, p + f"conv_{last}_w")), blobs, p + f"spatbn_{last}", False)
    if b.projection:
        q = f"shortcut_projection_{b.index}"
        x = spatial_bn(conv_pointwise(x, _w(blobs, q + "_w"), s, ts), blobs, q + "_spatbn")
    return relu(x + y)


def _c3d_stages(blobs, x: np.ndarray):
    """C3D: conv (+ bias), BN, ReLU; a pool after conv1a, 2a, 3b, 4b, 5b. Yields ("pool1", out) ... ("pool5", out)."""
    for name, _ in C3D_CONVS:
        w = _w(blobs, name + "_w")
        x = conv_dense(x, w, (1, 1, 1), (1, 1, 1)) + _w(blobs, name + "_b").reshape(1, -1, 1, 1, 1)
        x = _bn_relu(x, blobs, name + "_bn")
        if name in C3D_POOL_AFTER:
            x = max_pool(x, C3D_POOL_AFTER[name])
            yield f"pool{name[4]}", x


def stages(blobs: Mapping[str, np.ndarray], family: str, depth: int, clip: np.ndarray):
    """Yields ("stem", out), then ("layerL.j", out) for every block (L = 1-4, j 0-based), float64; C3D
    yields its five pools' outputs ("pool1" ... "pool5")."""
    x = np.asarray(clip, dtype=np.float64)
    if family == "c3d":
        yield from _c3d_stages(blobs, x)
        return
    kt = blobs["conv1_w"].shape[2]
    if family == "r2plus1d":
        x = _bn_relu(conv_dense(x, _w(blobs, "conv1_middle_w"), (1, 2, 2), (0, 3, 3)), blobs, "conv1_middle_spatbn_relu")
        x = _bn_relu(conv_dense(x, _w(blobs, "conv1_w"), (1, 1, 1), (kt // 2, 0, 0)), blobs, "conv1_spatbn_relu")
    else:                      # create_r2d's conv1 spans the clip with no temporal padding
        pad = 0 if family == "r2d" else kt // 2
        x = _bn_relu(conv_dense(x, _w(blobs, "conv1_w"), (1, 2, 2), (pad, 3, 3)), blobs, "conv1_spatbn_relu")
    if family in CSN:          # VMZ's CSN scripts run with use_pool1=1; R(2+1)D/R3D never do
        x = max_pool_133(x)
    yield "stem", x
    layer_of = [layer for layer, n in enumerate(BLOCK_CONFIG[depth], start=1) for _ in range(n)]
    first = {}
    for b in blocks(depth, simple_blocks(family, depth)):
        layer = layer_of[b.index]
        first.setdefault(layer, b.index)
        x = _block(x, blobs, family, b, depth)
        yield f"layer{layer}.{b.index - first[layer]}", x


def pooled(blobs: Mapping[str, np.ndarray], family: str, x: np.ndarray) -> np.ndarray:
    """The vector that feeds the classifier: the global average over T, H, W of the last block; for C3D,
    pool5 flattened (C, T, H, W order, as Caffe2's FC reads it) through fc6 + ReLU, fc7 + ReLU (dropout is
    the identity in test mode)."""
    if family != "c3d":
        return x.mean(axis=(2, 3, 4))
    x = x.reshape(x.shape[0], -1)
    for fc in ("fc6", "fc7"):
        w = _w(blobs, fc + "_w")
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{fc}_w takes {w.shape[1]} inputs, pool5 gives {x.shape[1]} (C3D's fc6 is built for "
                             f"a {C3D_CLIP[0]}x{C3D_CLIP[1]}x{C3D_CLIP[1]} clip)")
        x = relu(x @ w.T + _w(blobs, fc + "_b"))
    return x


def head(blobs: Mapping[str, np.ndarray], classes: int, x: np.ndarray, family: str = "r3d") -> np.ndarray:
    """:func:`pooled`, then the FC ``last_out_L{classes}``."""
    return pooled(blobs, family, x) @ _w(blobs, f"last_out_L{classes}_w").T + _w(blobs, f"last_out_L{classes}_b")


def forward(blobs: Mapping[str, np.ndarray], family: str, depth: int, classes: int, clip: np.ndarray,
            logmels: np.ndarray | None = None) -> np.ndarray:
    """Logits [N, classes] of the VMZ test graph on ``clip`` (N, 3, T, H, W, already normalised); an
    audio-visual family also takes ``logmels`` (N, 1, 100, 40) and returns the joint head."""
    if family in AV_VISUAL:
        return av_heads(blobs, family, depth, classes, clip, logmels)["joint"]
    for _, x in stages(blobs, family, depth, clip):
        pass
    return head(blobs, classes, x, family)


# -- audio-visual ----------------------------------------------------------------------------


class _Prefixed(abc.Mapping):
    """The blobs under ``prefix`` by their unprefixed names (the visual tower's "v_")."""

    def __init__(self, blobs, prefix: str):
        self.blobs, self.prefix = blobs, prefix

    def __getitem__(self, name):
        return self.blobs[self.prefix + name]

    def __iter__(self):
        return (n[len(self.prefix):] for n in self.blobs if n.startswith(self.prefix))

    def __len__(self):
        return sum(1 for _ in self)


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """A 2-D conv over N, C, H, W as a 3-D one with one frame."""
    return conv_dense(x[:, :, None], w[:, :, None], (1, stride, stride), (0, pad, pad))[:, :, 0]


def _bn2d(x: np.ndarray, blobs, name: str, with_relu: bool = True) -> np.ndarray:
    return _bn_relu(x[:, :, None], blobs, name, with_relu)[:, :, 0]


def audio_features(blobs: Mapping[str, np.ndarray], depth: int, logmels: np.ndarray) -> np.ndarray:
    """VMZ's audio tower on log-mels (N, 1, 100, 40): a_conv1 (+ bias), the blocks, then a_final_avg, a max
    over the 4x2 map (kernel [4, 2], stride 1), flattened."""
    x = np.asarray(logmels, dtype=np.float64)
    x = _conv2d(x, _w(blobs, "a_conv1_w"), 1, 1) + _w(blobs, "a_conv1_b").reshape(1, -1, 1, 1)
    for b in audio_blocks(depth):
        p, s = f"a_comp_{b.index}_", b.stride
        if b.simple:
            y = _bn2d(_conv2d(x, _w(blobs, p + "conv_1_w"), s, 1), blobs, p + "spatbn_1")
            y = _bn2d(_conv2d(y, _w(blobs, p + "conv_2_w"), 1, 1), blobs, p + "spatbn_2", False)
        else:
            y = _bn2d(_conv2d(x, _w(blobs, p + "conv_1_w"), 1, 0), blobs, p + "spatbn_1")
            y = _bn2d(_conv2d(y, _w(blobs, p + "conv_2_w"), s, 1), blobs, p + "spatbn_2")
            y = _bn2d(_conv2d(y, _w(blobs, p + "conv_3_w"), 1, 0), blobs, p + "spatbn_3", False)
        if b.projection:
            q = f"a_shortcut_projection_{b.index}"
            x = _bn2d(_conv2d(x, _w(blobs, q + "_w"), s, 0), blobs, q + "_spatbn", False)
        x = relu(x + y)
    if x.shape[2:] != AUDIO_POOL:
        raise ValueError(f"the audio tower leaves a {x.shape[2]}x{x.shape[3]} map, a_final_avg pools 4x2 "
                         f"(VMZ's audio input is 1x100x40, not {'x'.join(map(str, np.shape(logmels)[1:]))})")
    return x.max(axis=(2, 3))


def av_visual_stages(blobs: Mapping[str, np.ndarray], family: str, depth: int, clip: np.ndarray):
    """:func:`stages` of an audio-visual model's visual tower (its "v_" blobs)."""
    return stages(_Prefixed(blobs, "v_"), AV_VISUAL[family], depth, clip)


def av_heads(blobs: Mapping[str, np.ndarray], family: str, depth: int, classes: int, clip: np.ndarray,
             logmels: np.ndarray) -> dict[str, np.ndarray]:
    """The joint logits, and with G-Blend heads the audio and visual ones: {"joint", ["audio", "visual"]}."""
    if logmels is None:
        raise ValueError("an audio-visual model needs log-mels beside the clip")
    for _, x in av_visual_stages(blobs, family, depth, clip):
        pass
    return av_fusion(blobs, classes, x.mean(axis=(2, 3, 4)), audio_features(blobs, depth, logmels))


def av_fusion(blobs: Mapping[str, np.ndarray], classes: int, v: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    """The heads on the towers' pooled vectors: av_concat [visual, audio] -> av_fc1 -> ReLU -> av_fc2 -> ReLU ->
    last_out_L{N}; with G-Blend, a_last_out / v_last_out on each tower's vector."""
    y = np.concatenate([v, a], axis=1)                 # av_concat: visual first
    for fc in ("av_fc1", "av_fc2"):
        y = relu(y @ _w(blobs, fc + "_w").T + _w(blobs, fc + "_b"))
    out = {"joint": y @ _w(blobs, f"last_out_L{classes}_w").T + _w(blobs, f"last_out_L{classes}_b")}
    for name, feats in (("audio", a), ("visual", v)):
        head_w = f"{name[0]}_last_out_L{classes}_w"
        if head_w in blobs:
            out[name] = feats @ _w(blobs, head_w).T + _w(blobs, head_w[:-1] + "b")
    return out
