"""Crash-safe files: atomic writes, safetensors + JSON sidecars, fingerprints.

Why: a run that is interrupted (Ctrl-C, OOM, a killed notebook kernel) must never leave a
half-written result that a later run mistakes for a whole one. Everything is written to a temporary
name in the same folder and renamed into place, which is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentlab.errors import LatentlabError


def current_umask() -> int:
    """The process umask, read without changing it where possible (``/proc/self/status``).

    Why: ``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever the umask, so
    everything renamed into place from them must be given the mode a plain ``open``/``mkdir`` would
    have, or a team cannot share a model cache or read each other's runs.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # No /proc (macOS, old kernels): set and restore at once. Not thread-safe, but the window is
    # two system calls, and 0o077 makes anything created meanwhile too private, never too open.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 for 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the current umask (0755 for 022)."""
    return 0o777 & ~current_umask()


def _tmp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(name)


def make_temp_dir(parent: str | Path | None, prefix: str) -> Path:
    """``tempfile.mkdtemp(prefix=prefix, dir=parent)`` with the umask's folder mode, not 0700.

    For folders written in full and then moved into place (:func:`replace_dir`): converted models,
    checkpoints, adapters. ``parent`` is created if missing; ``None`` means the system temp folder.
    """
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent)))
    os.chmod(tmp, dir_mode())
    return tmp


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a clear error if it cannot be written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = _tmp_sibling(p / "probe")
        probe.unlink()
    except OSError as e:
        raise LatentlabError(
            f"cannot write to output folder {p} ({e.strerror or e})",
            "choose a folder you can write to with --out",
        ) from None
    return p


# A full disk or an exhausted quota: the user's to fix, so one LatentlabError, not a traceback.
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_error(path: str | Path, code: int) -> LatentlabError:
    """The one error every write path raises when the disk (or quota) is full."""
    return LatentlabError(f"{_FULL[code]} writing {path}", "free space or choose another --out")


def _write_error(path: Path, e: BaseException) -> LatentlabError | None:
    """``e`` as a LatentlabError when it is a failed write (a full disk or quota), else None.

    safetensors reports I/O as a SafetensorError whose text carries the OS error number
    ("I/O error: No space left on device (os error 28)").
    """
    if isinstance(e, OSError):
        return disk_full_error(path, e.errno) if e.errno in _FULL else None
    if isinstance(e, SafetensorError):
        m = re.search(r"os error (\d+)", str(e))
        if m and int(m.group(1)) in _FULL:
            return disk_full_error(path, int(m.group(1)))
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on error removed.

    A full disk (ENOSPC, EDQUOT, in the writer or here) becomes one :class:`LatentlabError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(target)
    except OSError as e:
        err = _write_error(target, e)
        if err is None:
            raise
        raise err from None
    try:
        yield tmp
        # The writer may have replaced the file (or made a folder): give it the umask's mode now.
        if tmp.exists():
            os.chmod(tmp, dir_mode() if tmp.is_dir() else file_mode())
        os.replace(tmp, target)
    except (OSError, SafetensorError) as e:
        err = _write_error(target, e)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``path`` (``.safetensors``) and its JSON sidecar (same stem, ``.json``).

    The sidecar is written last, so a sidecar on disk means the tensors beside it are whole.
    """
    p = Path(path).with_suffix(".safetensors")
    with atomic_path(p) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    write_json(p.with_suffix(".json"), dict(meta))
    return p


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` file and its JSON sidecar, with a clear error if either is missing."""
    p = Path(path).with_suffix(".safetensors")
    side = p.with_suffix(".json")
    if not p.exists() or not side.exists():
        raise LatentlabError(
            f"{p} or its sidecar {side.name} is missing (an interrupted run?)",
            "re-run the command that writes it",
        )
    return load_file(str(p)), read_json(side)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_file(path: str | Path, samples: int = 16, size: int = 1 << 16) -> str:
    """A fast, content-based fingerprint of a large file (size + evenly spaced chunks).

    Why not a full sha256: hashing a 14 GB 7B checkpoint on every load costs ~30 s; sampled chunks
    catch a different, truncated or damaged weight file in milliseconds.
    """
    p = Path(path)
    n = p.stat().st_size
    h = hashlib.sha256(str(n).encode())
    with open(p, "rb") as f:
        for i in range(samples + 1):
            f.seek(max(0, min(n - size, (n - size) * i // samples)))
            h.update(f.read(size))
    return h.hexdigest()


def fingerprint_weights(folder: str | Path) -> str:
    """Fingerprint every weight file of a model folder, in a stable order."""
    files = sorted(
        p for p in Path(folder).iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"}
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(fingerprint_file(p).encode())
    return h.hexdigest()[:16]


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing any previous (damaged) copy."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + f".old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
