"""`vmzconv parity --trace`: the first stage where a checkpoint (ours or anyone's) stops computing what
Caffe2 computes, for files with and without vmzconv's meta."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import assert_one_line_error

CLIP = ("--parity-clip", "8,96")


@pytest.fixture(scope="module")
def ir50(vmz_pickle, module_dir):
    """An ir-CSN-50 pickle and its conversions to MMAction2 and torchvision layouts."""
    from vmzconv.convert import convert

    folder = module_dir
    src = vmz_pickle("ircsn", 50)
    mm, tv = folder / "mm.pth", folder / "tv.pth"
    convert(src, mm, check_parity=False, card=False)
    convert(src, tv, target="torchvision", check_parity=False, card=False)
    return src, mm, tv


def trace(cli, src, ckpt, *extra):
    res = cli("parity", src, ckpt, "--trace", "--json", *CLIP, *extra)
    return res, json.loads(res.stdout)


def damaged(path, out, edit, bare=False):
    """A copy of ``path`` with ``edit(state_dict)`` applied, saved without vmzconv's meta."""
    sd = torch.load(path, weights_only=True)["state_dict"]
    edit(sd)
    torch.save(sd if bare else {"state_dict": sd}, out)
    return out


def swap(sd, a, b):
    sd[a], sd[b] = sd[b].clone(), sd[a].clone()


def test_a_healthy_file_has_no_divergent_stage(cli, ir50):
    src, mm, _ = ir50
    res, out = trace(cli, src, mm)
    assert res.exit_code == 0, res.stderr
    names = [s["name"] for s in out["trace"]]
    assert names == ["stem"] + [f"layer{L}.{j}" for L, n in enumerate((3, 4, 6, 3), 1) for j in range(n)] + ["head"]
    assert out["first_divergent"] is None and out["verdict"] == "pass"
    assert all(0 <= s["rel_diff"] <= 1e-5 for s in out["trace"])
    text = cli("parity", src, mm, "--trace", *CLIP)
    assert text.exit_code == 0 and all(n in text.stdout for n in names) and "first divergent" not in text.stdout


@pytest.mark.parametrize("edit,where", [
    (lambda sd: swap(sd, "backbone.layer2.1.conv2.0.bn.running_mean", "backbone.layer2.1.conv2.0.bn.running_var"),
     "layer2.1"),
    (lambda sd: swap(sd, "backbone.layer3.4.conv3.bn.weight", "backbone.layer3.4.conv3.bn.bias"), "layer3.4"),
    (lambda sd: sd.__setitem__("cls_head.fc_cls.weight", sd["cls_head.fc_cls.weight"].roll(1, dims=0)), "head"),
])
def test_damage_in_one_place_is_found_there(cli, ir50, tmp_path, edit, where):
    src, mm, _ = ir50
    res, out = trace(cli, src, damaged(mm, tmp_path / "plain_mmaction2.pth", edit))
    assert res.exit_code == 1
    assert out["first_divergent"] == where and out["verdict"] == "fail"
    before = [s for s in out["trace"][:[s["name"] for s in out["trace"]].index(where)]]
    assert all(isinstance(s["rel_diff"], float) and s["rel_diff"] <= 1e-4 for s in before)
    assert res.stderr.strip().endswith(f"first divergent stage {where}")


def test_a_consumers_bn_eps_shows_at_the_stem(cli, ir50):
    src, mm, _ = ir50
    res, out = trace(cli, src, mm, "--bn-eps", "1e-5")
    assert res.exit_code == 1 and out["first_divergent"] == "stem" and "pool1" in out["hint"]


def test_torchvision_layout_bare_state_dict(cli, ir50, tmp_path):
    src, _, tv = ir50
    bad = damaged(tv, tmp_path / "tv_bare.pth", lambda sd: swap(sd, "layer4.1.conv1.1.weight", "layer4.1.conv1.1.bias"),
                  bare=True)
    res, out = trace(cli, src, bad)
    assert res.exit_code == 1 and out["first_divergent"] == "layer4.1"
    assert json.loads(cli("parity", src, tv, "--trace", "--json", *CLIP).stdout)["first_divergent"] is None


def test_nan_is_written_as_a_string_and_the_stage_diverges(cli, ir50, tmp_path):
    src, mm, _ = ir50
    bad = damaged(mm, tmp_path / "nan.pth",
                  lambda sd: sd["backbone.layer1.1.conv1.bn.running_var"].__setitem__(0, float("nan")))
    res, out = trace(cli, src, bad)
    stage = next(s for s in out["trace"] if s["name"] == "layer1.1")
    assert out["first_divergent"] == "layer1.1" and stage["max_abs_diff"] == "nan" and stage["rel_diff"] == "nan"


def test_a_file_that_loads_into_no_layout_is_answered_with_its_keys(cli, ir50, tmp_path):
    src, mm, _ = ir50

    def drop(sd):
        del sd["backbone.layer1.0.conv1.conv.weight"]
        sd["backbone.extra.weight"] = torch.zeros(2)
        sd["backbone.layer1.0.conv3.conv.weight"] = torch.zeros(3, 3)

    res = cli("parity", src, damaged(mm, tmp_path / "broken.pth", drop), "--trace")
    assert_one_line_error(res, "does not load strictly as ircsn_r50", "1 missing ('backbone.layer1.0.conv1.conv.weight')",
                          "1 unexpected ('backbone.extra.weight')", "'backbone.layer1.0.conv3.conv.weight' [3, 3] vs")
