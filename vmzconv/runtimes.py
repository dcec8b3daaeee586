"""The ONNX runtimes behind ``--runtime onnxruntime | openvino``: graph cache, engines and their proof.

The graph is the model's ONNX graph with dynamic N, T, H, W (``graph.to_onnx_fast``: torch's TorchScript-
based exporter, ~14x faster than the torch.export-based one ``vmzconv export`` uses), kept in a cache folder (``--graph-cache``, else ``$VMZCONV_CACHE``, else ``$XDG_CACHE_HOME/vmzconv``,
else ``~/.cache/vmzconv``) under a name keyed by the checkpoint's sha256 and the graph options;
nothing is ever written beside the user's files. The first time a (graph, runtime, precision) is
used it is proven against the PyTorch model on the fixed parity clip (batch 2): relative max
|difference| (max |diff| / max |PyTorch output|) at most 1e-4 and the same top-5 per view in fp32;
at most 5e-2 and the same top-1 in bf16. The verdict is cached beside the graph. A runtime that
cannot load the graph or fails the proof is not used (the caller falls back to torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .files import write_atomic
from .inference import Engine

EXTRA = {"onnxruntime": "pip install 'vmzconv[onnx]'", "openvino": "pip install 'vmzconv[onnx,openvino]'"}
_NEEDS = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def installed(name: str) -> bool:
    if name == "torch":
        return True
    return all(importlib.util.find_spec(m) is not None for m in _NEEDS[name])


def cache_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("VMZCONV_CACHE"):
        return Path(os.environ["VMZCONV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmzconv"


def graph_file(conv, output: str, cache: Path) -> Path:
    """The cached ONNX graph of ``conv``'s model with output ``output``, exported on first use."""
    from . import graph, parity

    key = json.dumps({"checkpoint_sha256": conv.sha256, "arch": conv.arch.name, "target": conv.target.name,
                      "output": output, "dynamic": True, "exporter": "torchscript", "vmzconv": __version__,
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    folder = cache / "graphs"
    path = folder / f"{conv.arch.name}-{output}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the graph cache {folder}: {e.strerror or e}") from None
    t, h = conv.arch.parity_clip
    clip = parity.fixed_clip(t, h, c=conv.arch.in_channels)
    module, audio = _heads(conv, output), (parity.fixed_logmels() if conv.arch.fam.av else None)
    proto = graph.to_onnx_fast(module, clip, [output], True, audio)
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    return path


def _heads(conv, output: str):
    """The module whose ONNX graph a runtime runs: the model's ``output`` (audio-visual: its run layer)."""
    from . import graph
    from .inference import AV_LAYERS

    if conv.arch.fam.av and output != "logits":
        return graph.Heads(conv.model, "features", av_features=AV_LAYERS[output])
    return graph.Heads(conv.model, "logits" if output == "logits" else "features")


def _feed(names: list, output: str, clip: torch.Tensor, audio: torch.Tensor | None) -> dict:
    """The graph's inputs in its order: video then audio; a graph whose output reads one of them (an
    audio-visual model's audio layer reads no video) keeps only that one, under a name the exporter chose."""
    arrays = [np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in (clip, audio) if t is not None]
    if len(names) < len(arrays):
        arrays = [arrays[1] if output == "audio" else arrays[0]]
    return dict(zip(names, arrays))


class OnnxRuntimeEngine(Engine):
    runtime = "onnxruntime"

    def __init__(self, graph: Path, output: str, precision: str, max_views: int):
        import onnxruntime as ort

        super().__init__(torch.device("cpu"), precision, max_views)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.output = output
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def forward(self, clip: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self.sess.run([self.output], _feed(self.inputs, self.output, clip, audio))[0])


class OpenVinoEngine(Engine):
    runtime = "openvino"

    def __init__(self, graph: Path, output: str, precision: str, max_views: int):
        import openvino as ov

        super().__init__(torch.device("cpu"), precision, max_views)
        core = ov.Core()
        # The precision is always set: OpenVINO's default on a bf16-capable CPU is bf16.
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1}
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.port = self.compiled.output(0)
        self.inputs, self.output = list(range(len(self.compiled.inputs))), output

    def forward(self, clip: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        out = self.request.infer(_feed(self.inputs, self.output, clip, audio))[self.port]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))     # the request reuses its buffer


def bf16_capable() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def prove(engine: Engine, conv, output: str) -> dict:
    """``engine`` against the PyTorch model on the fixed parity clip (batch 2)."""
    from . import parity

    t, h = conv.arch.parity_clip
    x = torch.from_numpy(parity.fixed_clip(t, h, n=2, c=conv.arch.in_channels))
    args = (x,) + ((torch.from_numpy(parity.fixed_logmels(2)),) if conv.arch.fam.av else ())
    with torch.inference_mode():
        want = _heads(conv, output).eval()(*args).double()
        got = engine.forward(*args).double()
    precision = engine.effective_precision
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return {"passed": False, "reason": f"output {list(got.shape)} (or NaN/Inf) vs {list(want.shape)}"}
    diff = float((got - want).abs().max())
    rel = diff / (float(want.abs().max()) or 1.0)
    k = min(5, want.shape[1]) if precision == "fp32" else 1
    same_top = bool((got.topk(k, dim=1).indices == want.topk(k, dim=1).indices).all())
    logits = output == "logits"
    passed = rel <= TOLERANCE[precision] and (not logits or same_top)
    reason = "" if passed else (f"relative max |diff| {rel:.3g} (tolerance {TOLERANCE[precision]:g})"
                                + ("" if same_top or not logits else f", top-{k} differs"))
    return {"passed": passed, "max_abs_diff": diff, "rel_diff": rel, "top_k_identical": same_top, "k": k,
            "clip": list(x.shape), "reason": reason}


def open_engine(name: str, conv, rt, output: str, notes: list) -> Engine | None:
    """An engine of runtime ``name``, proven; None (with a note) when it cannot be used."""
    precision = rt.precision
    if precision == "bf16" and (name != "openvino" or not bf16_capable()):
        notes.append(f"--precision bf16: {'this CPU has no bf16 support' if name == 'openvino' else name + ' runs fp32 only'}"
                     f"; {name} runs fp32")
        precision = "fp32"
    cls = OpenVinoEngine if name == "openvino" else OnnxRuntimeEngine
    try:
        graph = graph_file(conv, output, cache_dir(rt.graph_cache))
        engine = cls(graph, output, precision, rt.max_views)
    except Exception as e:         # the exporter and both runtimes raise many types; torch remains
        notes.append(f"{name} cannot run this model ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                     "using torch")
        return None
    proof_file = graph.with_name(f"{graph.stem}.{name}-{precision}-proof.json")
    try:
        proof = json.loads(proof_file.read_text())
    except (OSError, ValueError):
        proof = None
    if not isinstance(proof, dict) or "passed" not in proof:
        try:
            proof = prove(engine, conv, output)
        except Exception as e:     # a runtime that cannot run its own graph: torch remains
            notes.append(f"{name} cannot run this model's graph ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
                         "; using torch")
            return None
        text = json.dumps(proof, indent=1)
        try:
            write_atomic(proof_file, lambda f: f.write(text.encode()))
        except Exception:            # an unwritable cache only costs the proof again next time
            pass
    engine.proof = proof
    if not proof.get("passed"):
        notes.append(f"{name} does not compute what the PyTorch model does on the fixed clip "
                     f"({proof.get('reason', '?')}); using torch")
        return None
    return engine
