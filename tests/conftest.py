"""Shared test data: VMZ-format pickles written with Python-2 cPickle opcodes."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vmzconv import reference, synth

HERE = Path(__file__).parent

# The tests of verify/predict/features run the PyTorch model unless they name a runtime (test_runtimes.py
# proves the others); ONNX graphs go to a throw-away cache, never to the user's.
os.environ.setdefault("VMZCONV_RUNTIME", "torch")
# Under pytest-xdist every worker is a process: with each one's torch (and the commands it runs, which
# honour OMP_NUM_THREADS) at one thread, the workers do not spin against each other for the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["VMZCONV_CACHE"] = tempfile.mkdtemp(prefix="vmzconv-test-cache-")
atexit.register(shutil.rmtree, os.environ["VMZCONV_CACHE"], True)
GOLDEN = HERE / "golden"
FIXTURES = HERE / "fixtures"


def golden_blobs(family: str, depth: int = 50, classes: int = 400) -> dict[str, np.ndarray]:
    """Recipe GOLDEN-1 (the weights behind tests/golden/*.caffe2_logits.npy, which genuine Caffe2 computed
    with VMZ's own graph code): closed-form values over the sorted blob names."""
    specs = dict(reference.blob_specs(family, depth, classes))
    out = {}
    for k, name in enumerate(sorted(specs)):
        shape = specs[name]
        i = np.arange(int(np.prod(shape)), dtype=np.float64)
        if name.endswith("_w"):
            v = np.sqrt(2.0 / np.prod(shape[1:])) * np.sin(0.7 * i + 0.3 * k + 0.1) * np.sqrt(2.0)
        elif name.endswith("_s"):
            v = 0.6 + 0.4 * np.sin(1.1 * i + k)
        elif name.endswith("_riv"):
            v = 1.25 + 0.75 * np.sin(0.5 * i + 3 * k)
        elif name.endswith("_rm"):
            v = 0.1 * np.cos(0.9 * i + k)
        elif name.startswith(("last_out_L", "fc6_", "fc7_")) and name.endswith("_b"):    # C3D: fc6_b, fc7_b too
            v = 0.1 * np.sin(0.2 * i + k)
        else:
            v = 0.1 * np.sin(1.3 * i + 2 * k)
        out[name] = v.reshape(shape).astype(np.float32)
    return out


def blobs_from_bytes(data: bytes, name: str = "x.pkl"):
    """read_blobs on ``data`` written to a temporary file named ``name``."""
    import tempfile

    from vmzconv.blobs import read_blobs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        blobs = read_blobs(path)
        blobs.arrays = {k: v.copy() for k, v in blobs.arrays.items()}
        return blobs


class PickleFactory:
    """Writes (and caches for the session) VMZ-format pickles of each architecture. Files over
    ``KEEP_BYTES`` (the 101/152-layer ones, 120-470 MB) are deleted after the test that asked for
    them (:meth:`evict_large`), so the suite's temp folder stays small; a later test rewrites them.
    ``keep=True`` pins one for the session (module fixtures that hand its path to several tests)."""

    KEEP_BYTES = 64 << 20

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, Path] = {}
        self.last: tuple | None = None
        self.pinned: set[tuple] = set()
        self.customs: list[Path] = []

    def evict_large(self) -> None:
        """Drop the large cached pickles, and every custom one (a test's own), after each test."""
        for key, path in list(self.cache.items()):
            if key not in self.pinned and (not path.exists() or path.stat().st_size > self.KEEP_BYTES):
                path.unlink(missing_ok=True)
                del self.cache[key]
        for path in self.customs:
            path.unlink(missing_ok=True)
        self.customs.clear()

    def arrays(self, family: str, depth: int, classes: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
        key = (family, depth, classes, seed)
        if self.last is None or self.last[0] != key:         # keep one set: the 152s are ~470 MB each
            self.last = (key, synth.seeded_blobs(family, depth, classes, seed))
        return dict(self.last[1])          # a fresh dict: tests add and drop blobs

    def __call__(self, family: str, depth: int, classes: int = 400, seed: int = 0, keep: bool = False) -> Path:
        key = (family, depth, classes, seed)
        if keep:
            self.pinned.add(key)
        if key not in self.cache:
            path = self.root / f"{family}_r{depth}_L{classes}_s{seed}.pkl"
            synth.write_vmz_pickle(path, self.arrays(family, depth, classes, seed))
            self.cache[key] = path
        return self.cache[key]

    def custom(self, name: str, arrays: dict, wrap: bool = True) -> Path:
        """A pickle of ``arrays`` named ``name``; removed after the test (or module fixture) that made it."""
        path = synth.write_vmz_pickle(self.root / name, arrays, wrap=wrap)
        self.customs.append(path)
        return path


@pytest.fixture(scope="session")
def vmz_pickle(tmp_path_factory) -> PickleFactory:
    return PickleFactory(tmp_path_factory.mktemp("pkl"))


@pytest.fixture(autouse=True)
def _evict_large_pickles(vmz_pickle):
    yield
    vmz_pickle.evict_large()


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    from vmzconv.cli import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmzconv: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def convert_fails(cli, src, tmp_path, *fragments, extra=(), code=2):
    out = tmp_path / "out.pth"
    res = cli("convert", src, out, "--no-parity", *extra)
    assert_one_line_error(res, *fragments, code=code)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temp files left behind"
    return res


class Ran:
    """What a finished command gave, shaped like subprocess.CompletedProcess."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def exit_code(self) -> int:            # click's name, so assert_one_line_error takes either
        return self.returncode


def run_cli(*args) -> Ran:
    """`vmzconv ARGS` in this process (no new interpreter and `import torch` per call); torch's thread
    count is restored afterwards, since --threads changes it for the whole process."""
    import torch
    from vmzconv.cli import main

    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    return Ran(res.exit_code, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """A folder for a module's shared data (converted checkpoints, videos), removed when the module is done."""
    import shutil

    d = tmp_path_factory.mktemp("module")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for(pred, timeout: float = 120.0) -> bool:
    """Poll ``pred`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def mmaction_registries():
    """MMAction2's registries, or a skip when the `mmaction` extra is not installed. The PyPI wheel of
    mmaction2 1.2.0 lacks ``mmaction/models/localizers/drn`` (its ``localizers/__init__`` imports it): an
    empty module stands in for that one localizer, which no recognizer config names."""
    import sys
    import types

    pytest.importorskip("mmengine")
    for name in ("mmaction.models.localizers.drn", "mmaction.models.localizers.drn.drn"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__, stub.DRN = [], None
            sys.modules[name] = stub
    mmaction = pytest.importorskip("mmaction.models")
    from mmaction.registry import DATASETS, MODELS
    from mmaction.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return mmaction, MODELS, DATASETS
