"""vmzconv: convert VMZ (Caffe2) ir-CSN / ip-CSN checkpoints to PyTorch, and prove the result."""

__version__ = "0.1.0"

from .errors import VmzconvError  # noqa: E402

__all__ = ["VmzconvError", "__version__"]
