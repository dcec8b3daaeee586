"""Hardening, round three: the run-time half against hostile videos, lists, caches, checkpoints and output
folders. Every input is made here; every answer is one line (exit 2), no traceback, no hang, bounded memory,
nothing half-written, nothing of the user's touched. The budget test runs every case in one child under a
3 GB address-space limit and reads its peak RSS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import run_cli
from .synthetic import frames, write_rawframes, write_video

SMALL = ["--clip-len", "8", "--num-clips", "2", "--short-side", "64", "--crop-size", "64", "--threads", "1",
         "--workers", "0"]


def ffv1_video(path, images, pts=None, rate=25) -> Path:
    """Lossless MKV (FFV1): any frame size, and timestamps of our choosing."""
    import av

    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=rate)
        s.width, s.height, s.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        s.time_base = Fraction(1, rate)
        for i, img in enumerate(images):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = (pts[i] if pts else i), Fraction(1, rate)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def with_meta(src: Path, dst: Path, change=None, tensors=None, small: bool = False) -> Path:
    """A copy of converted checkpoint ``src`` with ``change(meta)`` applied and/or ``tensors(state)``;
    ``small``: only its classifier's tensors (the card and the tensors are checked before the layout is)."""
    obj = torch.load(src, weights_only=True)
    if small:
        obj["state_dict"] = {k: v for k, v in obj["state_dict"].items() if k.startswith("fc.")}
    if change:
        change(obj["meta"])
    if tensors:
        tensors(obj["state_dict"])
    torch.save(obj, dst)
    return dst


@pytest.fixture(scope="module")
def world(module_dir, vmz_pickle):
    """A converted R3D-18, a few good videos, and the hostile inputs."""
    from vmzconv.convert import convert

    d = module_dir
    ckpt = d / "r3d18.pth"
    convert(vmz_pickle("r3d", 18, keep=True), ckpt, check_parity=False, card=False)
    for i in range(2):
        write_video(d / f"good{i}.mp4", frames(i, 20, 80, 60, seed=i))
    (d / "list.txt").write_text("good0.mp4 0\ngood1.mp4 1\n")
    return d, ckpt


def one_line(proc, *fragments, code=2):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("vmzconv: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# -- 1. memory follows the views, not the video ---------------------------------------------------------

LIMITED = r"""
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from click.testing import CliRunner
from vmzconv.cli import main
cases = json.load(open(sys.argv[1]))
out = []
for args in cases:
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
    out.append({"args": args, "code": res.exit_code, "stderr": res.stderr, "crashed": repr(res.exception) if crashed else None,
                "seconds": round(time.perf_counter() - t0, 2)})
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) // 1024
print(json.dumps({"cases": out, "peak_rss_mib": hwm}))
"""


def run_limited(tmp_path, cases: list[list[str]], timeout=600) -> dict:
    """``cases`` (CLI argument lists) one after another in one child under RLIMIT_AS = 3 GB."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[str(a) for a in c] for c in cases]))
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(spec)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, VMZCONV_RUNTIME="torch"))
    assert proc.returncode == 0, proc.stderr[-3000:]              # never killed by a signal, never out of memory
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hwm_of_predict(ckpt, video, tmp_path) -> int:
    res = run_limited(tmp_path, [["predict", ckpt, video, *SMALL]])
    assert res["cases"][0]["code"] == 0, res["cases"][0]["stderr"]
    return res["peak_rss_mib"]


def test_peak_memory_does_not_follow_the_videos_length(world, tmp_path):
    """A container without a frame count (MKV) used to keep every decoded frame up to the last sampled one."""
    d, ckpt = world
    short = ffv1_video(tmp_path / "short.mkv", list(frames(1, 40, 640, 480)))
    long = ffv1_video(tmp_path / "long.mkv", list(frames(1, 40, 640, 480)) * 10)          # 400 frames, 1.2 MB each
    a, b = _hwm_of_predict(ckpt, short, tmp_path), _hwm_of_predict(ckpt, long, tmp_path)
    assert b - a < 80, (a, b)


# -- the budget: every hostile case in one limited child -------------------------------------------------


@pytest.fixture(scope="module")
def hostile(world):
    """(cli args, exit code, fragments of the one-line answer) for each hostile input."""
    d, ckpt = world
    h = d / "cases"
    h.mkdir()
    cases = []

    def case(args, *fragments, code=2):
        cases.append(([str(a) for a in args], code, fragments))

    big = np.zeros((6000, 6000, 3), np.uint8)
    case(["predict", ckpt, ffv1_video(h / "huge_frame.mkv", [big]), *SMALL], "frame", "6000x6000")
    del big
    case(["predict", ckpt, ffv1_video(h / "aspect.mkv", [np.zeros((2, 16384, 3), np.uint8)] * 3), *SMALL],
         "16384x2", "resized")
    from PIL import Image

    (h / "raw" / "a").mkdir(parents=True)
    Image.new("1", (20000, 10000)).save(h / "raw" / "a" / "img_00001.png")
    (h / "raw.txt").write_text("a 1 0\n")
    case(["verify", ckpt, "--ann", h / "raw.txt", "--data-root", h / "raw", "--filename-tmpl", "img_{:05d}.png",
          *SMALL, "-q"], "img_00001.png", "20000x10000")
    write_rawframes(h / "raw" / "b", frames(0, 3, 80, 60))
    Image.fromarray(frames(0, 1, 60, 80)[0]).save(h / "raw" / "b" / "img_00002.jpg")       # portrait, midway
    (h / "sizes.txt").write_text("b 3 0\n")
    case(["verify", ckpt, "--ann", h / "sizes.txt", "--data-root", h / "raw", "--clip-len", "3", "--num-clips", "1",
          "--short-side", "64", "--crop-size", "64", "--workers", "0", "-q"], "change size")
    for name, change, fragments in [
        ("clips", lambda m: m["input"].update(num_clips=10 ** 9), ("num_clips",)),
        ("short", lambda m: m["input"].update(short_side=60000), ("short_side",)),
        ("classes", lambda m: m.update(num_classes=float("inf")), ("num_classes",)),
        ("target", lambda m: m.update(target=["mmaction2"]), ("target",)),
        ("input", lambda m: m.update(input=[1, 2]), ("input",)),
        ("mean", lambda m: m["input"].update(mean=[1.0, 2.0]), ("mean",)),
        ("cliplen", lambda m: m["input"].update(clip_len="8"), ("clip_len",)),
        ("zoo", lambda m: m.update(zoo="x"), ("zoo",)),
        ("std", lambda m: m["input"].update(std=[0.0, 1.0, 1.0]), ("std",)),
    ]:
        bad = with_meta(ckpt, h / f"meta_{name}.pth", change, small=True)
        case(["predict", bad, d / "good0.mp4", "--workers", "0"], str(bad), *fragments)
        if name in ("classes", "std"):
            case(["export", bad, h / f"{name}.onnx"], str(bad), *fragments)
    case(["predict", with_meta(ckpt, h / "nan.pth", tensors=lambda s: s["fc.weight"].fill_(float("nan")), small=True),
          d / "good0.mp4", *SMALL], "fc.weight", "NaN")
    case(["predict", with_meta(ckpt, h / "meta_dev.pth", tensors=lambda s: s.update(
        {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in s.items()}), small=True), d / "good0.mp4",
        *SMALL],
         "meta")
    bomb = h / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(1536):
                f.write(block)
    case(["predict", bomb, d / "good0.mp4", *SMALL], "bomb.pth", "uncompressed")
    return cases


def test_every_hostile_input_is_one_line_within_budget(hostile, tmp_path):
    res = run_limited(tmp_path, [c[0] for c in hostile])
    for (args, code, fragments), got in zip(hostile, res["cases"]):
        assert got["crashed"] is None, (args, got["crashed"], got["stderr"][-1500:])
        lines = [ln for ln in got["stderr"].splitlines() if ln.strip()]
        assert got["code"] == code, (args, got)
        assert len(lines) == 1 and lines[0].startswith("vmzconv: error: "), (args, got["stderr"][-1500:])
        for f in fragments:
            assert f in lines[0], (args, f, lines[0])
        assert got["seconds"] < 60, (args, got["seconds"])
    assert res["peak_rss_mib"] < 1536, res["peak_rss_mib"]


def test_float64_weights_are_cast_with_a_note(world, tmp_path):
    d, ckpt = world
    f64 = with_meta(ckpt, tmp_path / "f64.pth", tensors=lambda s: s.update(
        {k: v.double() if v.is_floating_point() else v for k, v in s.items()}))
    a = run_cli("predict", ckpt, d / "good0.mp4", *SMALL, "--json")
    b = run_cli("predict", f64, d / "good0.mp4", *SMALL, "--json")
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert "float64" in b.stderr and "float32" in b.stderr
    assert json.loads(a.stdout)[0]["top"][0]["index"] == json.loads(b.stdout)[0]["top"][0]["index"]


def test_weights_only_refusal_names_the_global(world, tmp_path):
    d, ckpt = world
    bad = tmp_path / "code.pth"
    torch.save({"state_dict": {}, "meta": {"x": Fraction(1, 3)}}, bad)
    proc = run_cli("predict", bad, d / "good0.mp4", *SMALL)
    line = one_line(proc, "fractions.Fraction")
    assert "weights_only=False" not in line


# -- 4. names are files, never URLs -------------------------------------------------------------------


def test_a_file_named_like_a_url_is_read_as_a_local_file(world, tmp_path, monkeypatch):
    d, ckpt = world
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setblocking(False)
        port = srv.getsockname()[1]
        monkeypatch.chdir(tmp_path)
        name = f"tcp:127.0.0.1:{port}"
        Path(name).write_bytes((d / "good0.mp4").read_bytes())
        proc = run_cli("predict", ckpt, name, *SMALL)
        assert proc.returncode == 0, proc.stderr                 # decoded from the local file
        with pytest.raises(BlockingIOError):
            srv.accept()                                         # and nothing connected
    (tmp_path / "concat.txt").write_text("concat:good0.mp4|good1.mp4 0\n")
    (tmp_path / "good0.mp4").write_bytes((d / "good0.mp4").read_bytes())
    one_line(run_cli("verify", ckpt, "--ann", tmp_path / "concat.txt", "--data-root", ".", *SMALL, "-q"),
             "concat:good0.mp4|good1.mp4", "no such video file")


def test_a_fifo_in_the_list_is_refused_not_waited_on(world, tmp_path):
    d, ckpt = world
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "list.txt").write_text("pipe.mp4 0\n")
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "verify", str(ckpt), "--ann", str(tmp_path / "list.txt"),
                           "--data-root", str(tmp_path), *SMALL, "-q"], capture_output=True, text=True, timeout=120)
    one_line(proc, "pipe.mp4", "not a regular file")


# -- 5. nothing of the user's is replaced ------------------------------------------------------------------


def test_features_never_replaces_files_it_did_not_write(world, tmp_path):
    d, ckpt = world
    out = tmp_path / "out"
    out.mkdir()
    for name in ("good0.npy", "good0.json", "index.csv"):
        (out / name).write_text(f"the user's {name}")
    args = ["features", ckpt, d / "good0.mp4", "--out-dir", out, "--short-side", "64", "--crop-size", "64",
            "--workers", "0", "--threads", "1", "-q"]
    one_line(run_cli(*args), "not written by vmzconv", "and 2 more", "--force")
    assert (out / "good0.npy").read_text() == "the user's good0.npy"
    assert run_cli(*args, "--force").returncode == 0
    assert np.load(out / "good0.npy").shape[1] == 512
    assert run_cli(*args).returncode == 0                       # its own outputs it may redo without --force
    h5 = tmp_path / "h5"
    h5.mkdir()
    (h5 / "features.h5").write_text("the user's h5")
    one_line(run_cli(*args[:3], "--out-dir", h5, *args[5:], "--format", "h5"), "features.h5", "--force")
    assert (h5 / "features.h5").read_text() == "the user's h5"


def test_verify_refuses_an_output_that_is_one_of_its_inputs(world, tmp_path):
    d, ckpt = world
    for flag, target in (("--out", d / "list.txt"), ("--report", ckpt)):
        before = target.read_bytes()
        one_line(run_cli("verify", ckpt, "--ann", d / "list.txt", "--data-root", d, *SMALL, "-q", flag, target),
                 str(target), "input")
        assert target.read_bytes() == before


def test_export_with_a_folder_as_card_leaves_nothing(world, tmp_path):
    d, ckpt = world
    (tmp_path / "m.onnx.json").mkdir()
    one_line(run_cli("export", ckpt, tmp_path / "m.onnx", "--force"), "m.onnx.json", "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.json"]


# -- 6. caches and resumed runs -------------------------------------------------------------------------


def test_verify_cache_follows_the_lists_content_and_checks_entries(world, tmp_path):
    d, ckpt = world
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"v{i}.mp4").write_bytes((d / f"good{i}.mp4").read_bytes())
    ann, cache, out = tmp_path / "list.txt", tmp_path / "cache", tmp_path / "out.json"
    ann.write_text("v0.mp4 0\nv1.mp4 1\n")
    run = lambda: run_cli("verify", ckpt, "--ann", ann, "--data-root", data, *SMALL, "-q", "--cache", cache,  # noqa: E731
                          "--out", out, "--report", tmp_path / "r.json")
    assert run().returncode == 0
    first = json.loads(out.read_text())
    ann.write_text("v1.mp4 0\nv0.mp4 1\n")                    # the list edited in place: its lines swapped
    assert run().returncode == 0
    assert json.loads(out.read_text()) == [first[1], first[0]]
    (data / "v0.mp4").write_bytes((d / "good1.mp4").read_bytes())     # a video replaced under the same name
    assert run().returncode == 0
    assert json.loads(out.read_text())[1] == first[1]
    for f in cache.rglob("*.npy"):                             # wrong length, wrong dtype
        np.save(f, np.ones(7))
    proc = run()
    assert proc.returncode == 0 and "recomputed" in proc.stdout
    assert json.loads(out.read_text()) == [first[1], first[1]]


def test_features_resume_checks_what_it_reuses(world, tmp_path):
    d, ckpt = world
    out = tmp_path / "out"
    args = ["features", ckpt, d / "good0.mp4", d / "good1.mp4", "--out-dir", out, "--short-side", "64",
            "--crop-size", "64", "--workers", "0", "--threads", "1", "-q"]
    assert run_cli(*args).returncode == 0
    want = np.load(out / "good0.npy")
    data = (out / "good0.npy").read_bytes()
    (out / "good0.npy").write_bytes(data[: len(data) // 2])                     # truncated
    side = json.loads((out / "good1.json").read_text())
    side["fps"] = 0
    (out / "good1.json").write_text(json.dumps(side))
    assert run_cli(*args).returncode == 0
    assert np.array_equal(np.load(out / "good0.npy"), want)
    assert json.loads((out / "good1.json").read_text())["fps"] == 25
    np.save(out / "good0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)      # an object array
    assert run_cli(*args).returncode == 0
    assert np.array_equal(np.load(out / "good0.npy"), want)
    h5 = tmp_path / "h5"
    h5.mkdir()
    (h5 / ".vmzconv-parts").write_text("a user's file")
    one_line(run_cli(*args[:4], "--out-dir", h5, *args[6:], "--format", "h5"), ".vmzconv-parts")


# -- 7. hangs -------------------------------------------------------------------------------------------


def test_fps_resampling_is_bounded(world, tmp_path):
    d, ckpt = world
    video = ffv1_video(tmp_path / "jump.mkv", list(frames(0, 3, 64, 48)), pts=[0, 1, 25_000_000])
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "features", str(ckpt), str(video), "--out-dir",
                           str(tmp_path / "out"), "--fps", "25", "--short-side", "64", "--crop-size", "64",
                           "--workers", "0", "--threads", "1", "-q"], capture_output=True, text=True, timeout=120)
    one_line(proc, "jump.mkv", "timestamps")


@pytest.mark.parametrize("env,fragment", [({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5"),
                                          ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                          ({"WORLD_SIZE": "2"}, "RANK is not set")])
def test_torchrun_variables_are_checked_before_any_rendezvous(world, env, fragment):
    d, ckpt = world
    clean = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "predict", str(ckpt), str(d / "good0.mp4"), *SMALL],
                          capture_output=True, text=True, timeout=120, env=clean | env)
    one_line(proc, fragment)


# -- 8. tracebacks and output hygiene -------------------------------------------------------------------


def test_list_lines_that_used_to_crash(world, tmp_path):
    d, ckpt = world
    ann = tmp_path / "l.txt"
    ann.write_text("good\x000.mp4 0\n")
    one_line(run_cli("verify", ckpt, "--ann", ann, "--data-root", d, *SMALL, "-q"), "NUL")
    ann.write_text("frames " + "9" * 30 + " 0\n")
    (d / "frames").mkdir(exist_ok=True)
    one_line(run_cli("verify", ckpt, "--ann", ann, "--data-root", d, *SMALL, "-q"), "total_frames")
    ann.write_text("x" * 20_000_000 + " 0 1 2\n")
    line = one_line(run_cli("verify", ckpt, "--ann", ann, "--data-root", d, *SMALL, "-q"), "cannot parse")
    assert len(line) < 400


def test_odd_video_names_in_index_and_h5(world, tmp_path):
    d, ckpt = world
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src) + b"/v\xff.mp4"
    with open(raw, "wb") as f:
        f.write((d / "good0.mp4").read_bytes())
    (src / "..mp4").write_bytes((d / "good1.mp4").read_bytes())
    out = tmp_path / "out"
    proc = run_cli("features", ckpt, os.fsdecode(raw), src / "..mp4", "--out-dir", out, "--format", "h5",
                   "--short-side", "64", "--crop-size", "64", "--workers", "0", "--threads", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    import h5py

    with h5py.File(out / "features.h5") as f:
        assert len(f.keys()) == 2
    rows = (out / "index.csv").read_bytes().splitlines()
    assert len(rows) > 2 and any(b"\\xff" in r or b"\xff" in r for r in rows[1:])


def test_printed_names_are_escaped_by_the_printer(world, tmp_path):
    d, ckpt = world
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class\x1b[31m{i}\x07\n" for i in range(400)))
    proc = run_cli("predict", ckpt, d / "good0.mp4", *SMALL, "--labels", labels)
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b[31m" in proc.stdout
    from vmzconv.text import render_table

    assert "\x1b" not in render_table([["a\x1b[2Jb", "c\nd"]]) and "\n" not in render_table([["c\nd"]])


def test_demo_names_and_skipped_list_are_escaped(world, tmp_path):
    d, ckpt = world
    proc = run_cli("demo", "--arch", "r3d_r18", "--out-dir", tmp_path / "demo\x1b[2Jx")
    assert proc.returncode == 0 and "\x1b" not in proc.stdout
    bad = tmp_path / "bad\nvmzconv: all good.mp4"
    bad.write_bytes(b"not a video")
    out = tmp_path / "out"
    proc = run_cli("features", ckpt, bad, d / "good0.mp4", "--out-dir", out, "--short-side", "64", "--crop-size", "64",
                   "--workers", "0", "--threads", "1", "-q", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert len((out / "skipped.txt").read_text().splitlines()) == 1
