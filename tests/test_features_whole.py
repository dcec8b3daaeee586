"""`features` covers whole videos: the tail policy, --num-snippets, folders of videos (--recursive), h5 mode
without hidden copies, and probabilities averaged per view under --crop three."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vmzconv.video import protocol as P
from vmzconv.video.windows import SlidingPlan, Windows, cut, snippet_plan

from .conftest import assert_one_line_error, run_cli
from .synthetic import frames, write_video

SMALL = ("--short-side", "64", "--crop-size", "64", "--workers", "0", "--threads", "1")


def _windows(clip_len, interval, stride, tail="pad", snippets=None):
    p = P.Protocol(clip_len=clip_len, frame_interval=interval, num_clips=1, num_crops=1, short_side=8, crop_size=8)
    return Windows(clip_len, interval, stride, "center", None, p, tail, snippets)


def _stream(n):
    """A stand-in for decoded frames: frame i is a 1x1 image holding i (so a window shows its indices)."""
    return ((i, (lambda i=i: np.full((1, 1, 1), i, np.int32))) for i in range(n))


def _cut(w, plan, n):
    return [(win, views[0, :, 0, 0, 0].tolist()) for win, views in cut(_stream(n), plan, lambda a: a[None])]


@pytest.mark.parametrize("clip_len,interval", [(8, 1), (4, 2), (16, 1)])
def test_every_frame_is_in_a_window_for_lengths_1_to_300(clip_len, interval):
    """The default tail: for every length 1..300 and strides up to the span, every frame lies inside a
    window, each window samples the frames it says (streamed = the rule), and no index passes the end."""
    span = (clip_len - 1) * interval + 1
    for stride in sorted({1, 3, clip_len, span}):
        w = _windows(clip_len, interval, stride)
        for n in range(1, 301):
            got = _cut(w, SlidingPlan(w), n)
            assert [win for win, _ in got] == w.layout(n), (stride, n)
            covered = np.zeros(n, bool)
            for (start, end, idx), seen in got:
                assert seen == idx and max(idx) <= n - 1 and end <= n - 1
                assert idx == [min(start + k * interval, n - 1) for k in range(clip_len)]
                covered[start:end + 1] = True
            assert covered.all(), (stride, n, np.flatnonzero(~covered)[:5])


def test_tail_policies_differ_only_in_the_last_window():
    w = {t: _windows(8, 1, 8, t) for t in ("pad", "shift", "drop")}
    n = 21                                                   # windows 0-7, 8-15; frames 16-20 left
    assert [x[:2] for x in w["drop"].layout(n)] == [(0, 7), (8, 15)]
    assert w["pad"].layout(n)[-1] == (16, 20, [16, 17, 18, 19, 20, 20, 20, 20])
    assert w["shift"].layout(n)[-1] == (13, 20, list(range(13, 21)))
    for t in w:                                              # what streams is the rule, for every length
        for n in range(1, 60):
            assert [win for win, _ in _cut(w[t], SlidingPlan(w[t]), n)] == w[t].layout(n)


@pytest.mark.parametrize("n,count", [(300, 7), (50, 1), (5, 3), (8, 8)])
def test_snippets_are_exactly_n_and_spread_over_the_video(n, count):
    w = _windows(8, 1, 8, snippets=count)
    layout = w.layout(n)
    got = _cut(w, snippet_plan(layout, w.clip_len), n)
    assert len(got) == count
    assert [seen for _, seen in got] == [idx for _, _, idx in layout]
    starts = [s for s, _, _ in layout]
    if n >= 8 and count > 1:
        assert starts[0] == 0 and layout[-1][1] == n - 1 and starts == sorted(starts)
        assert max(np.diff(starts)) - min(np.diff(starts)) <= 1            # evenly spread
    elif n >= 8:
        assert starts == [(n - 8) // 2]


@pytest.fixture(scope="module")
def data(module_dir, vmz_pickle):
    from vmzconv.convert import convert

    ckpt = module_dir / "r3d18.pth"
    convert(vmz_pickle("r3d", 18, keep=True), ckpt, check_parity=False, card=False)
    tree = module_dir / "videos"
    for k, rel in enumerate(["a/x.mp4", "b/x.mp4", "b/deeper/y.mkv"]):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(tree / rel, frames(k + 1, 21 + 6 * k, 96, 72, seed=k))
    (tree / "notes.txt").write_text("not a video")
    return ckpt, tree


def _index(out):
    with open(out / "index.csv") as f:
        return list(csv.DictReader(f))


def test_a_folder_of_same_named_videos_all_come_out(data, tmp_path):
    ckpt, tree = data
    res = run_cli("features", ckpt, tree, "--out-dir", tmp_path / "o", *SMALL)
    assert_one_line_error(res, "a folder", "--recursive")
    assert not (tmp_path / "o").exists()
    res = run_cli("features", ckpt, tree, "--recursive", "--out-dir", tmp_path / "o", *SMALL)
    assert res.returncode == 0, res.stderr
    assert "videos   3 of 3" in res.stdout
    for name, n in [("a/x", 21), ("b/x", 27), ("b/deeper/y", 33)]:
        rows = np.load(tmp_path / "o" / f"{name}.npy")
        assert rows.shape == (len(_windows(8, 1, 8).layout(n)), 512)
        assert json.loads((tmp_path / "o" / f"{name}.json").read_text())["record"]["windows"]["tail"] == "pad"
    assert not np.array_equal(np.load(tmp_path / "o" / "a/x.npy")[0], np.load(tmp_path / "o" / "b/x.npy")[0])
    assert sorted({r["video"] for r in _index(tmp_path / "o")}) == ["a/x", "b/deeper/y", "b/x"]


def test_num_snippets_gives_exactly_n_rows(data, tmp_path):
    ckpt, tree = data
    res = run_cli("features", ckpt, tree / "a" / "x.mp4", tree / "b" / "deeper" / "y.mkv", "--num-snippets", 5,
                  "--out-dir", tmp_path / "o", *SMALL)
    assert res.returncode == 0, res.stderr
    rows = _index(tmp_path / "o")
    for name, n in [("x", 21), ("y", 33)]:
        mine = [r for r in rows if r["video"] == name]
        assert len(mine) == 5 and np.load(tmp_path / "o" / f"{name}.npy").shape == (5, 512)
        assert int(mine[0]["start_frame"]) == 0 and int(mine[-1]["end_frame"]) == n - 1
        assert {r["windows"] for r in mine} == {"snippets"}
    res = run_cli("features", ckpt, tree / "a" / "x.mp4", "--num-snippets", 5, "--stride", 4,
                  "--out-dir", tmp_path / "p", *SMALL)
    assert_one_line_error(res, "--num-snippets")


def test_h5_keeps_no_hidden_copies_and_resumes_from_the_file(data, tmp_path, monkeypatch):
    import h5py

    import vmzconv.features as features_mod

    ckpt, tree = data
    out = tmp_path / "o"
    res = run_cli("features", ckpt, tree / "a", "--recursive", "--format", "h5", "--out-dir", out, *SMALL)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".vmzconv-outputs", "features.h5", "index.csv"]
    with h5py.File(out / "features.h5") as h5:
        first = h5["x"][()]

    def no_decoding(*a, **k):
        raise AssertionError("a video already in features.h5 was decoded again")

    monkeypatch.setattr(features_mod, "window_chunks", no_decoding)
    res = run_cli("features", ckpt, tree / "a", "--recursive", "--format", "h5", "--out-dir", out, *SMALL)
    assert res.returncode == 0, res.stderr
    monkeypatch.undo()
    res = run_cli("features", ckpt, tree / "a", tree / "b" / "x.mp4", "--recursive", "--format", "h5",
                  "--out-dir", out, *SMALL)
    assert_one_line_error(res, "would both be written as x.npy")    # a/x (as x) and b/x.mp4 (as x) collide
    res = run_cli("features", ckpt, tree / "a", tree / "b" / "deeper" / "y.mkv", "--recursive", "--format", "h5",
                  "--out-dir", out, *SMALL)
    assert res.returncode == 0, res.stderr
    with h5py.File(out / "features.h5") as h5:
        assert sorted(h5) == ["x", "y"] and np.array_equal(h5["x"][()], first)
    assert not (out / ".vmzconv-parts").exists()


def test_probs_with_three_crops_average_softmax_per_view(data, tmp_path):
    """As verify: softmax of each crop's logits, then the mean; not the softmax of the mean logits."""
    from vmzconv.features import window_chunks
    from vmzconv.load import load_converted

    ckpt, tree = data
    video = tree / "a" / "x.mp4"
    res = run_cli("features", ckpt, video, "--layer", "probs", "--crop", "three", "--out-dir", tmp_path / "o",
                  *SMALL)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "o" / "x.npy")
    model = load_converted(ckpt).model.eval()
    p = P.Protocol(clip_len=8, frame_interval=1, num_clips=1, num_crops=3, short_side=64, crop_size=64)
    views = np.concatenate([v for v, _ in window_chunks(str(video), Windows(8, 1, 8, "three", None, p), 8)])
    mean = np.array([110.201, 100.64, 95.9966], np.float32)
    std = np.array([58.1489, 56.4701, 55.3324], np.float32)
    x = torch.from_numpy(((views.astype(np.float32) - mean) / std).transpose(0, 4, 1, 2, 3).copy())
    with torch.no_grad():
        logits = model(x).reshape(-1, 3, 400)
    want = logits.softmax(-1).mean(1).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-7
    wrong = logits.mean(1).softmax(-1).numpy()
    assert np.abs(got - wrong).max() > 5e-6                      # the two rules differ on these views
