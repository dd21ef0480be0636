"""Result rows: one metric value per row (long format), each with its provenance.

Columns: experiment, variant (method spec), metric, context_length, value, n, seed, git_sha, device,
versions (JSON), timestamp, config (JSON). ``append_rows`` rewrites the file through a temporary
file and a rename, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "provenance", "make_row", "append_rows", "read_rows", "atomic_write_text"]

COLUMNS = [
    "experiment",
    "variant",
    "metric",
    "context_length",
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
    """The checkout's commit, read once per process (a run that outlives a commit keeps its own sha)."""
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
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "variant": variant,
        "metric": metric,
        "context_length": "" if context_length is None else int(context_length),
        "value": float(value),
        "n": int(n),
        "seed": int(seed),
        **(prov or provenance()),
        "config": json.dumps(config or {}, sort_keys=True, default=str),
    }


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file is as readable as any other
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rows(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append result rows to a CSV (created with a header when missing), atomically."""
    import io

    rows = list(rows)
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"result row lacks columns {sorted(missing)}")
    existing = read_rows(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(existing)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
