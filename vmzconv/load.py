"""``load_converted``: the one way to open a converted checkpoint as a filled model.

Reads a ``.pth`` / ``.safetensors`` written by vmzconv (its meta names arch and layout), or any
checkpoint of a VMZ model in a known layout without that meta (a plain MMAction2
``{"state_dict": ...}``, a torchvision-layout or bare state dict): the layout is then recognised
from the keys and the arch must be given. Used by ``parity``, ``verify``, ``predict``,
``features`` and ``export``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .arch import FAMILIES, Arch, arch_from_card, parse_arch_name
from .blobs import short_repr
from .errors import ArchError, InputError, MappingError, VmzconvError
from .files import sha256_file
from .targets import TARGETS, Target, get_target, recognise


@dataclass
class Converted:
    path: str
    model: object            # models.VideoResNet, filled, in eval mode
    arch: Arch
    target: Target
    meta: dict = field(default_factory=dict)
    _sha256: str | None = None
    notes: list = field(default_factory=list)     # what loading changed (e.g. float64 tensors cast)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_card(path, meta: dict) -> None:
    """Every meta field the run-time reads, checked for type, range, length and finiteness before use: a
    checkpoint is input like any other (one line naming the file and the field)."""
    from .video import protocol as P

    def bad(field_name: str, why: str):
        raise InputError(f"{path}: meta field {field_name!r} {why}")

    for key in ("arch", "target", "family"):
        if key in meta and not isinstance(meta[key], str):
            bad(key, f"is a {type(meta[key]).__name__}, not a string")
    if "target" in meta and meta["target"] not in TARGETS:
        bad("target", f"names no known layout ({short_repr(meta['target'])})")
    for key, top in (("num_classes", 1_000_000), ("conv1_temporal_kernel", 64), ("depth", 1000)):
        if key in meta:
            v = meta[key]
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
                bad(key, f"must be a whole number from 1 to {top}, not {short_repr(v)}")
    if meta.get("zoo") is not None:
        if not isinstance(meta["zoo"], dict):
            bad("zoo", f"is a {type(meta['zoo']).__name__}, not a table")
        acc = meta["zoo"].get("published_accuracy")
        if acc is not None and not (isinstance(acc, dict) and all(_finite_number(v) for v in acc.values())):
            bad("zoo.published_accuracy", "is not a table of numbers")
    inp = meta.get("input")
    if inp is None:
        return
    if not isinstance(inp, dict):
        bad("input", f"is a {type(inp).__name__}, not a table")
    channels = meta.get("input_channels", 3)
    if not (isinstance(channels, int) and not isinstance(channels, bool) and 1 <= channels <= 64):
        bad("input_channels", f"must be a whole number from 1 to 64, not {short_repr(channels)}")
    for key in ("mean", "std"):
        if key in inp:
            v = inp[key]
            if not (isinstance(v, list) and len(v) == channels and all(_finite_number(x) for x in v)):
                what = "(R, G, B)" if channels == 3 else "(one per input channel)"
                bad(f"input.{key}", f"must be {channels} finite numbers {what}, not {short_repr(v)}")
            if key == "std" and min(v) <= 0:
                bad("input.std", f"must be positive, not {v}")
    fields = {k: inp[k] for k in ("clip_len", "frame_interval", "num_clips", "short_side", "crop_size", "num_crops",
                                  "resize") if k in inp}
    if "protocol" in inp:
        fields["name"] = inp["protocol"]
    try:
        P.Protocol(**fields)
    except VmzconvError as e:
        raise InputError(f"{path}: meta field 'input': {e}") from None


def _arch_from_meta(path, meta: dict) -> Arch:
    try:
        return arch_from_card(meta)
    except (ArchError, KeyError, TypeError, ValueError):
        raise InputError(f"{path}: its vmzconv meta names an arch this version does not know "
                         f"({str(meta.get('arch'))[:60]!r})") from None


def _arch_from_keys(path, state, target: Target, arch: Arch | str) -> Arch:
    if isinstance(arch, Arch):
        return arch
    family, depth = parse_arch_name(arch)
    two_step = FAMILIES[family].stem == "2plus1d" and target.stem_temporal_key
    stem = state.get(target.stem_temporal_key if two_step else target.stem_key)
    kt = int(stem.shape[2]) if stem is not None and stem.ndim == 5 else None
    classes = 0
    if target.head_keys:
        head = state.get(target.head_keys[0])
        if head is None or head.ndim != 2:
            raise InputError(f"{path}: no classifier weight {target.head_keys[0]!r} in this {target.name} checkpoint")
        classes = int(head.shape[0])
    return Arch(family, depth, classes or 1, kt)


def load_converted(path: str | Path, arch: Arch | str | None = None, allow_non_finite: bool = False,
                   **faults) -> Converted:
    """Open ``path`` and return its model filled strictly (``faults`` reach :func:`models.build_model`).

    ``arch`` is needed only for files without vmzconv's meta; an ``Arch`` object (e.g. detected from
    the source pickle) is taken as it is. A file whose meta disagrees with ``arch`` is an error.
    ``allow_non_finite``: read NaN/Inf weights (``parity`` shows where they diverge); every command that
    runs a model refuses them."""
    from .models import build_model, fill

    notes: list[str] = []
    state, meta = checkpoint.load(path, notes, allow_non_finite)
    check_card(path, meta)
    if meta.get("target"):
        target = get_target(meta["target"])
    else:
        target = recognise(state)
        if target is None:
            shown = ", ".join(repr(k)[:60] for k in list(state)[:3])
            raise InputError(f"{path}: its keys match no known layout (mmaction2, torchvision, pytorchvideo): {shown}")
    if meta.get("arch"):
        a = _arch_from_meta(path, meta)
        wanted = arch.name if isinstance(arch, Arch) else arch
        if wanted and wanted != a.name:
            raise InputError(f"{path}: its meta records {a.name}, not {wanted} — it was converted from another model")
    elif arch is None:
        raise InputError(f"{path}: no vmzconv meta in this checkpoint; name its architecture with --arch")
    else:
        a = _arch_from_keys(path, state, target, arch)
    model = build_model(target.name, a, empty=True, **faults)
    try:
        fill(model, state)
    except RuntimeError:
        raise MappingError(f"{path}: does not load strictly as {a.name} ({target.name}): "
                           + describe_mismatch(model.state_dict(), state)) from None
    return Converted(str(path), model.eval(), a, target, dict(meta), notes=notes)


def describe_mismatch(expected, state, show: int = 3) -> str:
    """Missing, unexpected and mis-shaped keys (first few of each), for one line."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{repr(k)[:80]} {list(state[k].shape)} vs {list(expected[k].shape)} in the model" for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            shown = ", ".join(i if label == "mis-shaped" else repr(i)[:80] for i in items[:show])
            parts.append(f"{len(items)} {label} ({shown}{', ...' if len(items) > show else ''})")
    return "; ".join(parts) or "values do not load"
