"""`vmzconv zoo` and `vmzconv bulk`: naming, failures, reports, resumption, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmzconv import checkpoint, synth
from vmzconv.zoo import entries, lookup


def test_zoo_lists_every_released_csn_and_r2plus1d_pickle(cli):
    names = {e["file"] for e in entries()}
    assert len(names) == 59            # 21 CSN / R(2+1)D-34 / -152, 25 of models.md, 3 R(2+1)D-34 32-frame, 3 C3D, 7 AV
    for fam in ("irCSN_152", "ipCSN_152", "r2plus1d_152"):
        for kind in ("kinetics_from_scratch", "Sports1M_from_scratch", "ft_kinetics_from_Sports1M",
                     "ig65m_from_scratch", "ft_kinetics_from_ig65m"):
            assert any(n.lower().startswith(f"{fam}_{kind}_f".lower()) for n in names), (fam, kind)
    for clip in (8, 32):
        assert f"r2plus1d_34_clip{clip}_ig65m_from_scratch" in " ".join(names)
        assert lookup(f"r2plus1d_34_clip{clip}_ft_kinetics_from_ig65m%20f{128022400 if clip == 8 else 106169681}.pkl")
    assert lookup("r2plus1d_34_clip8_ig65m_from_scratch_f79708462.pkl")["classes"] == 487       # not 359
    assert lookup("r2plus1d_152_ft_kinetics_from_ig65m_f107107466.pkl")["vmz_top1"] == 81.6
    assert lookup("irCSN_152_sports1m_from_scratch_f99918785.pkl")["classes"] == 487      # spelling variant
    assert lookup("IRCSN_152_FT_KINETICS_FROM_IG65M_f126851907.pkl")["vmz_top1"] == 82.6
    assert lookup("renamed_f130601052.pkl")["name"] == "ipcsn_from_scratch_r152_ig65m"
    assert lookup("something_else.pkl") is None
    res = cli("zoo")
    assert res.exit_code == 0 and "vmz_ircsn_ig65m_pretrained_r152_32x2x1_58e_kinetics400_rgb" in res.stdout
    rows = json.loads(cli("zoo", "--json").stdout)
    ig = next(r for r in rows if r["file"] == "ipCSN_152_ft_kinetics_from_ig65m_f133090949.pkl")
    assert (ig["norm"], ig["vmz_top1"], ig["mmaction2_top1"], ig["kind"]) == ("imagenet", 82.5, 82.68, "recognizer")


@pytest.fixture(scope="module")
def bulk_src(module_dir, vmz_pickle):
    src = module_dir / "bulk_src"
    src.mkdir()
    (src / "sub").mkdir()
    links = {
        "irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl": ("ircsn", 50, 400, 0),          # fine-tuned ir-CSN
        "irCSN_50_pretrained_ig65m_f231921860.pkl": ("ircsn", 50, 359, 1),                # IG-65M pretraining
        # named like the Sports-1M ip-CSN-152 (lower-case spelling): bulk names it by the zoo; a 50 keeps it quick
        "sub/ipCSN_152_sports1m_from_scratch_f111018543.pkl": ("ipcsn", 50, 487, 2),
        "my own model.pkl": ("ipcsn", 50, 400, 3),                                         # unknown name
    }
    for name, (fam, depth, classes, seed) in links.items():
        synth.write_vmz_pickle(src / name, synth.seeded_blobs(fam, depth, classes, seed))
    data = (src / "my own model.pkl").read_bytes()
    (src / "truncated.pkl").write_bytes(data[: len(data) // 2])
    (src / "download.pkl").write_bytes(b"<!DOCTYPE html><html>Sign in to Dropbox</html>")
    return src


def bulk(*args, timeout=600):
    """`vmzconv bulk ARGS` with a small parity clip (parity runs; its size is not what these tests are about)."""
    return subprocess.run([sys.executable, "-m", "vmzconv", "bulk", *map(str, args), "--parity-clip", "8,64"],
                          capture_output=True, text=True, timeout=timeout)


EXPECTED = {
    "irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl":
        ("vmz_ircsn_ig65m_pretrained_r50_32x2x1_58e_kinetics400_rgb.pth", "mmaction2", "ircsn_r50", 400),
    "irCSN_50_pretrained_ig65m_f231921860.pkl": ("ircsn_from_scratch_r50_ig65m.pth", "mmaction2-backbone", "ircsn_r50", 359),
    "ipCSN_152_sports1m_from_scratch_f111018543.pkl":
        ("ipcsn_from_scratch_r152_sports1m.pth", "mmaction2-backbone", "ipcsn_r50", 487),
    "my own model.pkl": ("my_own_model.pth", "mmaction2", "ipcsn_r50", 400),
}


def test_bulk_converts_good_files_reports_bad_ones_and_resumes(bulk_src, tmp_path):
    out = tmp_path / "out"
    proc = bulk(bulk_src, out, "--jobs", "2")
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# vmzconv bulk report")
    rows = {Path(r["file"]).name: r for r in report["rows"]}
    assert set(rows) == set(EXPECTED) | {"truncated.pkl", "download.pkl"}
    for name, (out_name, target, arch, classes) in EXPECTED.items():
        r = rows[name]
        assert r["status"] == "converted" and Path(r["output"]).name == out_name
        assert (r["target"], r["arch"], r["classes"]) == (target, arch, classes)
        assert r["parity_max_diff"] < 1e-4
        _, meta = checkpoint.load(out / out_name)
        assert meta["target"] == target and meta["parity"]["passed"]
        assert (out / (out_name + ".json")).is_file()
    assert rows["truncated.pkl"]["status"] == "failed" and "truncated" in rows["truncated.pkl"]["reason"]
    assert "HTML page" in rows["download.pkl"]["reason"]
    for bad in ("truncated.pkl", "download.pkl"):
        assert "\n" not in rows[bad]["reason"]
        assert f"failed  {bad}:" in proc.stdout
    assert "4 converted, 0 up to date, 2 failed" in proc.stdout
    _, meta = checkpoint.load(out / "vmz_ircsn_ig65m_pretrained_r50_32x2x1_58e_kinetics400_rgb.pth")
    assert meta["zoo"]["published_accuracy"] == {"mmaction2_top1": 79.0, "mmaction2_top5": 94.2}

    # the same command again converts nothing and says so
    proc = bulk(bulk_src, out, "--jobs", "1")
    assert proc.returncode == 1 and "0 converted, 4 up to date, 2 failed" in proc.stdout
    # new bytes in one source reconvert just that one
    synth.write_vmz_pickle(bulk_src / "my own model.pkl", synth.seeded_blobs("ipcsn", 50, 400, 99))
    proc = bulk(bulk_src, out, "--jobs", "1")
    report = json.loads((out / "report.json").read_text())
    status = {Path(r["file"]).name: r["status"] for r in report["rows"]}
    assert status["my own model.pkl"] == "converted"
    assert [s for n, s in status.items() if n in EXPECTED and n != "my own model.pkl"] == ["up-to-date"] * 3
    assert not list(out.glob(".*.tmp"))


def test_bulk_of_good_files_only_says_nothing_to_do(vmz_pickle, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.link(vmz_pickle("ircsn", 50), src / "a.pkl")
    out = tmp_path / "out"
    assert bulk(src, out, "--jobs", "1").returncode == 0
    proc = bulk(src, out, "--jobs", "1")
    assert proc.returncode == 0 and "nothing to do: all 1 outputs are up to date" in proc.stdout


def test_manifest_sets_names_targets_and_arch(vmz_pickle, tmp_path):
    manifest = tmp_path / "files.toml"
    manifest.write_text(f'[[file]]\npath = "{vmz_pickle("ircsn", 50)}"\nname = "custom_tv"\ntarget = "torchvision"\n'
                        f'arch = "ircsn_r50"\n')
    out = tmp_path / "out"
    proc = bulk(manifest, out, "--jobs", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state, meta = checkpoint.load(out / "custom_tv.pth")
    assert meta["target"] == "torchvision" and "stem.0.weight" in state


def test_sigkill_mid_run_then_rerun_completes_cleanly(vmz_pickle, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        synth.write_vmz_pickle(src / f"m{i}.pkl", synth.seeded_blobs("ircsn", 50, 400, i))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "1",
                             "--parity-clip", "8,64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.pth.json")):
        time.sleep(0.05)
    assert list(out.glob("*.pth.json")), "no file finished in time"
    time.sleep(0.3)                                   # let it get into the next file
    os.killpg(proc.pid, signal.SIGKILL)               # the run and its worker, no clean-up
    proc.wait()
    finished = {p.name for p in out.glob("*.pth")}
    assert len(finished) == 1
    for p in out.glob("*.pth"):                       # whatever is there under a final name is complete
        checkpoint.load(p)
    rerun = bulk(src, out, "--jobs", "1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 0 and report["up_to_date"] >= 1 and report["converted"] + report["up_to_date"] == 2
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    for i in range(2):
        state, meta = checkpoint.load(out / f"m{i}.pth")
        assert meta["parity"]["passed"] and len(state) == 320


def test_the_bulk_parent_never_imports_torch(tmp_path):
    """Workers pay for `import torch`; the coordinating process must not (it would serialise ~1 s).
    A child plans and runs a real bulk conversion, then checks its own sys.modules."""
    code = f"""
import sys
from pathlib import Path
from vmzconv import bulk, synth, cli
src, out = Path({str(tmp_path / 'src')!r}), Path({str(tmp_path / 'out')!r})
src.mkdir()
synth.write_vmz_pickle(src / "m.pkl", synth.seeded_blobs("ircsn", 50))
rows = bulk.run(bulk.plan(src, out), out, n_jobs=1)
assert [r.status for r in rows] == ["converted"], rows
print(bulk.render_text(rows, out))
assert "torch" not in sys.modules, "torch imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    assert (tmp_path / "out" / "m.pth").is_file()


def test_manifest_names_cannot_escape_the_output_folder(vmz_pickle, tmp_path):
    manifest = tmp_path / "files.toml"
    manifest.write_text(f'[[file]]\npath = "{vmz_pickle("ircsn", 50)}"\nname = "../escaped"\n')
    proc = bulk(manifest, tmp_path / "out", "--jobs", "1")
    assert proc.returncode == 2 and "no folders" in proc.stderr
    assert not (tmp_path / "escaped.pth").exists()


def test_bulk_converts_this_sessions_families_in_one_folder(tmp_path):
    """An audio-visual R(2+1)D-18 (zoo-named, G-Blend), an optical-flow R(2+1)D-18 and an MC3-10 in one folder:
    each converted with parity in its family's layout."""
    src = tmp_path / "src"
    src.mkdir()
    synth.write_vmz_pickle(src / "av.pkl", synth.seeded_blobs("av_r2plus1d", 18))
    synth.write_vmz_pickle(src / "flow.pkl", synth.seeded_blobs("r2plus1d", 18, in_channels=2))
    synth.write_vmz_pickle(src / "mc3_d10.pkl", synth.seeded_blobs("mc3", 10))
    proc = bulk(src, tmp_path / "out", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {Path(r["file"]).name: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["rows"]}
    assert {n: (r["arch"], r["target"], r["status"]) for n, r in rows.items()} == {
        "av.pkl": ("av_r2plus1d_r18", "av", "converted"), "flow.pkl": ("r2plus1d_r18", "torchvision", "converted"),
        "mc3_d10.pkl": ("mc3_r10", "torchvision", "converted")}
    _, meta = checkpoint.load(tmp_path / "out" / "flow.pth")
    assert meta["modality"] == "optical flow, 2 channels" and meta["parity"]["passed"]
