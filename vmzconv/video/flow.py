"""The input of VMZ's optical-flow models, as Caffe2's ``VideoInput`` op computed it.

Sources: PyTorch 1.x ``caffe2/video/optical_flow.{h,cc}``, ``video_io.cc`` (``ClipTransformOpticalFlow``) and
``video_input_op.h``; the arguments VMZ ran its flow model with, ``c2/scripts/extract_feature_kinetics_of.sh``
(``--clip_length_rgb=33 --sampling_rate_rgb=1 --clip_length_of=32 --sampling_rate_of=1 --flow_data_type=0
--frame_gap_of=1 --do_flow_aggregation=1 --num_channels=2``):

* frames: a clip of 32 flow frames reads 33 consecutive decoded frames (``(length_of - 1) * sampling_rate_of +
  frame_gap_of + 1``), resized and centre-cropped as the RGB models' (the crop rectangle is cut first);
* each frame to gray with OpenCV's ``COLOR_RGB2GRAY``; flow l from gray frames l and l + 1 (gap 1; aggregation
  over a gap of one frame is that single flow);
* the algorithm: ``flow_alg_type`` is not passed by VMZ's tools, so VideoInput's default 0, OpenCV's Farneback
  with ``optical_flow.cc``'s arguments (pyr_scale sqrt(2)/2, levels 5, winsize 10, iterations 2, poly_n 7,
  poly_sigma 1.5, ``OPTFLOW_FARNEBACK_GAUSSIAN``);
* channels: horizontal (x) then vertical (y) displacement in pixels of the cropped frame, no bound and no
  rescaling to 8 bits, then (v - mean) / std with ``InputDataMean`` / ``InputDataStd``'s first two entries
  (0.0046635, 0.0046261) and (0.972347, 0.755146).

Not pinned by the source: OpenCV's Farneback has changed little, but VMZ's OpenCV build (2.4/3.x) and this
one (opencv-python-headless 4.x) are not the same code, so the flow may differ in its last bits.
"""

from __future__ import annotations

import math

import numpy as np

MEAN = (0.0046635, 0.0046261)          # video_input_op.h InputDataMean[0:2] (flow x, flow y)
STD = (0.972347, 0.755146)             # InputDataStd[0:2]
FARNEBACK = dict(pyr_scale=math.sqrt(2) / 2.0, levels=5, winsize=10, iterations=2, poly_n=7, poly_sigma=1.5)
GAP = 1                                # frame_gap_of


def input_spec(channels: int) -> dict:
    """The card's input fields for an optical-flow model."""
    spec = {"modality": f"optical flow, {channels} channels", "channel_order": "flow x, flow y",
            "value_range": "pixels of displacement (no bound)", "mean": list(MEAN), "std": list(STD),
            "flow": {"algorithm": "OpenCV Farneback (Caffe2 VideoInput flow_alg_type 0)",
                     "arguments": {k: round(v, 6) for k, v in FARNEBACK.items()} | {"flags": "OPTFLOW_FARNEBACK_GAUSSIAN"},
                     "frames": "clip_len + 1 consecutive frames, resized and centre-cropped, to gray (RGB2GRAY)",
                     "gap": GAP, "source": "caffe2/video optical_flow.cc, video_io.cc; VMZ extract_feature_kinetics_of.sh",
                     "not_pinned": "VMZ's OpenCV build differs from this one: flow may differ in its last bits"}}
    if channels != 2:
        spec["flow"]["unsupported"] = (f"{channels} channels: VMZ's flow_data_type 1-3 (magnitude, gray or RGB "
                                       "added); vmzconv computes the 2-channel input only")
    return spec


def clip_flow(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames [T + 1, H, W, 3] -> float32 flow [T, H, W, 2] (x, y), not normalised."""
    import cv2

    flags = cv2.OPTFLOW_FARNEBACK_GAUSSIAN
    grays = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    out = np.empty((len(grays) - GAP, *grays[0].shape, 2), np.float32)
    for t in range(len(grays) - GAP):
        out[t] = cv2.calcOpticalFlowFarneback(grays[t], grays[t + GAP], None, FARNEBACK["pyr_scale"],
                                              FARNEBACK["levels"], FARNEBACK["winsize"], FARNEBACK["iterations"],
                                              FARNEBACK["poly_n"], FARNEBACK["poly_sigma"], flags)
    return out


def flow_views(views: np.ndarray) -> np.ndarray:
    """uint8 views [V, T + 1, H, W, 3] -> float32 flow views [V, T, H, W, 2]."""
    return np.stack([clip_flow(v) for v in views])
