"""--runtime onnxruntime | openvino: the same outputs as the PyTorch model (within 1e-3 relative), the graph
cached outside the user's folders and proven on first use, and a failed proof falling back to torch."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from .conftest import run_cli
from .synthetic import frames, write_video

NEEDS = {"onnxruntime": pytest.mark.skipif(
             not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")),
             reason="the onnx extra is not installed"),
         "openvino": pytest.mark.skipif(
             not all(importlib.util.find_spec(m) for m in ("openvino", "onnxscript")),
             reason="the openvino extra is not installed")}
RUNTIMES = [pytest.param(name, marks=mark) for name, mark in NEEDS.items()]
SMALL = ("--clip-len", "8", "--num-clips", "2", "--short-side", "64", "--crop-size", "64", "--threads", "2",
         "--workers", "0")


@pytest.fixture(scope="module")
def demo(module_dir, vmz_pickle):
    """The demo checkpoints of R3D-18 and ir-CSN-50, and three short videos."""
    from vmzconv.convert import convert

    d = module_dir
    ckpts = {}
    for family, depth in (("r3d", 18), ("ircsn", 50)):
        ckpts[family] = d / f"{family}.pth"
        convert(vmz_pickle(family, depth, keep=True), ckpts[family], check_parity=False, card=False)
    videos = [write_video(d / f"v{i}.mp4", frames(i, n, 80, 60, seed=i)) for i, n in enumerate((20, 33, 12))]
    (d / "list.txt").write_text("".join(f"v{i}.mp4 {i}\n" for i in range(3)))
    return d, ckpts, videos


def _predict(ckpt, videos, runtime, *extra):
    proc = run_cli("predict", ckpt, *videos, *SMALL, "--runtime", runtime, "--json", "--top-k", "400", *extra)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return np.array([[t["probability"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in out]), proc


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("runtime,family", [pytest.param(r, f, marks=NEEDS[r]) for r, f in
                                            (("onnxruntime", "ircsn"), ("openvino", "r3d"), ("openvino", "ircsn"))]
                         # ONNX Runtime on R3D-18: test_verify_and_features_equal_torch_and_say_what_ran
                         + [pytest.param("onnxruntime", "r3d", marks=[NEEDS["onnxruntime"], pytest.mark.slow])])
def test_predict_equals_torch(demo, runtime, family):
    d, ckpts, videos = demo
    want, _ = _predict(ckpts[family], videos, "torch")
    got, proc = _predict(ckpts[family], videos, runtime)
    assert _rel(got, want) <= 1e-3
    assert (got.argmax(1) == want.argmax(1)).all()
    assert "note" not in proc.stderr, proc.stderr              # proven, so no fallback


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_verify_and_features_equal_torch_and_say_what_ran(demo, runtime, tmp_path):
    d, ckpts, _ = demo
    outs = {}
    for rt in ("torch", runtime):
        out, rep = tmp_path / f"{rt}.json", tmp_path / f"{rt}-report.json"
        proc = run_cli("verify", ckpts["r3d"], "--ann", d / "list.txt", "--data-root", d, *SMALL, "--runtime", rt,
                       "-q", "--warmup", "0", "--out", out, "--report", rep)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(rep.read_text())
        assert (report["runtime"], report["precision"]) == (rt, "fp32")
        assert f"({rt}, fp32)" in proc.stdout
        outs[rt] = np.array(json.loads(out.read_text()))
        feats = tmp_path / f"feat-{rt}"
        proc = run_cli("features", ckpts["r3d"], *(d / f"v{i}.mp4" for i in range(3)), "--out-dir", feats,
                       "--short-side", "64", "--crop-size", "64", "--threads", "2", "--workers", "0", "--runtime", rt,
                       "-q")
        assert proc.returncode == 0, proc.stderr
    assert _rel(outs[runtime], outs["torch"]) <= 1e-3
    for i in range(3):
        a, b = (np.load(tmp_path / f"feat-{rt}" / f"v{i}.npy") for rt in (runtime, "torch"))
        assert a.shape == b.shape and _rel(a, b) <= 1e-3


@pytest.mark.parametrize("runtime", RUNTIMES[1:])       # the cache is the runtimes' shared code
def test_graph_is_cached_outside_the_users_folders_and_proven_once(demo, runtime, tmp_path):
    d, ckpts, videos = demo
    cache = tmp_path / "cache"
    before = set(os.listdir(d))
    _predict(ckpts["r3d"], videos[:1], runtime, "--graph-cache", cache)
    graphs = sorted((cache / "graphs").glob("*.onnx"))
    proofs = sorted((cache / "graphs").glob(f"*.{runtime}-fp32-proof.json"))
    assert len(graphs) == 1 and len(proofs) == 1
    assert json.loads(proofs[0].read_text())["passed"] is True
    stamp = (graphs[0].stat().st_mtime_ns, proofs[0].stat().st_mtime_ns)
    _predict(ckpts["r3d"], videos[:1], runtime, "--graph-cache", cache)
    assert (graphs[0].stat().st_mtime_ns, proofs[0].stat().st_mtime_ns) == stamp       # reused, not redone
    assert set(os.listdir(d)) == before                     # nothing written beside the checkpoint or videos


@pytest.mark.parametrize("runtime", RUNTIMES[:1])       # the proof and the fallback are shared code too
def test_a_graph_that_fails_its_proof_falls_back_to_torch(demo, runtime, tmp_path, monkeypatch):
    from onnx import numpy_helper

    from vmzconv import graph as export_mod

    real = export_mod.to_onnx_fast

    def perturbed(*args, **kwargs):
        proto = real(*args, **kwargs)
        init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
        return proto

    monkeypatch.setattr(export_mod, "to_onnx_fast", perturbed)
    d, ckpts, videos = demo
    want, _ = _predict(ckpts["r3d"], videos[:1], "torch")
    got, proc = _predict(ckpts["r3d"], videos[:1], runtime, "--graph-cache", tmp_path / "cache")
    notes = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and "does not compute what the PyTorch model does" in notes[0] and "using torch" in notes[0]
    assert np.array_equal(got, want)                        # torch ran


def test_bf16_runs_on_openvino_and_stays_close(demo):
    pytest.importorskip("openvino")
    from vmzconv.runtimes import bf16_capable

    d, ckpts, videos = demo
    want, _ = _predict(ckpts["r3d"], videos, "torch")
    got, proc = _predict(ckpts["r3d"], videos, "openvino", "--precision", "bf16")
    if bf16_capable():
        assert "note" not in proc.stderr
        assert np.abs(got - want).max() <= 0.05              # probabilities; bf16 rounds the logits by ~1%
    else:
        assert "no bf16 support" in proc.stderr and _rel(got, want) <= 1e-3


def test_missing_runtime_is_a_note_and_torch_runs(demo, monkeypatch):
    from vmzconv import runtimes

    monkeypatch.setattr(runtimes, "installed", lambda name: name == "torch")
    d, ckpts, videos = demo
    want, _ = _predict(ckpts["r3d"], videos[:1], "torch")
    got, proc = _predict(ckpts["r3d"], videos[:1], "openvino")
    assert "its package is not installed" in proc.stderr and "using torch" in proc.stderr
    assert np.array_equal(got, want)
    got, proc = _predict(ckpts["r3d"], videos[:1], "auto")
    assert proc.stderr == "" and np.array_equal(got, want)      # auto: the best installed, silently


@NEEDS["openvino"]
def test_torchrun_with_openvino_equals_one_process(demo, tmp_path):
    d, ckpts, _ = demo
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    args = ["--ann", str(d / "list.txt"), "--data-root", str(d), *SMALL, "--runtime", "openvino", "-q", "--warmup", "0",
            "--graph-cache", str(tmp_path / "cache")]
    args[args.index("--threads") + 1] = "1"
    proc = run_cli("verify", ckpts["r3d"], *args, "--out", single)
    assert proc.returncode == 0, proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "vmzconv", "verify", str(ckpts["r3d"]), *args,
                           "--out", str(multi)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert multi.read_text() == single.read_text()
