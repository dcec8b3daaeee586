"""What a new user hit, round three: an interrupt after the work was done, help that said the wrong thing,
manifest entries ignored without a word, report.json's paths, and a demo that could not make a pretraining
pickle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from .conftest import assert_one_line_error


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupt_after_convert_finished_changes_nothing(vmz_pickle, tmp_path):
    """SIGINT landing after the command is done (as the process exits) used to turn a finished
    conversion into exit 130 and a traceback; now it is ignored: exit 0, the output complete."""
    out = tmp_path / "x.pth"
    code = (
        "import os, signal, sys\n"
        f"sys.argv = ['vmzconv', 'convert', {str(vmz_pickle('r3d', 18, keep=True))!r}, {str(out)!r}, "
        "'--no-parity', '--no-card', '-q']\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from vmzconv.cli import main\n"
        "try:\n"
        "    rc = main()\n"
        "finally:\n"
        "    os.kill(os.getpid(), signal.SIGINT)   # the interrupt lands just after the command returned\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and out.exists()
    assert "output" in proc.stdout


def test_an_interrupt_after_the_output_was_written_says_so(vmz_pickle, tmp_path, cli, monkeypatch):
    import vmzconv.cli as cli_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "_print_result", interrupted)
    out = tmp_path / "x.pth"
    res = cli("convert", vmz_pickle("r3d", 18, keep=True), out, "--no-parity")
    assert res.exit_code == 130
    assert "interrupted after" in res.stderr and str(out) in res.stderr and "(complete)" in res.stderr
    assert "no partial output" not in res.stderr and out.exists()


def test_help_says_what_the_tool_does(cli):
    assert "R(2+1)D" in cli("zoo", "--help").stdout
    bulk = " ".join(cli("bulk", "--help").stdout.split())
    assert "R(2+1)D -> torchvision" in bulk and "others mmaction2" not in bulk
    assert "130" in cli("--help").stdout and "130" in cli("convert", "--help").stdout
    features = " ".join(cli("features", "--help").stdout.split())
    assert "--format [npy|h5] npy: NAME.npy" in features
    predict = " ".join(cli("predict", "--help").stdout.split())
    assert "fp16/bf16: CUDA autocast" in predict
    demo = " ".join(cli("demo", "--help").stdout.split())
    for option in ("--arch", "--seed", "--classes"):
        line = demo[demo.index(option):][:160]
        assert len(line.split("]", 1)[-1].strip()) > 20, line            # each option says what it does


def test_demo_makes_a_pretraining_pickle(cli, tmp_path):
    res = cli("demo", "--out-dir", tmp_path, "--classes", 359, "--arch", "ircsn_r50")
    assert res.exit_code == 0, res.stderr
    card = json.loads((tmp_path / "demo_ircsn_r50_359.pth.json").read_text())
    assert card["num_classes"] == 359 and card["target"] == "mmaction2-backbone" and card["parity"]["passed"]
    assert "359 classes" in res.stdout


def test_manifest_entries_outside_the_source_folder_are_an_error(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.pkl").write_text("x")
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[file]]\npath = "elsewhere/b.pkl"\narch = "r3d_r18"\n')
    res = cli("bulk", tmp_path / "src", tmp_path / "out", "--manifest", manifest)
    assert_one_line_error(res, "elsewhere/b.pkl", "not a .pkl file below")
    assert not (tmp_path / "out").exists()


def test_report_json_paths_are_relative_like_report_md(cli, tmp_path, monkeypatch):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "a.pkl").write_text("not a pickle")
    (tmp_path / "src" / "sub" / "b.pkl").write_text("not a pickle either")
    monkeypatch.chdir(tmp_path)
    res = cli("bulk", "src", "out", "-q")
    assert res.exit_code == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["file"] for r in report["rows"]] == ["a.pkl", "b.pkl"]
    assert report["input_root"] == str(tmp_path / "src" / "sub") and report["out_dir"] == str(tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| a.pkl |" in md


@pytest.mark.parametrize("args", [("--parity-clip", "0,0"), ()])
def test_bulk_makes_no_out_dir_when_it_fails_before_converting(cli, tmp_path, args):
    (tmp_path / "empty").mkdir()
    res = cli("bulk", tmp_path / "empty", tmp_path / "new" / "out", *args)
    assert res.exit_code == 2 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("family", ["r3d", "r2plus1d"])
def test_torchvision_cards_build_torchvision_own_model(vmz_pickle, cli, tmp_path, family):
    """The card's `build` lines for R3D-18 (torchvision's own r3d_18) and R(2+1)D-18 (VideoResNet with the
    printed Conv2Plus1D), run against torchvision's classes from its wheel: strict load, the same logits."""
    import numpy as np
    import torch

    from vmzconv import parity
    from vmzconv.load import load_converted

    from . import torchvision_video

    if torchvision_video.load() is None:
        pytest.skip("the torchvision wheel is not in .venv/wheels (the test command downloads it)")
    out = tmp_path / f"{family}.pth"
    assert cli("convert", vmz_pickle(family, 18, keep=True), out, "--no-parity").exit_code == 0
    ns: dict = {}
    exec(json.loads((tmp_path / f"{family}.pth.json").read_text())["build"], ns)      # noqa: S102 (our card)
    model = ns["model"].eval()
    assert type(model).__module__ == "torchvision.models.video.resnet"
    model.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    clip = torch.from_numpy(parity.fixed_clip(8, 56))
    with torch.no_grad():
        theirs, ours = model(clip).numpy(), load_converted(out).model.eval()(clip).numpy()
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()
