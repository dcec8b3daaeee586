"""Write and read converted checkpoints: ``.pth`` (MMAction2's container) and ``.safetensors``.

Writes are atomic: a temp file in the destination folder, fsync, rename. An
interrupted or failed write leaves nothing behind, and an existing output is
only replaced with ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import InputError, OutputError
from .files import _umask, check_writable, sha256_file, write_atomic

SUFFIXES = (".pth", ".safetensors")
META_KEY = "vmzconv_meta"


def check_output_path(out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise OutputError(f"{out}: output must end in .pth or .safetensors")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    check_writable(out.parent, str(out))
    return out


class _HashingWriter:
    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_pth(f, state_dict, meta: dict) -> str:
    w = _HashingWriter(f)
    torch.save({"state_dict": state_dict, "meta": meta}, w)
    return w.sha.hexdigest()


def _write_safetensors(f, state_dict, meta: dict) -> str:
    """``save_file`` writes straight into the (already opened, empty) temp file: no in-memory copy."""
    from safetensors.torch import save_file

    save_file(dict(state_dict), f.name, metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
    os.chmod(f.name, 0o666 & ~_umask())          # save_file made its own file (0600); outputs get the usual mode
    return sha256_file(f.name)


def save(path: str | Path, state_dict, meta: dict, force: bool = False) -> str:
    """Write the checkpoint atomically (deterministic bytes for the same inputs); returns their sha256."""
    path = check_output_path(path, force)
    writer = _write_pth if path.suffix == ".pth" else _write_safetensors
    return write_atomic(path, lambda f: writer(f, state_dict, meta))[1]


def prepare_publish_folder(folder: str | Path) -> Path:
    """--publish writes into a folder, made if it does not exist yet."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: --publish needs a folder, this is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the --publish folder: {e.strerror or e}") from None
    check_writable(folder, str(folder))
    return folder


def publish_name(name: str, date: str, sha256: str) -> str:
    """MMAction2 publish_model / torch.hub convention: ``NAME_YYYYMMDD-<sha256[:8]>.pth``."""
    return f"{name}_{date}-{sha256[:8]}.pth"


def save_published(folder: str | Path, name: str, date: str, state_dict, meta: dict,
                   force: bool = False) -> tuple[Path, str]:
    """Write ``folder/NAME_DATE-<sha8>.pth``; the name is known only once the bytes are."""
    folder = Path(folder)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise OutputError(f"--publish {name!r}: use letters, digits, '_', '-' and '.' only")
    if not re.fullmatch(r"\d{8}", date):
        raise OutputError(f"--date {date!r}: expected YYYYMMDD")

    def final_path(sha: str) -> Path:
        target = folder / publish_name(name, date, sha)
        if target.exists() and not force:
            raise OutputError(f"{target}: already exists (use --force to overwrite)")
        return target

    return write_atomic(folder / f"{name}.pth", lambda f: _write_pth(f, state_dict, meta), rename=final_path)


def card_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def write_card(out: Path, card: dict) -> Path:
    path = card_path(out)
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
    return path


def load(path: str | Path, notes: list | None = None,
         allow_non_finite: bool = False) -> tuple["OrderedDict[str, torch.Tensor]", dict]:
    """Read a converted (or any MMAction2) checkpoint safely: ``weights_only`` for .pth, zip records
    bounded before anything is unpacked, every tensor checked (dense, on a device, a float dtype except
    the BN counters, finite unless ``allow_non_finite``: parity examines broken files); other float
    dtypes are cast to float32 with a note in ``notes``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable safetensors file: {e}") from None
        return _checked_state(path, state, notes, allow_non_finite), _safetensors_meta(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        state, meta = obj["state_dict"], obj.get("meta")
    elif isinstance(obj, dict):
        state, meta = obj, {}
    else:
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _checked_state(path, state, notes, allow_non_finite), _checked_meta(path, meta)


def _torch_load(path: Path, mmap: bool = False):
    """``torch.load(weights_only=True)`` after the file's own checks, with torch's refusals in one line."""
    _sniff_not_a_checkpoint(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file
        text = str(e)
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise InputError(f"{path}: its pickle names {refused.group(1)}, which is neither a tensor nor plain data; "
                             "refused (checkpoints are read with weights_only=True: nothing in them runs)") from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint: {text.splitlines()[0][:200] if text else type(e).__name__}") from None


_COUNTER = "num_batches_tracked"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: a sum is finite exactly when they are, unless it overflows; only
    then the exact (allocating) check runs."""
    total = t.sum(dtype=torch.float64) if t.dtype != torch.float64 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _checked_state(path, state, notes: list | None = None,
                   allow_non_finite: bool = False) -> "OrderedDict[str, torch.Tensor]":
    from .blobs import short_repr

    if not isinstance(state, dict):
        raise InputError(f"{path}: its state_dict is a {type(state).__name__}, not a dict of named tensors")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    cast: dict[str, int] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: state_dict entry {short_repr(k)} is a {type(v).__name__}"
                             + ("" if isinstance(k, str) else f" under a {type(k).__name__} key")
                             + ", not a named tensor")
        name = short_repr(k)
        if v.is_meta or v.layout != torch.strided:
            raise InputError(f"{path}: tensor {name} is a {'meta' if v.is_meta else str(v.layout)} tensor "
                             "without values; refused")
        if k.endswith(_COUNTER):
            out[k[7:] if k.startswith("module.") else k] = v
            continue
        if not v.is_floating_point():
            raise InputError(f"{path}: tensor {name} is {str(v.dtype).replace('torch.', '')}, not a float; refused")
        if not allow_non_finite and not all_finite(v):
            raise InputError(f"{path}: tensor {name} holds NaN or Inf; refused")
        if v.dtype != torch.float32:
            cast[str(v.dtype).replace("torch.", "")] = cast.get(str(v.dtype).replace("torch.", ""), 0) + 1
            v = v.float()
        out[k[7:] if k.startswith("module.") else k] = v
    if cast and notes is not None:
        notes.append(f"{path}: " + ", ".join(f"{n} {d}" for d, n in cast.items()) + " tensors cast to float32")
    return out


def _checked_meta(path, meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InputError(f"{path}: its meta is a {type(meta).__name__}, not a dict")
    return dict(meta)


def _sniff_not_a_checkpoint(path: Path) -> None:
    """Name the files people hand to parity/verify by mistake before torch's loader says something cryptic."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if not head:
        raise InputError(f"{path}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        _check_zip_records(path)                       # torch.save's zip format
        return
    if head[:14] == b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19":
        return                                         # torch.save's legacy format
    if head[:1] == b"\x80" or head[:1] in b"(}]" and b"blobs" in head:
        raise InputError(f"{path}: this is a pickle (a VMZ Caffe2 .pkl?), not a converted checkpoint — "
                         "run `vmzconv convert` on it first")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        raise InputError(f"{path}: this is a text file, not a PyTorch checkpoint")


def _check_zip_records(path: Path) -> None:
    """torch.save stores its records uncompressed: declared sizes far beyond the file's own are a zip bomb,
    refused from the central directory before a byte is unpacked."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(max(0, i.file_size) for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable PyTorch checkpoint (zip: {e})") from None
    if total > 2 * size + (64 << 20):
        raise InputError(f"{path}: its zip records would be {total:,} bytes uncompressed from a {size:,}-byte file "
                         "(torch.save stores them uncompressed) — a zip bomb? refused")


def load_meta(path: str | Path) -> dict:
    """Only the meta of a converted file (memory-mapped, tensors untouched)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_meta(path)
    obj = _torch_load(path, mmap=True)
    return _checked_meta(path, obj.get("meta")) if isinstance(obj, dict) else {}


def _safetensors_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file: {e}") from None
    if META_KEY not in raw:
        return {}
    try:
        meta = json.loads(raw[META_KEY])
    except ValueError:
        raise InputError(f"{path}: its {META_KEY} metadata is not JSON") from None
    return _checked_meta(path, meta)
