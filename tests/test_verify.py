"""`vmzconv verify`: MMAction2's test protocol by hand-computed cases, and end to end on PyAV videos."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from vmzconv import checkpoint
from vmzconv.arch import Arch
from vmzconv.errors import VmzconvError
from vmzconv.models import build_model
from vmzconv.verify import metrics
from vmzconv.video import protocol as P
from vmzconv.video.windows import clip_views
from .synthetic import frames, write_rawframes, write_video

from .conftest import assert_one_line_error, run_cli

# -- sampling ---------------------------------------------------------------------------------


def test_mmaction2_test_offsets_300_frames():
    # span (32-1)*2+1 = 63, max_offset 237, offsets round(k * 237 / 9)
    assert P.clip_offsets(300, P.Protocol()).tolist() == [0, 26, 53, 79, 105, 132, 158, 184, 211, 237]


def test_offsets_round_half_to_even_like_np_round():
    p = P.Protocol(num_clips=3)
    assert P.clip_offsets(66, p).tolist() == [0, 2, 3]      # max_offset 3: 1.5 -> 2
    assert P.clip_offsets(68, p).tolist() == [0, 2, 5]      # max_offset 5: 2.5 -> 2


def test_one_clip_takes_the_middle():
    assert P.clip_offsets(100, P.Protocol(num_clips=1)).tolist() == [18]   # (100 - 63) // 2


def test_short_video_wraps_mod_n():
    idx = P.frame_indices(40, P.Protocol())
    assert idx.shape == (10, 32) and (idx == idx[0]).all()                  # max_offset 0: all clips equal
    assert idx[0].tolist() == [(2 * i) % 40 for i in range(32)]


def test_vmz_protocol_floors():
    assert P.clip_offsets(300, P.Protocol("vmz")).tolist() == [0, 26, 52, 79, 105, 131, 158, 184, 210, 237]


# -- resize, crop, normalise -----------------------------------------------------------------------


def test_resize_size_rule():
    assert P.resized_size(340, 256, 256) == (340, 256)
    assert P.resized_size(320, 240, 256) == (341, 256)      # int(320 * 256/240 + 0.5)
    assert P.resized_size(240, 320, 256) == (256, 341)      # portrait


def test_resize_is_half_pixel_bilinear_without_antialias():
    img = np.zeros((1, 2, 3), np.uint8)
    img[0, 1] = 255
    out = P.resize(img, P.Protocol(num_clips=1, clip_len=1, short_side=2, crop_size=2))      # 2x1 -> 4x2
    assert out.shape == (2, 4, 3)
    assert out[0, :, 0].tolist() == [0, 64, 191, 255]       # src x = (dst + 0.5) / 2 - 0.5, clamped
    big = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
    small = P.resize(big, P.Protocol(short_side=24, crop_size=24))      # downscale: no antialiasing
    assert np.array_equal(small, cv2.resize(big, (32, 24), interpolation=cv2.INTER_LINEAR))


def test_three_crop_offsets_and_view_order():
    p = P.Protocol(num_clips=2, clip_len=1, short_side=256, crop_size=256)
    assert P.crop_boxes(341, 256, p) == [(0, 0), (84, 0), (42, 0)]      # left, right, middle
    assert P.crop_boxes(256, 341, p) == [(0, 0), (0, 84), (0, 42)]      # top, bottom, middle
    assert P.crop_boxes(341, 256, P.Protocol("vmz")) == [(0, 0), (42, 0), (84, 0)]
    fr = np.zeros((2, 4, 6, 3), np.uint8)
    fr[0], fr[1] = 10, 20                                                # clip 0, clip 1
    fr[:, :, 4:] += 1                                                    # right edge marked
    source = ((i, lambda f=f: f) for i, f in enumerate(fr))             # two frames, one per clip
    v = clip_views(source, 2, P.Protocol(num_clips=2, clip_len=1, short_side=4, crop_size=4), "x")
    assert v.shape == (6, 1, 4, 4, 3)
    assert [int(x[0, 0, 0, 0]) for x in v] == [10, 20, 10, 20, 10, 20]  # view = crop * clips + clip
    assert v[2, 0, 0, -1, 0] == 11 and v[0, 0, 0, -1, 0] == 10          # crop 1 is the right one


def test_crop_must_fit_the_short_side():
    with pytest.raises(VmzconvError, match="short side"):
        P.crop_boxes(100, 80, P.Protocol(short_side=64, crop_size=64))


def test_normalise():
    v = np.full((1, 1, 1, 1, 3), 110, np.uint8)
    x = P.normalise(v, [110.0, 100.0, 90.0], [10.0, 5.0, 2.0])
    assert x.shape == (1, 3, 1, 1, 1)
    assert x.flatten().tolist() == [0.0, 2.0, 10.0]


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_hand_computed():
    scores = np.array([[0.7, 0.2, 0.1],       # pred 0, gt 0  hit
                       [0.1, 0.3, 0.6],       # pred 2, gt 1  miss (2 never gt)
                       [0.2, 0.5, 0.3],       # pred 1, gt 1  hit
                       [0.5, 0.1, 0.4]])      # pred 0, gt 1  miss
    labels = np.array([0, 1, 1, 1])
    top1, top2 = metrics.top_k_accuracy(scores, labels, (1, 2))
    assert top1 == 0.5 and top2 == 0.75
    # classes {0,1,2}: recall 0 = 1/1, recall 1 = 1/3, class 2 predicted but never true = 0
    assert metrics.mean_class_accuracy(scores, labels) == pytest.approx((1 + 1 / 3 + 0) / 3)


# -- end to end ---------------------------------------------------------------------------------------

PROTO = dict(clip_len=8, frame_interval=2, num_clips=2, short_side=64, crop_size=64)
ARGS = ["--clip-len", "8", "--num-clips", "2", "--short-side", "64", "--crop-size", "64", "--threads", "1",
        "--workers", "1", "--warmup", "0", "-q"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    specs = [(0, 30, 80, 60), (1, 20, 80, 60), (2, 12, 48, 72), (3, 41, 96, 64), (2, 33, 64, 64)]
    lines = []
    for i, (label, n, w, h) in enumerate(specs):           # landscape, portrait, shorter than 8x2, square
        sub = root / f"class{label}"
        sub.mkdir(exist_ok=True)
        write_video(sub / f"v{i}.mp4", frames(label, n, w, h, seed=i))
        lines.append(f"class{label}/v{i}.mp4 {label}")
    (root / "videos.txt").write_text("\n".join(lines) + "\n")
    write_rawframes(root / "raw" / "r0", frames(1, 25, 80, 60, seed=7))
    (root / "raw.txt").write_text("raw/r0 25 1\n")
    return root


@pytest.fixture(scope="module")
def small_ckpt(vmz_pickle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "ir50.pth"
    from vmzconv.convert import convert

    convert(vmz_pickle("ircsn", 50), out, check_parity=False)
    return out


def independent_probs(ckpt, video_path=None, raw_dir=None, total=None):
    """The test's own pipeline: PyAV decode all frames, MMAction2's formulas, cv2 resize, crop,
    normalise, forward, softmax, mean. Shares no code with vmzconv.verify."""
    import av
    from PIL import Image

    if video_path is not None:
        with av.open(str(video_path)) as c:
            allf = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        n = len(allf)
        get = lambda i: allf[i]                                          # noqa: E731
    else:
        n = total
        get = lambda i: np.asarray(Image.open(raw_dir / f"img_{i + 1:05d}.jpg").convert("RGB"))  # noqa: E731
    span = (8 - 1) * 2 + 1
    max_off = max(n - span, 0)
    offsets = [int(np.round(k * max_off / 1.0)) for k in range(2)]
    views_by_crop = {}
    clips = []
    for off in offsets:
        clip = []
        for i in range(8):
            img = get((off + 2 * i) % n)
            h, w = img.shape[:2]
            s = 64 / min(h, w)
            nw, nh = int(w * s + 0.5), int(h * s + 0.5)
            clip.append(cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else img)
        clips.append(np.stack(clip))
    h, w = clips[0].shape[1:3]
    if h == 64:
        step = (w - 64) // 2
        boxes = [(x, 0) for x in (0, 2 * step, step)]
    else:
        step = (h - 64) // 2
        boxes = [(0, y) for y in (0, 2 * step, step)]
    views = [c[:, y:y + 64, x:x + 64] for (x, y) in boxes for c in clips]
    del views_by_crop
    x = torch.tensor(np.stack(views), dtype=torch.float32).permute(0, 4, 1, 2, 3)
    mean = torch.tensor([110.201, 100.64, 95.9966]).view(1, 3, 1, 1, 1)
    std = torch.tensor([58.1489, 56.4701, 55.3324]).view(1, 3, 1, 1, 1)
    state, _ = checkpoint.load(ckpt)
    model = build_model("mmaction2", Arch("ircsn", 50, 400))
    model.load_state_dict(state)
    torch.set_num_threads(1)
    with torch.no_grad():
        p = torch.softmax(model.eval()((x - mean) / std), dim=1).mean(0)
    return p.numpy()


def verify(*args):
    return run_cli("verify", *args)


def test_end_to_end_matches_an_independent_computation(dataset, small_ckpt, tmp_path):
    out, rep = tmp_path / "out.json", tmp_path / "report.json"
    proc = verify(small_ckpt, "--ann", dataset / "videos.txt", "--data-root", dataset, *ARGS, "--out", out,
                  "--report", rep)
    assert proc.returncode == 0, proc.stderr
    probs = json.loads(out.read_text())
    assert isinstance(probs, list) and len(probs) == 5 and all(len(p) == 400 for p in probs)
    lines = (dataset / "videos.txt").read_text().split()
    for i, p in enumerate(probs):
        want = independent_probs(small_ckpt, video_path=dataset / lines[2 * i])
        assert np.abs(np.array(p) - want).max() <= 1e-5, i
        assert abs(sum(p) - 1) < 1e-5
    report = json.loads(rep.read_text())
    labels = [int(x) for x in lines[1::2]]
    want = metrics.evaluate(np.array(probs), np.array(labels))
    assert report["metrics"] == pytest.approx(want)
    assert report["annotations"] == {"file": str(dataset / "videos.txt"), "videos": 5, "evaluated": 5, "skipped": 0,
                                     "from_cache": 0, "cache_entries_recomputed": 0}
    assert report["protocol"]["clip_len"] == 8 and report["protocol"]["mean"] == [110.201, 100.64, 95.9966]
    assert len(report["checkpoint"]["sha256"]) == 64 and report["timings"]["end_to_end_video_per_s"] > 0
    assert f"top1_acc     {want['top1']:.4f}" in proc.stdout


def test_rawframes_match_an_independent_computation(dataset, small_ckpt, tmp_path):
    out = tmp_path / "out.json"
    proc = verify(small_ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(out.read_text())[0])
    want = independent_probs(small_ckpt, raw_dir=dataset / "raw" / "r0", total=25)
    assert np.abs(got - want).max() <= 1e-5


def test_torchrun_two_ranks_equal_single_process(dataset, small_ckpt, tmp_path):
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    rep1, rep2 = tmp_path / "r1.json", tmp_path / "r2.json"
    proc = verify(small_ckpt, "--ann", dataset / "videos.txt", "--data-root", dataset, *ARGS, "--out", single,
                  "--report", rep1)
    assert proc.returncode == 0, proc.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "vmzconv", "verify",
                           str(small_ckpt), "--ann", str(dataset / "videos.txt"), "--data-root", str(dataset),
                           *ARGS, "--out", str(multi), "--report", str(rep2)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert multi.read_text() == single.read_text()
    r1, r2 = json.loads(rep1.read_text()), json.loads(rep2.read_text())
    assert r1["metrics"] == r2["metrics"] and r2["world_size"] == 2
    assert proc.stdout.count("top1_acc") == 1                  # only rank 0 reports


def test_corrupt_video_fails_with_its_name_unless_skip_bad(dataset, small_ckpt, tmp_path):
    bad_root = tmp_path / "data"
    bad_root.mkdir()
    (bad_root / "good.mp4").write_bytes((dataset / "class0" / "v0.mp4").read_bytes())
    data = (dataset / "class3" / "v3.mp4").read_bytes()
    (bad_root / "broken.mp4").write_bytes(data[:200] + bytes(len(data) - 200))
    ann = tmp_path / "list.txt"
    ann.write_text("good.mp4 0\nbroken.mp4 3\n")
    proc = verify(small_ckpt, "--ann", ann, "--data-root", bad_root, *ARGS)
    assert proc.returncode == 2
    assert_one_line_error(type("R", (), {"exit_code": proc.returncode, "stderr": proc.stderr, "stdout": ""})(),
                          "broken.mp4", "--skip-bad")
    rep, out = tmp_path / "rep.json", tmp_path / "out.json"
    proc = verify(small_ckpt, "--ann", ann, "--data-root", bad_root, *ARGS, "--skip-bad", "--report", rep, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 SKIPPED (unreadable): broken.mp4" in proc.stdout
    report = json.loads(rep.read_text())
    assert report["annotations"]["skipped"] == 1 and report["skipped"][0]["video"] == "broken.mp4"
    probs = json.loads(out.read_text())
    assert probs[1] is None and len(probs[0]) == 400


def test_kinetics_val_list_and_cache_resume(dataset, small_ckpt, tmp_path):
    ann = tmp_path / "kinetics_val_list.txt"
    ann.write_text("v0, 30, 0\nv1, 20, 1\nv3,41,3\n")            # ids, found under data-root by name
    cache = tmp_path / "cache"
    out1, out2, rep = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "rep.json"
    proc = verify(small_ckpt, "--ann", ann, "--data-root", dataset, *ARGS, "--cache", cache, "--out", out1)
    assert proc.returncode == 0, proc.stderr
    cached = sorted(cache.rglob("*.npy"))
    assert len(cached) == 3
    cached[1].unlink()                                           # as if interrupted before the second video
    proc = verify(small_ckpt, "--ann", ann, "--data-root", dataset, *ARGS, "--cache", cache, "--out", out2,
                  "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["annotations"]["from_cache"] == 2
    assert out1.read_text() == out2.read_text()


def test_expectations_turn_the_run_into_a_check(dataset, small_ckpt):
    proc = verify(small_ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--expect-top1", "90")
    assert proc.returncode == 1 and "accuracy check failed" in proc.stderr
    proc = verify(small_ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--expect-top1", "0")
    assert proc.returncode == 0 and "PASS" in proc.stdout


def test_plain_mmaction2_checkpoint_needs_arch(dataset, small_ckpt, tmp_path):
    obj = torch.load(small_ckpt, weights_only=True)
    plain = tmp_path / "mmaction2_style.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in obj["state_dict"].items()}}, plain)   # no meta
    proc = verify(plain, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS)
    assert proc.returncode == 2 and "--arch" in proc.stderr
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    assert verify(plain, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--arch", "ircsn_r50",
                  "--out", out_a).returncode == 0
    assert verify(small_ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--out", out_b).returncode == 0
    assert out_a.read_text() == out_b.read_text()


def test_expect_published_uses_the_zoo_numbers(vmz_pickle, dataset, tmp_path):
    from vmzconv.convert import convert

    src = vmz_pickle.custom("irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl", vmz_pickle.arrays("ircsn", 50))
    ckpt = tmp_path / "zoo.pth"
    convert(src, ckpt, check_parity=False)
    proc = verify(ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--expect-published",
                  "--norm", "imagenet")
    assert proc.returncode == 1, proc.stderr
    assert "top1 79.00% +- 0.5" in proc.stdout and "top5 94.20%" in proc.stdout and "accuracy check failed" in proc.stderr
    # the published numbers were measured under MMAction2's protocol: the run's small clips are named, the
    # normalisation (MMAction2's config's, as given) is not
    warning = next(ln for ln in proc.stderr.splitlines() if ln.startswith("vmzconv: warning: --expect-published"))
    for diff in ("clip_len 32 (this run: 8)", "num_clips 10 (this run: 2)", "short_side 256 (this run: 64)",
                 "crop_size 256 (this run: 64)"):
        assert diff in warning, warning
    assert "mean" not in warning and "MMAction2's re-measurement" in warning
    report = tmp_path / "r.json"
    proc = verify(ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--expect-published",
                  "--report", report)                         # the card's VMZ normalisation: named too
    warning = next(ln for ln in proc.stderr.splitlines() if ln.startswith("vmzconv: warning: --expect-published"))
    assert "mean [123.675, 116.28, 103.53] (this run: [110.201, 100.64, 95.9966])" in warning
    assert json.loads(report.read_text())["published_basis"]["measured_by"] == "mmaction2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_asking_for_cuda_without_one_is_a_clear_error(dataset, small_ckpt):
    proc = verify(small_ckpt, "--ann", dataset / "raw.txt", "--data-root", dataset, *ARGS, "--device", "cuda")
    assert proc.returncode == 2 and "no usable CUDA device" in proc.stderr and "Traceback" not in proc.stderr
