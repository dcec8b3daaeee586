"""Which CSN a set of blobs describes, from names and shapes alone."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .blobs import Blobs
from .errors import ArchError

# Blocks per layer (MMAction2 ResNet3dCSN.arch_settings = VMZ BLOCK_CONFIG).
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
FAMILIES = ("ir", "ip")
ARCH_NAMES = tuple(f"{f}csn_r{d}" for f in FAMILIES for d in LAYERS)
_DEPTH_BY_BLOCKS = {sum(v): k for k, v in LAYERS.items()}
# What VMZ's extract_features.py pickles instead of parameters (docs/vmz-caffe2-format.md §3).
FEATURE_OUTPUTS = {"final_avg", "softmax", "label", "video_id"}


@dataclass(frozen=True)
class Arch:
    family: str            # "ir" (channel-separated) or "ip" (interaction-preserved)
    depth: int             # 50, 101 or 152
    num_classes: int       # from last_out_L{N}
    conv1_kt: int = 3      # temporal kernel of the stem conv

    @property
    def name(self) -> str:
        return f"{self.family}csn_r{self.depth}"

    @property
    def layers(self) -> tuple[int, ...]:
        return LAYERS[self.depth]

    def describe(self) -> str:
        return f"{self.name} ({self.num_classes} classes, conv1 temporal kernel {self.conv1_kt})"


def parse_arch_name(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"(ir|ip)csn_r(50|101|152)", name)
    if not m:
        raise ArchError(f"unknown --arch {name!r}; choose one of {', '.join(ARCH_NAMES)} or auto")
    return m.group(1), int(m.group(2))


def detect(blobs: Blobs) -> Arch:
    """Family, depth, classes and stem kernel of the CSN that ``blobs`` hold."""
    names = set(blobs.names())
    src = blobs.source
    outputs = names & FEATURE_OUTPUTS
    if outputs and "conv1_w" not in names:
        raise ArchError(f"{src}: this is a VMZ feature-extraction output (activations such as "
                        f"{', '.join(sorted(outputs))}), not a model checkpoint")
    if any(n.startswith(("v_comp_", "a_comp_", "v_conv1", "a_conv1")) for n in names):
        raise ArchError(f"{src}: an audio-visual VMZ model (v_/a_ prefixed blobs) — not supported")
    if "conv1_middle_w" in names:
        raise ArchError(f"{src}: an R(2+1)D model (conv1_middle_w) — only ir-CSN and ip-CSN are supported")
    if "conv1_w" not in names:
        raise ArchError(f"{src}: no conv1_w blob — not a VMZ video model ({len(names)} blobs)")
    conv1 = blobs["conv1_w"]
    if conv1.ndim != 5 or conv1.shape[0] != 64 or conv1.shape[3:] != (7, 7):
        raise ArchError(f"{src}: conv1_w has shape {list(conv1.shape)}, expected [64, 3, kT, 7, 7]")
    if conv1.shape[1] != 3:
        raise ArchError(f"{src}: conv1_w takes {conv1.shape[1]} input channels, not 3 (RGB) — flow models are not supported")
    if conv1.shape[2] not in (3, 5):
        raise ArchError(f"{src}: conv1_w temporal kernel {conv1.shape[2]} (VMZ allows 3 or 5)")

    indices = {int(m.group(1)) for n in names if (m := re.match(r"comp_(\d+)_", n))}
    if not indices:
        raise ArchError(f"{src}: no residual blocks (comp_*) found")
    family = _family(blobs, names)
    count = max(indices) + 1
    depth = _DEPTH_BY_BLOCKS.get(count)
    if depth is None or len(indices) != count:
        raise ArchError(
            f"{src}: {len(indices)} residual blocks numbered up to {max(indices)}; "
            f"CSN-50/101/152 have {', '.join(str(k) for k in sorted(_DEPTH_BY_BLOCKS))}"
        )
    heads = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"last_out_L(\d+)_w", n)))
    if len(heads) != 1:
        found = ", ".join(f"last_out_L{h}_w" for h in heads) or "none"
        raise ArchError(f"{src}: expected exactly one classifier blob last_out_L<N>_w, found {found}")
    return Arch(family, depth, heads[0], int(conv1.shape[2]))


def _family(blobs: Blobs, names: set[str]) -> str:
    src = blobs.source
    if "comp_0_conv_2_middle_w" in names:
        shape = blobs["comp_0_conv_2_middle_w"].shape
        if len(shape) == 5 and shape[2:] == (1, 1, 1):
            return "ip"
        raise ArchError(f"{src}: comp_0_conv_2_middle_w has shape {list(shape)} — an R(2+1)D block, not ip-CSN")
    if "comp_0_conv_3_w" in names and "comp_0_conv_2_w" not in names:
        shape = blobs["comp_0_conv_3_w"].shape
        if len(shape) == 5 and shape[1] == 1:
            return "ir"
    if "comp_0_conv_2_w" in names and blobs["comp_0_conv_2_w"].shape[1:2] != (1,):
        raise ArchError(f"{src}: comp_0_conv_2_w is a dense 3-D conv — an R3D model, not CSN")
    raise ArchError(f"{src}: block 0 matches neither ir-CSN (conv_3 channel-wise) nor ip-CSN (conv_2_middle)")


def resolve(blobs: Blobs, requested: str = "auto") -> Arch:
    """The detected arch, checked against ``requested`` unless it is ``auto``."""
    detected = detect(blobs)
    if requested in (None, "", "auto"):
        return detected
    family, depth = parse_arch_name(requested)
    if (family, depth) != (detected.family, detected.depth):
        raise ArchError(f"{blobs.source}: --arch {requested} does not match the blobs: they look like {detected.describe()}")
    return detected
