"""Concurrent and interrupted runs leave nothing broken. Every interrupt is sent once the run is
provably mid-way (a file it is reading, a video it is blocked on), so these tests always test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

from vmzconv import checkpoint, synth

from .conftest import wait_for


def _default_sigint():
    """In the child, before exec: SIGINT at its default, so that Python installs its handler even when this
    test runs under a parent that ignores SIGINT (bash gives background jobs SIG_IGN, which exec keeps)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _pickles(folder, n, depth=50):
    folder.mkdir()
    for i in range(n):
        synth.write_vmz_pickle(folder / f"m{i}.pkl", synth.seeded_blobs("ircsn", depth, 400, i))
    return folder


def test_two_concurrent_bulk_runs_on_one_folder(tmp_path):
    src = _pickles(tmp_path / "src", 2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "1", "--parity-clip", "8,64"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (ao, ae), (bo, be) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, ae + be
    assert "waiting for another bulk run" in ae + be
    summaries = [o.strip().splitlines()[-1] for o in (ao, bo)]
    assert sorted(s.split(",")[0] for s in summaries) == ["2 converted", "nothing to do: all 2 outputs are up to date (--force reconverts)"]
    for i in range(2):
        state, meta = checkpoint.load(out / f"m{i}.pth")
        assert len(state) == 320 and meta["parity"]["passed"]
        assert json.loads((out / f"m{i}.pth.json").read_text())["source"]["file"] == f"m{i}.pkl"
    assert not list(out.glob(".*.tmp"))


def test_sigint_during_bulk_exits_cleanly(tmp_path):
    src = _pickles(tmp_path / "src", 3)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "bulk", str(src), str(out), "--jobs", "1",
                             "--parity-clip", "8,64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    assert wait_for(lambda: list(out.glob("*.pth.json")))
    os.killpg(proc.pid, signal.SIGINT)                     # like Ctrl-C: the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    done = sorted(out.glob("*.pth"))
    assert 1 <= len(done) < 3
    for p in done:                                         # what is there is complete
        assert checkpoint.load(p)[1]["parity"]["passed"]


def _open_by(pid: int, path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux /proc)."""
    target = os.path.realpath(path)
    try:
        return any(os.path.realpath(os.path.join(f"/proc/{pid}/fd", fd)) == target
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_sigint_during_convert_leaves_nothing(vmz_pickle, tmp_path):
    src = vmz_pickle("ipcsn", 152)
    out = tmp_path / "big.pth"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "convert", str(src), str(out), "--parity-clip", "16,224"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    # Ready: it is reading the 120 MB pickle; parity on 16x224 (seconds) still lies ahead of any write.
    assert wait_for(lambda: _open_by(proc.pid, src), timeout=120), "convert never opened its input"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def _open_in_session(sid: int, path) -> bool:
    """Whether any process of session ``sid`` (a command and its decoding workers) has ``path`` open."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid and _open_by(int(pid), path):
                return True
        except OSError:
            continue
    return False


def _long_video(path, clip, repeats: int) -> None:
    """``clip`` played ``repeats`` times, encoded as it goes (no array of the whole video)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for _ in range(repeats):
            for img in clip:
                for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_sigint_during_verify_leaves_no_partial_files(vmz_pickle, tmp_path):
    from vmzconv.convert import convert
    from .synthetic import frames, write_video

    ckpt = tmp_path / "r3d18.pth"
    convert(vmz_pickle("r3d", 18, keep=True), ckpt, check_parity=False, card=False)
    data = tmp_path / "videos"
    data.mkdir()
    lines = []
    for i in range(3):
        write_video(data / f"v{i}.mp4", frames(i % 3, 40, 96, 72, seed=i))
        lines.append(f"v{i}.mp4 {i % 3}")
    _long_video(data / "long.mp4", frames(0, 100, 320, 240), 40)      # 4000 frames: seconds of decoding
    lines.append("long.mp4 0")
    (data / "list.txt").write_text("\n".join(lines) + "\n")
    cache, out, rep = tmp_path / "cache", tmp_path / "out.json", tmp_path / "rep.json"
    proc = subprocess.Popen([sys.executable, "-m", "vmzconv", "verify", str(ckpt), "--ann", str(data / "list.txt"),
                             "--data-root", str(data), "--clip-len", "8", "--num-clips", "2", "--short-side", "96",
                             "--crop-size", "96", "--workers", "1", "--cache", str(cache), "--out", str(out),
                             "--report", str(rep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    try:
        # Ready: a worker is decoding the long video, so the run is mid-way (no output is written before the
        # whole list is done).
        assert wait_for(lambda: _open_in_session(proc.pid, data / "long.mp4")), "verify never reached the long video"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not out.exists() and not rep.exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert all(np.load(p).shape == (400,) for p in cache.rglob("*.npy"))   # whatever is cached is whole
