"""Wrong files get a one-line message of their own: the downloads people mistake for a VMZ pickle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vmzconv import synth
from vmzconv.blobs import read_blobs
from vmzconv.errors import InputError

from .conftest import assert_one_line_error, blobs_from_bytes, convert_fails


def wrong(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_html_page(cli, tmp_path):
    p = wrong(tmp_path, "irCSN_152.pkl", b"\n  <!DOCTYPE html>\n<html><head><title>Dropbox</title></head></html>")
    assert_one_line_error(cli("inspect", p), "this looks like an HTML page, not a pickle — was the download a web page?")


def test_empty_file(cli, tmp_path):
    assert_one_line_error(cli("inspect", wrong(tmp_path, "e.pkl", b"")), "the file is empty")


def test_zip_torch_save_renamed_pkl(cli, tmp_path):
    p = tmp_path / "model.pkl"
    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.zeros(2)}, "meta": {}}, p)
    assert_one_line_error(cli("inspect", p), "this is a PyTorch checkpoint (torch.save zip), not a Caffe2 pickle")


def test_our_own_pth_output_as_input(vmz_pickle, cli, tmp_path):
    out = tmp_path / "converted.pth"
    assert cli("convert", vmz_pickle("ircsn", 50), out, "--no-parity").exit_code == 0
    assert_one_line_error(cli("convert", out, tmp_path / "again.pth"), "PyTorch checkpoint")


def test_legacy_torch_save(cli, tmp_path):
    p = tmp_path / "legacy.pkl"
    torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
    assert_one_line_error(cli("inspect", p), "legacy PyTorch checkpoint")


def test_plain_pickle_of_torch_tensors(cli, tmp_path):
    p = wrong(tmp_path, "t.pkl", pickle.dumps({"conv1_w": torch.zeros(2)}, protocol=2))
    assert_one_line_error(cli("inspect", p), "this is a PyTorch checkpoint (pickled torch objects")


def test_mmaction2_state_dict_as_plain_pickle(cli, tmp_path):
    p = wrong(tmp_path, "sd.pkl", synth.dumps_py2({"state_dict": {"backbone.x": np.zeros(2, np.float32)},
                                                   "meta": {"a": np.zeros(1, np.float32)}}))
    assert_one_line_error(cli("inspect", p), "PyTorch/MMAction2 state dict")


def test_feature_extraction_output(cli, tmp_path):
    feats = {"final_avg": np.zeros((4, 2048), np.float32), "softmax": np.zeros((4, 400), np.float32),
             "label": np.zeros(4, np.int64), "video_id": np.arange(4, dtype=np.int64)}
    p = wrong(tmp_path, "features.pkl", synth.dumps_py2(feats))
    assert_one_line_error(cli("inspect", p), "VMZ feature-extraction output", "final_avg")


def test_broken_audio_visual_model(cli, tmp_path):
    """A file with v_/a_ blobs but no joint head, and a wrong a_conv1: one line each, nothing written."""
    blobs = {("v_" + k if not k.startswith("last_out") else "v_" + k): v
             for k, v in synth.seeded_blobs("ipcsn", 50).items() if k.startswith(("conv1", "comp_0_", "last_out"))}
    blobs["a_conv1_w"] = np.zeros((64, 1, 3, 3), np.float32)
    p = wrong(tmp_path, "g_b_ip_csn_152_kinetics.pkl", synth.dumps_py2({"blobs": blobs}))
    res = cli("convert", p, tmp_path / "o.pth")
    assert_one_line_error(res, "g_b_ip_csn_152_kinetics.pkl", "classifier blob last_out_L<N>_w")
    blobs["last_out_L400_w"], blobs["last_out_L400_b"] = np.zeros((400, 4096), np.float32), np.zeros(400, np.float32)
    p = wrong(tmp_path, "g_b_ip_csn_152_kinetics.pkl", synth.dumps_py2({"blobs": blobs}))
    res = cli("convert", p, tmp_path / "o.pth")
    assert_one_line_error(res, "audio-visual VMZ model", "a_conv1_w is [64, 1, 3, 3]", "[16, 1, 3, 3]")
    assert not (tmp_path / "o.pth").exists()


def test_max_bytes_limit(vmz_pickle, cli, tmp_path):
    src = vmz_pickle("ircsn", 50)
    res = cli("inspect", src, "--max-bytes", str(src.stat().st_size // 2))
    assert_one_line_error(res, "--max-bytes")
    assert cli("inspect", src).exit_code == 0


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html><body>Dropbox</body></html>", "HTML page"),
    (b"just some notes\n", "text file"),
    (b"\x93NUMPY\x01\x00", ".npy"),
])
def test_wrong_files_are_named(data, fragment):
    with pytest.raises(InputError, match=fragment):
        blobs_from_bytes(data, "w.pkl")


def test_torch_save_file_is_named(tmp_path):
    import torch

    path = tmp_path / "model.pkl"
    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.ones(1)}}, path)
    with pytest.raises(InputError, match="PyTorch checkpoint"):
        read_blobs(path)


def test_not_a_pickle(cli, tmp_path_factory, tmp_path):
    src = tmp_path_factory.mktemp("in") / "page.pkl"
    src.write_bytes(b"<html><head><title>Dropbox - Error</title></head></html>")
    convert_fails(cli, src, tmp_path, "page.pkl", "HTML page")
    src.write_bytes(bytes(range(256)) * 4)
    convert_fails(cli, src, tmp_path, "page.pkl", "not a readable pickle")
