"""Result rows: one metric value per row (long format), each with its provenance.

Columns: experiment, variant (method spec), metric, context_length (the window or prompt length),
position (the first position of a per-position bin), depth (a passkey depth), value, n, seed, git_sha,
device, versions (JSON), timestamp, config (JSON). Every coordinate a figure groups by has its own
column; nothing a plot needs hides in the config JSON.

``append_rows`` is safe across processes and never destroys a row: under a lock beside the file it
appends whole lines or nothing (a file written with an older header is first rewritten, atomically,
with the current one), refuses a CSV it did not write, and drops a row an interrupted append cut off;
``read_rows`` names the file and line of a damaged row.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import io
import json
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

from ropekit.files import atomic_write_text, csv_text, locked, read_only, write_csv
from ropekit.version import __version__

__all__ = ["COLUMNS", "provenance", "make_row", "append_rows", "write_rows", "read_rows"]

COLUMNS = [
    "experiment",
    "variant",
    "metric",
    "context_length",
    "position",
    "depth",
    "value",
    "n",
    "seed",
    "git_sha",
    "device",
    "versions",
    "timestamp",
    "config",
]


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The checkout's commit, read once per process (a run that outlives a commit keeps its own sha:
    long runs call this when they start). ``ROPEKIT_GIT_SHA`` names it where the tree travelled without
    its ``.git`` (a copy sent to a lent GPU machine)."""
    if os.environ.get("ROPEKIT_GIT_SHA"):
        return os.environ["ROPEKIT_GIT_SHA"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
            return sha + ("-dirty" if dirty else "")
    except OSError:
        pass
    return "unknown"


def device_name(device: Any = None) -> str:
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    out["ropekit"] = __version__
    return out


def provenance(device: Any = None) -> dict[str, str]:
    """git sha, device name, library versions and a UTC timestamp for result rows (to the microsecond: the
    rows of one call share it, and two calls begun in the same second must not read as one)."""
    return {
        "git_sha": git_sha(),
        "device": device_name(device),
        "versions": json.dumps(versions(), sort_keys=True),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
    }


def make_row(
    *,
    experiment: str,
    variant: str,
    metric: str,
    context_length: int | None,
    value: float,
    n: int,
    seed: int,
    config: dict[str, Any] | None = None,
    prov: dict[str, str] | None = None,
    position: int | None = None,
    depth: float | None = None,
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "variant": variant,
        "metric": metric,
        "context_length": "" if context_length is None else int(context_length),
        "position": "" if position is None else int(position),
        "depth": "" if depth is None else float(depth),
        "value": float(value),
        "n": int(n),
        "seed": int(seed),
        **(prov or provenance()),
        "config": json.dumps(config or {}, sort_keys=True, default=str),
    }


def _upgrade(row: dict[str, str]) -> dict[str, str]:
    """A row as this ropekit writes it. Before the ``position`` column, a per-position loss row held the
    bin's position in ``context_length`` and its window only in the config JSON: move both to their place."""
    row = {c: "" for c in COLUMNS} | row
    if row["metric"] == "position_loss" and row["position"] == "" and '"window"' in row["config"]:
        window = json.loads(row["config"]).get("window")
        if window is not None:
            row["position"], row["context_length"] = row["context_length"], str(int(window))
    return row


_REQUIRED = ("experiment", "variant", "metric", "value")  # what makes a CSV a ropekit result file, old or new
_JSON_COLUMNS = ("versions", "config")


def _check_header(path: Path, header: list[str]) -> None:
    """Refuse a CSV that ropekit did not write (its header is not COLUMNS or an older subset of them)."""
    if any(c not in COLUMNS for c in header) or not set(_REQUIRED) <= set(header):
        shown = ",".join(header)
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise ValueError(
            f"{str(path)!r} is not a ropekit result CSV (its header: {shown}); ropekit reads only result CSVs it "
            "wrote and never rewrites another file"
        )


def _damaged(fields: list[str], header: list[str]) -> str | None:
    """Why a parsed row cannot be a row ropekit wrote whole (a field count or JSON that does not parse), or None."""
    if len(fields) != len(header):
        return f"{len(fields)} fields where its header has {len(header)}"
    for name, value in zip(header, fields, strict=True):
        if name == "value":
            try:
                float(value)
            except ValueError:
                return f"its value {value[:20]!r} is not a number"
        # ropekit writes at least {}: an empty last column is a row cut right after its last comma
        if name in _JSON_COLUMNS and (value or name == header[-1]):
            try:
                json.loads(value)
            except ValueError:
                return f"its {name} is not valid JSON"
    return None


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a result CSV; rows of files written by an older ropekit are upgraded (``_upgrade``).

    A missing file has no rows. A file ropekit did not write, or a damaged row, is a ValueError naming the
    file and the line. A last line without its newline is an append in progress in another process (or one
    cut off), and is read only when it is a whole row."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not a ropekit result CSV (not UTF-8 text: {err.reason})") from None
    last = ""
    if text and not text.endswith("\n"):  # kept below only if it is a whole row (a hand edit dropped the newline)
        text, last = text[: text.rfind("\n") + 1], text[text.rfind("\n") + 1 :]
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    _check_header(path, header)
    rows = []
    for fields in reader:
        if not fields:
            continue
        why = _damaged(fields, header)
        if why:
            raise ValueError(f"{str(path)!r}, line {reader.line_num}: a damaged row ({why}); remove that line")
        rows.append(_upgrade(dict(zip(header, fields, strict=True))))
    fields = next(csv.reader([last]), []) if last else []
    if fields and not _damaged(fields, header):
        rows.append(_upgrade(dict(zip(header, fields, strict=True))))
    return rows


def _tail_line(path: Path) -> bytes:
    """The file's bytes after its last newline (the whole last line when the file lacks its final newline)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        chunk = 1 << 16
        while True:
            start = max(0, size - chunk)
            fh.seek(start)
            data = fh.read(size - start)
            cut = data.rfind(b"\n")
            if cut >= 0 or start == 0:
                return data[cut + 1 :]
            chunk *= 4


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append result rows to a CSV (created with a header when missing); safe across processes.

    Under a lock beside the file: a file ropekit did not write is refused, as is a read-only one; a file
    with an older header is rewritten whole (atomically, keeping its mode) with the current one; a last
    line cut off by an interrupted append is dropped, with a warning naming its line; the rows are
    appended whole or, when the write fails (a full disk), not at all: the file is put back as it was."""
    rows = list(rows)
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"result row lacks columns {sorted(missing)}")
    path = Path(path)
    with locked(path):
        if not path.is_file() or path.stat().st_size == 0:
            atomic_write_text(path, csv_text(rows, COLUMNS))
            return
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            header = next(csv.reader([fh.readline()]), [])
        _check_header(path, header)
        if read_only(path):
            raise ValueError(f"cannot append to {str(path)!r}: the file is read-only")
        tail = _tail_line(path)
        if tail:  # no final newline: a hand edit that dropped it, or an append cut off mid-row (mid-character too)
            fields = next(csv.reader([tail.decode("utf-8", errors="replace")]), [])
            if _damaged(fields, header):
                lines = sum(1 for _ in open(path, "rb"))
                warnings.warn(f"{path}: dropped line {lines}, a row cut off by an interrupted append", stacklevel=2)
                with open(path, "r+b") as fh:
                    fh.truncate(path.stat().st_size - len(tail))  # the torn bytes exactly
                tail = b""
        if header != COLUMNS:  # a file with an older header: write it whole
            atomic_write_text(path, csv_text([*read_rows(path), *rows], COLUMNS))
            return
        size = path.stat().st_size
        try:
            with open(path, "a", encoding="utf-8", newline="") as fh:  # whole lines, under the lock
                fh.write(("\n" if tail else "") + csv_text(rows, COLUMNS, header=False))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            with open(path, "r+b") as fh:
                fh.truncate(size)
            raise ValueError(f"cannot append to {str(path)!r}: {err.strerror or err}; the file is as it was") from None


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with exactly these result rows (a summary, a figure's rows), atomically. For rows that
    accumulate (a run's results), use ``append_rows``."""
    write_csv(path, rows, COLUMNS)
