"""The ONNX graph of a converted model: what ``vmzconv export`` writes and the ONNX runtimes run.

One input ``video`` [N, 3, T, H, W] (float32, normalised as the card says), and for an audio-visual model a
second one, ``audio`` [N, 1, 100, 40] (log-mels); outputs ``logits`` [N, classes] and/or ``features`` [N, C]
(the vector the classifier reads: the globally pooled one; audio-visual: av_fc2's). The batch axis is always
dynamic; ``dynamic=True`` makes T, H and W dynamic too (global average pooling allows it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from .errors import VmzconvError

MIN_OPSET = 18          # the torch.export-based exporter's floor


class MissingExtraError(VmzconvError):
    """An optional dependency is not installed."""


def _require():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise MissingExtraError(f"vmzconv export needs the optional extra 'onnx' ({e.name} is missing): "
                                "pip install 'vmzconv[onnx]'") from None
    return onnx, onnxruntime


class Heads:
    """The model with the outputs asked for: logits, the pooled features, or both (an audio-visual model's
    "features": ``av_features``, one of its layers, av_fc2's output by default)."""

    def __new__(cls, model, which: str, av_features: str = "fused"):
        import torch

        class Heads(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, video, audio=None):
                if audio is not None:            # audio-visual: features = av_fc2's output (or another layer)
                    if which == "features" and av_features != "fused":
                        return self.model.layer(av_features, video, audio)
                    feats = self.model.fused(*self.model.towers(video, audio))
                    logits = self.model.fc(feats) if which != "features" else None
                else:
                    feats = self.model.features(video)
                    logits = self.model.classifier()(feats) if which != "features" else None
                if which == "features":
                    return feats
                return logits if which == "logits" else (logits, feats)

        return Heads().eval()


def max_exporter_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return MIN_OPSET


@contextlib.contextmanager
def _quiet():
    """The exporter logs progress and warnings about packages we do not use (torchvision ops)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


LEGACY_OPSET = 17       # the TorchScript-based exporter's graphs for the runtimes' cache


def _args(clip: np.ndarray, audio: np.ndarray | None):
    import torch

    return (torch.from_numpy(clip),) + (() if audio is None else (torch.from_numpy(audio),))


def input_names(audio) -> list[str]:
    return ["video"] + ([] if audio is None else ["audio"])


def to_onnx_fast(module, clip: np.ndarray, names: list[str], dynamic: bool, audio: np.ndarray | None = None):
    """The ONNX ModelProto of ``module`` from torch's TorchScript-based exporter (``dynamo=False``): ~12x
    faster than the torch.export-based one on these models (0.9 s against 11 s for MC3-18 here), which
    matters on a runtime's first use. The runtimes prove every graph against PyTorch before they use it;
    where this exporter is gone or fails, :func:`to_onnx` makes the graph instead."""
    import onnx
    import torch

    axes = {0: "batch"} | ({2: "T", 3: "H", 4: "W"} if dynamic else {})
    buf = io.BytesIO()
    try:
        with _quiet():
            torch.onnx.export(module, _args(clip, audio), buf, dynamo=False, opset_version=LEGACY_OPSET,
                              input_names=input_names(audio), output_names=names,
                              dynamic_axes={"video": axes} | ({} if audio is None else {"audio": {0: "batch"}})
                              | {n: {0: "batch"} for n in names})
    except Exception:                   # noqa: BLE001 (any exporter failure: the other exporter decides)
        return to_onnx(module, clip, names, dynamic, max_exporter_opset(), audio)
    return onnx.load_from_string(buf.getvalue())


def to_onnx(module, clip: np.ndarray, names: list[str], dynamic: bool, opset: int, audio: np.ndarray | None = None):
    """The ONNX ModelProto of ``module`` traced on ``clip`` (and ``audio``)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    dims = {0: batch}
    if dynamic:
        dims |= {2: torch.export.Dim("T", min=8, max=4096), 3: torch.export.Dim("H", min=32, max=4096),
                 4: torch.export.Dim("W", min=32, max=4096)}
    shapes = (dims,) + (() if audio is None else ({0: batch},))
    with _quiet():
        prog = torch.onnx.export(module, _args(clip, audio), dynamo=True, opset_version=opset,
                                 input_names=input_names(audio), output_names=names, dynamic_shapes=shapes,
                                 external_data=False, optimize=True, verbose=False)
    return prog.model_proto
