"""torchvision's own video ResNet classes, without importing torchvision.

The torchvision wheel does not import beside the CPU build of torch this project pins (its compiled
operators do not match), but ``torchvision/models/video/resnet.py`` is plain Python over ``torch.nn``.
The test command downloads the wheel (``pip download --no-deps torchvision==0.29.1 -d .venv/wheels``);
this module runs that one file from it. Its five imports of torchvision internals serve only the
pretrained-weights machinery (enums of download URLs, an API-usage logger), which the stand-ins below
replace; every class and builder that makes a model is torchvision's code, unchanged.
"""

from __future__ import annotations

import enum
import sys
import types
import zipfile
from pathlib import Path

WHEELS = Path(__file__).resolve().parents[1] / ".venv" / "wheels"


def load():
    """torchvision's ``models/video/resnet.py`` as a module, or None when the wheel is not there. The
    stand-in ``torchvision`` package it is registered under stays in ``sys.modules``, so printed lines
    (``import torchvision``, ``from torchvision.models.video.resnet import ...``) run against it."""
    if "torchvision.models.video.resnet" in sys.modules:
        return sys.modules["torchvision.models.video.resnet"]
    wheels = sorted(WHEELS.glob("torchvision-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        source = z.read("torchvision/models/video/resnet.py").decode()

    class WeightsEnum(enum.Enum):
        def __getattr__(self, name):             # torchvision's: a member's fields are its value's
            if name.startswith("_"):
                raise AttributeError(name)
            return getattr(self.value, name)

        @classmethod
        def verify(cls, obj):
            if obj is not None:
                raise RuntimeError("pretrained weights are not available here")
            return None

    def weights(**kwargs):
        return types.SimpleNamespace(**kwargs)

    stubs = {
        "torchvision.transforms._presets": {"VideoClassification": object},
        "torchvision.utils": {"_log_api_usage_once": lambda obj: None},
        "torchvision.models._api": {"register_model": lambda *a, **k: (lambda f: f), "Weights": weights,
                                    "WeightsEnum": WeightsEnum},
        "torchvision.models._meta": {"_KINETICS400_CATEGORIES": []},
        "torchvision.models._utils": {"_ovewrite_named_param": lambda *a: None,
                                      "handle_legacy_interface": lambda **k: (lambda f: f), "_ModelURLs": dict},
    }
    for name in ("torchvision", "torchvision.models", "torchvision.models.video", "torchvision.transforms"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        sys.modules[name] = pkg
    for name, attrs in stubs.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    resnet = types.ModuleType("torchvision.models.video.resnet")
    resnet.__package__ = "torchvision.models.video"
    resnet.__file__ = f"{wheels[-1]}!/torchvision/models/video/resnet.py"
    sys.modules[resnet.__name__] = resnet
    exec(compile(source, resnet.__file__, "exec"), resnet.__dict__)          # noqa: S102 (torchvision's source)
    video = sys.modules["torchvision.models.video"]
    video.resnet = resnet
    for name in ("r3d_18", "mc3_18", "r2plus1d_18", "VideoResNet"):
        setattr(video, name, getattr(resnet, name))
    sys.modules["torchvision.models"].video = video
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    return resnet
