"""Bad input: one clear line, a non-zero exit, and nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import assert_one_line_error, convert_fails


def test_missing_blob(vmz_pickle, cli, tmp_path):
    arrays = vmz_pickle.arrays("ircsn", 50)
    del arrays["comp_5_spatbn_3_riv"]
    src = vmz_pickle.custom("missing.pkl", arrays)
    convert_fails(cli, src, tmp_path, "missing.pkl", "'comp_5_spatbn_3_riv' is missing",
                  "backbone.layer2.2.conv2.0.bn.running_var", "[128]")


def test_extra_unknown_blob(vmz_pickle, cli, tmp_path):
    arrays = vmz_pickle.arrays("ircsn", 50)
    arrays["mystery_w"] = np.zeros((3, 4), np.float32)
    src = vmz_pickle.custom("extra.pkl", arrays)
    convert_fails(cli, src, tmp_path, "extra.pkl", "unknown blob", "'mystery_w' [3, 4]")


def test_wrong_shape(vmz_pickle, cli, tmp_path):
    arrays = vmz_pickle.arrays("ipcsn", 50)
    arrays["comp_2_conv_2_middle_w"] = np.zeros((64, 64, 1, 1, 3), np.float32)
    src = vmz_pickle.custom("shape.pkl", arrays)
    convert_fails(cli, src, tmp_path, "shape.pkl", "'comp_2_conv_2_middle_w'", "[64, 64, 1, 1, 3]",
                  "backbone.layer1.2.conv2.0.conv.weight", "[64, 64, 1, 1, 1]")


def test_wrong_arch(vmz_pickle, cli, tmp_path):
    convert_fails(cli, vmz_pickle("ircsn", 50), tmp_path, "--arch ipcsn_r152", "look like ircsn_r50",
                  extra=("--arch", "ipcsn_r152"))


def test_truncated_file(vmz_pickle, cli, tmp_path):
    data = vmz_pickle("ircsn", 50).read_bytes()
    src = vmz_pickle.root / "truncated.pkl"
    src.write_bytes(data[: len(data) // 3])
    convert_fails(cli, src, tmp_path, "truncated.pkl", "truncated")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system")])
def test_global_outside_allowlist_is_refused_without_running(cli, tmp_path_factory, tmp_path, module, name):
    folder = tmp_path_factory.mktemp("evil")
    canary = folder / "canary"
    if name == "eval":
        payload = f"open({str(canary)!r}, 'w').close()".encode()
    else:
        payload = f"touch {canary}".encode()
    src = folder / "evil.pkl"
    src.write_bytes(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nT"
                    + len(payload).to_bytes(4, "little") + payload + b"\x85R.")
    convert_fails(cli, src, tmp_path, "evil.pkl", f"{module}.{name}", "allowlist", "nothing was executed")
    assert not canary.exists()
    res = cli("inspect", src)
    assert_one_line_error(res, f"{module}.{name}")
    assert not canary.exists()


def test_existing_output_needs_force(vmz_pickle, cli, tmp_path):
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    res = cli("convert", vmz_pickle("ircsn", 50), out, "--no-parity")
    assert_one_line_error(res, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert cli("convert", vmz_pickle("ircsn", 50), out, "--no-parity", "--force").exit_code == 0
    assert out.read_bytes() != b"precious"


def test_bad_suffix_and_missing_input(cli, tmp_path):
    res = cli("convert", tmp_path / "nope.pkl", tmp_path / "out.pth")
    assert_one_line_error(res, "nope.pkl", "no such file")
    res = cli("convert", tmp_path / "nope.pkl", tmp_path / "out.bin")
    assert_one_line_error(res, "out.bin", ".pth or .safetensors")


def test_inspect_reports_without_converting(vmz_pickle, cli, tmp_path):
    arrays = vmz_pickle.arrays("ipcsn", 50, classes=487)
    arrays["comp_0_conv_1_w_momentum"] = np.zeros((64, 64, 1, 1, 1), np.float32)
    arrays["stray_blob"] = np.zeros(2, np.float32)
    src = vmz_pickle.custom("ip487.pkl", arrays)
    res = cli("inspect", src)
    assert res.exit_code == 0, res.stderr
    assert "ipcsn_r50 (487 classes" in res.stdout
    assert "349 (float32)" in res.stdout
    assert "comp_0_conv_1_w_momentum (SGD momentum buffer)" in res.stdout
    assert "suspicious unknown: stray_blob" in res.stdout
    import json

    report = json.loads(cli("inspect", src, "--json").stdout)
    assert report["parameter_blobs"] == 347 and report["suspicious"]["unknown"] == ["stray_blob"]
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(vmz_pickle, cli, tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        res = cli("convert", vmz_pickle("ircsn", 50), ro / "x.pth", "--no-parity")
        assert_one_line_error(res, "cannot write")
    finally:
        ro.chmod(0o700)


def test_full_disk_is_one_line_and_leaves_nothing(vmz_pickle, cli, tmp_path, monkeypatch):
    import os

    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "x.pth", "--no-parity")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert_one_line_error(res, "x.pth", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_inspect_of_an_unsupported_model_is_one_line(cli, tmp_path):
    from vmzconv import synth

    blobs = {"conv1a_w": np.zeros((64, 3, 3, 3, 3), np.float32), "fc6_w": np.zeros((4096, 8192), np.float32)}
    src = synth.write_vmz_pickle(tmp_path / "c3d_sports1m.pkl", blobs)
    assert_one_line_error(cli("inspect", src), "c3d_sports1m.pkl", "C3D")
    assert_one_line_error(cli("inspect", src, "--json"), "C3D")
