"""Atomic file and directory writes, so an interrupted run never leaves half an output behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SlimtuneError


def _explain_os_error(path: Path, exc: OSError) -> SlimtuneError:
    if exc.errno == errno.ENOSPC:
        return SlimtuneError(f"disk full while writing {path}; free some space or choose another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SlimtuneError(f"cannot write to {path}: permission denied; choose a writable path")
    return SlimtuneError(f"cannot write {path}: {exc.strerror or exc}; choose another path")


def check_writable_parent(path: str | os.PathLike) -> Path:
    """Fail early (before hours of work) if `path` cannot be created."""
    path = Path(path).expanduser()
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SlimtuneError(f"cannot write to {path}: {probe} is not a writable directory; choose another path")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = check_writable_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise _explain_os_error(path, exc) from exc
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any exception the temporary directory is removed and `path` is left as it was.
    """
    path = check_writable_parent(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise SlimtuneError(f"output directory {path} exists and is not empty; pass --overwrite or choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as exc:
        raise _explain_os_error(path, exc) from exc
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain_os_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
