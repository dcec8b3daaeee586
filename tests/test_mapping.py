"""The mapping engine's own error paths, and the pin that the registry refactor changed no byte."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from vmzconv import mapping, synth
from vmzconv.arch import Arch
from vmzconv.blobs import Blobs
from vmzconv.convert import map_blobs
from vmzconv.errors import InputError, MappingError

# sha256 over (key, shape, dtype, bytes) of every entry, in order, of the state_dict that the code
# before the family/target registry wrote from synth.seeded_blobs(family, depth, 400, seed 0).
PINNED = {
    "ipcsn_r101/mmaction2": (824, "07d90c9efb0ceb9c158b5131bfe33e6c4ce876ef6fc222dd46ea56a4c94badac"),
    "ipcsn_r101/mmaction2-backbone": (822, "f83aeb89dc8f91454b3cc4754c0375413a248050638431aec69314bca79f247c"),
    "ipcsn_r101/torchvision": (824, "5d3785cb001c5d0a88fedc053f9b1f498d8754a5a7b3527746dc97d6cc15821b"),
    "ipcsn_r152/mmaction2": (1232, "83aa790dc732875e509427fd43ef34ca19fe8482e2b7bfc617997084c5760b42"),
    "ipcsn_r152/mmaction2-backbone": (1230, "03139ba9ca232ad64dba33b3523637b42dd79b813667db971c197cde486f9f7c"),
    "ipcsn_r152/torchvision": (1232, "a4e6016cb081a2808c1b410e44c4ced977dfd915b5a87036263b735281f052c7"),
    "ipcsn_r50/mmaction2": (416, "6ef9b880c4cf1932251aae6ad92f9302eb153f80ab1f5e41a52a72f505bb59ad"),
    "ipcsn_r50/mmaction2-backbone": (414, "2f60e9ca6f40df727b29b2427abec233fe9b57e5b34157cb49c48552d84b7eb5"),
    "ipcsn_r50/torchvision": (416, "5b0f14e3c3e4010537ad1564852397e4765401040bda9139c1edc355a29b7da1"),
    "ircsn_r101/mmaction2": (626, "029db932c3b34c8c357c275f28911a7b6487537f77df0c59bce443f7f313885b"),
    "ircsn_r101/mmaction2-backbone": (624, "c8a88a7ecba1f3f0aeb32c2c20e92ba88732496f88966700b796c53762cfe187"),
    "ircsn_r101/pytorchvideo": (626, "f3a7fecdb40ecd0c640655d18d4d0a79307cdb2a927ef6a3d3cb68e5ff91afb1"),
    "ircsn_r101/torchvision": (626, "c009755d9ecebea48aefb5147cf65a5743cc9d2cb217a62d04da02d27d31c56c"),
    "ircsn_r152/mmaction2": (932, "13d7738a965f074c0e74e5da372cd823c934f65c0e20139230cb9a5484b61ad6"),
    "ircsn_r152/mmaction2-backbone": (930, "2a66bf8958ce92c0fc82720f7527782545928b2ffbcf63ab511f19c483491c83"),
    "ircsn_r152/pytorchvideo": (932, "808a8bb238c56fa73f7d643e2bf608a2cfab996e6a2c6a3a0a6d0c7b857433ed"),
    "ircsn_r152/torchvision": (932, "605ee419c2992a56224a1b88ba738599dee732d729aee82bd27c2f21cab9d8e5"),
    "ircsn_r50/mmaction2": (320, "83213443d3d2beddc0b06bf4322f9b7d50edabaed526753e78ea7b2a928664ba"),
    "ircsn_r50/mmaction2-backbone": (318, "acfe5db96980bf8d31d297aa789b694c9c6994bf9c1fbaf2e8ca10d7296d37e6"),
    "ircsn_r50/pytorchvideo": (320, "b17dab2ba8a2ddbc8e82d9b13769d33a0f09a55a83a6b8374d59765b8527b6a6"),
    "ircsn_r50/torchvision": (320, "68266d0c1b291ff59669548f65f1dccfb510d06d892407f00a70de277d68e9b1"),
}


def digest(state) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode() + b"\0" + repr(tuple(v.shape)).encode() + str(v.dtype).encode() + b"\0")
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("arch", sorted({k.split("/")[0] for k in PINNED}))
def test_every_csn_layout_writes_the_pinned_bytes(arch):
    family, depth = arch.split("_r")
    blobs = Blobs("pin.pkl", synth.seeded_blobs(family, int(depth), 400, 0))
    for key, (count, sha) in PINNED.items():
        if key.startswith(arch + "/"):
            _, _, mapped = map_blobs(blobs, Arch(family, int(depth), 400), key.split("/")[1])
            assert (len(mapped.state_dict), digest(mapped.state_dict)) == (count, sha), key


@pytest.fixture(scope="module")
def ir50():
    return Blobs("m.pkl", synth.seeded_blobs("ircsn", 50)), Arch("ircsn", 50, 400)


def table_with(tmp_path, text: str, name="t.toml"):
    path = tmp_path / name
    path.write_text(text)
    return mapping.load_table(path)


def edited_table(tmp_path, old: str, new: str, target="mmaction2"):
    text = mapping.builtin_table_path("ircsn", target).read_text()
    assert old in text
    return table_with(tmp_path, text.replace(old, new))


def expected(a: Arch, target="mmaction2"):
    from vmzconv.models import build_model

    return build_model(target, a, empty=True).state_dict()


def test_unknown_template_field(tmp_path, ir50):
    blobs, a = ir50
    t = edited_table(tmp_path, '"comp_{i}_conv_1_w"', '"comp_{k}_conv_1_w"')
    with pytest.raises(MappingError, match=r"template 'comp_\{k\}_conv_1_w' uses an unknown variable"):
        mapping.apply(t, a, blobs, expected(a))


def test_entry_filled_twice(tmp_path, ir50):
    blobs, a = ir50
    t = edited_table(tmp_path, '"comp_{i}_conv_4_w" = "backbone.layer{L}.{j}.conv3.conv.weight"',
                     '"comp_{i}_conv_4_w" = "backbone.layer{L}.{j}.conv1.conv.weight"')
    with pytest.raises(MappingError, match="is filled twice"):
        mapping.apply(t, a, blobs, expected(a))


def test_entry_the_model_does_not_have(tmp_path, ir50):
    blobs, a = ir50
    t = edited_table(tmp_path, '"backbone.layer{L}.{j}.conv3.conv.weight"', '"backbone.layer{L}.{j}.conv9.conv.weight"')
    with pytest.raises(MappingError, match="model has no entry 'backbone.layer1.0.conv9.conv.weight'"):
        mapping.apply(t, a, blobs, expected(a))


def test_unknown_value_form_and_unknown_section(tmp_path, ir50):
    blobs, a = ir50
    t = edited_table(tmp_path, '"conv1_w" = "backbone.conv1.conv.weight"', '"conv1_w" = { copy = "x" }')
    with pytest.raises(MappingError, match="unknown value"):
        mapping.apply(t, a, blobs, expected(a))
    with pytest.raises(MappingError, match="unknown sections"):
        table_with(tmp_path, 'family = "ircsn"\ntarget = "mmaction2"\n[extras]\n"a" = "b"\n', "u.toml")
    with pytest.raises(MappingError, match="not valid TOML"):
        table_with(tmp_path, "family = ", "bad.toml")


def test_refused_leftover_is_named(ir50):
    blobs, a = ir50
    arrays = dict(blobs.arrays, pred_logit_w=np.ones(400, np.float32), pred_logit_b=np.zeros(400, np.float32))
    t = mapping.load_table(mapping.builtin_table_path("ircsn", "mmaction2"))
    with pytest.raises(InputError, match="'pred_logit_.': multi-label ElementwiseLinear head"):
        mapping.apply(t, a, Blobs("ml.pkl", arrays), expected(a))


def test_table_for_another_target_or_family(vmz_pickle, cli, tmp_path, ir50):
    from .conftest import assert_one_line_error

    tv = mapping.builtin_table_path("ircsn", "torchvision")
    res = cli("convert", vmz_pickle("ircsn", 50), tmp_path / "o.pth", "--target", "mmaction2", "--mapping", tv)
    assert_one_line_error(res, "ircsn.torchvision.toml is for target torchvision, not mmaction2")
    blobs, a = ir50
    ip = mapping.load_table(mapping.builtin_table_path("ipcsn", "mmaction2"))
    with pytest.raises(MappingError, match="is for ipcsn, the blobs are ircsn_r50"):
        mapping.apply(ip, a, blobs, expected(a))


def test_verify_and_load_do_not_import_convert():
    code = ("import sys, vmzconv.verify.runner, vmzconv.load, vmzconv.inference; "
            "assert 'vmzconv.convert' not in sys.modules, 'convert imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
