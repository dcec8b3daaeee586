"""Files: streamed sha256 and atomic writes. No torch here, so light callers (bulk's parent) stay light."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import OutputError

TEMP_PREFIX = ".vmzconv-tmp."      # every temp file vmzconv makes starts so: bulk sweeps only these


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write, rename=None):
    """``write(f)`` into a temp file beside ``path``, fsync, then rename it to ``path`` (or to
    ``rename(result)`` when given, e.g. a name that contains the file's hash). Returns
    ``(final path, result)``; on any failure the temp file is removed and an OS error becomes
    an OutputError naming the file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write here: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())           # mkstemp makes 0600; outputs get the usual mode
        os.close(fd)
        with open(tmp, "wb") as f:                 # f.name is the temp path, for writers that want one
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        final = rename(result) if rename else path
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        raise
    return final, result


def check_writable(folder: Path, what: str) -> None:
    """Fail now, not after the work, when ``folder`` does not exist or takes no new file (a probe file is
    created and removed: permission bits alone say nothing for root or on a read-only mount)."""
    if not folder.is_dir():
        raise OutputError(f"{what}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vmzconv-probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)
