"""Every output layout: strict loads, parity, pinned key lists, publish names, cards, safetensors."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from vmzconv import checkpoint
from vmzconv.arch import Arch
from vmzconv.models import build_model

from .conftest import assert_one_line_error

LAYERS = {50: (3, 4, 6, 3), 152: (3, 8, 36, 3)}
# Depth 50 through the CLI; every 152 layout is checked byte for byte by tests/test_mapping.py's pinned
# digests, and 152 parity by tests/test_convert.py.
COMBOS = [(t, f, 50) for t in ("mmaction2", "mmaction2-backbone", "torchvision", "pytorchvideo")
          for f in ("ircsn", "ipcsn") if not (t == "pytorchvideo" and f == "ipcsn")]


@pytest.mark.parametrize("target,family,depth", COMBOS)
def test_every_target_loads_strictly_and_passes_parity(vmz_pickle, cli, tmp_path, target, family, depth):
    out = tmp_path / "out.pth"
    res = cli("convert", vmz_pickle(family, depth), out, "--target", target, "--parity-clip", "8,96", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["target"] == target and summary["parity"]["passed"]
    state, meta = checkpoint.load(out)
    build_model(target, Arch(family, depth, 400)).load_state_dict(state, strict=True)
    assert meta["target"] == target
    res = cli("parity", vmz_pickle(family, depth), out, "--parity-clip", "8,64")   # re-check from the file
    assert res.exit_code == 0, res.stderr


def bn(prefix: str) -> list[str]:
    return [f"{prefix}.{a}" for a in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def torchvision_keys(family: str, depth: int) -> list[str]:
    """VMZ's PyTorch port (pt/vmz/models/csn.py, torchvision VideoResNet names), written out independently."""
    keys = ["stem.0.weight", *bn("stem.1")]
    for layer, n in enumerate(LAYERS[depth], start=1):
        for j in range(n):
            p = f"layer{layer}.{j}"
            keys += [f"{p}.conv1.0.weight", *bn(f"{p}.conv1.1")]
            if family == "ircsn":
                keys += [f"{p}.conv2.0.weight"]
            else:
                keys += [f"{p}.conv2.0.0.weight", *bn(f"{p}.conv2.0.1"), f"{p}.conv2.0.2.weight"]
            keys += [*bn(f"{p}.conv2.1"), f"{p}.conv3.0.weight", *bn(f"{p}.conv3.1")]
            if j == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def pytorchvideo_keys(depth: int) -> list[str]:
    """pytorchvideo create_csn (models/resnet.py, stem.py, head.py) names, written out independently."""
    keys = ["blocks.0.conv.weight", *bn("blocks.0.norm")]
    for stage, n in enumerate(LAYERS[depth], start=1):
        for j in range(n):
            p = f"blocks.{stage}.res_blocks.{j}"
            if j == 0:
                keys += [f"{p}.branch1_conv.weight", *bn(f"{p}.branch1_norm")]
            for part in ("a", "b", "c"):
                keys += [f"{p}.branch2.conv_{part}.weight", *bn(f"{p}.branch2.norm_{part}")]
    return keys + ["blocks.5.proj.weight", "blocks.5.proj.bias"]


@pytest.mark.parametrize("family", ["ircsn", "ipcsn"])
def test_torchvision_key_list_is_pinned(family):
    sd = build_model("torchvision", Arch(family, 152, 400)).state_dict()
    assert list(sd) == torchvision_keys(family, 152)
    assert len(sd) == {"ircsn": 932, "ipcsn": 1232}[family]
    assert tuple(sd["layer3.35.conv2.0.weight" if family == "ircsn" else "layer3.35.conv2.0.2.weight"].shape) == (256, 1, 3, 3, 3)


def test_pytorchvideo_key_list_is_pinned():
    sd = build_model("pytorchvideo", Arch("ircsn", 152, 400)).state_dict()
    assert list(sd) == pytorchvideo_keys(152)
    assert tuple(sd["blocks.4.res_blocks.0.branch1_conv.weight"].shape) == (2048, 1024, 1, 1, 1)
    assert tuple(sd["blocks.5.proj.weight"].shape) == (400, 2048)


def test_pytorchvideo_refuses_ip_csn_and_says_why(vmz_pickle, cli, tmp_path):
    res = cli("convert", vmz_pickle("ipcsn", 50), tmp_path / "o.pth", "--target", "pytorchvideo")
    assert_one_line_error(res, "pytorchvideo", "ipcsn_r50", "no interaction-preserved block")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes,dataset", [(359, "IG-65M"), (487, "Sports-1M")])
def test_pretraining_pickles_become_backbones_unless_keep_head(vmz_pickle, cli, tmp_path, classes, dataset):
    src = vmz_pickle("ircsn", 50, classes=classes)
    out = tmp_path / "bb.pth"
    assert cli("convert", src, out, "--parity-clip", "8,64").exit_code == 0
    state, meta = checkpoint.load(out)
    assert meta["target"] == "mmaction2-backbone" and not any(k.startswith(("backbone.", "cls_head.")) for k in state)
    assert meta["blobs"]["dropped"] == [f"last_out_L{classes}_b", f"last_out_L{classes}_w"]
    assert any(dataset in n for n in meta["notes"])
    build_model("mmaction2-backbone", Arch("ircsn", 50, classes)).load_state_dict(state, strict=True)
    kept = tmp_path / "full.pth"
    assert cli("convert", src, kept, "--keep-head", "--no-parity").exit_code == 0
    state, meta = checkpoint.load(kept)
    assert meta["target"] == "mmaction2" and tuple(state["cls_head.fc_cls.weight"].shape) == (classes, 2048)
    assert meta["blobs"]["dropped"] == []


def test_publish_name_is_deterministic_and_carries_the_sha(vmz_pickle, cli, tmp_path):
    names = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        res = cli("convert", vmz_pickle("ipcsn", 50), folder, "--publish", "vmz_ipcsn_r50_demo", "--date", "20261124",
                  "--json", "--parity-clip", "8,64")
        assert res.exit_code == 0, res.stderr
        out = json.loads(res.stdout)["output"]
        names.append(out.rsplit("/", 1)[-1])
        m = re.fullmatch(r"vmz_ipcsn_r50_demo_20261124-([0-9a-f]{8})\.pth", names[-1])
        assert m, names[-1]
        with open(out, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest().startswith(m.group(1))
        assert sorted(p.name for p in folder.iterdir()) == [names[-1], names[-1] + ".json"]
    assert names[0] == names[1]
    res = cli("convert", vmz_pickle("ipcsn", 50), tmp_path / "a", "--publish", "vmz_ipcsn_r50_demo", "--date", "20261124",
              "--parity-clip", "8,64")                   # the same options: the same bytes, the same name
    assert_one_line_error(res, "already exists")


def test_safetensors_metadata_parses_back_to_the_card(vmz_pickle, cli, tmp_path):
    out = tmp_path / "m.safetensors"
    assert cli("convert", vmz_pickle("ircsn", 50), out, "--parity-clip", "8,64").exit_code == 0
    state = load_file(out)
    assert len(state) == 320
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and all(isinstance(v, str) for v in meta.values())
    card = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert set(meta) == {"format", "vmzconv_meta"}              # the meta is stored once, as JSON
    measured = card.pop("parity_measured")                  # the card = the meta + the measured figures
    assert json.loads(meta["vmzconv_meta"]) == card and measured["max_abs_diff"] <= 1e-4
    assert card["arch"] == "ircsn_r50" and card["num_classes"] == 400 and card["parity"]["passed"]


def test_card_of_a_known_zoo_file(vmz_pickle, cli, tmp_path):
    src = vmz_pickle.custom("irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl", vmz_pickle.arrays("ircsn", 50))
    out = tmp_path / "zoo.pth"
    res = cli("convert", src, out, "--parity-clip", "8,64", "--print-config")
    assert res.exit_code == 0, res.stderr
    card = json.loads((tmp_path / "zoo.pth.json").read_text())
    assert card["source"]["file"] == src.name and len(card["source"]["sha256"]) == 64
    assert card["zoo"]["name"] == "vmz_ircsn_ig65m_pretrained_r50_32x2x1_58e_kinetics400_rgb"
    assert card["zoo"]["published_accuracy"] == {"mmaction2_top1": 79.0, "mmaction2_top5": 94.2}
    assert card["zoo"]["mmaction2_config_norm"] == "imagenet"
    assert card["input"]["clip_len"] == 32 and card["input"]["frame_interval"] == 2
    assert card["input"]["short_side"] == 256 and (card["input"]["num_crops"], card["input"]["num_clips"]) == (3, 10)
    assert card["parity"]["passed"] and card["arch"] == "ircsn_r50"
    assert f"load_from = '{out.resolve()}'" in res.stdout and "ActionDataPreprocessor" in res.stdout
    assert "imagenet" in res.stdout


def test_no_card(vmz_pickle, cli, tmp_path):
    assert cli("convert", vmz_pickle("ircsn", 50), tmp_path / "x.pth", "--no-card", "--no-parity").exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_cli_target_choices_come_from_the_registry(cli):
    from vmzconv.targets import TARGETS

    help_text = cli("convert", "--help").stdout
    for name in TARGETS:
        assert name in help_text
