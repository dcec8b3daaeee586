"""Output layouts ("targets"): one :class:`Target` per PyTorch home for VMZ weights.

A target owns what is true of its layout: the name of its model builder (``models.BUILDERS``), how a
file in that layout is recognised from its keys, its classifier keys, whether it has a head,
and which families it can hold (with the reason it refuses the others). The CLI's
``--target`` choices, layout recognition for files without vmzconv's meta, and the verify
runner all read this registry. No torch import here: the CLI and bulk's parent stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ArchError

_PTV_R21D = ("pytorchvideo's create_r2plus1d runs the temporal conv before the spatial one, keeps the middle "
             "width at the bottleneck width (VMZ: its own formula) and has a single-conv stem, so VMZ's "
             "weights have no place in it; use --target torchvision")
_PTV_R3D = ("pytorchvideo's create_resnet puts the temporal stride on the 1x1x1 conv_a, where VMZ strides the "
            "3x3x3 conv (and has no depth 18/34), so it computes something else; use --target torchvision")
_MM_R21D = ("MMAction2's ResNet2Plus1d builds its (2+1)-D convs with Conv2plus1d, whose middle width comes from "
            "its own formula per conv pair (stem: 83, VMZ: 45) and whose convs carry biases, so no stock "
            "MMAction2 config holds VMZ's R(2+1)D weights; use --target torchvision")

_2018 = ("r2d", "r2df", "mc2", "mc3", "mc4", "mc5", "rmc2", "rmc3", "rmc4", "rmc5")
_MM_R2D = ("MMAction2's ResNet3d pads its stem conv by (k-1)//2 in time, and VMZ's R2D conv1 spans the clip "
           "unpadded, so no ResNet3d config computes it; use --target torchvision")
_PTV_2018 = "pytorchvideo has no model with per-stage 2-D/3-D convolutions; use --target torchvision"
_MM_C3D = ("MMAction2's C3D pads pool5 (0, 1, 1), so its fc6 takes 8192 values where VMZ's takes 4608, and its "
           "ConvModules drop the conv biases once BN is on, which VMZ's C3D keeps; use --target pytorch")
_NOT_C3D = "only C3D (no library holds VMZ's C3D) is written as a plain PyTorch module; use --target torchvision"
_C3D_ONLY = "this layout holds video ResNets; VMZ's C3D is written with --target pytorch"
_RESNETS = ("ircsn", "ipcsn", "r2plus1d", "r3d", *_2018)
_AV = ("av_ircsn", "av_ipcsn", "av_r2plus1d", "av_r3d")
_AV_ONLY = ("vmzconv's audio-visual model: no library holds VMZ's audio tower. --tower visual writes the visual "
            "tower alone in this layout")
_NOT_AV = "this layout is vmzconv's audio-visual model; use it for VMZ's audio-visual files only"


@dataclass(frozen=True)
class Target:
    name: str
    layout: str                           # builder name in models.layouts
    has_head: bool
    head_keys: tuple[str, str] | None     # (weight, bias) of the classifier
    stem_key: str                         # the stem conv's weight (its shape gives conv1's temporal kernel)
    recognise: Callable[[set], bool]
    refusals: dict                        # family -> why this layout cannot hold it
    summary: str
    stem_temporal_key: str | None = None  # a (2+1)-D stem's temporal conv, whose kernel is conv1's (not stem_key's 1)

    def check(self, family: str, arch_name: str) -> None:
        if family in self.refusals:
            raise ArchError(f"target {self.name} cannot hold {arch_name}: {self.refusals[family]}")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("mmaction2", "mmaction2", True, ("cls_head.fc_cls.weight", "cls_head.fc_cls.bias"),
           "backbone.conv1.conv.weight", lambda k: "backbone.conv1.conv.weight" in k,
           {"r2plus1d": _MM_R21D, "r2d": _MM_R2D, "c3d": _MM_C3D} | dict.fromkeys(_AV, _AV_ONLY),
           "MMAction2 Recognizer3D (ResNet3dCSN / ResNet3d + I3DHead; load_from=)"),
    Target("mmaction2-backbone", "mmaction2_backbone", False, None, "conv1.conv.weight",
           lambda k: "conv1.conv.weight" in k and "layer1.0.conv1.conv.weight" in k,
           {"r2plus1d": _MM_R21D, "r2d": _MM_R2D, "c3d": _MM_C3D} | dict.fromkeys(_AV, _AV_ONLY),
           "the MMAction2 backbone alone (backbone.pretrained=)"),
    Target("torchvision", "torchvision", True, ("fc.weight", "fc.bias"), "stem.0.weight",
           lambda k: "stem.0.weight" in k and "fc.weight" in k, {"c3d": _C3D_ONLY} | dict.fromkeys(_AV, _AV_ONLY),
           "torchvision VideoResNet module names (VMZ's PyTorch hub, ig65m-pytorch)", stem_temporal_key="stem.3.weight"),
    Target("pytorchvideo", "pytorchvideo", True, ("blocks.5.proj.weight", "blocks.5.proj.bias"),
           "blocks.0.conv.weight", lambda k: "blocks.0.conv.weight" in k,
           {"ipcsn": "pytorchvideo's create_csn has no interaction-preserved block: its conv_b is a single "
                     "depthwise conv, so ip-CSN's extra 1x1x1 conv + BN has nowhere to go; use --target "
                     "torchvision or mmaction2",
            "r2plus1d": _PTV_R21D, "r3d": _PTV_R3D, "c3d": _C3D_ONLY} | dict.fromkeys(_2018, _PTV_2018)
           | dict.fromkeys(_AV, _AV_ONLY),
           "pytorchvideo create_csn (ir-CSN only)"),
    Target("pytorch", "pytorch", True, ("fc8.weight", "fc8.bias"), "conv1a.weight",
           lambda k: "conv1a.weight" in k and "fc6.weight" in k, dict.fromkeys(_RESNETS, _NOT_C3D)
           | dict.fromkeys(_AV, _AV_ONLY), "a plain PyTorch module defined by the card's build lines (VMZ's C3D)"),
    Target("av", "av", True, ("fc.weight", "fc.bias"), "visual.stem.0.weight",
           lambda k: "audio.conv1.weight" in k and "fc1.weight" in k, dict.fromkeys((*_RESNETS, "c3d"), _NOT_AV),
           "vmzconv's audio-visual model (visual tower in torchvision names, VMZ's audio ResNet, the fusion head; "
           "vmzconv.load.load_converted opens it)", stem_temporal_key="visual.stem.3.weight"),
)}
TARGET_NAMES = tuple(TARGETS)
# The layout each family is written in unless --target says otherwise.
DEFAULT_TARGET = {"ircsn": "mmaction2", "ipcsn": "mmaction2", "r2plus1d": "torchvision", "r3d": "torchvision",
                  **dict.fromkeys(_2018, "torchvision"), "c3d": "pytorch", **dict.fromkeys(_AV, "av")}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ArchError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def recognise(keys) -> Target | None:
    """The layout a state dict without vmzconv's meta is in, from its keys alone."""
    keys = set(keys)
    return next((t for t in TARGETS.values() if t.recognise(keys)), None)


# -- how a user builds the matching model in the consumer library -------------------------------------

_EPS_FIX = """for m in model.modules():              # Caffe2's SpatialBN epsilon; the library's default is 1e-5
    if isinstance(m, nn.BatchNorm3d):
        m.eps = 1e-3"""

_TV_CONV2PLUS1D = """class Conv2Plus1D(nn.Sequential):      # torchvision's, with VMZ's middle width computed per conv
    def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
        mid = (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes)
        super().__init__(
            nn.Conv3d(in_planes, mid, (1, 3, 3), (1, stride, stride), (0, padding, padding), bias=False),
            nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_planes, (3, 1, 1), (stride, 1, 1), (padding, 0, 0), bias=False))

    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride

"""


_C3D_CLASS = """import torch
from torch import nn


class C3D(nn.Module):                      # VMZ's c3d_model.py: conv biases AND BN (eps 1e-3), pool5 unpadded
    def __init__(self, num_classes):
        super().__init__()
        cin = 3
        for name, cout in (("1a", 64), ("2a", 128), ("3a", 256), ("3b", 256), ("4a", 512), ("4b", 512),
                           ("5a", 512), ("5b", 512)):
            self.add_module("conv" + name, nn.Conv3d(cin, cout, 3, padding=1))
            self.add_module("bn" + name, nn.BatchNorm3d(cout, eps=1e-3))
            cin = cout
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.pool = nn.MaxPool3d(2, 2)      # pool2 .. pool5: no padding
        self.fc6, self.fc7 = nn.Linear(512 * 3 * 3, 4096), nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)

    def forward(self, x):                  # x: N x 3 x 16 x 112 x 112
        for name in ("1a", "2a", "3a", "3b", "4a", "4b", "5a", "5b"):
            x = torch.relu(getattr(self, "bn" + name)(getattr(self, "conv" + name)(x)))
            if name == "1a":
                x = self.pool1(x)
            elif name in ("2a", "3b", "4b", "5b"):
                x = self.pool(x)
        x = torch.relu(self.fc6(x.flatten(1)))     # dropout at training time only
        x = torch.relu(self.fc7(x))
        return self.fc8(x)


"""


def recipe(target: str, arch) -> str:
    """Python lines that build, in the consumer library itself, the model a ``target`` file of ``arch``
    loads into with ``strict=True`` and computes the same logits with ("" for MMAction2: see the config)."""
    fam, layers = arch.fam, list(arch.layers)
    if target == "av":
        return ("from vmzconv.arch import Arch\nfrom vmzconv.models import build_model\n"
                f"model = build_model('av', Arch({arch.family!r}, {arch.depth}, {arch.num_classes}, {arch.conv1_kt}, "
                f"gblend={arch.gblend}))   # model(video, audio); model.heads(video, audio)")
    if target == "pytorch":
        return f"{_C3D_CLASS}model = C3D(num_classes={arch.num_classes})"
    block = "BasicBlock" if arch.kind == "simple" else "Bottleneck"
    if target == "torchvision":
        if fam.name == "r3d" and arch.depth == 18 and arch.conv1_kt == 3 and not arch.flow:
            build = f"model = torchvision.models.video.r3d_18(num_classes={arch.num_classes})"
            imports = "import torchvision\nfrom torch import nn\n"
            return f"{imports}{build}\n{_EPS_FIX}"
        imports = ("from torch import nn\nfrom torchvision.models.video.resnet import "
                   f"VideoResNet, {block}, ")
        if fam.name == "r2plus1d":
            head = imports + "R2Plus1dStem\n\n" + _TV_CONV2PLUS1D
            build = f"model = VideoResNet({block}, [Conv2Plus1D] * 4, {layers}, R2Plus1dStem, num_classes={arch.num_classes})"
        elif fam.name == "r3d" and arch.conv1_kt == 3 and not arch.flow:
            head = imports + "Conv3DSimple, BasicStem\n"
            build = f"model = VideoResNet({block}, [Conv3DSimple] * 4, {layers}, BasicStem, num_classes={arch.num_classes})"
        elif fam.name == "mc3" and arch.depth == 18 and not arch.flow:
            imports = "import torchvision\nfrom torch import nn\n"
            build = f"model = torchvision.models.video.mc3_18(num_classes={arch.num_classes})"
            return f"{imports}{build}\n{_EPS_FIX}"
        elif fam.conv_maker == "3d":        # R3D with another stem kernel, R2D, fR2D, MCx, rMCx: per-stage kinds
            kinds = ", ".join("Conv3DSimple" if k == "3d" else "Conv3DNoTemporal" for k in fam.stage_kinds)
            kt, pad = arch.conv1_kt, arch.stem_temporal_pad
            head = (imports + "Conv3DSimple, Conv3DNoTemporal\n\n"
                    "class Stem(nn.Sequential):             # VMZ's conv1: temporal kernel "
                    f"{kt}, padding {pad}" + (f", {arch.in_channels} input channels (optical flow)" if arch.flow else "")
                    + "\n    def __init__(self):\n"
                    f"        super().__init__(nn.Conv3d({arch.in_channels}, 64, ({kt}, 7, 7), (1, 2, 2), ({pad}, 3, 3), "
                    "bias=False),\n"
                    "                         nn.BatchNorm3d(64), nn.ReLU(inplace=True))\n\n")
            build = f"model = VideoResNet({block}, [{kinds}], {layers}, Stem, num_classes={arch.num_classes})"
            return f"{head}{build}\n{_EPS_FIX}"
        else:
            return ("# VMZ's own PyTorch port holds this layout: pt/vmz/models/csn.py "
                    f"({fam.name.replace('csn', '_csn')}_{arch.depth}, num_classes={arch.num_classes}; BN eps 1e-3), "
                    "with torchvision's VideoResNet")
        if arch.conv1_kt != 3:                # R(2+1)D: the stem's temporal conv (its second conv) follows it
            build += (f"\nmodel.stem[3] = nn.Conv3d(45, 64, ({arch.conv1_kt}, 1, 1), (1, 1, 1), "
                      f"({arch.conv1_kt // 2}, 0, 0), bias=False)   # conv1 temporal kernel {arch.conv1_kt}")
        if arch.flow:                         # optical flow: the stem's first conv takes C channels
            build += (f"\nmodel.stem[0] = nn.Conv3d({arch.in_channels}, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), "
                      f"bias=False)   # optical flow: {arch.in_channels} input channels")
        return f"{head}{build}\n{_EPS_FIX}"
    if target == "pytorchvideo":
        t, h = fam.protocol["clip_len"], fam.protocol["crop_size"]
        return ("from torch import nn\nfrom pytorchvideo.models.csn import create_csn\n"
                f"model = create_csn(model_depth={arch.depth}, model_num_class={arch.num_classes}, "
                f"stem_pool=nn.MaxPool3d,\n                   head_pool_kernel_size=({t // 8}, {h // 32}, {h // 32}))"
                f"   # (T/8, H/32, W/32) of your clips: global pooling\n{_EPS_FIX}")
    return ""
