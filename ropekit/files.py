"""Files: the one place ropekit writes to disk safely.

- ``atomic_write_text``: a whole file or nothing (temporary file in the same folder, then a rename);
- ``atomic_folder``: a whole folder or nothing (checkpoints, the final model);
- ``locked``: an inter-process lock beside a file (``filelock``), for appends by several processes;
- ``check_writable``: fail at once, before hours of work, when an output cannot be written;
- ``cache_dir``: ropekit's download cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

__all__ = ["atomic_path", "atomic_write_text", "atomic_folder", "locked", "check_writable", "cache_dir"]


def cache_dir() -> Path:
    """ropekit's download cache: $ROPEKIT_CACHE, else ~/.cache/ropekit."""
    return Path(os.environ.get("ROPEKIT_CACHE") or Path.home() / ".cache" / "ropekit")


def _readable_mode(path: str | Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp makes 0600; an output is as readable as any other file


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` in one rename.

    For writers that want a file name (``np.ndarray.tofile``, ``savefig``): a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    _readable_mode(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    An interrupted write leaves ``path`` as it was (or absent), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield tmp
        old = None
        if path.exists():  # a rename cannot replace a non-empty folder: move the old one aside first
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def locked(path: str | Path, timeout: float = 600.0) -> FileLock:
    """An inter-process lock for ``path`` (a ``.lock`` file beside it): ``with locked(p): ...``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout)


def check_writable(path: str | Path, *, kind: str = "file") -> Path:
    """Raise ValueError (one line) unless ``path`` can be written as a ``kind`` ("file" or "folder").

    Creates missing parent folders; never leaves anything else behind.
    """
    path = Path(path).expanduser()
    if kind == "file" and path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory; pass a file path (e.g. {str(path / 'results.csv')!r})")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} exists and is a file; pass a folder path")
    folder = path if kind == "folder" else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ropekit-write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write output {str(path)!r}: {err.strerror or err}") from None
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write output {str(path)!r}: the file is read-only")
    return path
