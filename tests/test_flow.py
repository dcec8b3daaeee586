"""VMZ's optical-flow R(2+1)D (a 2-channel stem): detection and the card, convert -> parity -> features on a
tiny PyAV video, and the flow front end against an independent reading of Caffe2's VideoInput op."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vmzconv import parity
from vmzconv.arch import detect
from vmzconv.blobs import Blobs
from vmzconv.synth import seeded_blobs

from . import torchvision_video
from .conftest import run_cli
from .synthetic import frames, write_video


def test_a_two_channel_stem_is_an_optical_flow_model():
    blobs = Blobs("r2.5d_d34_l32_ft_sports1m_optical_flow.pkl", seeded_blobs("r2plus1d", 34, in_channels=2))
    a = detect(blobs)
    assert (a.name, a.in_channels, a.modality) == ("r2plus1d_r34", 2, "optical flow, 2 channels")
    assert "optical flow, 2 channels" in a.describe()
    r3d = detect(Blobs("r3d_flow.pkl", seeded_blobs("r3d", 18, in_channels=2)))
    assert r3d.in_channels == 2


@pytest.fixture(scope="module")
def flow_file(module_dir, vmz_pickle):
    src = vmz_pickle.custom("r21d18_flow.pkl", seeded_blobs("r2plus1d", 18, in_channels=2))
    out = module_dir / "flow.pth"
    res = run_cli("convert", src, out, "--json", "-q", "--parity-clip", "8,32")
    assert res.returncode == 0, res.stderr
    res = run_cli("parity", src, out, "--parity-clip", "8,32")           # and again, from the written file
    assert res.returncode == 0, res.stderr
    res = run_cli("inspect", src)
    assert "optical flow, 2 channels" in res.stdout
    return out


def test_card_says_optical_flow_and_its_build_lines_take_two_channels(flow_file):
    card = json.loads(flow_file.with_name(flow_file.name + ".json").read_text())
    assert card["modality"] == "optical flow, 2 channels" and card["input_channels"] == 2
    inp = card["input"]
    assert inp["channel_order"] == "flow x, flow y" and inp["mean"] == [0.0046635, 0.0046261]
    assert "Farneback" in inp["flow"]["algorithm"] and card["parity"]["clip"] == [1, 2, 8, 32, 32]
    assert "nn.Conv3d(2, 45" in card["build"]
    if torchvision_video.load() is None:
        pytest.skip("the torchvision wheel is not in .venv/wheels (the test command downloads it)")
    from vmzconv.load import load_converted

    ns: dict = {}
    exec(card["build"], ns)                                          # noqa: S102 (our own card)
    ns["model"].load_state_dict(torch.load(flow_file, weights_only=True)["state_dict"], strict=True)
    clip = torch.from_numpy(parity.fixed_clip(8, 48, c=2))
    with torch.no_grad():
        theirs, ours = ns["model"].eval()(clip).numpy(), load_converted(flow_file).model(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()


def _independent_flow(path, starts, clip_len: int, size=(171, 128), crop: int = 112) -> np.ndarray:
    """VideoInput's flow read again: PyAV frames, resized to 171x128, the centre 112 crop cut first, gray,
    Farneback with optical_flow.cc's arguments between consecutive frames, x then y, (v - mean) / std."""
    import av
    import cv2

    with av.open(str(path)) as c:
        rgb = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = []
    for s in starts:
        grays = []
        for f in rgb[s:s + clip_len + 1]:
            f = cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)
            y0, x0 = (f.shape[0] - crop) // 2, (f.shape[1] - crop) // 2
            grays.append(cv2.cvtColor(f[y0:y0 + crop, x0:x0 + crop], cv2.COLOR_RGB2GRAY))
        flows = [cv2.calcOpticalFlowFarneback(a, b, None, math.sqrt(2) / 2.0, 5, 10, 2, 7, 1.5,
                                              cv2.OPTFLOW_FARNEBACK_GAUSSIAN) for a, b in zip(grays, grays[1:])]
        f = np.stack(flows).transpose(3, 0, 1, 2)                   # C, T, H, W
        out.append((f - np.array([0.0046635, 0.0046261]).reshape(2, 1, 1, 1))
                   / np.array([0.972347, 0.755146]).reshape(2, 1, 1, 1))
    return np.stack(out).astype(np.float32)


def test_flow_front_end_matches_an_independent_reading(flow_file, tmp_path):
    """The views predict/verify feed a flow model (VMZ's protocol, 2 clips of 8 flow frames from 9 frames)
    equal the test's own pipeline to 1e-5 (same OpenCV Farneback; the rest written independently)."""
    from vmzconv.load import load_converted
    from vmzconv.video import annotations
    from vmzconv.video.protocol import Protocol, normalise
    from vmzconv.video.windows import item_views

    video = write_video(tmp_path / "v.mp4", frames(2, 30, 200, 150))
    conv = load_converted(flow_file)
    p = Protocol.from_card(conv.meta["input"], num_clips=2)
    views = item_views(annotations.Item(0, str(video), -1, str(video), "video"), p, flow=True)
    ours = normalise(views, conv.meta["input"]["mean"], conv.meta["input"]["std"]).numpy()
    starts = [0, 30 - 9]                                          # VMZ: floor(k * (F - span) / (n - 1)), span 9
    theirs = _independent_flow(video, starts, 8)
    assert ours.shape == theirs.shape == (2, 2, 8, 112, 112)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(theirs).max() > 0.5                              # the pattern moves: real flow, not zeros


def test_features_run_on_a_flow_model(flow_file, tmp_path):
    video = write_video(tmp_path / "v.mp4", frames(1, 20, 160, 120))
    res = run_cli("features", flow_file, video, "--out-dir", tmp_path / "f", "--num-snippets", "2")
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "f" / "v.npy").shape == (2, 512)
    res = run_cli("predict", flow_file, video, "--num-clips", "1", "--mean", "1,2,3")
    assert res.returncode == 2 and "2 input channels" in res.stderr
