"""Convert a folder (or a manifest) of VMZ pickles: parallel, resumable, one report.

Resumable by construction: every output is written atomically and carries in
its meta the source sha256, the options and the tool version; a later run skips
an output whose record matches and redoes anything else. A lock on the output
folder serialises concurrent runs; temp files of a killed run are swept under
that lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import re
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, zoo
from .errors import InputError, OutputError, VmzconvError
from .text import safe

LOCK_NAME = ".vmzconv-bulk.lock"


@dataclass
class Job:
    source: str
    output: str
    arch: str
    target: str
    parity_clip: tuple | None = None       # (T, H); None: the family's


@dataclass
class Row:
    file: str
    status: str            # converted | up-to-date | failed
    arch: str = ""
    classes: int | None = None
    target: str = ""
    output: str = ""
    parity_max_diff: float | None = None
    seconds: float = 0.0
    reason: str = ""
    worker_peak_rss_mib: float = 0.0      # the worker process's peak so far (it converts files one by one)

    @property
    def ok(self) -> bool:
        return self.status in ("converted", "up-to-date")


# -- planning -------------------------------------------------------------------------


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "model"


def _manifest(path: Path) -> dict[str, dict]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: not a readable manifest: {e}") from None
    files = raw.get("file")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        raise InputError(f"{path}: a manifest lists [[file]] tables, each with path = \"...\"")
    out = {}
    for f in files:
        unknown = set(f) - {"path", "arch", "target", "name"}
        if unknown:
            raise InputError(f"{path}: [[file]] {f['path']}: unknown keys {sorted(unknown)}")
        p = Path(f["path"])
        out[str(p if p.is_absolute() else (path.parent / p))] = f
    return out


def plan(src: str | Path, out_dir: str | Path, target: str | None = None,
         manifest: str | Path | None = None, parity_clip: tuple | None = None) -> list[Job]:
    """One job per pickle: zoo files get their MMAction2 name and kind, others a name from the file."""
    src, out_dir = Path(src), Path(out_dir)
    overrides: dict[str, dict] = {}
    if src.is_file() and src.suffix == ".toml":
        overrides = _manifest(src)
        sources = [Path(p) for p in overrides]
    elif src.is_dir():
        sources = sorted(p for p in src.rglob("*") if p.suffix.lower() == ".pkl" and p.is_file())
    else:
        raise InputError(f"{src}: not a folder or a .toml manifest")
    if manifest:
        extra = {str(Path(k).resolve()): v for k, v in _manifest(Path(manifest)).items()}
        known = {str(s.resolve()) for s in sources}
        stray = [v["path"] for k, v in extra.items() if k not in known]
        if stray:
            raise InputError(f"{manifest}: [[file]] {stray[0]!r} is not a .pkl file below {src}"
                             + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                             + "; a --manifest only sets options for SRC's own files")
        overrides.update(extra)
    jobs, names = [], {}
    for s in sources:
        o = overrides.get(str(s)) or overrides.get(str(s.resolve())) or {}
        entry = zoo.lookup(s.name)
        if entry:
            name = entry["name"]
            t = entry.get("target") or ("mmaction2" if entry["kind"] == "recognizer" else "mmaction2-backbone")
        else:
            name, t = _safe_name(s.stem), "auto"
        t = o.get("target") or target or t
        name = o.get("name") or name
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise InputError(f"{s}: output name {name!r}: use letters, digits, '_', '-' and '.' (no folders)")
        suffix = "" if name.endswith((".pth", ".safetensors")) else ".pth"
        final = name + suffix                      # collisions count after the suffix: a.pkl and a.pth.pkl
        if final in names:
            raise InputError(f"{safe(s)} and {safe(names[final])} would both be written as {final}; "
                             "name one in a manifest")
        names[final] = s
        jobs.append(Job(str(s), str(out_dir / f"{name}{suffix}"), o.get("arch", "auto"), t, parity_clip))
    return jobs


# -- one job (runs in a worker process) --------------------------------------------------


def options_record(job: Job) -> dict:
    """What, besides the source bytes and the tool version, decides an output's content."""
    return {"arch": job.arch, "target": job.target} | ({"parity_clip": list(job.parity_clip)} if job.parity_clip else {})


def up_to_date(job: Job, source_sha: str) -> dict | None:
    """The output's meta when it was made from these bytes, with these options, by this version; else None."""
    from .checkpoint import card_path, load_meta

    out = Path(job.output)
    if not out.is_file() or not card_path(out).is_file():
        return None
    try:
        meta = load_meta(out)
    except VmzconvError:
        return None
    fresh = (meta.get("vmzconv_version") == __version__ and (meta.get("source") or {}).get("sha256") == source_sha
             and meta.get("options") == options_record(job) and (meta.get("parity") or {}).get("passed") is True)
    return meta if fresh else None


def run_job(job: Job, force: bool) -> Row:
    """Convert one file; never raises (a failure is a row)."""
    from .convert import convert
    from .files import sha256_file

    t0 = time.perf_counter()
    row = Row(file=job.source, status="failed", target=job.target, output=job.output)
    try:
        sha = sha256_file(job.source)
        meta = None if force else up_to_date(job, sha)
        if meta is not None:
            row.status = "up-to-date"
            row.arch, row.classes, row.target = meta["arch"], meta["num_classes"], meta["target"]
            row.parity_max_diff = (_card(job.output).get("parity_measured") or {}).get("max_abs_diff")
        else:
            res = convert(job.source, job.output, arch=job.arch, target=job.target, force=True,
                          parity_clip=job.parity_clip, clip_for_resnets_only=True)
            row.status, row.arch, row.classes, row.target = "converted", res.arch, res.num_classes, res.target
            row.parity_max_diff = res.verdict.max_abs_diff if res.verdict else None
    except VmzconvError as e:
        row.reason = str(e).replace("\n", " ")
    except Exception as e:  # a bug must not stop the other files; report it on the row
        row.reason = f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    row.seconds = round(time.perf_counter() - t0, 2)
    _release_memory()
    import resource

    row.worker_peak_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _card(output: str) -> dict:
    from .checkpoint import card_path

    try:
        return json.loads(card_path(Path(output)).read_text())
    except (OSError, ValueError):
        return {}


def _release_memory() -> None:
    """Hand freed heap back to the OS between files, so a worker peaks no higher than one convert."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _init_worker(threads: int) -> None:
    """Workers die with the coordinating process, whatever kills it (kill -9 included): Linux's
    PR_SET_PDEATHSIG sends them SIGKILL, and they never outlive it writing without the lock."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))       # PR_SET_PDEATHSIG
    if os.getppid() == 1:                 # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent decides what an interrupt means
    import torch

    torch.set_num_threads(threads)


# -- the run -------------------------------------------------------------------------------


def acquire_lock(out_dir: Path, on_wait=None) -> int:
    """An exclusive lock on ``out_dir`` (released when the returned fd is closed, or the process dies):
    a second bulk run on the same folder waits for the first. The holder removes the lock file when
    it is done, so a waiter re-checks that the file it locked is still the one at the path."""
    waited = False
    while True:
        try:
            fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{out_dir / LOCK_NAME}: is a symbolic link — refused (it could point outside "
                                  "the folder)") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait and not waited:
                on_wait()
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(out_dir / LOCK_NAME).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)                      # the previous holder removed it: lock the new one


def release_lock(out_dir: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / LOCK_NAME)    # while still holding it: waiters notice and retry
    os.close(fd)


def sweep_temp_files(out_dir: Path) -> list[str]:
    """Remove temp files a killed run left: only regular files named by vmzconv itself
    (``.vmzconv-tmp.<output name>.<random>.tmp``), never a user's file or a folder."""
    from .files import TEMP_PREFIX

    removed = []
    for p in out_dir.glob(f"{TEMP_PREFIX}*.tmp"):
        if p.is_symlink() or not p.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return removed


def run(jobs: list[Job], out_dir: Path, n_jobs: int | None = None, force: bool = False,
        progress=None, on_wait=None) -> list[Row]:
    """Convert every job under a lock on ``out_dir``; write the reports; return the rows in job order."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = acquire_lock(out_dir, on_wait)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot use as the output folder: {e.strerror or e}") from None
    try:
        sweep_temp_files(out_dir)
        rows = _convert_all(jobs, out_dir, n_jobs, force, progress)
        write_reports(out_dir, rows)
        return rows
    finally:
        release_lock(out_dir, fd)


def _convert_all(jobs: list[Job], out_dir: Path, n_jobs: int | None, force: bool, progress) -> list[Row]:
    cores = os.cpu_count() or 1
    n_jobs = max(1, min(n_jobs or cores, max(1, len(jobs))))
    threads = max(1, cores // n_jobs)
    rows: dict[str, Row] = {}
    env_keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: str(threads) for k in env_keys})   # read by each worker's numpy/torch at start
    try:
        broken = _run_pool(jobs, n_jobs, threads, force, out_dir, rows, progress)
        # A worker died (killed, or a crash in native code) and took the pool with it: every job it had not
        # finished is retried alone; one that kills its worker again is the culprit and is reported failed.
        for job in broken:
            if _run_pool([job], 1, threads, force, out_dir, rows, progress):
                row = Row(file=job.source, status="failed", target=job.target, output=job.output,
                          reason="the worker process died while converting it (killed, or a crash in native code)")
                rows[job.source] = row
                if progress:
                    progress(row)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [rows[j.source] for j in jobs]


@contextlib.contextmanager
def _spawning_guard():
    """Workers are started inside submit(). An interrupt raised in the middle of a spawn cuts the new
    worker's start-up data short, and the worker prints a traceback; masking the signal does not help
    (CPython runs Python-level handlers in the main thread, whichever thread the kernel picked). So
    meanwhile SIGTERM is only recorded, and re-raised as the usual interrupt once the spawns are done;
    SIGINT is ignored, which the new workers inherit: a terminal's Ctrl-C, sent to the whole group,
    never reaches them — the parent decides, and kills them."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = (signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if caught:
        raise KeyboardInterrupt


def _run_pool(jobs: list[Job], n_jobs: int, threads: int, force: bool, out_dir: Path, rows: dict,
              progress) -> list[Job]:
    """Convert ``jobs`` in a pool of ``n_jobs`` spawned workers; returns the jobs a broken pool lost."""
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
    lost: list[Job] = []
    try:
        with _spawning_guard():
            futures = {pool.submit(run_job, job, force): job for job in jobs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except BrokenProcessPool:
                lost.append(futures[fut])
                continue
            rows[row.file] = row
            if progress:
                progress(row)
    except BaseException:
        # Ctrl-C, SIGTERM (or a crash): stop the workers now, even one still starting up (an orderly
        # shutdown would pull the pool's semaphores from under it: a traceback). Their writes are
        # atomic, so what they leave is at most a temp file, swept while we still hold the lock.
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        sweep_temp_files(out_dir)
        raise
    else:
        pool.shutdown()
    if lost:
        sweep_temp_files(out_dir)
    return [j for j in jobs if j in lost]


# -- reports ----------------------------------------------------------------------------------


def _fmt_diff(v) -> str:
    return "" if v is None else f"{v:.2e}"


def _input_root(rows: list[Row]) -> str:
    """The folder every input lies under: rows show their path relative to it (two manifest entries
    called model.pkl in different folders stay apart)."""
    dirs = [os.path.dirname(os.path.abspath(r.file)) for r in rows]
    return os.path.commonpath(dirs) if dirs else ""


def _shown(file: str, root: str) -> str:
    from .text import safe

    return safe(os.path.relpath(os.path.abspath(file), root) if root else file)


def table(rows: list[Row], out_dir: Path | None = None) -> list[list[str]]:
    def rel(p: str) -> str:
        if not p:
            return ""
        return os.path.relpath(p, out_dir) if out_dir else p

    src_root = _input_root(rows)
    head = ["file", "arch", "classes", "output", "parity max diff", "status", "seconds"]
    body = [[_shown(r.file, src_root), r.arch, "" if r.classes is None else str(r.classes),
             rel(r.output) if r.ok else "", _fmt_diff(r.parity_max_diff), r.status, f"{r.seconds:.1f}"]
            for r in rows]
    return [head] + body


def render_text(rows: list[Row], out_dir: Path | None = None) -> str:
    """The summary table, then one line per failure with its reason."""
    from .text import render_table, safe

    t = table(rows, out_dir)
    root = _input_root(rows)
    lines = [render_table(t, right=(len(t[0]) - 1,))]
    lines += [f"failed  {_shown(r.file, root)}: {safe(r.reason)}" for r in rows if not r.ok]
    return "\n".join(lines)


def render_md(rows: list[Row], out_dir: Path | None = None) -> str:
    from .text import safe

    t = table(rows, out_dir)
    t[0].append("reason")
    for r, row in zip(t[1:], rows):
        r.append(safe(row.reason))
    esc = [[c.replace("|", "\\|") for c in r] for r in t]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def write_reports(out_dir: Path, rows: list[Row]) -> None:
    from .files import write_atomic

    root = _input_root(rows)
    out_abs = os.path.abspath(out_dir)

    def relative(r: Row) -> dict:        # as report.md: inputs below their common folder, outputs below OUT_DIR
        d = asdict(r)
        d["file"] = os.path.relpath(os.path.abspath(r.file), root) if root else r.file
        d["output"] = os.path.relpath(os.path.abspath(r.output), out_abs) if r.output else r.output
        return d

    summary = {"vmzconv_version": __version__, "files": len(rows),
               "converted": sum(r.status == "converted" for r in rows),
               "up_to_date": sum(r.status == "up-to-date" for r in rows),
               "failed": sum(not r.ok for r in rows), "input_root": root, "out_dir": out_abs,
               "rows": [relative(r) for r in rows]}
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(out_dir / "report.json", lambda f: f.write(text.encode()))
    md = f"# vmzconv bulk report\n\n{render_md(rows, out_dir)}\n"
    write_atomic(out_dir / "report.md", lambda f: f.write(md.encode()))
