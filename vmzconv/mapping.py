"""Apply a declarative mapping table (``mappings/*.toml``) to a set of blobs.

A table says which Caffe2 blob feeds which state_dict entry for one
(family, target) pair. This engine expands its templates over the block
enumeration and then accounts for every name: each blob consumed exactly once
(or classified as a training leftover), each target entry filled exactly once,
each shape equal to the model's. It knows no Caffe2 names itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arch import FAMILIES, Arch
from .blobs import Blobs
from .errors import InputError, MappingError


def mappings_dir() -> Path:
    """Installed wheels carry the tables in ``vmzconv/mappings``; a checkout has them at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "mappings", here.parent / "mappings"):
        if candidate.is_dir():
            return candidate
    raise MappingError(f"mapping tables not found next to {here}")


def builtin_table_path(family: str, target: str) -> Path:
    """The built-in table for a family's blob-naming scheme (the 2018 families share R3D's) and a layout."""
    scheme = FAMILIES[family].tables if family in FAMILIES else family
    path = mappings_dir() / f"{scheme}.{target}.toml"
    if not path.is_file():
        raise MappingError(f"no built-in mapping table for {family} -> {target} ({path.name})")
    return path


@dataclass
class Table:
    path: Path
    family: str
    target: str
    bn_suffixes: dict[str, str]
    bn_constants: dict[str, int]
    sections: dict[str, dict]
    sha256: str
    include: dict = field(default_factory=dict)   # name -> {table, blobs, keys, head}: another table, prefixed

    @property
    def name(self) -> str:
        return self.path.name


_SECTIONS = ("stem", "trunk", "block", "simple_block", "bottleneck_block", "projection", "head",
             "audio_stem", "audio_block", "audio_bottleneck", "audio_projection", "gblend_head")


def load_table(path: str | Path) -> Table:
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except FileNotFoundError:
        raise MappingError(f"mapping table {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MappingError(f"mapping table {path}: not valid TOML: {e}") from None
    for key in ("family", "target"):
        if not isinstance(raw.get(key), str):
            raise MappingError(f"mapping table {path}: missing string field {key!r}")
    bn = raw.get("bn", {})
    unknown = set(raw) - {"family", "target", "bn", "include", *_SECTIONS}
    if unknown:
        raise MappingError(f"mapping table {path}: unknown sections {sorted(unknown)}")
    return Table(
        path=path,
        family=raw["family"],
        target=raw["target"],
        bn_suffixes=dict(bn.get("suffixes", {})),
        bn_constants=dict(bn.get("constants", {})),
        sections={s: dict(raw.get(s, {})) for s in _SECTIONS},
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        include=dict(raw.get("include", {})),
    )


@dataclass
class Plan:
    """The expanded table for one arch: blob -> key, blob -> dropped role, key -> constant."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)


def block_enumeration(arch: Arch):
    """(i, L, j) for every block: VMZ's global counter, layer 1-4, index in layer."""
    i = 0
    for layer, n in enumerate(arch.layers, start=1):
        for j in range(n):
            yield i, layer, j
            i += 1


def audio_enumeration(arch: Arch):
    """(i, L, j) for every block of VMZ's audio tower: layer 0 holds the three blocks before the stages."""
    i = 0
    for layer, n in enumerate((3, *arch.layers)):
        for j in range(n):
            yield i, layer, j
            i += 1


def expand(table: Table, arch: Arch, head: bool = True) -> Plan:
    """[stem] and [trunk] (a network without repeated blocks: C3D) apply once, [block] to every block,
    [simple_block] / [bottleneck_block] to blocks of that kind (depth 18/34 vs 50+), [projection] to the
    blocks that have a shortcut projection. Audio-visual tables: [audio_stem] once, [audio_block] to every
    audio block (layer 0: the three before the stages), [audio_bottleneck] to those of a bottleneck network's
    stages, [audio_projection] to the first block of each audio layer, [gblend_head] when the G-Blend heads
    are there; [include] expands another table for the visual tower (``{visual}``: its scheme) with its
    blob names and keys prefixed, its [head] only with the G-Blend heads. ``head=False`` skips [head]."""
    plan = Plan()
    blocks = [dict(i=i, L=L, j=j) for i, L, j in block_enumeration(arch)]
    audio = [dict(i=i, L=L, j=j) for i, L, j in audio_enumeration(arch)] if arch.fam.av else []
    contexts = {
        "stem": [{}],
        "trunk": [{}],
        "head": [{"classes": arch.num_classes}],
        "block": blocks,
        "simple_block": blocks if arch.kind == "simple" else [],
        "bottleneck_block": blocks if arch.kind == "bottleneck" else [],
        "projection": [b for b in blocks if arch.has_projection(b["L"], b["j"])],
        "audio_stem": [{}] if audio else [],
        "audio_block": audio,
        "audio_bottleneck": [b for b in audio if b["L"] > 0 and arch.kind == "bottleneck"],
        "audio_projection": [b for b in audio if b["j"] == 0],
        "gblend_head": [{"classes": arch.num_classes}] if arch.gblend else [],
    }
    if not head:
        contexts["head"] = []
    for name, inc in table.include.items():
        if not (isinstance(inc, dict) and isinstance(inc.get("table"), str)) or not arch.fam.av:
            raise MappingError(f"mapping table {table.name}: [include] {name!r} needs a table (and an audio-visual arch)")
        sub = load_table(mappings_dir() / inc["table"].format(visual=FAMILIES[arch.fam.visual].tables))
        sub_plan = expand(sub, arch.visual, head=arch.gblend and inc.get("head") == "gblend")
        pb, pk = str(inc.get("blobs", "")), str(inc.get("keys", ""))
        plan.pairs += [(pb + b, pk + k) for b, k in sub_plan.pairs]
        plan.dropped.update({pb + b: role for b, role in sub_plan.dropped.items()})
        plan.constants.update({pk + k: v for k, v in sub_plan.constants.items()})
    for section, entries in table.sections.items():
        for ctx in contexts[section]:
            for src_t, dst in entries.items():
                src = _fmt(table, src_t, ctx)
                if isinstance(dst, str):
                    plan.pairs.append((src, _fmt(table, dst, ctx)))
                elif isinstance(dst, dict) and "bn" in dst and set(dst) <= {"bn", "suffixes"}:
                    prefix = _fmt(table, dst["bn"], ctx)
                    for sfx, attr in dst.get("suffixes", table.bn_suffixes).items():
                        plan.pairs.append((src + sfx, f"{prefix}.{attr}"))
                    for attr, value in table.bn_constants.items():
                        plan.constants[f"{prefix}.{attr}"] = value
                elif isinstance(dst, dict) and set(dst) == {"drop"}:
                    plan.dropped[src] = str(dst["drop"])
                else:
                    raise MappingError(f"mapping table {table.name}: [{section}] {src_t!r} has an unknown value {dst!r}")
    return plan


def _fmt(table: Table, template: str, ctx: dict) -> str:
    try:
        return template.format(**ctx)
    except (KeyError, IndexError, ValueError) as e:
        raise MappingError(f"mapping table {table.name}: template {template!r} uses an unknown variable ({e})") from None


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """Share the reader's buffer when it is writable and aligned (the common case); copy otherwise."""
    if arr.flags.writeable and arr.flags.aligned and arr.flags.c_contiguous:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))


@dataclass
class Leftovers:
    ignore: list[tuple[str, str]]
    refuse: list[tuple[str, str]]

    def classify(self, name: str) -> tuple[str, str] | None:
        for kind, rules in (("refuse", self.refuse), ("ignore", self.ignore)):
            for pattern, why in rules:
                if fnmatch.fnmatchcase(name, pattern):
                    return kind, why
        return None


def sort_leftovers(names, used) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The blobs in ``names`` that ``used`` does not consume: (ignored -> why, refused -> why, unknown)."""
    rules = load_leftovers()
    ignored: dict[str, str] = {}
    refused: dict[str, str] = {}
    unknown: list[str] = []
    for name in names:
        if name in used:
            continue
        verdict = rules.classify(name)
        if verdict is None:
            unknown.append(name)
        else:
            (refused if verdict[0] == "refuse" else ignored)[name] = verdict[1]
    return ignored, refused, unknown


def load_leftovers() -> Leftovers:
    raw = tomllib.loads((mappings_dir() / "caffe2-leftovers.toml").read_text())
    return Leftovers(
        ignore=[(r["pattern"], r["why"]) for r in raw.get("ignore", [])],
        refuse=[(r["pattern"], r["why"]) for r in raw.get("refuse", [])],
    )


@dataclass
class Mapped:
    state_dict: "OrderedDict[str, torch.Tensor]"
    ignored: dict[str, str]            # blob -> why (training leftovers)
    dropped: dict[str, np.ndarray]     # role -> array (e.g. the FC of a backbone-only target)
    dropped_blobs: list[str]


def apply(table: Table, arch: Arch, blobs: Blobs, expected: "OrderedDict[str, torch.Tensor]") -> Mapped:
    """Fill ``expected`` (a model's state_dict) from ``blobs`` through ``table``."""
    if table.family != arch.fam.tables:
        raise MappingError(f"mapping table {table.name} is for {table.family}, the blobs are {arch.name}"
                           + ("" if arch.fam.tables == arch.family else f" ({arch.fam.tables} names)"))
    plan = expand(table, arch)
    src = blobs.source
    seen_blobs: dict[str, str] = {}
    filled: dict[str, torch.Tensor] = {}
    for blob, key in plan.pairs:
        if blob in seen_blobs or blob in plan.dropped:
            raise MappingError(f"mapping table {table.name}: blob {blob!r} is used twice ({seen_blobs.get(blob, 'drop')} and {key})")
        seen_blobs[blob] = key
        if key in filled or key in plan.constants:
            raise MappingError(f"mapping table {table.name}: entry {key!r} is filled twice")
        if key not in expected:
            raise MappingError(f"mapping table {table.name}: {blob!r} -> {key!r}, but the {arch.name} model has no entry {key!r}")
        if blob not in blobs:
            raise MappingError(f"{src}: blob {blob!r} is missing (it feeds {key}, shape {list(expected[key].shape)})")
        arr = blobs[blob]
        want = tuple(expected[key].shape)
        if arr.shape != want:
            raise MappingError(f"{src}: blob {blob!r} has shape {list(arr.shape)}, {key} needs {list(want)}")
        if arr.dtype != np.float32:
            raise MappingError(f"{src}: blob {blob!r} is {arr.dtype}, {key} needs float32")
        filled[key] = _tensor(arr)
    for key, value in plan.constants.items():
        if key not in expected:
            raise MappingError(f"mapping table {table.name}: constant {key!r} is not an entry of the {arch.name} model")
        filled[key] = torch.tensor(value, dtype=expected[key].dtype)
    for blob in plan.dropped:
        if blob not in blobs:
            raise MappingError(f"{src}: blob {blob!r} is missing")

    missing = [k for k in expected if k not in filled]
    if missing:
        raise MappingError(
            f"mapping table {table.name} leaves {len(missing)} entries of the {arch.name} model unfilled: "
            + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        )

    ignored, refused, unknown = sort_leftovers(blobs.names(), seen_blobs.keys() | plan.dropped.keys())
    for name, why in refused.items():
        raise InputError(f"{src}: blob {name!r}: {why}")
    if unknown:
        shown = ", ".join(f"{n!r} {list(blobs[n].shape)}" for n in unknown[:4])
        raise MappingError(
            f"{src}: {len(unknown)} unknown blob{'s' if len(unknown) > 1 else ''} not part of {arch.name} "
            f"(table {table.name}): {shown}{' ...' if len(unknown) > 4 else ''}"
        )
    state = OrderedDict((k, filled[k]) for k in expected)
    dropped = {role: blobs[b] for b, role in plan.dropped.items()}
    return Mapped(state, ignored, dropped, sorted(plan.dropped))
