"""The VMZ model families, and which one (with depth, classes, stem kernel) a set of blobs describes.

One :class:`Family` per VMZ model type holds what is true of that type: its depths, the
block-conv builder its PyTorch trunk uses, its stem, whether VMZ ran it with ``pool1``, the
test protocol its published numbers used, and how it is recognised from blob names and
shapes. Detection asks each family in turn; where two fit the same shapes (R2D on 3-frame clips and
MC2) a released file name or ``--arch`` decides; C3D, optical-flow and audio-visual files are named and
refused.
Adding a family is adding a ``Family`` here (plus its reference graph and mapping tables).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .blobs import Blobs
from .errors import ArchError

# VMZ BLOCK_CONFIG (c2/lib/models/r3d_model.py): blocks per layer. Depth 18/34 use simple blocks
# with the shallow widths, 50+ bottlenecks with the deep ones.
BLOCKS = {10: (1, 1, 1, 1), 16: (2, 2, 2, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
          101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# The 2018 families (create_r2d/r2df/mcx/rmcx) build simple blocks at every depth of VMZ's BLOCK_CONFIG: 10, 16,
# 18, 26, 34, 50, 101, 152. There 26 is 18's (2, 2, 2, 2) and 50 is 34's (3, 4, 6, 3), the same graph and blobs,
# so they are converted as 18 and 34.
DEPTHS_2018 = (10, 16, 18, 34, 101, 152)
SIMPLE_DEPTHS = (18, 34)
# What VMZ's extract_features.py pickles instead of parameters.
FEATURE_OUTPUTS = {"final_avg", "softmax", "label", "video_id"}
C3D_FC = 4096            # C3D's fc6 and fc7 width (c3d_model.create_model's fc6_dim, fc7_dim)
C3D_POOL5 = 512 * 3 * 3  # what pool5 leaves of a 16x112x112 clip: fc6's input


def block_kind(depth: int) -> str:
    return "simple" if depth in SIMPLE_DEPTHS else "bottleneck"


@dataclass(frozen=True)
class Family:
    name: str                          # arch names are f"{name}_r{depth}"
    title: str                         # for people: "ir-CSN"
    depths: tuple[int, ...]
    conv_maker: str                    # the trunk's builder for the block's spatiotemporal conv
    stem: str                          # "3d" (one kx7x7 conv, padded k//2 in time), "2plus1d" (spatial conv, then
                                       # temporal) or "clip" (R2D: kx7x7 spanning the clip, no temporal padding)
    pool1: bool                        # VMZ's max-pool after the stem
    protocol: dict                     # the test protocol behind the published numbers
    parity_clip: tuple[int, int]       # default (T, H) of the fixed parity clip
    recognise: Callable[[Blobs, set], bool] = field(repr=False, compare=False)
    simple_marker: str | None = None   # blob whose presence means simple blocks (18/34)
    mmaction2: dict | None = None      # MMAction2 backbone config, or None when MMAction2 cannot hold it
    # VMZ 2018 (create_mcx, create_rmcx, create_r2d, create_r2df): per stage, conv_2x .. conv_5x, the kind of
    # the block convs: "3d" (3x3x3, strides in time when the stage downsamples) or "2d" (1x3x3, never strides
    # in time, nor does its shortcut). None: every stage is ``conv_maker``.
    stages: tuple[str, ...] | None = None
    stem_kts: tuple[int, ...] = (3, 5)  # conv1 temporal kernels VMZ builds ("clip" stems: any, = clip length)
    scheme: str | None = None          # blob-naming scheme = the mapping tables it uses (default: its own name)
    default_kt: int = 3                # conv1's temporal kernel when nothing says otherwise
    visual: str | None = None          # audio-visual: the family of its visual tower ("v_" blobs)
    simple_only: bool = False          # simple blocks at every depth (the 2018 families), not bottlenecks at 50+

    def kind_of(self, depth: int) -> str:
        return "simple" if self.simple_only else block_kind(depth)

    def arch_names(self) -> tuple[str, ...]:
        if not self.resnet:
            return (self.name,)
        return tuple(f"{self.name}_r{d}" for d in self.depths)

    @property
    def resnet(self) -> bool:
        """Every family but C3D (VGG-style, one depth) is a VMZ video ResNet (audio-visual: its visual tower)."""
        return self.stem != "c3d"

    @property
    def av(self) -> bool:
        return self.visual is not None

    @property
    def stage_kinds(self) -> tuple[str, ...]:
        return self.stages or (self.conv_maker,) * 4

    @property
    def tables(self) -> str:
        return self.scheme or self.name


def _shape(blobs: Blobs, name: str) -> tuple:
    return tuple(blobs[name].shape) if name in blobs else ()


def _is_ircsn(blobs: Blobs, names: set) -> bool:
    s = _shape(blobs, "comp_0_conv_3_w")
    return len(s) == 5 and s[1] == 1 and "comp_0_conv_2_w" not in names and "conv1_middle_w" not in names


def _is_ipcsn(blobs: Blobs, names: set) -> bool:
    s = _shape(blobs, "comp_0_conv_2_middle_w")
    return len(s) == 5 and s[2:] == (1, 1, 1) and "conv1_middle_w" not in names


def _is_r2plus1d(blobs: Blobs, names: set) -> bool:
    return "conv1_middle_w" in names


_CSN_PROTOCOL = dict(protocol="mmaction2", clip_len=32, frame_interval=2, num_clips=10, short_side=256, crop_size=256,
                     num_crops=3)
# VMZ's R(2+1)D/R3D test scripts: 10 uniformly spaced clips, one centre crop of 112 from frames
# resized to 171x128 (video_res_type 0); clip length 8 or 32 depending on the model.
_R21D_PROTOCOL = dict(protocol="vmz", clip_len=8, frame_interval=1, num_clips=10, short_side=128, crop_size=112,
                      num_crops=1, resize=[171, 128])

def _plain_stage_kinds(blobs: Blobs, names: set) -> tuple[str, ...] | None:
    """Per stage, "3d" or "2d" from the temporal kernel of its block convs (VMZ's comp_* names shared by
    R3D and the 2018 families); None when the stages mix kernels or the block count fits no depth."""
    layers = next((v for v in BLOCKS.values() if sum(v) == _block_count(names)), None)
    if layers is None:
        return None
    kinds, first = [], 0
    for n in layers:
        kts = {s[2] for j in range(first, first + n) for c in (1, 2, 3)
               if len(s := _shape(blobs, f"comp_{j}_conv_{c}_w")) == 5 and s[3:] == (3, 3)}
        if kts not in ({3}, {1}):
            return None
        kinds.append("3d" if kts == {3} else "2d")
        first += n
    return tuple(kinds)


def _plain(kinds: tuple[str, ...], stem_kts: tuple[int, ...]):
    """Recognises a family of VMZ's plain (comp_*, no middle, no channel-wise) networks by its stage kinds
    and the stem's temporal kernel."""
    def recognise(blobs: Blobs, names: set) -> bool:
        if "conv1_middle_w" in names or "comp_0_conv_2_middle_w" in names or _is_ircsn(blobs, names):
            return False
        stem = _shape(blobs, "conv1_w")
        return (_plain_stage_kinds(blobs, names) == kinds and len(stem) == 5
                and stem[2] in stem_kts)
    return recognise


_MC = {k: tuple("3d" if i < k - 2 else "2d" for i in range(4)) for k in (2, 3, 4, 5)}       # create_mcx
_RMC = {k: tuple("2d" if i < k - 2 else "3d" for i in range(4)) for k in (2, 3, 4, 5)}      # create_rmcx
def _family_2018(name: str, title: str, stem: str, kinds: tuple[str, ...], kts: tuple[int, ...],
                 default_kt: int) -> "Family":
    """A VMZ 2018 family: simple blocks at every depth (10 to 152), R3D's blob names and tables, VMZ's
    R(2+1)D/R3D test protocol (171x128 frames, 10 clips, a 112 centre crop), no pool1. MMAction2's
    ResNet3d holds those with a padded stem (not R2D's): per stage, ``inflate`` 1 for 3x3x3 and 0 for
    1x3x3 convs, and a temporal stride of 2 only where a 3-D stage downsamples."""
    mm = None if stem == "clip" else dict(
        type="ResNet3d", pretrained2d=False, conv1_kernel=(default_kt, 7, 7), conv1_stride_t=1, pool1_stride_t=1,
        with_pool1=False, with_pool2=False, inflate=tuple(int(k == "3d") for k in kinds), inflate_style="3x3x3",
        spatial_strides=(1, 2, 2, 2), temporal_strides=tuple(2 if i and k == "3d" else 1 for i, k in enumerate(kinds)))
    return Family(name, title, DEPTHS_2018, "3d", stem, False, _R21D_PROTOCOL, (8, 112), _plain(kinds, kts),
                  simple_marker="!comp_0_conv_3_w", mmaction2=mm, stages=kinds, stem_kts=kts, scheme="r3d",
                  default_kt=default_kt, simple_only=True)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("ircsn", "ir-CSN", (50, 101, 152), "channelwise", "3d", True, _CSN_PROTOCOL, (8, 224), _is_ircsn,
           mmaction2=dict(type="ResNet3dCSN", bottleneck_mode="ir")),
    Family("ipcsn", "ip-CSN", (50, 101, 152), "ip_channelwise", "3d", True, _CSN_PROTOCOL, (8, 224), _is_ipcsn,
           mmaction2=dict(type="ResNet3dCSN", bottleneck_mode="ip")),
    Family("r2plus1d", "R(2+1)D", (18, 34, 50, 101, 152), "2plus1d", "2plus1d", False, _R21D_PROTOCOL, (8, 112),
           _is_r2plus1d, simple_marker="comp_0_conv_1_middle_w"),
    Family("r3d", "R3D", (18, 34, 50, 101, 152), "3d", "3d", False, _R21D_PROTOCOL, (8, 112), _plain(("3d",) * 4, (3, 5)),
           simple_marker="!comp_0_conv_3_w",
           mmaction2=dict(type="ResNet3d", pretrained2d=False, conv1_kernel=(3, 7, 7), conv1_stride_t=1,
                          pool1_stride_t=1, with_pool1=False, with_pool2=False, inflate=(1, 1, 1, 1),
                          inflate_style="3x3x3", spatial_strides=(1, 2, 2, 2), temporal_strides=(1, 2, 2, 2))),
    # VMZ 2018 ("A Closer Look at Spatiotemporal Convolutions"): R3D's blob names, other conv kinds per stage.
    # R2D's conv1 spans the clip, unpadded in time; on 1-frame clips it is fR2D op for op, so kernel 1 is fR2D's
    _family_2018("r2d", "R2D", "clip", ("2d",) * 4, tuple(range(2, 65)), 8),
    _family_2018("r2df", "fR2D", "3d", ("2d",) * 4, (1,), 1),                  # frame-wise 2-D, pooled over time
    *(_family_2018(f"mc{k}", f"MC{k}", "3d", _MC[k], (3,), 3) for k in (2, 3, 4, 5)),
    *(_family_2018(f"rmc{k}", f"rMC{k}", "3d", _RMC[k], (1,), 1) for k in (2, 3, 4, 5)),
    # C3D (c3d_model.py): eight 3x3x3 convs with biases and BN, five unpadded max-pools, fc6 4608 -> 4096, fc7.
    # "depth" 8 counts its convs; its fc6 fixes the input at 16x112x112. MMAction2's C3D cannot hold it.
    Family("c3d", "C3D", (8,), "c3d", "c3d", False, _R21D_PROTOCOL | {"clip_len": 16}, (16, 112),
           lambda blobs, names: "conv1a_w" in names),
)}


def _av_family(visual: Family) -> Family:
    """VMZ's create_av_resnet around ``visual``: the same trunk under "v_" names (the visual family's stem,
    pool1 and protocol: the zoo's 110.1 GFLOPs for AV ip-CSN-152 against 108.8 for ip-CSN-152 say pool1 ran),
    an audio ResNet on log-mels under "a_" names, and the fusion head."""
    return Family(f"av_{visual.name}", f"audio-visual {visual.title}", visual.depths, visual.conv_maker, visual.stem,
                  visual.pool1, visual.protocol, visual.parity_clip, lambda blobs, names: False,
                  simple_marker=visual.simple_marker, scheme="av", visual=visual.name)


# model_blocktype of audio_visual_model.py: r2plus1d, r3d, ir-csn, ip-csn
FAMILIES.update({f.name: f for f in (_av_family(FAMILIES[v]) for v in ("ircsn", "ipcsn", "r2plus1d", "r3d"))})
ARCH_NAMES = tuple(n for f in FAMILIES.values() for n in f.arch_names())


@dataclass(frozen=True)
class Arch:
    family: str            # a key of FAMILIES
    depth: int
    num_classes: int       # from last_out_L{N}
    conv1_kt: int | None = None     # temporal kernel of the stem's (temporal) conv; None: the family's usual
    gblend: bool = False   # audio-visual: the G-Blend heads a_last_out / v_last_out are present
    in_channels: int = 3   # the stem's input channels: 3 RGB; otherwise optical flow (VMZ's: 2, x and y)

    def __post_init__(self):
        for field_name in ("depth", "num_classes", "conv1_kt", "in_channels"):
            v = getattr(self, field_name)
            if v is None and field_name == "conv1_kt":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArchError(f"{field_name} must be a positive integer, not {str(v)[:40]!r}")
        if self.num_classes > 1_000_000:
            raise ArchError(f"implausible {self.num_classes=}")
        if self.in_channels > 64:
            raise ArchError(f"implausible {self.in_channels=}")
        if self.family not in FAMILIES:
            raise ArchError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        fam = FAMILIES[self.family]
        if self.depth not in fam.depths:
            raise ArchError(f"{fam.title} has no depth {self.depth}")
        if self.conv1_kt is None:
            object.__setattr__(self, "conv1_kt", fam.default_kt)
        if self.conv1_kt not in fam.stem_kts:
            raise ArchError(f"{fam.title}: conv1 temporal kernel {self.conv1_kt} (VMZ builds "
                            f"{_kts(fam.stem_kts)})")

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def stem_temporal_pad(self) -> int:
        """VMZ pads conv1 in time by kt // 2, except R2D's, which spans the clip without padding."""
        return 0 if self.fam.stem == "clip" else self.conv1_kt // 2

    @property
    def clip_len(self) -> int | None:
        """The clip length the weights fix (R2D's conv1 spans it), or None."""
        return self.conv1_kt if self.fam.stem == "clip" else None

    @property
    def parity_clip(self) -> tuple[int, int]:
        t, h = self.fam.parity_clip
        return (self.clip_len or t, h)

    @property
    def name(self) -> str:
        return f"{self.family}_r{self.depth}" if self.fam.resnet else self.family

    @property
    def layers(self) -> tuple[int, ...]:
        """Residual blocks per layer (none in C3D)."""
        return BLOCKS[self.depth] if self.fam.resnet else ()

    @property
    def kind(self) -> str:
        return self.fam.kind_of(self.depth) if self.fam.resnet else "vgg"

    def has_projection(self, layer: int, j: int) -> bool:
        """VMZ adds a shortcut projection where width or stride change: the first block of layers 2-4,
        and of layer 1 too in a bottleneck network (64 -> 256)."""
        return j == 0 and (layer > 1 or self.kind == "bottleneck")

    @property
    def feature_dim(self) -> int:
        return {"simple": 512, "bottleneck": 2048, "vgg": C3D_FC}[self.kind]

    @property
    def flow(self) -> bool:
        return self.in_channels != 3

    @property
    def modality(self) -> str:
        if self.flow:
            return f"optical flow, {self.in_channels} channels"
        return "audio-visual" if self.fam.av else "RGB"

    @property
    def visual(self) -> "Arch":
        """An audio-visual arch's visual tower as an ordinary arch of its family (itself otherwise)."""
        if not self.fam.av:
            return self
        return Arch(self.fam.visual, self.depth, self.num_classes, self.conv1_kt)

    def describe(self) -> str:
        extra = (", G-Blend heads" if self.gblend else "") + (f", {self.modality}" if self.flow else "")
        return f"{self.name} ({self.num_classes} classes, conv1 temporal kernel {self.conv1_kt}{extra})"


def arch_from_card(meta: dict) -> Arch:
    """The Arch a converted file's meta records (arch, num_classes, conv1_temporal_kernel, gblend)."""
    family, depth = parse_arch_name(meta["arch"])
    kt = meta.get("conv1_temporal_kernel")
    gblend = meta.get("gblend", False)
    if not isinstance(gblend, bool):
        raise ArchError(f"meta field 'gblend' must be true or false, not {str(gblend)[:20]!r}")
    channels = meta.get("input_channels", 3)
    return Arch(family, depth, int(meta["num_classes"]), None if kt is None else int(kt), gblend=gblend,
                in_channels=channels)


def _kts(kts: tuple[int, ...]) -> str:
    return f"{kts[0]} to {kts[-1]}" if len(kts) > 3 else " or ".join(map(str, kts))


def parse_arch_name(name: str) -> tuple[str, int]:
    if name not in ARCH_NAMES:
        raise ArchError(f"unknown --arch {str(name)[:40]!r}; choose one of {', '.join(ARCH_NAMES)} or auto")
    if name in FAMILIES:                 # one-depth families (C3D) are named without a depth
        return name, FAMILIES[name].depths[0]
    family, depth = name.rsplit("_r", 1)
    return family, int(depth)


# -- detection -------------------------------------------------------------------------------


def _refuse_other_models(blobs: Blobs, names: set) -> None:
    """The VMZ files vmzconv does not convert, each named."""
    src = blobs.source
    outputs = names & FEATURE_OUTPUTS
    if outputs and "conv1_w" not in names:
        raise ArchError(f"{src}: this is a VMZ feature-extraction output (activations such as "
                        f"{', '.join(sorted(outputs))}), not a model checkpoint")
    if any(n.startswith(("v_", "a_")) for n in names):
        if not any(n.startswith(("v_conv1", "v_comp_")) for n in names):
            raise ArchError(f"{src}: an audio-only VMZ model (a_ blobs without a visual tower; VMZ's a_resnet "
                            "names its blobs without a prefix) — not supported")
        return
    if "conv1_w" in names and len(_shape(blobs, "conv1_w")) == 4:
        raise ArchError(f"{src}: an audio-only VMZ a_resnet (2-D conv1_w {list(_shape(blobs, 'conv1_w'))} on "
                        "log-mels) — not supported; its audio-visual models are")
    if "conv1a_w" in names:
        return
    first = "conv1_middle_w" if "conv1_middle_w" in names else "conv1_w"
    if first not in names:
        raise ArchError(f"{src}: no conv1_w blob — not a VMZ video model ({len(names)} blobs)")
    conv1 = _shape(blobs, first)
    if len(conv1) != 5:
        raise ArchError(f"{src}: {first} has shape {list(conv1)}, expected 5 dimensions")
    if conv1[1] % 3 == 0 and conv1[1] > 3:        # other counts are optical flow (VMZ's flow_data_type: 2, 3, 5)
        raise ArchError(f"{src}: {first} takes {conv1[1]} input channels, not 3 (RGB) — an R(2+1)D-F / R2D-F model "
                        "(frames folded into channels); not supported")


def _block_count(names: set) -> int:
    indices = {int(m.group(1)) for n in names if (m := re.match(r"comp_(\d+)_", n))}
    return max(indices) + 1 if indices and len(indices) == max(indices) + 1 else 0


def detect(blobs: Blobs) -> Arch:
    """Family, depth, classes and stem kernel of the VMZ model that ``blobs`` hold. Where the blobs fit
    two families alike (R2D on 3-frame clips and MC2) a released file's name decides, else it asks for --arch."""
    found = candidates(blobs)
    if len(found) > 1:                    # a released file's name settles it (VMZ's models.md names them)
        from . import zoo

        entry = zoo.lookup(blobs.source)
        named = [a for a in found if entry and entry["arch"] == a.name]
        if named:
            return named[0]
        names = " and ".join(f"{a.fam.title} ({a.name})" for a in found)
        raise ArchError(f"{blobs.source}: every blob shape fits both {names}; pass --arch "
                        + " or --arch ".join(a.name for a in found))
    return found[0]


def candidates(blobs: Blobs) -> list[Arch]:
    """Every (family, depth, classes, stem kernel) the blobs fit: one, or two where shapes cannot tell."""
    names = set(blobs.names())
    src = blobs.source
    _refuse_other_models(blobs, names)
    if "conv1a_w" in names:
        return [_c3d_arch(blobs, names)]
    if any(n.startswith("v_") for n in names):
        return _av_archs(blobs, names)
    fams = [f for f in FAMILIES.values() if f.resnet and f.recognise(blobs, names)]
    kinds = _plain_stage_kinds(blobs, names)
    if not fams and kinds not in (None, ("3d",) * 4):
        raise ArchError(f"{src}: a VMZ 2018 model with stages {'/'.join(kinds)} at a depth vmzconv does not "
                        "convert (R2D, fR2D, MCx and rMCx: depths 10, 16, 18, 34, 101, 152; VMZ's 26 and 50 are 18 and 34)")
    if not fams:
        raise ArchError(f"{src}: block 0 matches none of the VMZ families vmzconv knows "
                        f"({', '.join(f.title for f in FAMILIES.values())})")
    return [_arch_of(blobs, names, fam) for fam in fams]


def _arch_of(blobs: Blobs, names: set, fam: Family) -> Arch:
    src = blobs.source
    stem = _shape(blobs, "conv1_w")
    first = _shape(blobs, "conv1_middle_w" if fam.stem == "2plus1d" else "conv1_w")
    channels = first[1] if len(first) == 5 else 3             # optical flow: 2 (VMZ's flow_data_type 0)
    want = (64, 45, None, 1, 1) if fam.stem == "2plus1d" else (64, channels, None, 7, 7)
    if len(stem) != 5 or any(w is not None and s != w for s, w in zip(stem, want)):
        shown = "[" + ", ".join("kT" if w is None else str(w) for w in want) + "]"
        raise ArchError(f"{src}: conv1_w has shape {list(stem)}, a {fam.title} stem needs {shown}")
    if stem[2] not in fam.stem_kts:
        raise ArchError(f"{src}: conv1_w temporal kernel {stem[2]} (VMZ's {fam.title} has {_kts(fam.stem_kts)})")
    indices = {int(m.group(1)) for n in names if (m := re.match(r"comp_(\d+)_", n))}
    if not indices:
        raise ArchError(f"{src}: no residual blocks (comp_*) found")
    count = max(indices) + 1
    marker = fam.simple_marker
    if marker is None:
        simple = False
    elif marker.startswith("!"):
        simple = marker[1:] not in names
    else:
        simple = marker in names
    kind = "simple" if simple else "bottleneck"
    depth = next((d for d in fam.depths if fam.kind_of(d) == kind and sum(BLOCKS[d]) == count), None)
    if depth is None or len(indices) != count:
        known = ", ".join(f"{d}: {sum(BLOCKS[d])}" for d in fam.depths if fam.kind_of(d) == kind) or "none"
        raise ArchError(f"{src}: {len(indices)} {kind} {fam.title} blocks numbered up to {max(indices)}; "
                        f"depths have ({known}) blocks")
    return Arch(fam.name, depth, _classes(blobs, names), int(stem[2]), in_channels=int(channels))


def _classes(blobs: Blobs, names: set) -> int:
    heads = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"last_out_L(\d+)_w", n)))
    if len(heads) != 1:
        found = ", ".join(f"last_out_L{h}_w" for h in heads) or "none"
        raise ArchError(f"{blobs.source}: expected exactly one classifier blob last_out_L<N>_w, found {found}")
    return heads[0]


def _av_archs(blobs: Blobs, names: set) -> list[Arch]:
    """create_av_resnet: the visual tower is recognised as its family would be from the "v_" blobs (with the
    joint head's class count), the audio tower must be there, and the G-Blend heads come in pairs."""
    src = blobs.source
    classes = _classes(blobs, names)
    for blob, want in (("a_conv1_w", (16, 1, 3, 3)), (f"av_fc1_w", None), (f"av_fc2_w", None)):
        if blob not in names or (want and _shape(blobs, blob) != want):
            shown = list(_shape(blobs, blob)) if blob in names else "missing"
            raise ArchError(f"{src}: an audio-visual VMZ model (v_ blobs) whose {blob} is {shown}"
                            + (f" (VMZ's: {list(want)})" if want else ""))
    heads = [f"{t}_last_out_L{classes}_w" in names for t in "av"]
    if heads[0] != heads[1]:
        raise ArchError(f"{src}: G-Blend heads come in pairs; found only {'a' if heads[0] else 'v'}_last_out_L{classes}")
    visual = av_visual_blobs(blobs, classes, "joint")
    found = []
    for a in candidates(visual):
        av = f"av_{a.family}"
        if av not in FAMILIES:
            raise ArchError(f"{src}: an audio-visual model whose visual tower is {a.fam.title}; VMZ builds them "
                            "around R(2+1)D, R3D, ir-CSN and ip-CSN")
        found.append(Arch(av, a.depth, classes, a.conv1_kt, gblend=all(heads)))
    return found


def av_visual_blobs(blobs: Blobs, classes: int, head: str) -> Blobs:
    """An audio-visual file's visual tower under its family's own blob names ("v_" dropped), with
    ``last_out_L{N}`` taken from the G-Blend visual head (``head="visual"``) or the joint head ("joint")."""
    view = {n[2:]: a for n, a in blobs.arrays.items() if n.startswith("v_") and not n.startswith("v_last_out_L")}
    prefix = "v_" if head == "visual" else ""
    view.update({f"last_out_L{classes}{s}": blobs[f"{prefix}last_out_L{classes}{s}"] for s in ("_w", "_b")
                 if f"{prefix}last_out_L{classes}{s}" in blobs})
    return Blobs(blobs.source, view, blobs.sha256, blobs.size, list(blobs.notes))


def av_blob_counts(blobs: Blobs) -> dict[str, int]:
    """How many blobs an audio-visual file holds per tower (the "v_" and "a_" names)."""
    names = blobs.names()
    return {"visual": sum(n.startswith("v_") for n in names), "audio": sum(n.startswith("a_") for n in names)}


def _c3d_arch(blobs: Blobs, names: set) -> Arch:
    """VMZ's C3D: conv1a takes 3 channels in a 3x3x3 kernel, fc6 maps pool5's 4608 values to 4096."""
    src = blobs.source
    for name, want in (("conv1a_w", (64, 3, 3, 3, 3)), ("fc6_w", (C3D_FC, C3D_POOL5)), ("fc7_w", (C3D_FC, C3D_FC))):
        got = _shape(blobs, name)
        if got != want:
            shown = list(got) if got else "missing"
            raise ArchError(f"{src}: blob {name!r} has shape {shown}, VMZ's C3D has {list(want)}"
                            + (" (fc6 over an 8192-wide pool5 is MMAction2's C3D, not VMZ's)"
                               if name == "fc6_w" and got[1:] == (8192,) else ""))
    return Arch("c3d", 8, _classes(blobs, names), 3)


def resolve(blobs: Blobs, requested: str = "auto") -> Arch:
    """The detected arch, checked against ``requested`` unless it is ``auto`` (which also settles the
    families whose blobs look alike)."""
    if requested in (None, "", "auto"):
        return detect(blobs)
    family, depth = parse_arch_name(requested)
    found = candidates(blobs)
    for a in found:
        if (a.family, a.depth) == (family, depth):
            return a
    shown = " or ".join(a.describe() for a in found)
    raise ArchError(f"{blobs.source}: --arch {requested} does not match the blobs: they look like {shown}")
