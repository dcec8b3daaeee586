"""What a new user tripped on: consumer models, interrupted writes, late validation, messages, small promises."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import types

import pytest
from torch import nn

from vmzconv import checkpoint, synth
from vmzconv.arch import Arch

from .conftest import assert_one_line_error, wait_for

# -- consumer recipes ------------------------------------------------------------------------------


def _stub(monkeypatch, modules: dict):
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)


def _library_default_bn(model):
    """What the libraries build: BN eps 1e-5 everywhere (pytorchvideo even passes it explicitly)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = 1e-5
    return model


def test_check_consumer_runs_the_pytorchvideo_recipe_with_its_exact_arguments(vmz_pickle, cli, tmp_path, monkeypatch):
    from vmzconv.models import layouts

    calls = []

    def create_csn(*, model_depth, model_num_class, stem_pool, head_pool_kernel_size):
        calls.append((model_depth, model_num_class, stem_pool, head_pool_kernel_size))
        assert stem_pool is nn.MaxPool3d                           # without it: pytorchvideo's default, no pool
        return _library_default_bn(layouts.pytorchvideo(Arch("ircsn", model_depth, model_num_class),
                                                        pool=stem_pool is not None))

    _stub(monkeypatch, {"pytorchvideo": {}, "pytorchvideo.models": {}, "pytorchvideo.models.csn": {"create_csn": create_csn}})
    out = tmp_path / "ptv.pth"
    res = cli("convert", vmz_pickle("ircsn", 50), out, "--target", "pytorchvideo", "--check-consumer",
              "--parity-clip", "8,96", "--json")
    assert res.exit_code == 0, res.stderr
    assert calls == [(50, 400, nn.MaxPool3d, (4, 8, 8))]
    assert any("--check-consumer" in n and "passes parity" in n for n in json.loads(res.stdout)["notes"])
    card = json.loads((tmp_path / "ptv.pth.json").read_text())
    assert "stem_pool=nn.MaxPool3d" in card["build"] and "m.eps = 1e-3" in card["build"]


def test_check_consumer_fails_when_the_librarys_model_computes_something_else(vmz_pickle, cli, tmp_path, monkeypatch):
    from vmzconv.models import layouts

    def r3d_18(*, num_classes):        # torchvision's r3d_18, but a recipe that forgot the eps fix-up
        model = _library_default_bn(layouts.torchvision(Arch("r3d", 18, num_classes)))
        model.modules = lambda: iter(())           # the recipe's eps loop then finds no BN to fix
        return model

    video = {"r3d_18": r3d_18}
    _stub(monkeypatch, {"torchvision": {}, "torchvision.models": {}, "torchvision.models.video": video})
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    sys.modules["torchvision.models"].video = sys.modules["torchvision.models.video"]
    res = cli("convert", vmz_pickle("r3d", 18, keep=True), tmp_path / "tv.pth", "--check-consumer")
    assert_one_line_error(res, "torchvision's own model", "does not compute what Caffe2 computes", code=1)
    assert list(tmp_path.iterdir()) == []


def test_check_consumer_without_the_library_is_one_line(vmz_pickle, cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    res = cli("convert", vmz_pickle("r3d", 18, keep=True), tmp_path / "tv.pth", "--check-consumer", "--no-parity")
    assert_one_line_error(res, "torchvision is not importable here")


def test_torchvision_recipe_arguments_build_vmzs_widths():
    """The recipe's Conv2Plus1D, run as written: VMZ's middle width per conv, torchvision's module order."""
    from vmzconv.targets import recipe

    code = recipe("torchvision", Arch("r2plus1d", 34, 400))
    fake = {"VideoResNet": object, "BasicBlock": object, "R2Plus1dStem": object, "Bottleneck": object}
    _, cls_part = code.split("\n\n", 1)
    ns: dict = {"nn": nn}
    exec(cls_part.split("model = ")[0], ns)
    conv = ns["Conv2Plus1D"](128, 128, 230, stride=1)               # torchvision would pass its block's 230
    assert conv[0].weight.shape == (288, 128, 1, 3, 3) and conv[3].weight.shape == (128, 288, 3, 1, 1)
    assert ns["Conv2Plus1D"].get_downsample_stride(2) == (2, 2, 2)
    assert "VideoResNet(BasicBlock, [Conv2Plus1D] * 4, [3, 4, 6, 3], R2Plus1dStem, num_classes=400)" in code
    assert all(name in code for name in fake if name != "Bottleneck")


# -- interrupted writes, SIGTERM, orphans ----------------------------------------------------------


def test_ctrl_c_inside_torch_save_is_the_documented_line(vmz_pickle, cli, tmp_path, monkeypatch):
    """torch.save's zip writer turns a KeyboardInterrupt into RuntimeError('unexpected pos') on the way out."""
    def interrupted_write(f, state_dict, meta):
        f.write(b"partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint, "_write_pth", interrupted_write)
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "o.pth", "--no-parity")
    assert res.exit_code == 130 and "interrupted" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _bulk(tmp_path, n=3):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        synth.write_vmz_pickle(src / f"m{i}.pkl", synth.seeded_blobs("ircsn", 50, 400, i))
    out = tmp_path / "out"
    return subprocess.Popen([sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True), out


def test_kill_9_of_bulk_takes_its_workers_with_it(tmp_path):
    proc, out = _bulk(tmp_path)
    kids: set[int] = set()
    assert wait_for(lambda: len(kids.update(_children(proc.pid)) or kids) >= 2), "no workers started"
    assert wait_for(lambda: any(_children(k) == set() and "torch" in open(f"/proc/{k}/maps").read() for k in kids
                             if _alive(k)), timeout=120), "workers never got to work"
    os.kill(proc.pid, signal.SIGKILL)                   # the coordinating process only, no clean-up
    proc.wait()
    assert wait_for(lambda: not any(_alive(k) for k in kids), timeout=20), "orphaned bulk workers"


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    proc, out = _bulk(tmp_path)
    assert wait_for(lambda: len(_children(proc.pid)) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")) and not (out / ".vmzconv-bulk.lock").exists()


# -- validation before the work --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_verify(module_dir, vmz_pickle):
    from vmzconv.convert import convert
    from .synthetic import frames, write_video

    d = module_dir
    ckpt = d / "r3d.pth"
    convert(vmz_pickle("r3d", 18, keep=True), ckpt, check_parity=False, card=False)
    write_video(d / "v0.mp4", frames(0, 24, 80, 64))
    return d, ckpt


@pytest.mark.parametrize("line,fragment", [("v0.mp4 500", "label 500 is not a class of this 400-class model"),
                                           ("v0.mp4 -1", "label -1"),
                                           ("missing.mp4 3", "missing.mp4: no such video file")])
def test_verify_refuses_bad_lists_before_the_first_forward(cli, small_verify, tmp_path, line, fragment):
    d, ckpt = small_verify
    ann = tmp_path / "list.txt"
    ann.write_text(f"v0.mp4 1\n{line}\n")
    res = cli("verify", ckpt, "--ann", ann, "--data-root", d, "--cache", tmp_path / "cache", "--workers", "0")
    assert_one_line_error(res, fragment)
    assert not list((tmp_path / "cache").rglob("*.npy"))                 # nothing was evaluated


def test_verify_refuses_an_unwritable_report_before_the_run(cli, small_verify, tmp_path):
    d, ckpt = small_verify
    (tmp_path / "list.txt").write_text("v0.mp4 1\n")
    res = cli("verify", ckpt, "--ann", tmp_path / "list.txt", "--data-root", d, "--report", tmp_path / "no" / "r.json")
    assert_one_line_error(res, "r.json", "does not exist")


def test_convert_into_an_unwritable_folder_fails_before_reading(vmz_pickle, cli, tmp_path, monkeypatch):
    import tempfile

    from vmzconv import convert as convert_mod

    def no(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no)                         # as a read-only folder answers
    monkeypatch.setattr(convert_mod, "read_blobs", lambda *a, **k: pytest.fail("read before checking the output"))
    assert_one_line_error(cli("convert", vmz_pickle("ircsn", 50), tmp_path / "o.pth"), "cannot write in", "Permission denied")


# -- messages --------------------------------------------------------------------------------------


def test_parity_given_a_pickle_or_text_says_what_it_is(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("ircsn", 50)
    assert_one_line_error(cli("parity", src, src), "this is a pickle", "run `vmzconv convert` on it first")
    (tmp_path / "notes.pkl").write_text("just notes\n")
    assert_one_line_error(cli("parity", src, tmp_path / "notes.pkl"), "this is a text file")


def test_parity_against_a_file_of_another_model_names_the_meta(vmz_pickle, cli, tmp_path):
    out = tmp_path / "ip.pth"
    assert cli("convert", vmz_pickle("ipcsn", 50), out, "--no-parity").exit_code == 0
    assert_one_line_error(cli("parity", vmz_pickle("ircsn", 50), out), "its meta records ipcsn_r50, not ircsn_r50")


def test_usage_errors_are_one_line_with_a_hint(cli):
    for args, fragment in ((["convert"], "Missing argument 'SRC'"), (["convert", "a", "b", "--target", "x"], "'x'"),
                           (["nosuch"], "No such command 'nosuch'")):
        res = cli(*args)
        assert_one_line_error(res, fragment, "--help')")


def test_verify_help_has_no_literal_percent_signs(cli):
    text = cli("verify", "--help").stdout
    assert "%%" not in text and "--resize WxH" in text


# -- small promises --------------------------------------------------------------------------------


def test_publish_creates_its_folder(vmz_pickle, cli, tmp_path):
    res = cli("convert", vmz_pickle("r3d", 18, keep=True), tmp_path / "new" / "releases", "--publish", "vmz_r3d_r18",
              "--no-parity", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["output"].startswith(str(tmp_path / "new" / "releases" / "vmz_r3d_r18_"))


def test_zoo_cards_say_the_match_is_by_name_only(vmz_pickle, cli, tmp_path):
    src = vmz_pickle.custom("irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl", synth.seeded_blobs("ircsn", 50))
    assert cli("convert", src, tmp_path / "z.pth", "--no-parity").exit_code == 0
    card = json.loads((tmp_path / "z.pth.json").read_text())
    assert "file name only" in card["zoo"]["matched_by"] and "unverified" in card["zoo"]["matched_by"]


@pytest.mark.parametrize("family,depth,target", [("ircsn", 50, "mmaction2"), ("r3d", 18, "mmaction2"),
                                                 ("ipcsn", 50, "mmaction2-backbone"), ("r2plus1d", 18, "torchvision")])
def test_print_config_is_complete_python(vmz_pickle, cli, tmp_path, family, depth, target):
    res = cli("convert", vmz_pickle(family, depth), tmp_path / "c.pth", "--target", target, "--no-parity",
              "--print-config")
    assert res.exit_code == 0, res.stderr
    config = res.stdout.split("\n\n", 1)[1]
    tree = ast.parse(config)                                   # runnable Python, not a fragment
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    if target.startswith("mmaction2"):
        assert {"_base_", "model", "test_dataloader", "test_evaluator", "test_cfg", "test_pipeline"} <= names
        assert "eps=0.001" in config and ("ResNet3dCSN" in config or "ResNet3d'" in config)
    else:
        assert "model" in names and "m.eps = 1e-3" in config and "load_state_dict" in config
