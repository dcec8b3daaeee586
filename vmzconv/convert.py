"""The pipeline: read -> detect -> map -> check (strict load + parity) -> write."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, arch as arch_mod, checkpoint, mapping, parity
from .blobs import Blobs, read_blobs
from .errors import MappingError
from .models import BN_EPS, build_model, fill, get_target

VMZ_MEAN = [110.201, 100.64, 95.9966]
VMZ_STD = [58.1489, 56.4701, 55.3324]


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
    meta: dict = field(default_factory=dict)


def input_spec(mean=VMZ_MEAN, std=VMZ_STD) -> dict:
    return {"channel_order": "RGB", "layout": "NCTHW", "value_range": "0-255", "mean": list(mean), "std": list(std)}


def build_meta(blobs: Blobs, a: arch_mod.Arch, target: str, table: mapping.Table, mapped: mapping.Mapped,
               verdict: parity.Verdict | None, builtin_table: bool) -> dict:
    """Checkpoint metadata: plain Python types only (MMAction2 loads it without weights_only)."""
    return {
        "vmzconv_version": __version__,
        "source": {"file": Path(blobs.source).name, "sha256": blobs.sha256, "bytes": int(blobs.size)},
        "arch": a.name,
        "family": a.family,
        "depth": int(a.depth),
        "num_classes": int(a.num_classes),
        "conv1_temporal_kernel": int(a.conv1_kt),
        "target": target,
        "mapping": {"table": table.name, "builtin": builtin_table, "sha256": table.sha256},
        "input": input_spec(),
        "blobs": {
            "total": len(blobs),
            "converted": len(blobs) - len(mapped.ignored) - len(mapped.dropped_blobs),
            "ignored": dict(sorted(mapped.ignored.items())),
            "dropped": list(mapped.dropped_blobs),
        },
        "notes": list(blobs.notes),
        "parity": verdict.to_meta() if verdict is not None else None,
    }


def map_blobs(blobs: Blobs, a: arch_mod.Arch, target: str = "mmaction2", mapping_path: str | Path | None = None,
              with_pool1: bool = True, bn_eps: float = BN_EPS):
    """Build the target model, fill it through the table, and load it with ``strict=True``."""
    get_target(target)
    table_path = Path(mapping_path) if mapping_path else mapping.builtin_table_path(a.family, target)
    table = mapping.load_table(table_path)
    if table.target != target:
        raise MappingError(f"mapping table {table.name} is for target {table.target}, not {target}")
    model = build_model(target, a, with_pool1=with_pool1, bn_eps=bn_eps, empty=True)
    mapped = mapping.apply(table, a, blobs, model.state_dict())
    fill(model, mapped.state_dict)
    return model, table, mapped


def convert(src: str | Path, out: str | Path, arch: str = "auto", target: str = "mmaction2",
            mapping_path: str | Path | None = None, check_parity: bool = True,
            parity_clip=parity.DEFAULT_CLIP, tolerance: float = parity.DEFAULT_TOLERANCE,
            force: bool = False, with_pool1: bool = True, bn_eps: float = BN_EPS, progress=None) -> Result:
    """Convert one VMZ pickle. Raises a VmzconvError (and writes nothing) on any failure.

    ``with_pool1`` and ``bn_eps`` change the PyTorch model only (never the reference):
    they exist so tests can prove that parity catches such mistakes.
    """
    step = progress or (lambda name: None)
    t0 = time.perf_counter()
    out = checkpoint.check_output_path(out, force)
    step("read")
    blobs = read_blobs(src)
    a = arch_mod.resolve(blobs, arch)
    step("map")
    model, table, mapped = map_blobs(blobs, a, target, mapping_path, with_pool1, bn_eps)
    verdict = None
    if check_parity:
        step("parity")
        head = mapped.dropped if not get_target(target).has_head else None
        verdict = parity.run(blobs, a, target, model, head=head, clip_size=parity_clip, tolerance=tolerance)
        parity.require(verdict, str(src))
    step("write")
    meta = build_meta(blobs, a, target, table, mapped, verdict, builtin_table=mapping_path is None)
    sha = checkpoint.save(out, mapped.state_dict, meta, force=force)
    return Result(str(out), sha, a.name, a.num_classes, target, len(mapped.state_dict),
                  meta["blobs"]["converted"], mapped.ignored, mapped.dropped_blobs, blobs.notes, verdict,
                  round(time.perf_counter() - t0, 3), meta)


def parity_of(src: str | Path, converted: str | Path, clip=parity.DEFAULT_CLIP,
              tolerance: float = parity.DEFAULT_TOLERANCE) -> tuple[arch_mod.Arch, str, parity.Verdict]:
    """Parity of an existing converted file against the pickle it came from."""
    blobs = read_blobs(src)
    a = arch_mod.detect(blobs)
    state, meta = checkpoint.load(converted)
    target = meta.get("target") or _guess_target(state)
    model = build_model(target, a, empty=True)
    try:
        fill(model, state)
    except RuntimeError as e:
        raise MappingError(f"{converted}: does not load strictly into {a.name} ({target}): {str(e).splitlines()[0][:300]}") from None
    head = None
    if not get_target(target).has_head:
        table = mapping.load_table(mapping.builtin_table_path(a.family, target))
        head = {role: blobs[b] for b, role in mapping.expand(table, a).dropped.items()}
    return a, target, parity.run(blobs, a, target, model, head=head, clip_size=clip, tolerance=tolerance)


def _guess_target(state) -> str:
    return "mmaction2" if any(k.startswith("backbone.") for k in state) else "mmaction2-backbone"


def inspect(src: str | Path) -> dict:
    """What a pickle holds, without converting it."""
    blobs = read_blobs(src)
    report = {
        "file": str(src),
        "sha256": blobs.sha256,
        "bytes": blobs.size,
        "blobs": len(blobs),
        "dtypes": sorted({str(a.dtype) for a in blobs.arrays.values()}),
        "notes": list(blobs.notes),
    }
    try:
        a = arch_mod.detect(blobs)
    except arch_mod.ArchError as e:
        report.update(arch=None, problem=str(e))
        return report
    table = mapping.load_table(mapping.builtin_table_path(a.family, "mmaction2"))
    plan = mapping.expand(table, a)
    wanted = {b for b, _ in plan.pairs}
    leftovers = mapping.load_leftovers()
    ignored, unknown, refused = {}, [], {}
    for name in blobs.names():
        if name in wanted:
            continue
        verdict = leftovers.classify(name)
        if verdict is None:
            unknown.append(name)
        elif verdict[0] == "refuse":
            refused[name] = verdict[1]
        else:
            ignored[name] = verdict[1]
    missing = sorted(wanted - set(blobs.names()))
    model = build_model("mmaction2", a, empty=True)
    params = int(sum(p.numel() for p in model.parameters()))
    report.update(
        arch=a.name, family=a.family, depth=a.depth, num_classes=a.num_classes, conv1_temporal_kernel=a.conv1_kt,
        parameter_blobs=len(wanted & set(blobs.names())), parameters=params,
        non_parameter_blobs=dict(sorted(ignored.items())),
        suspicious={"missing": missing, "unknown": sorted(unknown), "refused": refused,
                    "non_finite": sorted(n for n in wanted if n in blobs and not np.isfinite(blobs[n]).all())},
    )
    return report
