"""`vmzconv features` and `vmzconv predict` on PyAV-encoded videos: the window rule, the layers, the
independence of the features from our pipeline, resumption, torchrun, and agreement with verify."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from .synthetic import frames, write_video

from .conftest import assert_one_line_error, run_cli

SMALL = ("--short-side", "64", "--crop-size", "64", "--workers", "0", "--threads", "1")


@pytest.fixture(scope="module")
def data(module_dir, vmz_pickle):
    """An R3D-18 checkpoint (8-frame clips) and videos of known length at 25 fps."""
    from vmzconv.convert import convert

    d = module_dir
    ckpt = d / "r3d18.pth"
    convert(vmz_pickle("r3d", 18, keep=True), ckpt, check_parity=False, card=False)
    lengths = {"long": 50, "short": 10, "mid": 33}
    for i, (name, n) in enumerate(lengths.items()):
        write_video(d / f"{name}.mp4", frames(i + 1, n, 96, 72, seed=i), fps=25)
    return d, ckpt, lengths


def features(ckpt, out, *args):
    return run_cli("features", ckpt, *args, "--out-dir", out, *SMALL)


def index_rows(out):
    with open(out / "index.csv") as f:
        return list(csv.DictReader(f))


def expected_windows(n, clip_len=8, interval=1, stride=None, tail="pad"):
    span = (clip_len - 1) * interval + 1
    stride = stride or clip_len * interval
    if n < span:
        return [(0, n - 1)]
    out = [(s, s + span - 1) for s in range(0, n - span + 1, stride)]
    nxt = out[-1][0] + stride                   # the tail: frames after the last whole window
    if out[-1][1] < n - 1 and nxt <= n - 1 and tail != "drop":
        out.append((nxt, n - 1) if tail == "pad" else (n - span, n - 1))
    return out


@pytest.mark.parametrize("args,interval,stride,fps", [((), 1, None, 25.0),
                                                      (("--frame-interval", "2", "--stride", "5"), 2, 5, 25.0),
                                                      (("--fps", "10"), 1, None, 10.0)])
def test_rows_and_timestamps_follow_the_window_rule(data, tmp_path, args, interval, stride, fps):
    d, ckpt, lengths = data
    proc = features(ckpt, tmp_path / "out", *(d / f"{n}.mp4" for n in lengths), *args)
    assert proc.returncode == 0, proc.stderr
    rows = index_rows(tmp_path / "out")
    assert list(rows[0]) == ["video", "row", "start_frame", "end_frame", "start_sec", "end_sec", "fps", "windows"]
    assert {r["windows"] for r in rows} == {"pad"}
    for name, n in lengths.items():
        frames_at_rate = int(np.ceil(n / 25 * fps - 1e-9)) if fps != 25.0 else n     # --fps: k/fps < duration
        want = expected_windows(frames_at_rate, 8, interval, stride)
        got = [r for r in rows if r["video"] == name]
        assert [(int(r["start_frame"]), int(r["end_frame"])) for r in got] == want, (name, got)
        assert [int(r["row"]) for r in got] == list(range(len(want)))
        for r in got:
            assert float(r["fps"]) == pytest.approx(fps)
            assert float(r["start_sec"]) == pytest.approx(int(r["start_frame"]) / fps, abs=1e-6)
            assert float(r["end_sec"]) == pytest.approx((int(r["end_frame"]) + 1) / fps, abs=1e-6)
        assert np.load(tmp_path / "out" / f"{name}.npy").shape == (len(want), 512)


def test_layers_agree_with_the_classifier_and_npy_equals_h5(data, tmp_path):
    import h5py

    d, ckpt, _ = data
    video = d / "long.mp4"
    outs = {}
    for layer in ("pool", "logits", "probs"):
        assert features(ckpt, tmp_path / layer, video, "--layer", layer).returncode == 0
        outs[layer] = np.load(tmp_path / layer / "long.npy")
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    w, b = sd["fc.weight"].double().numpy(), sd["fc.bias"].double().numpy()
    logits = outs["pool"].astype(np.float64) @ w.T + b
    assert np.abs(logits - outs["logits"]).max() <= 1e-4
    e = np.exp(outs["logits"] - outs["logits"].max(axis=1, keepdims=True))
    assert np.abs(e / e.sum(axis=1, keepdims=True) - outs["probs"]).max() <= 1e-6
    proc = features(ckpt, tmp_path / "h5", video, "--format", "h5")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "h5" / "features.h5") as h5:
        assert np.array_equal(h5["long"][()], outs["pool"])
        assert json.loads(h5.attrs["options"])["layer"] == "pool"


def test_a_windows_feature_is_the_models_own(data, tmp_path):
    """Window 1 of long.mp4, decoded and preprocessed here (PyAV, resize short side 64, centre crop 64)."""
    import av
    import cv2

    from vmzconv.load import load_converted

    d, ckpt, _ = data
    assert features(ckpt, tmp_path / "o", d / "long.mp4").returncode == 0
    got = np.load(tmp_path / "o" / "long.npy")[1]
    with av.open(str(d / "long.mp4")) as c:
        rgb = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][8:16]
    h, w = rgb[0].shape[:2]                                          # 72 x 96 -> 64 x 85
    nw, nh = int(w * 64 / h + 0.5), 64
    clip = np.stack([cv2.resize(f, (nw, nh), interpolation=cv2.INTER_LINEAR) for f in rgb])
    x0 = (nw - 64) // 2
    clip = clip[:, :, x0:x0 + 64].astype(np.float32)
    mean, std = np.array([110.201, 100.64, 95.9966]), np.array([58.1489, 56.4701, 55.3324])
    x = ((clip - mean) / std).astype(np.float32).transpose(3, 0, 1, 2)[None]
    model = load_converted(ckpt).model
    with torch.no_grad():
        want = model.features(torch.from_numpy(x)).numpy()[0]
    assert np.abs(got - want).max() <= 1e-5


def test_predict_agrees_with_verify_and_names_its_classes(data, tmp_path, cli):
    d, ckpt, _ = data
    res = cli("predict", ckpt, d / "mid.mp4", "--json", "--short-side", "64", "--crop-size", "64", "--workers", "0")
    assert res.exit_code == 0, res.stderr
    top = json.loads(res.stdout)[0]["top"]
    assert len(top) == 5 and 0 <= top[0]["probability"] <= 1 and top[0]["probability"] >= top[1]["probability"]
    from vmzconv.predict import class_names

    names = class_names(400)
    assert all(t["name"] == names[t["index"]] for t in top) and names[0] == "abseiling" and len(names) == 400
    (tmp_path / "one.txt").write_text("mid.mp4 0\n")
    out = tmp_path / "v.json"
    res = cli("verify", ckpt, "--ann", tmp_path / "one.txt", "--data-root", d, "--out", out,
              "--short-side", "64", "--crop-size", "64", "--workers", "0")
    assert res.exit_code == 0, res.stderr
    assert int(np.argmax(json.loads(out.read_text())[0])) == top[0]["index"]
    assert len(class_names(487)) == 487 and class_names(359) is None


def test_predict_refuses_a_backbone(vmz_pickle, cli, tmp_path, data):
    d, _, _ = data
    bb = tmp_path / "bb.pth"
    assert cli("convert", vmz_pickle("ircsn", 50), bb, "--target", "mmaction2-backbone", "--no-parity").exit_code == 0
    assert_one_line_error(cli("predict", bb, d / "mid.mp4"), "no classifier to predict with")


def test_bad_video_is_one_line_unless_skip_bad(data, tmp_path):
    d, ckpt, _ = data
    bad = tmp_path / "broken.mp4"
    raw = (d / "mid.mp4").read_bytes()
    bad.write_bytes(raw[:100] + bytes(len(raw) - 100))
    proc = features(ckpt, tmp_path / "o", d / "short.mp4", bad)
    assert proc.returncode == 2 and "broken.mp4" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = features(ckpt, tmp_path / "o", d / "short.mp4", bad, "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert "broken.mp4" in (tmp_path / "o" / "skipped.txt").read_text()
    assert {r["video"] for r in index_rows(tmp_path / "o")} == {"short"}


def test_sigkill_then_rerun_redoes_only_the_unfinished_video(data, tmp_path):
    d, ckpt, _ = data
    src = tmp_path / "videos"
    src.mkdir()
    for name in ("long", "short"):
        (src / f"{name}.mp4").write_bytes((d / f"{name}.mp4").read_bytes())
    os.mkfifo(src / "zlast.mp4")                       # blocks the run until we kill it: always mid-way
    (src / "list.txt").write_text("long.mp4\nshort.mp4\nzlast.mp4\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "features", str(ckpt), "--ann", str(src / "list.txt"),
                             "--data-root", str(src), "--out-dir", str(out), *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "long.json").exists() and (out / "short.json").exists()):
            time.sleep(0.05)
        assert (out / "short.json").exists(), "the first videos never finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "index.csv").exists() and not list(out.glob(".vmzconv-tmp.*"))    # killed mid-run, nothing half-written
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert set(before) == {"long.npy", "short.npy"}
    os.unlink(src / "zlast.mp4")
    (src / "zlast.mp4").write_bytes((d / "mid.mp4").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "features", str(ckpt), "--ann", str(src / "list.txt"),
                           "--data-root", str(src), "--out-dir", str(out), *SMALL], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy") if p.name in before} == before
    assert {r["video"] for r in index_rows(out)} == {"long", "short", "zlast"}


def test_torchrun_two_ranks_equal_one_process_bit_for_bit(data, tmp_path):
    d, ckpt, lengths = data
    videos = [str(d / f"{n}.mp4") for n in lengths]
    assert features(ckpt, tmp_path / "one", *videos).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "vmzconv", "features", str(ckpt), *videos,
                           "--out-dir", str(tmp_path / "two"), *SMALL], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for n in lengths:
        assert (tmp_path / "one" / f"{n}.npy").read_bytes() == (tmp_path / "two" / f"{n}.npy").read_bytes()
    assert (tmp_path / "one" / "index.csv").read_text() == (tmp_path / "two" / "index.csv").read_text()
    assert f"videos   {len(lengths)} of {len(lengths)} with features" in proc.stdout     # every rank's, not rank 0's
