"""The pipeline: read -> detect -> map -> check (strict load + parity) -> write."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, arch as arch_mod, checkpoint, mapping, parity, zoo
from .blobs import Blobs, read_blobs
from .errors import CheckError, InputError, MappingError, OutputError, VmzconvError
from .targets import DEFAULT_TARGET, get_target, recipe

PRETRAIN_ONLY_CLASSES = {359: "IG-65M", 487: "Sports-1M"}


@dataclass
class Result:
    output: str
    sha256: str
    arch: str
    num_classes: int
    target: str
    tensors: int
    blobs_converted: int
    ignored: dict
    dropped: list
    notes: list
    verdict: parity.Verdict | None
    seconds: float
    card: str | None = None
    meta: dict = field(default_factory=dict)


def input_spec(a: arch_mod.Arch) -> dict:
    """What the converted model expects, and the test protocol behind its family's published numbers."""
    norm = zoo.NORMS["vmz"]
    spec = {"channel_order": "RGB", "layout": "NCTHW", "value_range": "0-255", "mean": list(norm["mean"]),
            "std": list(norm["std"])}
    spec.update(a.fam.protocol)
    if a.clip_len:                      # R2D: conv1 spans the clip, so the weights fix its length
        spec["clip_len"] = a.clip_len
    views = a.fam.protocol["num_clips"] * a.fam.protocol["num_crops"]
    spec["aggregation"] = f"softmax per view, mean over the {views} views"
    if a.flow:
        from .video import flow as F

        spec.update(F.input_spec(a.in_channels))
    if a.fam.av:
        from .video import audio as A

        spec["audio"] = {
            "shape": [1, A.MEL_FRAMES, A.MEL_FILTERS], "layout": "N x 1 x time x mel", "normalisation": "none",
            "source": f"the video's first audio stream, decoded and resampled to {A.SAMPLE_RATE} Hz mono float",
            "logmels": f"{A.MEL_FILTERS} mel filters 0-{A.SAMPLE_RATE // 2} Hz, {A.WINDOW_MS} ms Hann windows every "
                       f"{A.STEP_MS} ms, power x {A.GAIN}, ln (VMZ ops/LogMels.cc)",
            "alignment": "the clip's span of frames stretched to 100 log-mel rows (AVInput align_audio=1)",
            "silent": "a video without an audio stream is an error; --silent-audio feeds zeros and marks the output",
        }
    return spec


def build_meta(blobs: Blobs, a: arch_mod.Arch, target: str, table: mapping.Table, mapped: mapping.Mapped,
               verdict: parity.Verdict | None, builtin_table: bool, notes: list[str], options: dict) -> dict:
    """Checkpoint metadata = the model card. Plain Python types only (MMAction2 loads it without weights_only)."""
    meta = {
        "vmzconv_version": __version__,
        "source": {"file": Path(blobs.source).name, "sha256": blobs.sha256, "bytes": int(blobs.size)},
        "arch": a.name,
        "family": a.family,
        "family_title": a.fam.title,
        "depth": int(a.depth),
        "num_classes": int(a.num_classes),
        "conv1_temporal_kernel": int(a.conv1_kt),
        **({"gblend": bool(a.gblend)} if a.fam.av else {}),
        **({"input_channels": int(a.in_channels)} if a.flow else {}),
        "modality": a.modality,
        "target": target,
        "options": options,
        "mapping": {"table": table.name, "builtin": builtin_table, "sha256": table.sha256},
        "input": input_spec(a),
        "blobs": {
            "total": len(blobs),
            "converted": len(blobs) - len(mapped.ignored) - len(mapped.dropped_blobs),
            "ignored": dict(sorted(mapped.ignored.items())),
            "dropped": list(mapped.dropped_blobs),
        },
        "build": recipe(target, a) or "see `vmzconv convert --print-config` (an MMAction2 config)",
        "notes": list(blobs.notes) + list(notes),
        "parity": verdict.to_meta(measured=False) if verdict is not None else None,
        "zoo": None,
    }
    entry = zoo.lookup(blobs.source)
    if (entry is not None and entry["arch"] == a.name and entry.get("classes", a.num_classes) == a.num_classes
            and entry.get("input_channels", 3) == a.in_channels):
        meta["zoo"] = {
            "file": entry["file"], "pretrain": entry["pretrain"], "kind": entry["kind"],
            "name": entry["name"], "mmaction2_published": entry.get("mmaction2_published"),
            "mmaction2_config_norm": entry.get("norm"),
            "mmaction2_config_mean_std": zoo.NORMS[entry["norm"]] if entry.get("norm") else None,
            "published_accuracy": zoo.published_accuracy(entry),
            "matched_by": "file name only (case-insensitive, or its f<id>): unverified, since no sha256 of the "
                          "released files is known; a renamed file would be carded the same",
        }
        if entry.get("protocol_note"):
            meta["zoo"]["protocol_note"] = entry["protocol_note"]
        if "clip_len" in entry and not a.clip_len:     # e.g. R(2+1)D-34 clip 8 vs clip 32 (R2D: its weights say)
            meta["input"]["clip_len"] = int(entry["clip_len"])
        for key in ("crop_size", "short_side"):         # e.g. the AudioSet R(2+1)D-101 at 224
            if key in entry:
                meta["input"][key] = int(entry[key])
        if entry.get("resize") is False:
            meta["input"].pop("resize", None)
        meta["zoo"]["modality"] = entry.get("modality", "RGB")
    return meta


def card_of(meta: dict, verdict: parity.Verdict | None) -> dict:
    """The model card: the checkpoint's meta, plus the measured parity figures (kept out of the
    checkpoint so that its bytes do not change with thread counts)."""
    card = dict(meta)
    if verdict is not None:
        card["parity_measured"] = verdict.to_meta()
    return card


def check_consumer(target: str, a: arch_mod.Arch, state_dict, blobs: Blobs, clip_size,
                   tolerance: float = parity.DEFAULT_TOLERANCE) -> parity.Verdict:
    """Build the model with the card's recipe in the consumer library itself (torchvision, pytorchvideo),
    load ``state_dict`` strictly, and compare its logits with the reference on the parity clip."""
    code = recipe(target, a)
    if not code or code.startswith("#"):
        raise VmzconvError(f"--check-consumer: no library recipe to run for {a.name} in the {target} layout "
                           "(MMAction2: run the config --print-config prints); nothing was checked or written")
    import torch

    namespace: dict = {}
    try:
        exec(compile(code, f"<{target} recipe>", "exec"), namespace)      # our own recipe text, never input data
    except ImportError as e:
        raise VmzconvError(f"--check-consumer: {e.name or target} is not importable here ({e}); "
                           "the recipe in the card is unchecked") from None
    model = namespace["model"]
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckError(f"--check-consumer: the file does not load into {target}'s own model: "
                         f"{str(e).splitlines()[0][:200]}") from None
    clip = parity.fixed_clip(*clip_size, c=a.in_channels)
    with torch.no_grad():
        ours = model.eval()(torch.from_numpy(clip)).numpy()
    from . import reference

    ref = reference.forward(blobs.arrays, a.family, a.depth, a.num_classes, clip)
    return parity.compare(ours, ref, tolerance, clip.shape)


def visual_tower(blobs: Blobs, a: arch_mod.Arch, headless_ok: bool) -> tuple[Blobs, arch_mod.Arch, list[str]]:
    """An audio-visual file's visual tower as an ordinary file of its family: its "v_" blobs unprefixed, with
    the G-Blend visual head (v_last_out_L{N}) as its classifier. Without G-Blend heads there is no visual
    classifier: only a backbone layout takes it (the joint head then only probes parity, and is dropped)."""
    if not a.fam.av:
        raise VmzconvError(f"{blobs.source}: --tower visual is for audio-visual files; this is {a.name}")
    if not a.gblend and not headless_ok:
        raise VmzconvError(f"{blobs.source}: no G-Blend heads, so no classifier on the visual tower alone; "
                           "--target mmaction2-backbone writes the trunk without one")
    counts = arch_mod.av_blob_counts(blobs)
    note = (f"the visual tower of the audio-visual {a.name} ({blobs.source}): weights from its audio-visual "
            f"training; {len(blobs) - counts['visual']} audio-tower and fusion blobs left out"
            + ("; its classifier is the G-Blend visual head" if a.gblend else ""))
    view = arch_mod.av_visual_blobs(blobs, a.num_classes, "visual" if a.gblend else "joint")
    return view, a.visual, [note]


def choose_target(a: arch_mod.Arch, target: str, keep_head: bool) -> tuple[str, list[str]]:
    """``auto`` is the family's usual layout; pretraining-only class counts go to MMAction2 as a
    backbone unless the head is wanted (layouts that always keep the head ignore --keep-head)."""
    if target in (None, "", "auto"):
        target = DEFAULT_TARGET[a.family]
    get_target(target).check(a.family, a.name)
    if target == "mmaction2" and a.num_classes in PRETRAIN_ONLY_CLASSES and not keep_head:
        return "mmaction2-backbone", [
            f"{a.num_classes} classes = {PRETRAIN_ONLY_CLASSES[a.num_classes]} pretraining: written as an MMAction2 "
            "backbone (pretrained=) with the head dropped; --keep-head keeps the full recognizer"]
    return target, []


def map_blobs(blobs: Blobs, a: arch_mod.Arch, target: str, mapping_path: str | Path | None = None):
    """Build the target model on the meta device, fill it through the table; returns (model, table, mapped)."""
    from .models import build_model, fill

    get_target(target).check(a.family, a.name)
    table_path = Path(mapping_path) if mapping_path else mapping.builtin_table_path(a.family, target)
    table = mapping.load_table(table_path)
    if table.target != target:
        raise MappingError(f"mapping table {table.name} is for target {table.target}, not {target}")
    model = build_model(target, a, empty=True)
    mapped = mapping.apply(table, a, blobs, model.state_dict())
    fill(model, mapped.state_dict)
    return model, table, mapped


def convert(src: str | Path, out: str | Path, arch: str = "auto", target: str = "auto",
            mapping_path: str | Path | None = None, check_parity: bool = True,
            parity_clip=None, tolerance: float = parity.DEFAULT_TOLERANCE,
            force: bool = False, keep_head: bool = False, card: bool = True,
            publish: str | None = None, date: str | None = None, max_bytes: int | None = None,
            progress=None, consumer: bool = False, allow_non_finite: bool = False, tower: str = "all",
            clip_for_resnets_only: bool = False) -> Result:
    """Convert one VMZ pickle. Raises a VmzconvError (and writes nothing) on any failure. ``tower="visual"``:
    an audio-visual file's visual tower alone, as an ordinary file of its family.

    ``out`` is the output file, or with ``publish`` the folder that receives
    ``PUBLISH_YYYYMMDD-<sha8>.pth``. ``parity_clip`` (T, H) defaults to the family's; with
    ``clip_for_resnets_only`` (bulk's mixed folders) C3D, whose fc6 fixes its input, keeps its own.
    """
    step = progress or (lambda name: None)
    t0 = time.perf_counter()
    if publish is None:                     # everything checkable is checked before the work
        out = checkpoint.check_output_path(out, force)
        if card and checkpoint.card_path(out).exists() and not force:
            raise OutputError(f"{checkpoint.card_path(out)}: already exists (use --force to overwrite)")
    else:
        out = checkpoint.prepare_publish_folder(out)
    options = ({"arch": arch, "target": target} | ({"keep_head": True} if keep_head else {})
               | ({"parity_clip": list(parity_clip)} if parity_clip else {}) | ({"tower": tower} if tower != "all" else {}))
    step("read")
    blobs = read_blobs(src, max_bytes)
    a = arch_mod.resolve(blobs, arch)
    tower_notes: list[str] = []
    whole = a
    if tower == "visual":
        headless = target == "mmaction2-backbone" or (target in (None, "", "auto") and not a.gblend)
        blobs, a, tower_notes = visual_tower(blobs, a, headless)
        if target in (None, "", "auto") and headless:
            target = "mmaction2-backbone"
    elif tower != "all":
        raise VmzconvError(f"--tower {tower!r}: all or visual")
    target, notes = choose_target(a, target, keep_head)
    notes = tower_notes + notes
    if parity_clip and clip_for_resnets_only and not a.fam.resnet and tuple(parity_clip) != a.parity_clip:
        notes.append(f"--parity-clip {','.join(map(str, parity_clip))} is for the video ResNets; {a.fam.title}'s "
                     f"fc6 fixes its parity clip at {','.join(map(str, a.parity_clip))}")
        parity_clip = None
    step("map")
    model, table, mapped = map_blobs(blobs, a, target, mapping_path)
    if not allow_non_finite:        # a sum per tensor: torch.isfinite allocated a full boolean copy of each
        bad = [k for k, v in mapped.state_dict.items() if v.is_floating_point() and not checkpoint.all_finite(v)]
        if bad:
            raise InputError(f"{src}: {len(bad)} weight tensors hold NaN or Inf (first: {bad[0]}) — refused; "
                             "--allow-non-finite writes them anyway (parity then fails)")
    verdict = None
    if check_parity:
        step("parity")
        head = mapped.dropped if not get_target(target).has_head else None
        verdict = parity.run(blobs, a, model, head=head, clip_size=parity_clip or a.parity_clip,
                             tolerance=tolerance)
        parity.require(verdict, str(src))
    if consumer:
        step("consumer")
        v = check_consumer(target, a, mapped.state_dict, blobs, parity_clip or a.parity_clip, tolerance)
        if not v.passed:
            raise CheckError(f"--check-consumer: {target}'s own model, built as the card says, does not compute "
                             f"what Caffe2 computes — {v.reason}; nothing was written")
        notes = notes + [f"--check-consumer: {target}'s own model built by the card's recipe passes parity "
                         f"(max |logit diff| {v.max_abs_diff:.2g})"]
    step("write")
    meta = build_meta(blobs, a, target, table, mapped, verdict, builtin_table=mapping_path is None, notes=notes,
                      options=options)
    if tower == "visual":
        entry = zoo.lookup(blobs.source)
        meta["tower"] = "visual"
        meta["tower_of"] = {"arch": whole.name, "gblend": bool(whole.gblend),
                            "pretrain": entry["pretrain"] if entry and entry["arch"] == whole.name else None,
                            "weights": "trained as the visual tower of an audio-visual model (VMZ "
                                       "audio_visual_model.py); the audio tower and fusion head are not in this file"}
    if publish is not None:
        day = date or datetime.date.today().strftime("%Y%m%d")
        out, sha = checkpoint.save_published(out, publish, day, mapped.state_dict, meta, force=force)
    else:
        sha = checkpoint.save(out, mapped.state_dict, meta, force=force)
    card_file = str(checkpoint.write_card(out, card_of(meta, verdict))) if card else None
    return Result(str(out), sha, a.name, a.num_classes, target, len(mapped.state_dict),
                  meta["blobs"]["converted"], mapped.ignored, mapped.dropped_blobs, meta["notes"], verdict,
                  round(time.perf_counter() - t0, 3), card_file, meta)


def parity_of(src: str | Path, converted: str | Path, clip=None, tolerance: float = parity.DEFAULT_TOLERANCE,
              trace: bool = False, trace_tolerance: float = parity.DEFAULT_TRACE_TOLERANCE,
              bn_eps: float | None = None):
    """Parity of an existing converted file (ours, or any checkpoint in a known layout) against its pickle:
    (arch, layout, Verdict), or with ``trace`` (arch, layout, Trace) comparing every stage. ``bn_eps``
    builds the PyTorch side with another BN eps, as a consumer library might."""
    from .load import load_converted

    blobs = read_blobs(src)
    a = arch_mod.detect(blobs)
    if a.fam.av and checkpoint.load_meta(converted).get("tower") == "visual":
        blobs, a, _ = visual_tower(blobs, a, headless_ok=True)
    conv = load_converted(converted, a, allow_non_finite=True, **({"bn_eps": bn_eps} if bn_eps is not None else {}))
    head = None
    if not conv.target.has_head:
        table = mapping.load_table(mapping.builtin_table_path(a.family, conv.target.name))
        head = {role: blobs[b] for b, role in mapping.expand(table, a).dropped.items()}
    clip = clip or a.parity_clip
    if trace:
        return a, conv.target.name, parity.trace(blobs, a, conv.model, head, clip, trace_tolerance, tolerance)
    return a, conv.target.name, parity.run(blobs, a, conv.model, head=head, clip_size=clip, tolerance=tolerance)


def inspect(src: str | Path, max_bytes: int | None = None) -> dict:
    """What a pickle holds, without converting it."""
    blobs = read_blobs(src, max_bytes)
    a = arch_mod.detect(blobs)          # an unsupported or unrecognised model is the one-line answer
    report = {
        "file": str(src),
        "sha256": blobs.sha256,
        "bytes": blobs.size,
        "blobs": len(blobs),
        "dtypes": sorted({str(a.dtype) for a in blobs.arrays.values()}),
        "notes": list(blobs.notes),
    }
    from .models import build_model

    target = DEFAULT_TARGET[a.family]
    table = mapping.load_table(mapping.builtin_table_path(a.family, target))
    wanted = {b for b, _ in mapping.expand(table, a).pairs}
    ignored, refused, unknown = mapping.sort_leftovers(blobs.names(), wanted)
    missing = sorted(wanted - set(blobs.names()))
    model = build_model(target, a, empty=True)
    params = int(sum(p.numel() for p in model.parameters()))
    report.update(
        arch=a.name, family=a.family, depth=a.depth, num_classes=a.num_classes, conv1_temporal_kernel=a.conv1_kt,
        modality=a.modality,
        parameter_blobs=len(wanted & set(blobs.names())), parameters=params,
        non_parameter_blobs=dict(sorted(ignored.items())),
        suspicious={"missing": missing, "unknown": sorted(unknown), "refused": refused,
                    "non_finite": sorted(n for n in wanted if n in blobs and not np.isfinite(blobs[n]).all())},
    )
    if a.fam.av:
        w, n = a.feature_dim, a.num_classes
        count = arch_mod.av_blob_counts(blobs)
        report["towers"] = {
            "visual": f"{arch_mod.FAMILIES[a.fam.visual].title}-{a.depth} on RGB clips ({count['visual']} blobs)",
            "audio": f"VMZ's audio ResNet-{a.depth} on 1x100x40 log-mels ({count['audio']} blobs)",
            "fusion": f"[visual {w}, audio {w}] -> av_fc1 {2 * w}->{w}, ReLU -> av_fc2 {w}->{w}, ReLU -> "
                      f"last_out_L{n} {w}->{n}",
            "heads": ["joint", "audio", "visual"] if a.gblend else ["joint"],
        }
    return report
