"""Atomic file and directory writes, so an interrupted run never leaves half an output behind.

Outputs get the permissions of normally created files (0o666 / 0o777 minus the umask), not the
private 0o600 / 0o700 of `tempfile`: a model saved for a team stays readable by the team.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SlimtuneError

# Written into every directory slimtune saves; `--overwrite` replaces only such directories.
MARKER = ".slimtune"


def _explain_os_error(path: Path, exc: OSError) -> SlimtuneError:
    if exc.errno == errno.ENOSPC:
        return SlimtuneError(f"disk full while writing {path}; free some space or choose another --out")
    if exc.errno == errno.EROFS:
        return SlimtuneError(f"cannot write to {path}: read-only file system; choose a writable path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SlimtuneError(f"cannot write to {path}: permission denied; choose a writable path")
    return SlimtuneError(f"cannot write {path}: {exc.strerror or exc}; choose another path")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: str | os.PathLike) -> Path:
    """Fail early (before hours of work) if `path` cannot be created."""
    path = Path(path).expanduser()
    probe = _nearest_existing(path.parent if path.parent != Path("") else Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SlimtuneError(f"cannot write to {path}: {probe} is not a writable directory; choose another path")
    return path


def _probe_write(path: Path) -> None:
    """Create and delete a file next to `path`. os.access() trusts mode bits, so it says yes on a
    read-only mount or a full disk; only a real write finds out before the work starts."""
    probe = _nearest_existing(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".slimtune-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise _explain_os_error(path, exc) from exc


def written_by_slimtune(path: str | os.PathLike) -> bool:
    """True if `path` holds slimtune's marker file or a slimtune prune report."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    return {"job", "sparsity"} <= report.keys() or str(report.get("command", "")).startswith("slimtune")


def _overlap(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "is inside"
    return None


def check_output_dir(out: str | os.PathLike, overwrite: bool, protected: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check `--out` before any work: raise SlimtuneError (one line) unless writing there is safe.

    Refuses an existing regular file; a directory that is, contains or is inside a `protected`
    path (the input model, the data; entries that do not exist, such as hub ids, are skipped); a
    non-empty directory without `overwrite`, or with it when slimtune did not write it; and a
    location where no file can actually be created. Returns `out` as a Path.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SlimtuneError(f"--out {path} is a file, not a directory; choose another --out")
    resolved = path.resolve()
    for item in protected:
        if item is None or not Path(item).expanduser().exists():
            continue
        relation = _overlap(resolved, Path(item).expanduser().resolve())
        if relation:
            raise SlimtuneError(f"--out {path} {relation} the input {item}, which must stay untouched; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        ours = written_by_slimtune(path)
        if ours and not overwrite:
            raise SlimtuneError(f"output directory {path} exists and is not empty; pass --overwrite to replace it or choose another --out")
        if not ours:  # someone's own files: never offer to delete them
            raise SlimtuneError(f"output directory {path} is not empty and slimtune did not write it (no {MARKER} marker "
                                "or slimtune report.json), so --overwrite would not replace it either; choose another --out")
    _probe_write(path)
    return path


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere the only way to read it is to set it and put it back.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(mode: int, umask: int) -> int:
    return (0o666 | (mode & 0o111)) & ~umask  # keep execute bits, as a copied script would


def _apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes of normally created files and folders.

    tempfile makes 0o700 / 0o600 on purpose, and some writers (safetensors) go through it too."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                os.chmod(file, _file_mode(os.stat(file).st_mode, umask))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: str | os.PathLike, write) -> Path:
    """Call `write(fh)` on a temporary file next to `path`, then rename it over `path`: a reader (or a
    crash) sees the old file or the whole new one. Streaming into the file (e.g. `torch.save(obj, fh)`)
    avoids holding a serialised copy in memory."""
    path = check_writable_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
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

    On any exception the temporary directory is removed and `path` is left as it was. Whether
    replacing `path` is wise is the caller's question (see `check_output_dir`).
    """
    path = check_writable_parent(path)
    if path.exists() and not path.is_dir():
        raise SlimtuneError(f"{path} is a file, not a directory; choose another --out")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise SlimtuneError(f"output directory {path} exists and is not empty; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as exc:
        raise _explain_os_error(path, exc) from exc
    try:
        yield tmp
        _apply_umask(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the user's previous output back under its own name
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain_os_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def visible_files(folder: Path) -> list[Path]:
    """The files under `folder`, sorted, skipping hidden files and anything under a hidden folder."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def fingerprint(name: str) -> list | None:
    """What a --resume compares for a local input (a file or a directory): each file's relative
    path, size and modification time, hidden entries skipped. None for a name that is not a local
    path (the bundled defaults, a hub id)."""
    path = Path(name)
    if not path.exists():
        return None
    files = [path] if path.is_file() else visible_files(path)
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name if f == path else str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out
