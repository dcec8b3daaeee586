"""Wrong downloads get a specific message; concurrent and interrupted runs leave nothing broken."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vmzconv import checkpoint, synth

from .conftest import assert_one_line_error


def wrong(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_html_page(cli, tmp_path):
    p = wrong(tmp_path, "irCSN_152.pkl", b"\n  <!DOCTYPE html>\n<html><head><title>Dropbox</title></head></html>")
    assert_one_line_error(cli("inspect", p), "this looks like an HTML page, not a pickle — was the download a web page?")


def test_empty_file(cli, tmp_path):
    assert_one_line_error(cli("inspect", wrong(tmp_path, "e.pkl", b"")), "the file is empty")


def test_zip_torch_save_renamed_pkl(cli, tmp_path):
    p = tmp_path / "model.pkl"
    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.zeros(2)}, "meta": {}}, p)
    assert_one_line_error(cli("inspect", p), "this is a PyTorch checkpoint (torch.save zip), not a Caffe2 pickle")


def test_our_own_pth_output_as_input(vmz_pickle, cli, tmp_path):
    out = tmp_path / "converted.pth"
    assert cli("convert", vmz_pickle("ircsn", 50), out, "--no-parity").exit_code == 0
    assert_one_line_error(cli("convert", out, tmp_path / "again.pth"), "PyTorch checkpoint")


def test_legacy_torch_save(cli, tmp_path):
    p = tmp_path / "legacy.pkl"
    torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
    assert_one_line_error(cli("inspect", p), "legacy PyTorch checkpoint")


def test_plain_pickle_of_torch_tensors(cli, tmp_path):
    p = wrong(tmp_path, "t.pkl", pickle.dumps({"conv1_w": torch.zeros(2)}, protocol=2))
    assert_one_line_error(cli("inspect", p), "this is a PyTorch checkpoint (pickled torch objects")


def test_mmaction2_state_dict_as_plain_pickle(cli, tmp_path):
    p = wrong(tmp_path, "sd.pkl", synth.dumps_py2({"state_dict": {"backbone.x": np.zeros(2, np.float32)},
                                                   "meta": {"a": np.zeros(1, np.float32)}}))
    assert_one_line_error(cli("inspect", p), "PyTorch/MMAction2 state dict")


def test_feature_extraction_output(cli, tmp_path):
    feats = {"final_avg": np.zeros((4, 2048), np.float32), "softmax": np.zeros((4, 400), np.float32),
             "label": np.zeros(4, np.int64), "video_id": np.arange(4, dtype=np.int64)}
    p = wrong(tmp_path, "features.pkl", synth.dumps_py2(feats))
    assert_one_line_error(cli("inspect", p), "VMZ feature-extraction output", "final_avg")


def test_audio_visual_model(cli, tmp_path):
    blobs = {("v_" + k if not k.startswith("last_out") else "v_" + k): v
             for k, v in synth.seeded_blobs("ipcsn", 50).items() if k.startswith(("conv1", "comp_0_", "last_out"))}
    blobs["a_conv1_w"] = np.zeros((64, 1, 3, 3), np.float32)
    p = wrong(tmp_path, "g_b_ip_csn_152_kinetics.pkl", synth.dumps_py2({"blobs": blobs}))
    res = cli("convert", p, tmp_path / "o.pth")
    assert_one_line_error(res, "audio-visual VMZ model", "not supported")


def test_max_bytes_limit(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("ircsn", 50)
    res = cli("inspect", src, "--max-bytes", str(src.stat().st_size // 2))
    assert_one_line_error(res, "--max-bytes")
    assert cli("inspect", src).exit_code == 0


# -- concurrency and interruption --------------------------------------------------------------


def _pickles(folder, n, depth=50):
    folder.mkdir()
    for i in range(n):
        synth.write_vmz_pickle(folder / f"m{i}.pkl", synth.seeded_blobs("ircsn", depth, 400, i))
    return folder


def test_two_concurrent_bulk_runs_on_one_folder(tmp_path):
    src = _pickles(tmp_path / "src", 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "1"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (ao, ae), (bo, be) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, ae + be
    assert "waiting for another bulk run" in ae + be
    summaries = [o.strip().splitlines()[-1] for o in (ao, bo)]
    assert sorted(s.split(",")[0] for s in summaries) == ["3 converted", "nothing to do: all 3 outputs are up to date (--force reconverts)"]
    for i in range(3):
        state, meta = checkpoint.load(out / f"m{i}.pth")
        assert len(state) == 320 and meta["parity"]["passed"]
        assert json.loads((out / f"m{i}.pth.json").read_text())["source"]["file"] == f"m{i}.pkl"
    assert not list(out.glob(".*.tmp"))


def _wait_for(pred, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigint_during_bulk_exits_cleanly(tmp_path):
    src = _pickles(tmp_path / "src", 4)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert _wait_for(lambda: list(out.glob("*.pth.json")))
    os.killpg(proc.pid, signal.SIGINT)                     # like Ctrl-C: the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    done = sorted(out.glob("*.pth"))
    assert 1 <= len(done) < 4
    for p in done:                                         # what is there is complete
        assert checkpoint.load(p)[1]["parity"]["passed"]


def test_sigint_during_convert_leaves_nothing(vmz_pickle, tmp_path):
    out = tmp_path / "big.pth"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "convert", str(vmz_pickle("ipcsn", 152)), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)                                        # importing torch, reading, or in parity
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_verify_leaves_no_partial_files(vmz_pickle, tmp_path):
    from vmzconv.convert import convert
    from vmzconv.verify.synthetic import frames, write_video

    ckpt = tmp_path / "ir50.pth"
    convert(vmz_pickle("ircsn", 50), ckpt, check_parity=False, card=False)
    data = tmp_path / "videos"
    data.mkdir()
    lines = []
    for i in range(12):
        write_video(data / f"v{i}.mp4", frames(i % 3, 40, 96, 72, seed=i))
        lines.append(f"v{i}.mp4 {i % 3}")
    (data / "list.txt").write_text("\n".join(lines) + "\n")
    cache, out, rep = tmp_path / "cache", tmp_path / "out.json", tmp_path / "rep.json"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "verify", str(ckpt), "--ann", str(data / "list.txt"),
                             "--data-root", str(data), "--clip-len", "16", "--num-clips", "4", "--short-side", "96",
                             "--crop-size", "96", "--workers", "1", "--cache", str(cache), "--out", str(out),
                             "--report", str(rep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert _wait_for(lambda: len(list(cache.rglob("*.npy"))) >= 1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("verify finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not out.exists() and not rep.exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert all(np.load(p).shape == (400,) for p in cache.rglob("*.npy"))   # whatever is cached is whole
