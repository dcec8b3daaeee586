"""R(2+1)D and R3D, depths 18-152: detection, bit-identical conversion in every layout that can hold
them, genuine-Caffe2-anchored parity, pinned key lists, and the faults parity must catch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from vmzconv import checkpoint, mapping, parity, reference, synth
from vmzconv.arch import Arch, detect
from vmzconv.blobs import Blobs, read_blobs
from vmzconv.convert import map_blobs
from vmzconv.errors import ArchError, MappingError
from vmzconv.models import build_model, fill, logits

from .conftest import GOLDEN, assert_one_line_error, golden_blobs

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# VMZ's blob counts (stem + blocks + projections + FC), from its construction rules.
BLOBS = {("r2plus1d", 18): 187, ("r2plus1d", 34): 347, ("r2plus1d", 50): 352, ("r2plus1d", 101): 692,
         ("r2plus1d", 152): 1032, ("r3d", 18): 102, ("r3d", 34): 182, ("r3d", 50): 267, ("r3d", 101): 522,
         ("r3d", 152): 777}
LAYOUTS = {"r2plus1d": ("torchvision",), "r3d": ("torchvision", "mmaction2", "mmaction2-backbone")}
BN = (("weight", "_s"), ("bias", "_b"), ("running_mean", "_rm"), ("running_var", "_riv"))


def expected_sources(family: str, depth: int, target: str, classes: int = 400) -> dict[str, str]:
    """key -> VMZ blob, written out from VMZ's naming and each library's module names (not from mappings/)."""
    tv = target == "torchvision"
    pre = "" if tv or target == "mmaction2-backbone" else "backbone."
    out: dict[str, str] = {}

    def conv(key, blob):
        out[pre + key + (".weight" if tv else ".conv.weight")] = blob

    def bn(key, blob):
        for attr, sfx in BN:
            out[pre + key + ("" if tv else ".bn") + "." + attr] = blob + sfx

    if family == "r2plus1d":
        for i, blob in ((0, "conv1_middle"), (3, "conv1")):      # R2Plus1dStem: conv, BN, ReLU, conv, BN, ReLU
            out[f"stem.{i}.weight"] = blob + "_w"
            for attr, sfx in BN:
                out[f"stem.{i + 1}.{attr}"] = blob + "_spatbn_relu" + sfx
    else:
        conv("stem.0" if tv else "conv1", "conv1_w")
        bn("stem.1" if tv else "conv1", "conv1_spatbn_relu")
    simple = depth in (18, 34)
    c = 0
    for layer, n in enumerate(LAYERS[depth], start=1):
        for j in range(n):
            p, b = f"layer{layer}.{j}", f"comp_{c}_"
            if family == "r2plus1d":
                convs = ((1, True), (2, True)) if simple else ((1, False), (2, True), (3, False))
                for k, two_plus_one in convs:
                    if two_plus_one:
                        conv(f"{p}.conv{k}.0.0", f"{b}conv_{k}_middle_w")
                        bn(f"{p}.conv{k}.0.1", f"{b}spatbn_{k}_middle")
                        conv(f"{p}.conv{k}.0.3", f"{b}conv_{k}_w")
                    else:
                        conv(f"{p}.conv{k}.0", f"{b}conv_{k}_w")
                    bn(f"{p}.conv{k}.1", f"{b}spatbn_{k}")
            else:
                for k in ((1, 2) if simple else (1, 2, 3)):
                    conv(f"{p}.conv{k}" + (".0" if tv else ""), f"{b}conv_{k}_w")
                    bn(f"{p}.conv{k}" + (".1" if tv else ""), f"{b}spatbn_{k}")
            if j == 0 and (layer > 1 or not simple):
                conv(f"{p}.downsample" + (".0" if tv else ""), f"shortcut_projection_{c}_w")
                bn(f"{p}.downsample" + (".1" if tv else ""), f"shortcut_projection_{c}_spatbn")
            c += 1
    if target != "mmaction2-backbone":
        head = "fc" if tv else "cls_head.fc_cls"
        out.update({f"{head}.weight": f"last_out_L{classes}_w", f"{head}.bias": f"last_out_L{classes}_b"})
    return out


def keys_with_counters(sources: dict[str, str]) -> list[str]:
    """The ordered state_dict keys: num_batches_tracked after each BN's running_var."""
    keys = []
    for k in sources:
        keys.append(k)
        if k.endswith("running_var"):
            keys.append(k[: -len("running_var")] + "num_batches_tracked")
    return keys


def check_bit_identical(state, family, depth, target, arrays):
    sources = expected_sources(family, depth, target)
    assert list(state) == keys_with_counters(sources)
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            assert tensor.item() == 0
            continue
        assert tensor.dtype == torch.float32 and tensor.numpy().tobytes() == arrays[sources[key]].tobytes(), key
    used = set(sources.values()) | ({"last_out_L400_w", "last_out_L400_b"} if target == "mmaction2-backbone" else set())
    assert used == set(arrays) and len(arrays) == BLOBS[family, depth]


@pytest.mark.parametrize("family,depth", [
    ("r2plus1d", 18), ("r2plus1d", 50), ("r3d", 18), ("r3d", 50),
    *(pytest.param(f, d, marks=pytest.mark.slow) for f in ("r2plus1d", "r3d") for d in (34, 101)),
    pytest.param("r2plus1d", 152, marks=pytest.mark.slow), pytest.param("r3d", 152, marks=pytest.mark.slow),
])
def test_every_new_arch_converts_bit_identically_in_every_layout(vmz_pickle, cli, tmp_path, family, depth):
    """The Python-2 pickle through the CLI into the family's default layout (torchvision); the other
    layouts through the same read -> map path in memory (the pickle's bytes are the same)."""
    src = vmz_pickle(family, depth)
    arrays = vmz_pickle.arrays(family, depth)
    out = tmp_path / "out.pth"
    args = ["--parity-clip", "8,112"] if depth == 18 else ["--parity-clip", "8,32"] if depth <= 50 else ["--no-parity"]
    res = cli("convert", src, out, "--json", *args)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["arch"] == f"{family}_r{depth}" and summary["target"] == "torchvision"
    assert summary["blobs_converted"] == BLOBS[family, depth]
    state, meta = checkpoint.load(out)
    check_bit_identical(state, family, depth, "torchvision", arrays)
    assert meta["family"] == family and meta["depth"] == depth
    assert "--no-parity" in args or (summary["parity"]["passed"] and meta["parity"]["passed"])
    blobs = read_blobs(src)
    for target in LAYOUTS[family][1:]:
        check_bit_identical(map_blobs(blobs, detect(blobs), target)[2].state_dict, family, depth, target, arrays)


@pytest.mark.parametrize("family,target", [(f, t) for f in LAYOUTS for t in LAYOUTS[f]])
def test_genuine_caffe2_logits_are_reproduced(vmz_pickle, cli, tmp_path, family, target):
    caffe2 = np.load(GOLDEN / f"{family}_r18_L400.caffe2_logits.npy")
    src = vmz_pickle.custom(f"golden_{family}.pkl", golden_blobs(family, 18))
    out = tmp_path / "g.pth"
    res = cli("convert", src, out, "--target", target, "--no-parity")      # the logits are compared here
    assert res.exit_code == 0, res.stderr
    clip = parity.fixed_clip(8, 112)
    blobs = read_blobs(src)
    ref = reference.forward(blobs.arrays, family, 18, 400, clip)
    assert np.abs(ref - caffe2).max() <= 1e-5                    # logits ~0.25: compare absolutely
    from vmzconv.load import load_converted

    conv = load_converted(out)
    head = None if conv.target.has_head else {"head.weight": blobs["last_out_L400_w"], "head.bias": blobs["last_out_L400_b"]}
    assert np.abs(logits(conv.model, clip, head) - caffe2).max() <= 1e-5


def test_default_target_and_refusals(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("r2plus1d", 18)
    res = cli("convert", src, tmp_path / "a.pth", "--json", "--no-parity", "--keep-head")
    assert res.exit_code == 0 and json.loads(res.stdout)["target"] == "torchvision"     # --keep-head: no change
    for target, why in (("mmaction2", "Conv2plus1d"), ("mmaction2-backbone", "biases"),
                        ("pytorchvideo", "temporal conv before the spatial one")):
        assert_one_line_error(cli("convert", src, tmp_path / "b.pth", "--target", target), "r2plus1d_r18", why)
    assert_one_line_error(cli("convert", vmz_pickle("r3d", 18), tmp_path / "c.pth", "--target", "pytorchvideo"),
                          "r3d_r18", "conv_a")
    assert not (tmp_path / "b.pth").exists() and not (tmp_path / "c.pth").exists()


@pytest.mark.parametrize("family,depth,target", [("r2plus1d", 34, "torchvision"), ("r3d", 50, "torchvision"),
                                                 ("r3d", 50, "mmaction2")])
def test_pinned_key_lists(family, depth, target):
    sd = build_model(target, Arch(family, depth, 400), empty=True).state_dict()
    assert list(sd) == keys_with_counters(expected_sources(family, depth, target))
    if family == "r2plus1d":     # VMZ's middle width per conv: 288 in layer2.0.conv2, where torchvision's block gives 230
        assert tuple(sd["layer2.0.conv1.0.0.weight"].shape) == (230, 64, 1, 3, 3)
        assert tuple(sd["layer2.0.conv2.0.0.weight"].shape) == (288, 128, 1, 3, 3)
        assert tuple(sd["stem.0.weight"].shape) == (45, 3, 1, 7, 7)


@pytest.mark.parametrize("family,depth", [(f, d) for f in ("r2plus1d", "r3d") for d in LAYERS])
def test_detection_of_every_arch(family, depth):
    a = detect(Blobs("m.pkl", synth.seeded_blobs(family, depth, 487)))
    assert (a.name, a.num_classes, a.conv1_kt) == (f"{family}_r{depth}", 487, 3)


def test_detection_reads_the_stem_kernel_and_the_class_count():
    a = detect(Blobs("m.pkl", synth.seeded_blobs("r2plus1d", 34, 359, conv1_kt=5)))
    assert (a.name, a.num_classes, a.conv1_kt) == ("r2plus1d_r34", 359, 5)


def _mixed(kts_by_layer, conv1_kt):
    """An R3D-18-shaped blob set whose 3x3 convs have the given temporal kernel per group."""
    arrays = synth.seeded_blobs("r3d", 18)
    arrays["conv1_w"] = np.zeros((64, 3, conv1_kt, 7, 7), np.float32)
    c = 0
    for layer, n in enumerate(LAYERS[18]):
        for _ in range(n):
            for k in (1, 2):
                w = arrays[f"comp_{c}_conv_{k}_w"]
                arrays[f"comp_{c}_conv_{k}_w"] = np.zeros(w.shape[:2] + (kts_by_layer[layer], 3, 3), np.float32)
            c += 1
    return arrays


@pytest.mark.parametrize("kts,conv1_kt,found", [
    ((1, 1, 1, 1), 1, {"r2df_r18"}),                     # (R2D on 1-frame clips: the same ops)
    ((1, 1, 1, 1), 3, {"r2d_r18", "mc2_r18"}),           # every shape shared: --arch decides
    ((1, 1, 1, 1), 8, {"r2d_r18"}),
    ((3, 3, 1, 1), 3, {"mc4_r18"}),
    ((1, 1, 3, 3), 1, {"rmc4_r18"}),
    ((3, 3, 3, 3), 1, {"rmc2_r18"}),
    ((3, 3, 3, 3), 3, {"r3d_r18"}),
])
def test_the_2018_families_are_told_apart_by_stage_kernels(kts, conv1_kt, found):
    from vmzconv.arch import candidates

    blobs = Blobs("m.pkl", _mixed(kts, conv1_kt))
    assert {a.name for a in candidates(blobs)} == found
    if len(found) > 1:
        with pytest.raises(ArchError, match="every blob shape fits both .* pass --arch"):
            detect(blobs)


def test_an_incomplete_c3d_is_named_and_a_flow_stem_is_read():
    with pytest.raises(ArchError, match=re.escape("blob 'fc6_w' has shape missing, VMZ's C3D has")):
        detect(Blobs("old.pkl", {"conv1a_w": np.zeros((64, 3, 3, 3, 3), np.float32)}))
    flow = dict(synth.seeded_blobs("r2plus1d", 18), conv1_middle_w=np.zeros((45, 2, 1, 7, 7), np.float32))
    assert detect(Blobs("flow.pkl", flow)).in_channels == 2                 # optical flow (tests/test_flow.py)
    folded = dict(synth.seeded_blobs("r2plus1d", 18), conv1_middle_w=np.zeros((45, 6, 1, 7, 7), np.float32))
    with pytest.raises(ArchError, match="frames folded into channels"):
        detect(Blobs("f.pkl", folded))


# -- faults parity must catch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def r21d18():
    blobs = Blobs("r21d.pkl", synth.seeded_blobs("r2plus1d", 18))
    a = detect(blobs)
    return blobs, a, map_blobs(blobs, a, "torchvision")[2].state_dict


def _fails(blobs, a, model):
    v = parity.run(blobs, a, model, clip_size=(8, 112))
    assert not v.passed and "exceeds" in v.reason, v.summary()


def test_bn_eps_1e5_fails_parity(r21d18):
    blobs, a, state = r21d18
    _fails(blobs, a, fill(build_model("torchvision", a, empty=True, bn_eps=1e-5), state))


def test_pool1_added_fails_parity(r21d18):
    blobs, a, state = r21d18
    _fails(blobs, a, fill(build_model("torchvision", a, empty=True, pool=True), state))


def test_missing_relu_after_a_middle_bn_fails_parity(r21d18):
    blobs, a, state = r21d18
    model = fill(build_model("torchvision", a, empty=True), state)
    assert isinstance(model.layer3[1].conv1[0][2], nn.ReLU)
    model.layer3[1].conv1[0][2] = nn.Identity()
    _fails(blobs, a, model)


def test_extra_relu_after_a_simple_blocks_last_bn_fails_parity(r21d18):
    blobs, a, state = r21d18
    model = fill(build_model("torchvision", a, empty=True), state)
    assert len(model.layer2[1].conv2) == 2                     # builder, BN: no ReLU before the sum
    model.layer2[1].conv2.append(nn.ReLU())
    _fails(blobs, a, model)


def test_torchvisions_per_block_middle_width_is_a_one_line_shape_error(vmz_pickle, cli, tmp_path, r21d18):
    """torchvision's r2plus1d_18 gives a block one middle width from its input (230 in layer2.0.conv2,
    VMZ: 288): VMZ's weights do not fit, and a port built that way is answered with both shapes."""
    blobs, a, _ = r21d18
    model = build_model("torchvision", a, empty=True)
    with torch.device("meta"):
        model.layer2[0].conv2[0] = nn.Sequential(nn.Conv3d(128, 230, (1, 3, 3), bias=False), nn.BatchNorm3d(230),
                                                 nn.ReLU(), nn.Conv3d(230, 128, (3, 1, 1), bias=False))
    table = mapping.load_table(mapping.builtin_table_path("r2plus1d", "torchvision"))
    with pytest.raises(MappingError, match=re.escape("blob 'comp_2_conv_2_middle_w' has shape [288, 128, 1, 3, 3], "
                                                     "layer2.0.conv2.0.0.weight needs [230, 128, 1, 3, 3]")):
        mapping.apply(table, a, blobs, model.state_dict())
    port = {k: torch.zeros(v.shape) if v.is_floating_point() else torch.zeros((), dtype=torch.long)
            for k, v in model.state_dict().items()}
    torch.save(port, tmp_path / "stock_torchvision_port.pth")
    res = cli("parity", vmz_pickle("r2plus1d", 18), tmp_path / "stock_torchvision_port.pth")
    assert_one_line_error(res, "'layer2.0.conv2.0.0.weight' [230, 128, 1, 3, 3] vs [288, 128, 1, 3, 3] in the model")


# -- inspect, zoo, bulk ---------------------------------------------------------------------------


def test_inspect_json_names_the_arch_and_classes(vmz_pickle, cli):
    rep = json.loads(cli("inspect", vmz_pickle("r2plus1d", 34, classes=487), "--json").stdout)
    assert rep["arch"] == "r2plus1d_r34" and rep["num_classes"] == 487 and rep["parameter_blobs"] == 347
    rep = json.loads(cli("inspect", vmz_pickle("r3d", 50), "--json").stdout)
    assert rep["arch"] == "r3d_r50" and rep["num_classes"] == 400 and not any(rep["suspicious"].values())


def test_zoo_card_of_a_released_r2plus1d_name(vmz_pickle, cli, tmp_path):
    arrays = synth.seeded_blobs("r2plus1d", 34, 400)
    src = vmz_pickle.custom("r2plus1d_34_clip32_ft_kinetics_from_ig65m_ f106169681.pkl", arrays)
    out = tmp_path / "r34.pth"
    assert cli("convert", src, out, "--no-parity").exit_code == 0
    card = json.loads((tmp_path / "r34.pth.json").read_text())
    assert card["zoo"]["published_accuracy"] == {"vmz_top1": 80.0, "vmz_top5": 94.2}
    assert card["input"]["clip_len"] == 32 and card["input"]["resize"] == [171, 128]
    assert card["input"]["crop_size"] == 112 and card["input"]["num_crops"] == 1 and card["input"]["protocol"] == "vmz"


@pytest.mark.slow
def test_bulk_converts_a_mixed_folder(vmz_pickle, tmp_path):
    """Three families through one manifest; two inputs share a base name (rows show their paths relative
    to the input), and no lock file is left behind."""
    import subprocess
    import sys

    src = tmp_path / "src"
    for name, fam, depth in (("a/model.pkl", "ircsn", 50), ("b/model.pkl", "r2plus1d", 18), ("r3d.pkl", "r3d", 18)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        synth.write_vmz_pickle(src / name, synth.seeded_blobs(fam, depth))
    manifest = tmp_path / "files.toml"
    manifest.write_text('[[file]]\npath = "src/a/model.pkl"\nname = "csn"\n[[file]]\npath = "src/b/model.pkl"\n'
                        'name = "r21d"\n[[file]]\npath = "src/r3d.pkl"\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vmzconv", "bulk", str(manifest), str(out), "--jobs", "2",
                           "--parity-clip", "8,64"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    got = {r["output"].rsplit("/", 1)[-1]: (r["arch"], r["target"], r["status"]) for r in report["rows"]}
    assert got == {"csn.pth": ("ircsn_r50", "mmaction2", "converted"),
                   "r21d.pth": ("r2plus1d_r18", "torchvision", "converted"),
                   "r3d.pth": ("r3d_r18", "torchvision", "converted")}
    assert "a/model.pkl" in proc.stdout and "b/model.pkl" in proc.stdout
    assert not (out / ".vmzconv-bulk.lock").exists()
