"""What a new user hit after the run-time core landed: each a test that failed before its fix."""

from __future__ import annotations

import os
import stat

import torch

from .conftest import assert_one_line_error, run_cli
from .synthetic import frames, write_video

SMALL = ("--clip-len", "8", "--num-clips", "2", "--short-side", "64", "--crop-size", "64", "--threads", "1",
         "--workers", "0")


def test_a_plain_r2plus1d_file_with_arch_runs(vmz_pickle, tmp_path):
    """Without vmzconv's meta the stem's temporal kernel was read from the spatial conv (kernel 1)."""
    from vmzconv.convert import convert

    ckpt = tmp_path / "r21d.pth"
    convert(vmz_pickle("r2plus1d", 18), ckpt, check_parity=False, card=False)
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], plain)          # a bare state dict
    video = write_video(tmp_path / "v.mp4", frames(0, 20, 80, 60))
    a = run_cli("predict", ckpt, video, *SMALL, "--json", "--protocol", "vmz", "--frame-interval", "1", "--num-crops", "1")
    b = run_cli("predict", plain, video, *SMALL, "--json", "--protocol", "vmz", "--frame-interval", "1", "--num-crops", "1",
                "--arch", "r2plus1d_r18")
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout


def test_a_zero_std_is_refused(vmz_pickle, tmp_path, cli):
    from vmzconv.convert import convert

    ckpt = tmp_path / "ir50.pth"
    convert(vmz_pickle("ircsn", 50), ckpt, check_parity=False, card=False)
    video = write_video(tmp_path / "v.mp4", frames(0, 20, 80, 60))
    assert_one_line_error(cli("predict", ckpt, video, *SMALL, "--std", "0,0,0"), "std", "positive")


def test_safetensors_output_follows_the_umask_and_convert_names_it_as_input(vmz_pickle, tmp_path, cli):
    out = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        res = cli("convert", vmz_pickle("ircsn", 50), out, "--no-parity")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert_one_line_error(cli("convert", out, tmp_path / "again.pth"), "safetensors file", "not a Caffe2 pickle")


def test_check_consumer_without_a_recipe_is_bad_input_not_a_failed_check(vmz_pickle, tmp_path, cli):
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "x.pth", "--no-parity", "--check-consumer")
    assert_one_line_error(res, "no library recipe", code=2)
    assert not (tmp_path / "x.pth").exists()


def test_features_makes_no_folder_when_it_fails(tmp_path):
    bad = tmp_path / "not_a_ckpt.pth"
    bad.write_text("hello")
    video = write_video(tmp_path / "v.mp4", frames(0, 10, 80, 60))
    proc = run_cli("features", bad, video, "--out-dir", tmp_path / "new" / "out", *SMALL[6:])
    assert proc.returncode == 2 and "text file" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_the_printed_loading_lines_run(vmz_pickle, tmp_path, cli):
    """--print-config's lines for a torchvision/safetensors file: the load part runs as printed (the model
    part needs torchvision, which does not import beside this torch; here vmzconv's own model stands in)."""
    from vmzconv.arch import Arch
    from vmzconv.models import build_model

    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"r3d{suffix}"
        res = cli("convert", vmz_pickle("r3d", 18), out, "--no-parity", "--print-config", "--no-card")
        assert res.exit_code == 0, res.stderr
        code = res.stdout.split("\n\n", 1)[1]
        load = code[code.index("model = "):]
        load = load[load.index("\n", load.index("m.eps = 1e-3")) + 1:]        # after the recipe's eps loop
        namespace = {"model": build_model("torchvision", Arch("r3d", 18, 400))}
        exec(compile(load, "<printed>", "exec"), namespace)                     # noqa: S102 (our own output)
