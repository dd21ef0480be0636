"""Files: the one place ropekit writes to disk safely.

- ``atomic_write_text``: a whole file or nothing (temporary file in the same folder, then a rename);
- ``csv_text`` / ``write_csv``: the one CSV writer (a table as text; a whole table, atomically);
- ``atomic_folder``: a whole folder or nothing (checkpoints, the final model);
- ``locked``: an inter-process lock beside a file (``filelock``), for appends by several processes;
- ``sole_writer``: one process at a time writes a run folder or an output (a second one is refused);
- ``check_writable``: fail at once, before hours of work, when an output cannot be written;
- ``cache_dir``: ropekit's download cache.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "csv_text",
    "write_csv",
    "atomic_folder",
    "locked",
    "sole_writer",
    "check_writable",
    "read_only",
    "cache_dir",
]


def cache_dir() -> Path:
    """ropekit's download cache: $ROPEKIT_CACHE, else ~/.cache/ropekit."""
    return Path(os.environ.get("ROPEKIT_CACHE") or Path.home() / ".cache" / "ropekit")


def _default_mode(bits: int) -> int:
    """``bits`` less the process's umask: the mode ``open`` or ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def _readable_mode(path: str | Path, like: Path | None = None) -> None:
    """mkstemp makes 0600: give a new output the mode of the file it replaces, else the umask's default."""
    os.chmod(path, like.stat().st_mode & 0o7777 if like is not None and like.exists() else _default_mode(0o666))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` in one rename.

    For writers that want a file name (``np.ndarray.tofile``, ``savefig``): a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _readable_mode(tmp, like=path)
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


def csv_text(rows: Iterable[Mapping | Sequence], columns: Sequence[str], *, header: bool = True) -> str:
    """``rows`` as CSV text under ``columns``: each row a mapping (keys beyond ``columns`` ignored, missing ones
    empty) or a sequence in the columns' order; ``header=False`` for rows to append to an existing table."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row)
    return buf.getvalue()


def write_csv(path: str | Path, rows: Iterable[Mapping | Sequence], columns: Sequence[str]) -> None:
    """Write a whole CSV table atomically (see ``csv_text``): the old file stays until the new one is complete."""
    atomic_write_text(path, csv_text(rows, columns))


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
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes 0700; a saved model is as readable as any folder
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


@contextlib.contextmanager
def sole_writer(path: str | Path, *, kind: str) -> Iterator[None]:
    """Hold ``path`` (``kind`` "folder": a run folder; "file": an output file) for this process alone while
    the block runs.

    A second process that asks while the first holds it gets a one-line ValueError naming the holder,
    at once; a holder that dies (even by SIGKILL) releases it. The lock file sits in the folder (a
    folder) or beside the file (``.<name>.writer.lock``), with the holder's pid, host and start time
    in a file beside it."""
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file'; got {kind!r}")
    path = Path(path)
    base = path / ".writer" if kind == "folder" else path.with_name(f".{path.name}.writer")
    base.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(str(base) + ".lock", timeout=0), Path(str(base) + ".holder")
    try:
        lock.acquire()
    except Timeout:
        who = holder.read_text().strip() if holder.is_file() else "holder unknown"
        if who.startswith(f"pid {os.getpid()} on {socket.gethostname()},"):
            raise ValueError(f"{str(path)!r} is already being written by this process ({who})") from None
        raise ValueError(
            f"{str(path)!r} is being written by another ropekit process ({who}); "
            "wait for it to end or pass another output"
        ) from None
    try:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        atomic_write_text(holder, f"pid {os.getpid()} on {socket.gethostname()}, since {now}")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def check_writable(path: str | Path, *, kind: str = "file") -> Path:
    """Raise ValueError (one line) unless ``path`` can be written as a ``kind`` ("file" or "folder").

    Creates missing parent folders; never leaves anything else behind.
    """
    if not str(path).strip():
        raise ValueError(f"the output path is empty; pass a {kind} path")
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
    if kind == "file" and path.exists() and read_only(path):
        raise ValueError(f"cannot write output {str(path)!r}: the file is read-only")
    return path


def read_only(path: str | Path) -> bool:
    """The file cannot be written, or its mode says no one may write it (which root would override)."""
    return not os.access(path, os.W_OK) or not Path(path).stat().st_mode & 0o222
