"""``vmzconv export``: a converted checkpoint as an ONNX graph, proven equal in ONNX Runtime before it is kept.

The graph takes one input ``video`` [N, 3, T, H, W] (float32, normalised as the card says; an audio-visual
model also ``audio`` [N, 1, 100, 40], its log-mels) and gives
``logits`` [N, classes] and/or ``features`` [N, C] (the globally pooled vector). The batch axis is
always dynamic; ``dynamic=True`` makes T, H and W dynamic too (global average pooling allows it).
Before anything is written, ONNX Runtime (CPU) runs the fixed parity clip at batch 1 and 2 (and at
a second clip size when dynamic) and must match the PyTorch model: max |difference| <= 1e-4 x
max(1, max |PyTorch output|) (relative for large outputs: fp32 rounding grows with them), the same
top-5 for logits, no NaN/Inf. The verdict, the source checkpoint's sha256, the arch and the
expected input go into the graph's ``metadata_props`` (and ``OUT.onnx.json`` beside it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, parity
from .errors import CheckError, OutputError, VmzconvError
from .files import write_atomic
from . import graph
from .graph import MIN_OPSET, Heads, MissingExtraError, _require, max_exporter_opset  # noqa: F401

OUTPUTS = ("logits", "features", "both")
TOLERANCE = 1e-4


@dataclass
class Proof:
    passed: bool
    checks: list = field(default_factory=list)      # one per (output, clip): max_abs_diff, top5 ...

    def summary(self) -> str:
        worst = max((c["max_abs_diff"] for c in self.checks), default=float("nan"))
        shapes = ", ".join(sorted({"x".join(map(str, c["clip"])) for c in self.checks}))
        return (f"{'PASS' if self.passed else 'FAIL'}: ONNX Runtime vs PyTorch, max |diff| {worst:.3g} "
                f"(tolerance {TOLERANCE:g} x max(1, max |output|)) on {shapes}")


@dataclass
class Exported:
    output: str
    arch: str
    opset: int
    outputs: list
    dynamic: bool
    proof: Proof
    seconds: float
    card: str | None
    metadata: dict


def prove(proto, module, clips: list, names: list[str]) -> Proof:
    """ONNX Runtime (CPU) against ``module`` on each clip (an array, or a (video, log-mels) pair for an
    audio-visual model), for each output."""
    import torch

    _, ort = _require()
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:       # ORT raises its own exception types for a graph it cannot load
        return Proof(False, [{"error": f"ONNX Runtime cannot load the graph: {str(e).splitlines()[0][:200]}",
                              "max_abs_diff": float("nan"), "clip": []}])
    checks = []
    for clip in clips:
        clip, audio = clip if isinstance(clip, tuple) else (clip, None)
        with torch.no_grad():
            want = module(*graph._args(clip, audio))
        want = [want] if len(names) == 1 else list(want)
        got = sess.run(names, {"video": clip} | ({} if audio is None else {"audio": audio}))
        for name, w, g in zip(names, want, got):
            w = w.numpy()
            tolerance = TOLERANCE * max(1.0, float(np.abs(w).max()) if np.isfinite(w).all() else 1.0)
            if name == "logits":
                v = parity.compare(g, w, tolerance, clip.shape)
                checks.append({"output": name, "clip": list(clip.shape), "max_abs_diff": v.max_abs_diff,
                               "tolerance": tolerance, "top5_identical": v.top5_identical, "passed": v.passed,
                               "reason": v.reason})
            else:
                finite = bool(np.isfinite(g).all() and np.isfinite(w).all())
                diff = float(np.abs(g.astype(np.float64) - w).max()) if finite and g.shape == w.shape else float("nan")
                ok = finite and g.shape == w.shape and diff <= tolerance
                checks.append({"output": name, "clip": list(clip.shape), "max_abs_diff": diff, "tolerance": tolerance,
                               "passed": ok,
                               "reason": "" if ok else f"max |feature diff| {diff:.4g} (or NaN/Inf/shape)"})
    return Proof(all(c["passed"] for c in checks), checks)


def _check_output(out: Path, force: bool, card: bool) -> Path:
    if out.suffix != ".onnx":
        raise OutputError(f"{out}: the output must end in .onnx")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    for p in (out, out.with_name(out.name + ".json")) if card else (out,):
        if p.is_dir():
            raise OutputError(f"{p}: is a folder; nothing was written")
        if p.exists() and not force:
            raise OutputError(f"{p}: already exists (use --force to overwrite)")
    return out


def export(ckpt: str | Path, out: str | Path, output: str = "logits", clip: tuple[int, int] | None = None,
           dynamic: bool = False, opset: int | None = None, arch: str | None = None, card: bool = True,
           force: bool = False) -> Exported:
    """Export ``ckpt`` (anything :func:`load_converted` opens) to ``out``; raises CheckError and writes
    nothing when ONNX Runtime disagrees with PyTorch."""
    _require()
    from .load import load_converted

    t0 = time.perf_counter()
    if output not in OUTPUTS:
        raise VmzconvError(f"--output {output!r}: one of {', '.join(OUTPUTS)}")
    out = _check_output(Path(out), force, card)
    conv = load_converted(ckpt, arch)
    if output != "features" and not conv.target.has_head:
        raise VmzconvError(f"{ckpt}: a backbone-only ({conv.target.name}) file has no classifier; use --output features")
    top = max_exporter_opset()
    opset = opset or top
    if not MIN_OPSET <= opset <= top:
        raise VmzconvError(f"--opset {opset}: this exporter writes opsets {MIN_OPSET}-{top}")
    names = ["logits", "features"] if output == "both" else [output]
    module = Heads(conv.model, output)
    t, h = clip or conv.arch.parity_clip
    c = conv.arch.in_channels
    base = parity.fixed_clip(t, h, c=c)
    clips = [base, parity.fixed_clip(t, h, n=2, c=c)]
    if dynamic:
        clips.append(parity.fixed_clip(2 * t, h + 32, n=1, c=c))
    av = conv.arch.fam.av
    audio = parity.fixed_logmels() if av else None
    if av:                               # the second input: log-mels, as many as clips
        clips = [(c, parity.fixed_logmels(c.shape[0])) for c in clips]
    while True:
        proto = graph.to_onnx(module, base, names, dynamic, opset, audio)
        proof = prove(proto, module, clips, names)
        loadable = not any("cannot load" in c.get("error", "") for c in proof.checks)
        if loadable or opset <= MIN_OPSET:
            break
        opset -= 1                # ONNX Runtime does not know this opset yet: the newest both support
    if not proof.passed:
        bad = next(c for c in proof.checks if not c.get("passed"))
        raise CheckError(f"{ckpt}: the ONNX graph does not compute what the PyTorch model does — "
                         f"{bad.get('reason') or bad.get('error')} on {'x'.join(map(str, bad['clip']))}; "
                         "nothing was written")
    inp = conv.meta.get("input") or {}
    metadata = {
        "vmzconv_version": __version__, "source_checkpoint": Path(conv.path).name,
        "source_sha256": conv.sha256, "arch": conv.arch.name, "num_classes": conv.arch.num_classes,
        "outputs": names, "opset": opset, "dynamic_axes": ["N", "T", "H", "W"] if dynamic else ["N"],
        "input": {"name": "video", "shape": ["N", c, "T" if dynamic else t, "H" if dynamic else h,
                                             "W" if dynamic else h], "dtype": "float32", "layout": "NCTHW",
                  "channel_order": inp.get("channel_order", "RGB"), "normalisation": {k: inp[k] for k in ("mean", "std", "value_range")
                                                            if k in inp}},
        **({"audio_input": {"name": "audio", "shape": ["N", 1, 100, 40], "dtype": "float32",
                            "what": "VMZ log-mels (see the checkpoint card's input.audio); not normalised",
                            "features": "av_fc2's output (what the joint classifier reads)"}} if av else {}),
        "proof": {"passed": proof.passed, "tolerance": TOLERANCE, "checks": proof.checks},
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    data = proto.SerializeToString()
    write_atomic(out, lambda f: f.write(data))
    card_file = None
    if card:
        card_file = out.with_name(out.name + ".json")
        text = json.dumps(metadata, indent=2) + "\n"
        write_atomic(card_file, lambda f: f.write(text.encode()))
    return Exported(str(out), conv.arch.name, opset, names, dynamic, proof, round(time.perf_counter() - t0, 2),
                    str(card_file) if card_file else None, metadata)
