"""`vmzconv convert` end to end on full-size VMZ-format pickles."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vmzconv import checkpoint
from vmzconv.arch import Arch
from vmzconv.models import build_model

LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BLOB_COUNTS = {("ircsn", 50): 267, ("ircsn", 101): 522, ("ircsn", 152): 777,
               ("ipcsn", 50): 347, ("ipcsn", 101): 687, ("ipcsn", 152): 1027}


def expected_sources(family: str, depth: int, classes: int) -> dict[str, str]:
    """MMAction2 key -> VMZ blob, written out from MMAction2's ResNet3dCSN and VMZ's blob naming (independent of mappings/)."""
    out = {}

    def conv_bn(key, conv_blob, bn_blob):
        out[f"{key}.conv.weight"] = conv_blob
        for attr, sfx in (("weight", "_s"), ("bias", "_b"), ("running_mean", "_rm"), ("running_var", "_riv")):
            out[f"{key}.bn.{attr}"] = bn_blob + sfx

    conv_bn("backbone.conv1", "conv1_w", "conv1_spatbn_relu")
    c = 0
    for layer, n in enumerate(LAYERS[depth], start=1):
        for j in range(n):
            p = f"backbone.layer{layer}.{j}"
            conv_bn(f"{p}.conv1", f"comp_{c}_conv_1_w", f"comp_{c}_spatbn_1")
            if family == "ircsn":
                conv_bn(f"{p}.conv2.0", f"comp_{c}_conv_3_w", f"comp_{c}_spatbn_3")
                conv_bn(f"{p}.conv3", f"comp_{c}_conv_4_w", f"comp_{c}_spatbn_4")
            else:
                conv_bn(f"{p}.conv2.0", f"comp_{c}_conv_2_middle_w", f"comp_{c}_spatbn_2_middle")
                conv_bn(f"{p}.conv2.1", f"comp_{c}_conv_2_w", f"comp_{c}_spatbn_2")
                conv_bn(f"{p}.conv3", f"comp_{c}_conv_3_w", f"comp_{c}_spatbn_3")
            if j == 0:
                conv_bn(f"{p}.downsample", f"shortcut_projection_{c}_w", f"shortcut_projection_{c}_spatbn")
            c += 1
    out["cls_head.fc_cls.weight"] = f"last_out_L{classes}_w"
    out["cls_head.fc_cls.bias"] = f"last_out_L{classes}_b"
    return out


def check_output(path, family, depth, classes, arrays):
    state, meta = checkpoint.load(path)
    model = build_model("mmaction2", Arch(family, depth, classes))
    model.load_state_dict(state, strict=True)                        # strict, like our own check
    sources = expected_sources(family, depth, classes)
    assert len(sources) == BLOB_COUNTS[family, depth] == len(arrays)
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert tensor.item() == 0
            continue
        blob = arrays[sources[key]]
        assert tensor.dtype == torch.float32
        assert tensor.numpy().tobytes() == blob.tobytes(), key        # bit-identical
    return meta


@pytest.mark.parametrize("family,depth", [
    ("ircsn", 50), ("ipcsn", 50), ("ircsn", 101), ("ipcsn", 101),
    pytest.param("ircsn", 152, marks=pytest.mark.slow), pytest.param("ipcsn", 152, marks=pytest.mark.slow),
])
def test_convert_every_arch_bit_identical_with_parity(vmz_pickle, cli, tmp_path, family, depth):
    src = vmz_pickle(family, depth)
    out = tmp_path / "out.pth"
    res = cli("convert", src, out, "--json", "--parity-clip", "8,64")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["arch"] == f"{family}_r{depth}" and summary["num_classes"] == 400
    assert summary["blobs_converted"] == BLOB_COUNTS[family, depth]
    assert summary["parity"]["passed"] and summary["parity"]["max_abs_diff"] <= 1e-4
    meta = check_output(out, family, depth, 400, vmz_pickle.arrays(family, depth))
    assert meta["parity"]["passed"] is True and meta["parity"]["top5_identical"] is True
    assert "max_abs_diff" not in meta["parity"]                 # measured figures: the card, not the bytes
    card = json.loads(out.with_name("out.pth.json").read_text())
    assert card["parity_measured"]["max_abs_diff"] == summary["parity"]["max_abs_diff"]
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_pth_is_mmaction2_loadable_and_meta_is_plain(vmz_pickle, cli, tmp_path):
    out = tmp_path / "r50.pth"
    assert cli("convert", vmz_pickle("ircsn", 50), out).exit_code == 0
    obj = torch.load(out, map_location="cpu", weights_only=True)     # ERRATA 2: plain types only
    assert set(obj) == {"state_dict", "meta"}
    assert not any(k.startswith("module.") for k in obj["state_dict"])
    meta = obj["meta"]
    assert meta["arch"] == "ircsn_r50" and meta["num_classes"] == 400 and meta["target"] == "mmaction2"
    assert meta["input"]["mean"] == [110.201, 100.64, 95.9966] and meta["input"]["channel_order"] == "RGB"
    assert len(meta["source"]["sha256"]) == 64 and meta["source"]["file"].endswith(".pkl")

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float, bool)

    assert plain(meta)
    # MMAction2's load_checkpoint: ckpt['state_dict'], strip 'module.', load_state_dict
    build_model("mmaction2", Arch("ircsn", 50, 400)).load_state_dict(obj["state_dict"], strict=True)


def test_safetensors_output(vmz_pickle, cli, tmp_path):
    out = tmp_path / "r50.safetensors"
    assert cli("convert", vmz_pickle("ipcsn", 50), out, "--no-parity").exit_code == 0
    state = load_file(out)
    assert len(state) == 416
    _, meta = checkpoint.load(out)
    assert meta["arch"] == "ipcsn_r50" and meta["parity"] is None


def test_training_leftovers_scopes_and_float64_are_handled(vmz_pickle, cli, tmp_path):
    arrays = vmz_pickle.arrays("ircsn", 50)
    messy = {f"gpu_0/{k}": (v.astype(np.float64) if k.endswith("_rm") else v) for k, v in arrays.items()}
    messy["gpu_0/comp_0_conv_1_w_momentum"] = np.zeros_like(arrays["comp_0_conv_1_w"])
    messy["gpu_0/ITER"] = np.array([1000], np.int64)
    messy["gpu_0/LR"] = np.array([0.01], np.float32)
    src = vmz_pickle.custom("messy.pkl", messy, wrap=False)
    out = tmp_path / "messy.pth"
    res = cli("convert", src, out, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert set(summary["ignored"]) == {"comp_0_conv_1_w_momentum", "ITER", "LR"}
    assert any("float64 cast" in n for n in summary["notes"])
    state, meta = checkpoint.load(out)
    assert meta["blobs"]["converted"] == 267 and set(meta["blobs"]["ignored"]) == {"comp_0_conv_1_w_momentum", "ITER", "LR"}
    rm = arrays["comp_3_spatbn_1_rm"]
    assert torch.equal(state["backbone.layer2.0.conv1.bn.running_mean"], torch.from_numpy(rm))


def test_python_dash_m_entry_point(vmz_pickle, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "m.pth"
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "convert", str(vmz_pickle("ircsn", 50)), str(out),
                           "--parity-clip", "8,64"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and out.is_file()


@pytest.mark.slow
def test_written_bytes_do_not_depend_on_threads_jobs_or_command(tmp_path):
    """The same pickle and options give the same checkpoint bytes in `convert` under OMP_NUM_THREADS=1
    and in `bulk -j1` (a worker with 2 threads here) / `-j2` (two with 1): --publish names agree too."""
    import os
    import subprocess
    import sys

    from vmzconv import synth

    src_a, src_ab = tmp_path / "a_only", tmp_path / "a_and_b"
    for folder, names in ((src_a, ("a",)), (src_ab, ("a", "b"))):
        folder.mkdir()
        for name in names:
            synth.write_vmz_pickle(folder / f"{name}.pkl", synth.seeded_blobs("r2plus1d", 18, 400, ord(name)))

    def sub(args, threads=None):
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-m", "vmzconv", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr

    digests = {}
    sub(["convert", src_a / "a.pkl", tmp_path / "t1.pth"], threads="1")
    digests["convert OMP=1"] = tmp_path / "t1.pth"
    sub(["bulk", src_a, tmp_path / "j1", "--jobs", "1"])
    digests["bulk -j1"] = tmp_path / "j1" / "a.pth"
    sub(["bulk", src_ab, tmp_path / "j2", "--jobs", "2"])
    digests["bulk -j2"] = tmp_path / "j2" / "a.pth"
    digests = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in digests.items()}
    assert len(set(digests.values())) == 1, digests
