"""Numerical parity: the converted PyTorch model against the NumPy Caffe2 reference.

Both sides see the same fixed clip. The clip is closed-form, so anyone can
rebuild it: element j (flat C-order index, float64) of an N x 3 x T x H x W
array is ``sin(0.013*j + 0.5) + 0.5*cos(0.0071*j)``, cast to float32 and fed
as already-normalised input. (The clip of the recipe behind tests/golden's Caffe2 logits.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from . import reference
from .errors import CheckError, VmzconvError

DEFAULT_CLIP = (8, 224)       # T, H (= W); each family has its own default (Family.parity_clip)
DEFAULT_TOLERANCE = 1e-4      # max |logit difference|


def fixed_clip(t: int = DEFAULT_CLIP[0], h: int = DEFAULT_CLIP[1], n: int = 1, c: int = 3) -> np.ndarray:
    """The closed-form N x C x T x H x H clip (see the module docstring; C = 2 for optical flow)."""
    j = np.arange(n * c * t * h * h, dtype=np.float64)
    return (np.sin(0.013 * j + 0.5) + 0.5 * np.cos(0.0071 * j)).astype(np.float32).reshape(n, c, t, h, h)


def fixed_logmels(n: int = 1) -> np.ndarray:
    """The closed-form N x 1 x 100 x 40 log-mel input of audio-visual parity: element k (flat C-order index,
    float64) is ``sin(0.021*k + 0.2) + 0.3*cos(0.0037*k)``, cast to float32 (the golden recipe's)."""
    k = np.arange(n * 100 * 40, dtype=np.float64)
    return (np.sin(0.021 * k + 0.2) + 0.3 * np.cos(0.0037 * k)).astype(np.float32).reshape(n, 1, 100, 40)


def parse_clip(text: str | None) -> tuple[int, int] | None:
    """``T,H`` from the command line; None (the family's default) when not given."""
    if text is None:
        return None
    try:
        t, h = (int(v) for v in text.split(","))
    except ValueError:
        raise VmzconvError(f"--parity-clip takes T,H (e.g. 8,224), not {text!r}") from None
    if t < 8 or h < 32:
        raise VmzconvError(f"--parity-clip {text}: needs T >= 8 and H >= 32 (VMZ changes its temporal strides below 8 frames)")
    return t, h


@dataclass
class Verdict:
    passed: bool
    max_abs_diff: float
    max_rel_diff: float
    worst_class: int
    top1_agree: bool
    top5_identical: bool
    tolerance: float
    clip: list
    reason: str
    reference_seconds: float
    model_seconds: float
    heads: dict | None = None          # audio-visual: max |logit diff| per head (joint, audio, visual)

    # What the checkpoint file records: the outcome and the setting, never a measured float. The
    # measured figures (max_abs_diff, ...) vary in their last bits with thread counts and BLAS builds,
    # so they live in the model card beside the file; the file's bytes stay a function of its input.
    RECORDED = ("passed", "tolerance", "clip", "top1_agree", "top5_identical", "reason")

    def to_meta(self, timings: bool = False, measured: bool = True) -> dict:
        """Plain types. ``measured=False``: only the outcome (what goes into the checkpoint's bytes)."""
        d = asdict(self)
        if not timings:
            d.pop("reference_seconds")
            d.pop("model_seconds")
        if not measured:
            d = {k: v for k, v in d.items() if k in self.RECORDED}
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}

    def summary(self) -> str:
        state = "PASS" if self.passed else "FAIL"
        heads = (" over the " + ", ".join(self.heads) + " heads") if self.heads else ""
        return (f"{state}: max |logit diff|{heads} {self.max_abs_diff:.3g} (rel {self.max_rel_diff:.3g}, "
                f"tolerance {self.tolerance:g}), top-1 {'same' if self.top1_agree else 'DIFFERENT'}, "
                f"top-5 {'identical' if self.top5_identical else 'DIFFERENT'}; clip {'x'.join(map(str, self.clip))}")


def compare(ours: np.ndarray, ref: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, clip=()) -> Verdict:
    """Verdict for logits ``ours`` (model) against ``ref`` (reference), both [N, classes]."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())
    diff = np.abs(ours - ref)
    if finite:
        flat = int(np.argmax(diff))
        max_abs = float(diff.reshape(-1)[flat])
        worst = flat % ref.shape[1]
        scale = float(np.abs(ref).max()) or 1.0
        max_rel = max_abs / scale
    else:
        max_abs, max_rel, worst = float("nan"), float("nan"), -1
    k = min(5, ref.shape[1])
    top5_ours = np.argsort(-ours, axis=1, kind="stable")[:, :k]
    top5_ref = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top1 = bool((top5_ours[:, 0] == top5_ref[:, 0]).all())
    top5 = bool((top5_ours == top5_ref).all())
    if not finite:
        bad = int((~np.isfinite(ours)).sum() + (~np.isfinite(ref)).sum())
        reason = f"NaN or Inf in the logits ({bad} values; max |logit diff| undefined)"
    elif max_abs > tolerance:
        reason = f"max |logit diff| {max_abs:.4g} at class {worst} exceeds {tolerance:g}"
    elif not top5:
        reason = f"top-5 classes differ (max |logit diff| {max_abs:.4g} is within {tolerance:g})"
    else:
        reason = ""
    return Verdict(not reason, max_abs, max_rel, worst, top1, top5, tolerance, list(clip), reason, 0.0, 0.0)


def check_clip(arch, clip_size) -> None:
    """C3D's fc6 fixes its input: pool5 must leave 1x3x3, i.e. a 16x112x112 clip."""
    if not arch.fam.resnet and tuple(clip_size) != tuple(arch.fam.parity_clip):
        t, h = arch.fam.parity_clip
        raise VmzconvError(f"{arch.fam.title}'s fc6 fixes its input at {t}x{h}x{h}: the parity clip must be {t},{h}, "
                           f"not {','.join(map(str, clip_size))}")


def run(blobs, arch, model, head: dict | None = None, clip_size=DEFAULT_CLIP,
        tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Run both sides on the fixed clip and return the verdict (never raises on a mismatch)."""
    from .models import logits  # torch is only needed for this side

    check_clip(arch, clip_size)
    if arch.fam.av:
        return _run_av(blobs, arch, model, clip_size, tolerance)
    clip = fixed_clip(*clip_size, c=arch.in_channels)
    t0 = time.perf_counter()
    ref = reference.forward(blobs.arrays, arch.family, arch.depth, arch.num_classes, clip)
    t1 = time.perf_counter()
    try:
        ours = logits(model, clip, head)
    except ValueError as e:            # a model that cannot run the clip at all (C3D with a padded pool5)
        ours, broken = np.full_like(ref, np.nan), str(e)
    else:
        broken = None
    t2 = time.perf_counter()
    verdict = compare(ours, ref, tolerance, clip.shape)
    if broken:
        verdict.reason = f"the PyTorch model cannot compute the parity clip: {broken}"
    verdict.reference_seconds = round(t1 - t0, 3)
    verdict.model_seconds = round(t2 - t1, 3)
    return verdict


def _run_av(blobs, arch, model, clip_size, tolerance: float) -> Verdict:
    """Every head of an audio-visual model (joint; audio and visual with G-Blend) on the fixed clip and
    log-mels; the verdict is the worst head's, and names it when it fails."""
    import torch

    clip, logmels = fixed_clip(*clip_size), fixed_logmels()
    t0 = time.perf_counter()
    ref = reference.av_heads(blobs.arrays, arch.family, arch.depth, arch.num_classes, clip, logmels)
    t1 = time.perf_counter()
    with torch.no_grad():
        ours = {k: v.numpy() for k, v in model.eval().heads(torch.from_numpy(clip), torch.from_numpy(logmels)).items()}
    t2 = time.perf_counter()
    if set(ours) != set(ref):
        raise CheckError(f"the model has heads {sorted(ours)}, the blobs {sorted(ref)}")
    verdicts = {name: compare(ours[name], ref[name], tolerance, clip.shape) for name in ref}
    failing = [n for n, v in verdicts.items() if not v.passed]
    worst = failing[0] if failing else max(verdicts, key=lambda n: verdicts[n].max_abs_diff)
    verdict = verdicts[worst]
    if failing:
        verdict.reason = f"{', '.join(failing)} head{'s' if len(failing) > 1 else ''}: {verdict.reason}"
    verdict.heads = {n: float(v.max_abs_diff) for n, v in verdicts.items()}
    verdict.reference_seconds, verdict.model_seconds = round(t1 - t0, 3), round(t2 - t1, 3)
    return verdict


def require(verdict: Verdict, what: str) -> None:
    if not verdict.passed:
        raise CheckError(f"{what}: parity FAILED — {verdict.reason} (top-1 {'same' if verdict.top1_agree else 'different'}, "
                         f"top-5 {'identical' if verdict.top5_identical else 'different'}); nothing was written")


# -- trace: where a port stops computing what Caffe2 computes --------------------------------------

HINTS = {
    "stem": "the stem: pool1 (VMZ runs CSN with a max-pool after the stem, R(2+1)D/R3D without), the stem BN's "
            "eps or statistics, or RGB/BGR order of conv1's input channels",
    "block": "this block: its BN statistics or scale/bias (swapped?), a missing or extra ReLU, a (2+1)-D middle "
             "width, or a stride",
    "pool": "C3D up to this pool: a conv bias or BN dropped, BN eps, or a pool's padding (VMZ pads none; "
            "MMAction2's C3D pads pool5)",
    "head": "the classifier only (the trunk agrees): class order, or the classifier blobs (C3D: fc6/fc7 too)",
    "audio": "the audio tower: a_conv1's bias, a block's BN or ReLU, a stride, or the final pool (VMZ max-pools the "
             "4x2 map)",
    "joint": "the fusion only (both towers agree): the concat order (visual first), the ReLUs after av_fc1 and "
             "av_fc2, or the fusion blobs",
}
DEFAULT_TRACE_TOLERANCE = 1e-4


@dataclass
class Stage:
    name: str
    max_abs_diff: float
    rel_diff: float
    shape: list
    divergent: bool
    note: str = ""


@dataclass
class Trace:
    stages: list
    first_divergent: str | None
    hint: str
    verdict: Verdict
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.first_divergent is None and self.verdict.passed

    def to_json(self) -> dict:
        def num(v: float):
            return v if np.isfinite(v) else ("nan" if np.isnan(v) else "inf")

        return {"trace": [{"name": s.name, "max_abs_diff": num(s.max_abs_diff), "rel_diff": num(s.rel_diff)}
                          | ({"note": s.note} if s.note else {}) for s in self.stages],
                "first_divergent": self.first_divergent, "hint": self.hint or None,
                "verdict": "pass" if self.passed else "fail", "tolerance": self.tolerance,
                "parity": self.verdict.to_meta()}


def _trace_av(blobs, arch, model, clip_size, tolerance: float, logit_tolerance: float) -> Trace:
    """An audio-visual model: the visual tower stage by stage, the audio tower's pooled vector, then every head;
    the verdict is parity's (every head)."""
    import torch

    clip, logmels = fixed_clip(*clip_size), fixed_logmels()
    model.eval()
    with torch.no_grad():
        ours_stages = list(model.visual.stages(torch.from_numpy(clip)))
        v = model.visual.pooled(ours_stages[-1][1])
        a = model.audio.features(torch.from_numpy(logmels))
        ours_heads = {"joint": model.fc(model.fused(v, a))}
        if model.gblend:
            ours_heads |= {"audio": model.audio.fc(a), "visual": model.visual.classifier()(v)}
    stages: list[Stage] = []
    ref_stages = reference.av_visual_stages(blobs.arrays, arch.family, arch.depth, clip)
    for (name, ours), (ref_name, ref) in zip(ours_stages, ref_stages):
        assert name == ref_name, (name, ref_name)
        stages.append(_stage(f"visual.{name}", ours, ref, tolerance))
        last_ref = ref
    ref_a = reference.audio_features(blobs.arrays, arch.depth, logmels)
    stages.append(_stage("audio", a, ref_a, tolerance))
    ref_heads = reference.av_fusion(blobs.arrays, arch.num_classes, last_ref.mean(axis=(2, 3, 4)), ref_a)
    for head in ref_heads:
        stages.append(_stage("joint" if head == "joint" else f"{head} head", ours_heads[head], ref_heads[head], tolerance))
    verdicts = {h: compare(ours_heads[h].numpy(), ref_heads[h], logit_tolerance, clip.shape) for h in ref_heads}
    failing = [h for h, v in verdicts.items() if not v.passed]
    verdict = verdicts[failing[0] if failing else max(verdicts, key=lambda h: verdicts[h].max_abs_diff)]
    if failing:
        verdict.reason = f"{', '.join(failing)} head{'s' if len(failing) > 1 else ''}: {verdict.reason}"
    verdict.heads = {h: float(v.max_abs_diff) for h, v in verdicts.items()}
    first = next((s.name for s in stages if s.divergent), None)
    kind = None if first is None else ("block" if first.startswith("visual.layer") else
                                       "stem" if first == "visual.stem" else
                                       "head" if first.endswith(" head") else first)
    return Trace(stages, first, HINTS.get(kind, ""), verdict, tolerance)


def _stage(name: str, ours, ref: np.ndarray, tolerance: float) -> Stage:
    """One stage's comparison, in torch (threaded, no float64 copy of ``ours``); a NaN or Inf anywhere
    makes the maximum non-finite, so no separate finiteness pass is needed."""
    import torch

    if tuple(ours.shape) != ref.shape:
        return Stage(name, float("nan"), float("nan"), list(ref.shape), True,
                     f"shape {list(ours.shape)} vs the reference's {list(ref.shape)}")
    r = torch.from_numpy(ref)
    diff = float(torch.sub(ours, r).abs_().max())
    scale = float(r.abs().max())
    if not (np.isfinite(diff) and np.isfinite(scale)):
        return Stage(name, float("nan"), float("nan"), list(ref.shape), True, "NaN or Inf")
    rel = diff / (scale or 1.0)
    return Stage(name, diff, rel, list(ref.shape), rel > tolerance)


def trace(blobs, arch, model, head: dict | None = None, clip_size=DEFAULT_CLIP,
          tolerance: float = DEFAULT_TRACE_TOLERANCE, logit_tolerance: float = DEFAULT_TOLERANCE) -> Trace:
    """The stem, every residual block and the head of ``model`` against the reference, in order, on the
    fixed clip; the first stage whose relative difference exceeds ``tolerance`` (or is not finite)."""
    import torch

    check_clip(arch, clip_size)
    if arch.fam.av:
        return _trace_av(blobs, arch, model, clip_size, tolerance, logit_tolerance)
    clip = fixed_clip(*clip_size, c=arch.in_channels)
    model.eval()
    # The PyTorch side runs first and keeps its (float32) stage outputs; the reference then streams past
    # them. Interleaving the two stage by stage makes torch's and NumPy's thread pools fight (~1.2x slower).
    with torch.no_grad():
        ours_stages = list(model.stages(torch.from_numpy(clip)))
        broken = None
        try:
            feats = model.pooled(ours_stages[-1][1])
        except ValueError as e:          # C3D with a padded pool5: fc6 cannot take what it gives
            broken = str(e)
        if broken:
            logits = np.full((clip.shape[0], arch.num_classes), np.nan)
        elif model.has_head:
            logits = model.classifier()(feats).numpy()
        else:
            logits = torch.nn.functional.linear(feats, torch.as_tensor(np.asarray(head["head.weight"])),
                                                torch.as_tensor(np.asarray(head["head.bias"]))).numpy()
    stages: list[Stage] = []
    for ref_name, ref in reference.stages(blobs.arrays, arch.family, arch.depth, clip):
        name, ours = ours_stages.pop(0)
        assert name == ref_name, (name, ref_name)
        stages.append(_stage(name, ours, ref, tolerance))
        last_ref = ref
    ref_logits = reference.head(blobs.arrays, arch.num_classes, last_ref, arch.family)
    stages.append(_stage("head", torch.from_numpy(logits), ref_logits, tolerance))
    verdict = compare(logits, ref_logits, logit_tolerance, clip.shape)
    if broken:
        stages[-1].note = verdict.reason = broken
    first = next((s.name for s in stages if s.divergent), None)
    kind = None if first is None else ("block" if first.startswith("layer") else
                                       "pool" if first.startswith("pool") else first)
    return Trace(stages, first, HINTS.get(kind, ""), verdict, tolerance)
