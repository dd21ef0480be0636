"""Result rows: one metric value per row (long format), each with its provenance.

Columns: experiment, variant (method spec), metric, context_length (the window or prompt length),
position (the first position of a per-position bin), depth (a passkey depth), value, n, seed, git_sha,
device, versions (JSON), timestamp, config (JSON). Every coordinate a figure groups by has its own
column; nothing a plot needs hides in the config JSON.

``append_rows`` is safe across processes: under a lock beside the file it appends whole lines (a file
written with an older header is first rewritten, atomically, with the current one), so two runs
appending to one CSV never lose a row.
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ropekit.files import atomic_write_text, locked

__all__ = ["COLUMNS", "provenance", "make_row", "append_rows", "read_rows", "atomic_write_text"]

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
def _git_sha() -> str:
    """The checkout's commit, read once per process (a run that outlives a commit keeps its own sha:
    long runs call this when they start)."""
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
    import torch

    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    from ropekit import __version__

    out["ropekit"] = __version__
    return out


def provenance(device: Any = None) -> dict[str, str]:
    """git sha, device name, library versions and a UTC timestamp for result rows."""
    return {
        "git_sha": _git_sha(),
        "device": device_name(device),
        "versions": json.dumps(versions(), sort_keys=True),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a result CSV; rows of files written by an older ropekit are upgraded (``_upgrade``)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # an append in progress in another process: its last line is partial
        text = text[: text.rfind("\n") + 1]
    return [_upgrade(row) for row in csv.DictReader(io.StringIO(text, newline=""))]


def _csv_text(rows: Iterable[dict[str, Any]], *, header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append result rows to a CSV (created with a header when missing); safe across processes."""
    rows = list(rows)
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"result row lacks columns {sorted(missing)}")
    path = Path(path)
    with locked(path):
        header = ""
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as fh:
                header = fh.readline().rstrip("\r\n")
        if header != ",".join(COLUMNS):  # a new file, or one with an older header: write it whole
            atomic_write_text(path, _csv_text([*read_rows(path), *rows], header=True))
            return
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            newline = "" if fh.read(1) == b"\n" else "\n"  # a hand-edited file may lack its last newline
        with open(path, "a", encoding="utf-8", newline="") as fh:  # whole lines, under the lock
            fh.write(newline + _csv_text(rows, header=False))
            fh.flush()
            os.fsync(fh.fileno())
