"""VMZ's audio-visual models (c2/lib/models/audio_visual_model.py): genuine-Caffe2 logits of all three G-Blend
heads, detection of every tower at depth 50 and 152, the faults parity must catch, the visual tower as an
ordinary MMAction2 backbone, VMZ's log-mel front end against an independent NumPy version, and the commands
that run them on tiny PyAV videos with AAC or PCM sound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vmzconv import parity, reference
from vmzconv.arch import Arch, detect
from vmzconv.blobs import Blobs
from vmzconv.convert import map_blobs, visual_tower
from vmzconv.errors import ArchError
from vmzconv.synth import seeded_blobs, tone_frames, write_video_with_audio
from vmzconv.video import audio as A

from .conftest import GOLDEN, assert_one_line_error, golden_blobs, mmaction_registries, run_cli


def _zeros(family: str, depth: int, gblend: bool = True) -> Blobs:
    """VMZ's blob names and shapes (zeros: detection and mapping read only names and shapes)."""
    return Blobs(f"{family}.pkl", {n: np.zeros(s, np.float32)
                                   for n, s in reference.blob_specs(family, depth, 400, gblend=gblend)})


# -- genuine Caffe2 ---------------------------------------------------------------------------------


def test_genuine_caffe2_logits_of_all_three_heads():
    """Genuine Caffe2 ran audio_visual_model.create_model (av_resnet-r2plus1d, depth 18, g_blend) on recipe
    GOLDEN-1 and the closed-form log-mels: the float64 reference and the converted AVModel reproduce the joint,
    audio and visual logits within 1e-4 of each head's max |logit| (these reach 121, 4e4 and 0.27)."""
    blobs = Blobs("golden_av.pkl", golden_blobs("av_r2plus1d", 18))
    assert len(blobs) == 332
    a = detect(blobs)
    assert (a.name, a.gblend) == ("av_r2plus1d_r18", True)
    model, _, mapped = map_blobs(blobs, a, "av")
    clip, logmels = parity.fixed_clip(8, 112), parity.fixed_logmels()
    ref = reference.av_heads(blobs.arrays, a.family, 18, 400, clip, logmels)
    with torch.no_grad():
        ours = {k: v.numpy() for k, v in model.eval().heads(torch.from_numpy(clip), torch.from_numpy(logmels)).items()}
    for head, suffix in (("joint", ""), ("audio", ".a"), ("visual", ".v")):
        caffe2 = np.load(GOLDEN / f"av_r2plus1d_r18_gblend_L400{suffix}.caffe2_logits.npy")
        scale = float(np.abs(caffe2).max())
        for got in (ref[head], ours[head]):
            assert np.abs(got - caffe2).max() <= 1e-4 * scale, head
            assert (np.argsort(-got[0])[:5] == np.argsort(-caffe2[0])[:5]).all(), head


# -- detection and accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("family,depth", [("av_ipcsn", 50), ("av_ipcsn", 152), ("av_ircsn", 50), ("av_ircsn", 152),
                                          ("av_r2plus1d", 101), ("av_r3d", 18)])
@pytest.mark.parametrize("gblend", [True, False])
def test_towers_are_detected_and_every_blob_is_accounted_for(family, depth, gblend):
    """From the v_/a_ blobs alone, with and without G-Blend heads; the av table (which includes the visual
    family's torchvision table) consumes every blob and fills every entry of AVModel."""
    blobs = _zeros(family, depth, gblend)
    a = detect(blobs)
    assert (a.family, a.depth, a.num_classes, a.gblend) == (family, depth, 400, gblend)
    model, table, mapped = map_blobs(blobs, a, "av")
    assert table.name == "av.av.toml" and not mapped.ignored
    assert len(mapped.state_dict) == len(model.state_dict())
    assert hasattr(model.audio, "fc") == gblend and model.visual.has_head == gblend


def test_broken_av_files_are_one_line_errors():
    blobs = _zeros("av_r2plus1d", 18)
    del blobs.arrays["a_last_out_L400_w"], blobs.arrays["a_last_out_L400_b"]
    with pytest.raises(ArchError, match="G-Blend heads come in pairs"):
        detect(blobs)
    blobs = _zeros("av_r2plus1d", 18)
    blobs.arrays["a_conv1_w"] = np.zeros((16, 2, 3, 3), np.float32)
    with pytest.raises(ArchError, match=r"a_conv1_w is \[16, 2, 3, 3\].*\[16, 1, 3, 3\]"):
        detect(blobs)
    audio_only = {n[2:] if n.startswith("a_") else n: v for n, v in _zeros("av_r2plus1d", 18).arrays.items()
                  if n.startswith("a_")}
    with pytest.raises(ArchError, match="audio-only VMZ a_resnet"):
        detect(Blobs("a.pkl", audio_only))


# -- parity and its faults -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18():
    blobs = Blobs("av18.pkl", seeded_blobs("av_r2plus1d", 18))
    a = detect(blobs)
    return blobs, a, map_blobs(blobs, a, "av")[2].state_dict


def test_parity_passes_and_compares_every_head(r18):
    from vmzconv.models import build_model

    blobs, a, state = r18
    model = build_model("av", a)
    model.load_state_dict(state, strict=True)
    v = parity.run(blobs, a, model, clip_size=(8, 32))
    assert v.passed and set(v.heads) == {"joint", "audio", "visual"}


@pytest.mark.parametrize("fault,head", [({"swap_concat": True}, "joint"), ({"fc1_relu": False}, "joint"),
                                        ({"audio_pool": "avg"}, "audio")])
def test_parity_fails_for_each_fusion_fault(r18, fault, head):
    """[audio, visual] into av_fc1, a missing ReLU after av_fc1, the audio tower's max-pool as an average:
    each fails parity, and the verdict names a head it broke."""
    from vmzconv.models import build_model

    blobs, a, state = r18
    model = build_model("av", a, **fault)
    model.load_state_dict(state, strict=True)
    v = parity.run(blobs, a, model, clip_size=(8, 32))
    assert not v.passed and head in v.reason.split(":")[0]
    assert v.heads["visual"] <= 1e-4                 # the visual tower itself is untouched by these faults


@pytest.mark.parametrize("fault,first", [({"swap_concat": True}, "joint"), ({"audio_pool": "avg"}, "audio")])
def test_trace_names_the_tower_or_the_fusion(r18, fault, first):
    """parity --trace on an audio-visual model: the visual tower stage by stage, the audio tower, every head;
    the first divergent stage says where a fault is."""
    from vmzconv.models import build_model

    blobs, a, state = r18
    model = build_model("av", a, **fault)
    model.load_state_dict(state, strict=True)
    trace = parity.trace(blobs, a, model, clip_size=(8, 32))
    assert not trace.passed and trace.first_divergent == first and trace.hint
    assert [s.name for s in trace.stages][-4:] == ["audio", "joint", "audio head", "visual head"]
    assert not any(s.divergent for s in trace.stages if s.name.startswith("visual."))


# -- the visual tower as an ordinary backbone -----------------------------------------------------------


def test_visual_tower_of_av_ipcsn152_loads_strictly_into_mmaction2():
    """--tower visual of a synthetic AV ip-CSN-152 (VMZ's names and shapes): the mmaction2-backbone state dict
    loads with strict=True into MMAction2 1.2.0's own ResNet3dCSN, whose features equal the AV model's
    visual-tower features."""
    _, MODELS, _ = mmaction_registries()
    blobs = Blobs("g_b_ip_csn_152_kinetics.pkl", seeded_blobs("av_ipcsn", 152))
    a = detect(blobs)
    view, visual, notes = visual_tower(blobs, a, headless_ok=True)
    assert visual.name == "ipcsn_r152" and "audio-visual" in notes[0]
    _, _, backbone = map_blobs(view, visual, "mmaction2-backbone")
    av_model, _, _ = map_blobs(blobs, a, "av")
    from vmzconv.configs import _backbone

    theirs = MODELS.build(_backbone(visual, None, frozen_bn=False))
    theirs.load_state_dict(backbone.state_dict, strict=True)
    theirs.eval()                                  # (ResNet3dCSN.train returns None, so not chained)
    clip = torch.from_numpy(parity.fixed_clip(8, 64))
    with torch.no_grad():
        want = av_model.eval().visual.features(clip)
        got = theirs(clip).mean(dim=(2, 3, 4))
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_tower_visual_cli_writes_a_backbone_with_its_provenance(vmz_pickle, tmp_path):
    src = vmz_pickle.custom("g_b_ip_csn_152_kinetics.pkl", seeded_blobs("av_ipcsn", 50))      # a zoo name
    out = tmp_path / "vis.pth"
    res = run_cli("convert", src, out, "--tower", "visual", "--target", "mmaction2-backbone", "--parity-clip", "8,32",
                  "--json")
    assert res.returncode == 0, res.stderr
    card = json.loads(out.with_name("vis.pth.json").read_text())
    assert card["arch"] == "ipcsn_r50" and card["tower"] == "visual" and card["tower_of"]["arch"] == "av_ipcsn_r50"
    assert card["parity"]["passed"]
    res = run_cli("parity", src, out, "--parity-clip", "8,32")
    assert res.returncode == 0, res.stderr
    res = run_cli("convert", vmz_pickle("ipcsn", 50), tmp_path / "x.pth", "--tower", "visual", "--no-parity")
    assert_one_line_error(res, "--tower visual is for audio-visual files")


# -- the log-mel front end ------------------------------------------------------------------------------


def _independent_logmels(x: np.ndarray) -> np.ndarray:
    """LogMels.cc read again, frame by frame, float64 throughout, without vmzconv's code."""
    sr, n_filt, win, step, fft = 16000, 40, 256, 160, 256
    length = fft // 2 + 1
    hz2mel = lambda hz: 1127 * math.log(1 + hz / 700)           # noqa: E731
    mel2hz = lambda mel: 700 * (math.exp(mel / 1127) - 1)        # noqa: E731
    dx = (hz2mel(sr / 2) - hz2mel(0)) / (n_filt + 1)
    freq_step = sr / 2 / length
    bank, ranges = np.zeros((n_filt, length)), []
    for f in range(n_filt):
        start, mid, end = (mel2hz((f + d) * dx) / freq_step for d in range(3))
        lo, hi = max(0, int(start)), min(length - 1, int(end) + 1)
        for i in range(lo, hi + 1):
            v = 1 - ((mid - i) / max(1.0, mid - start) if i < mid else (i - mid) / max(1.0, end - mid))
            bank[f, i] = max(v, 0.0)
        bank[f] /= bank[f].sum()
        ranges.append((lo, hi))
    hann = [0.5 * (1 - math.cos(2 * math.pi * i / (win - 1))) for i in range(win)]
    rows, pos = [], 0
    while len(x) - pos > win:               # tempFrame_ and window_ are float arrays: the product is float32
        frame = np.array([np.float32(x[pos + i]) * np.float32(hann[i]) for i in range(win)], np.float32)
        spec = np.fft.fft(frame, fft)
        power = np.abs(spec[:fft // 2]) ** 2
        power[0] = spec[0].real ** 2 + spec[fft // 2].real ** 2           # av_rdft packs Nyquist beside DC
        row = []
        for f, (lo, hi) in enumerate(ranges):
            e = sum(power[j] * bank[f, j] for j in range(lo, hi)) * 1080674186.3482928
            row.append(math.log(e) if e > math.e else e / math.e)
        rows.append(row)
        pos += step
    return np.array(rows)


@pytest.mark.parametrize("signal", ["tone", "chirp", "silence"])
def test_logmels_match_an_independent_numpy_version(signal):
    t = np.arange(int(0.5 * 16000)) / 16000
    x = {"tone": 0.4 * np.sin(2 * np.pi * 440 * t), "chirp": 0.3 * np.sin(2 * np.pi * (100 + 3000 * t) * t),
         "silence": np.zeros_like(t)}[signal].astype(np.float32)
    ours, theirs = A.logmel_frames(x), _independent_logmels(x.astype(np.float64))
    assert ours.shape == theirs.shape == (49, 40)                # frames while more than 256 samples remain
    assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())
    if signal == "silence":
        assert not ours.any()


@pytest.mark.parametrize("video_frames,src_rows", [(25, 99), (25, 700), (301, 37)])
def test_alignment_is_opencvs_resize_and_clips_read_their_start(video_frames, src_rows):
    """align_audio=1: F frames of video, clips of span 8 -> F * 100 // 8 rows, as cv2.resize makes them (linear
    when stretching, nearest when shrinking) though only the rows a clip reads are computed; a clip at frame s
    reads from s * rows // F; past the end is zeros."""
    import cv2

    frames = np.random.default_rng(0).normal(size=(src_rows, 40)).astype(np.float32)
    aligned = A.Aligned(frames, video_frames, 8)
    rows = video_frames * 100 // 8
    interp = cv2.INTER_LINEAR if rows >= src_rows else cv2.INTER_NEAREST
    want = cv2.resize(frames, (40, rows), interpolation=interp)
    assert aligned.rows == rows
    assert np.abs(aligned.take(0, rows) - want).max() <= 1e-6
    last = video_frames - 1
    clips = A.clip_logmels(aligned, video_frames, [0, video_frames // 2, last])
    assert clips.shape == (3, 1, 100, 40)
    a = (video_frames // 2) * rows // video_frames
    assert np.abs(clips[1, 0, :min(100, rows - a)] - want[a:a + 100]).max() <= 1e-6
    tail = rows - last * rows // video_frames
    assert tail < 100 and not clips[2, 0, tail:].any()


def test_log_mels_are_computed_while_the_stream_decodes(tmp_path):
    """Frames taken as the samples arrive equal the frames of the whole decoded track at once."""
    import av

    video = write_video_with_audio(tmp_path / "v.mp4", tone_frames(20), _sound(1.7, 44100))
    frames, total = A.decode_logmels(str(video))
    with av.open(str(video)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        parts = []
        for f in c.decode(audio=0):
            f.pts = None
            parts += [o.to_ndarray().reshape(-1) for o in resampler.resample(f)]
    whole = np.concatenate(parts)
    assert total == whole.size and frames.shape[0] == -(-(whole.size - 256) // 160)
    assert np.array_equal(frames, A.logmel_frames(whole))


# -- the commands -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def av_file(module_dir):
    from vmzconv.synth import write_vmz_pickle

    src = write_vmz_pickle(module_dir / "av_r21d18.pkl", seeded_blobs("av_r2plus1d", 18))
    out = module_dir / "av.pth"
    res = run_cli("convert", src, out, "-q", "--parity-clip", "8,32")
    assert res.returncode == 0, res.stderr
    return out


def _sound(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (220 + 300 * t) * t)).astype(np.float32)


@pytest.mark.parametrize("codec,suffix", [("aac", ".mp4"), ("pcm_s16le", ".mov")])
def test_predict_runs_on_a_video_with_sound(av_file, tmp_path, codec, suffix):
    video = write_video_with_audio(tmp_path / f"v{suffix}", tone_frames(30), _sound(1.2, 44100), codec=codec)
    res = run_cli("predict", av_file, video, "--num-clips", "2", "--json")
    assert res.returncode == 0, res.stderr
    (pred,) = json.loads(res.stdout)
    assert len(pred["top"]) == 5 and "silent_audio" not in pred


def test_a_video_without_sound_is_refused_unless_silent_audio(av_file, tmp_path):
    video = write_video_with_audio(tmp_path / "mute.mp4", tone_frames(20), None)
    assert_one_line_error(run_cli("predict", av_file, video), "mute.mp4", "no audio stream", "--silent-audio")
    blip = write_video_with_audio(tmp_path / "blip.mov", tone_frames(20), np.zeros(100, np.float32), codec="pcm_s16le")
    assert_one_line_error(run_cli("predict", av_file, blip), "blip.mov", "no log-mel frame", "--silent-audio")
    res = run_cli("predict", av_file, video, "--num-clips", "1", "--json", "--silent-audio")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["silent_audio"] is True
    (tmp_path / "list.txt").write_text("mute.mp4 3\n")
    res = run_cli("verify", av_file, "--ann", tmp_path / "list.txt", "--data-root", tmp_path, "--num-clips", "1",
                  "--silent-audio", "--report", tmp_path / "report.json")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "report.json").read_text())["silent_audio"] == ["mute.mp4"]
    assert_one_line_error(run_cli("config", av_file, "--finetune", "--num-classes", "5"), "--tower visual")


def test_config_lines_run_as_printed(av_file):
    """`vmzconv config` of an audio-visual file builds vmzconv's model and loads the file strictly, as printed."""
    res = run_cli("config", av_file)
    assert res.returncode == 0, res.stderr
    ns: dict = {}
    exec(res.stdout, ns)                                             # noqa: S102 (our own printed lines)
    from vmzconv.load import load_converted

    clip, logmels = torch.from_numpy(parity.fixed_clip(8, 32)), torch.from_numpy(parity.fixed_logmels())
    with torch.no_grad():
        assert torch.equal(ns["model"].eval()(clip, logmels), load_converted(av_file).model(clip, logmels))


def test_features_give_audio_and_fused_layers(av_file, tmp_path):
    video = write_video_with_audio(tmp_path / "v.mp4", tone_frames(20), _sound(0.8, 44100))
    dims = {}
    for layer in ("pool", "audio", "fused"):
        res = run_cli("features", av_file, video, "--out-dir", tmp_path / layer, "--layer", layer)
        assert res.returncode == 0, res.stderr
        dims[layer] = np.load(tmp_path / layer / "v.npy")
    assert {k: v.shape for k, v in dims.items()} == {k: (3, 512) for k in dims}      # 20 frames, windows of 8: pad
    assert not np.allclose(dims["pool"], dims["audio"])


def test_export_has_two_inputs(av_file, tmp_path):
    onnx = pytest.importorskip("onnx")
    res = run_cli("export", av_file, tmp_path / "av.onnx")
    assert res.returncode == 0, res.stderr
    graph = onnx.load(str(tmp_path / "av.onnx")).graph
    assert [i.name for i in graph.input] == ["video", "audio"]
    assert [d.dim_value for d in graph.input[1].type.tensor_type.shape.dim][1:] == [1, 100, 40]


def test_inspect_shows_both_towers_and_demo_writes_sound(tmp_path):
    res = run_cli("demo", "--arch", "av_r2plus1d_r18", "--out-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert A.decode_logmels(str(tmp_path / "demo_av_r2plus1d_r18.mp4"))[1] > 2 * 16000 - 2000      # ~2 s of sound
    res = run_cli("inspect", tmp_path / "demo_av_r2plus1d_r18.pkl")
    assert res.returncode == 0, res.stderr
    for fragment in ("R(2+1)D-18 on RGB clips", "audio ResNet-18 on 1x100x40 log-mels", "av_fc1 1024->512",
                     "joint, audio, visual (G-Blend)"):
        assert fragment in res.stdout


@pytest.mark.parametrize("family", ["av_ircsn", "av_ipcsn"])
def test_csn_towers_at_depth_50_convert_with_parity_from_a_pickle(vmz_pickle, tmp_path, family):
    """A Python-2-opcode pickle with VMZ's names and shapes (no G-Blend heads this time) through the CLI:
    the joint model passes parity and its card carries the audio input."""
    src = vmz_pickle.custom(f"{family}50.pkl", seeded_blobs(family, 50, gblend=False))
    out = tmp_path / "av.pth"
    res = run_cli("convert", src, out, "--json", "-q", "--parity-clip", "8,32")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["arch"] == f"{family}_r50" and summary["target"] == "av" and summary["parity"]["passed"]
    card = json.loads(out.with_name("av.pth.json").read_text())
    assert card["gblend"] is False and card["input"]["audio"]["shape"] == [1, 100, 40]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_runtimes_run_the_two_input_graph_and_equal_torch(av_file, tmp_path, runtime):
    """predict's probabilities and the audio layer's features on ONNX Runtime / OpenVINO equal torch's (the
    audio layer's graph reads no video: the exporter keeps only its audio input, under a name of its own)."""
    pytest.importorskip(runtime)
    video = write_video_with_audio(tmp_path / "v.mp4", tone_frames(20), _sound(0.8, 44100))
    out = {}
    for rt in ("torch", runtime):
        res = run_cli("predict", av_file, video, "--num-clips", "2", "--json", "--runtime", rt,
                      "--graph-cache", tmp_path / "graphs")
        assert res.returncode == 0, res.stderr
        assert "using torch" not in res.stderr
        out[rt] = {c["index"]: c["probability"] for c in json.loads(res.stdout)[0]["top"]}
        res = run_cli("features", av_file, video, "--out-dir", tmp_path / rt, "--layer", "audio", "--runtime", rt,
                      "--graph-cache", tmp_path / "graphs")
        assert res.returncode == 0 and "using torch" not in res.stderr, res.stderr
    assert list(out["torch"]) == list(out[runtime])
    assert max(abs(out["torch"][k] - out[runtime][k]) for k in out["torch"]) <= 1e-4
    a, b = np.load(tmp_path / "torch" / "v.npy"), np.load(tmp_path / runtime / "v.npy")
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
