"""Writes the fuzzing seed corpus (run: python tests/fuzz_seeds/make_seeds.py).

Small VMZ-format pickles from every writer we know: our Python-2 cPickle emitter (protocol 2,
{"blobs": ...} and bare), Python 3's pickler at protocols 0-5, and (copied in by the fuzz test)
the genuine CPython-2.7 files of tests/fixtures/py2 (protocols 0, 1, 2).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from vmzconv import synth

HERE = Path(__file__).parent


def arrays() -> dict[str, np.ndarray]:
    """The first blobs of an ir-CSN (real names, small shapes) plus a training leftover."""
    rng = np.random.default_rng(0)
    return {
        "conv1_w": rng.standard_normal((4, 3, 3, 7, 7)).astype(np.float32),
        "conv1_spatbn_relu_s": np.ones(4, np.float32),
        "conv1_spatbn_relu_b": np.zeros(4, np.float32),
        "conv1_spatbn_relu_rm": np.zeros(4, np.float64),
        "conv1_spatbn_relu_riv": np.ones(4, np.float32),
        "comp_0_conv_3_w": rng.standard_normal((4, 1, 3, 3, 3)).astype(np.float32),
        "last_out_L400_b": np.zeros(400, np.float32),
        "ITER": np.array([7], np.int64),
    }


def main() -> None:
    a = arrays()
    (HERE / "py2_p2_blobs.pkl").write_bytes(synth.dumps_py2({"blobs": a}))
    (HERE / "py2_p2_bare.pkl").write_bytes(synth.dumps_py2({f"gpu_0/{k}": v for k, v in a.items()}))
    for proto in range(6):
        (HERE / f"py3_p{proto}.pkl").write_bytes(pickle.dumps({"blobs": a}, protocol=proto))
    print("seeds written")


if __name__ == "__main__":
    main()
