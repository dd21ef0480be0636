"""Helpers of ``gpu_check.sh``: its stages' rows in the result schema (``ropekit.results``).

    python3 experiments/device/gpu_check.py tests ROWS.csv -- PYTEST_ARGS...   # pytest outcomes as rows
    python3 experiments/device/gpu_check.py stage ROWS.csv NAME EXIT SECONDS BUDGET   # one stage's wall time
    python3 experiments/device/gpu_check.py environment                          # device and versions

Every row carries the device, the library versions and the git sha (``ROPEKIT_GIT_SHA`` where the tree
travelled without its ``.git``).
"""

from __future__ import annotations

import sys
import time

from ropekit.results import append_rows, make_row, provenance


class _Outcomes:
    """A pytest plugin that keeps each test's outcome and duration (the call phase, or the failing one)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        entry = self.rows.setdefault(report.nodeid, {"outcome": "passed", "duration_s": 0.0, "message": ""})
        entry["duration_s"] += report.duration
        if report.failed or (report.skipped and entry["outcome"] == "passed"):
            entry["outcome"] = "failed" if report.failed else "skipped"
            lines = (str(report.longrepr) if report.longrepr else "").strip().splitlines()
            errors = [line[1:].strip() for line in lines if line.startswith("E ") and line[1:].strip()]
            entry["message"] = " / ".join(errors[:3])[:300] if errors else (lines[-1][:300] if lines else "")


def tests(rows_path: str, pytest_args: list[str]) -> int:
    """Run pytest; one row per test (metric = its outcome, value 1) and one summary row per outcome."""
    import pytest

    plugin = _Outcomes()
    start = time.perf_counter()
    status = int(pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[plugin]))
    prov = provenance()
    rows = [make_row(experiment="gpu_tests", variant=nodeid, metric=e["outcome"], context_length=None, value=1.0,
                     n=1, seed=0, config={"duration_s": round(e["duration_s"], 3), "message": e["message"]},
                     prov=prov)
            for nodeid, e in plugin.rows.items()]  # fmt: skip
    counts = {k: sum(e["outcome"] == k for e in plugin.rows.values()) for k in ("passed", "failed", "skipped")}
    for outcome, count in counts.items():
        rows.append(make_row(experiment="gpu_tests", variant="all", metric=outcome, context_length=None, value=count,
                             n=len(plugin.rows), seed=0, prov=prov,
                             config={"pytest_args": pytest_args, "pytest_exit": status,
                                     "wall_s": round(time.perf_counter() - start, 1)}))  # fmt: skip
    append_rows(rows_path, rows)
    print(f"gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"(pytest exit {status}); {len(rows)} rows appended to {rows_path}")  # fmt: skip
    return status


def stage(rows_path: str, name: str, exit_status: str, seconds: str, budget: str) -> int:
    """A stage's wall time and exit status (124: cut at its budget) as rows."""
    prov = provenance()
    config = {"budget_s": int(budget)}
    rows = [make_row(experiment="gpu_check", variant=name, metric=metric, context_length=None, value=float(value),
                     n=1, seed=0, config=config, prov=prov)
            for metric, value in (("wall_s", seconds), ("exit_status", exit_status))]  # fmt: skip
    append_rows(rows_path, rows)
    return 0


def environment() -> int:
    prov = provenance()
    print(f"device: {prov['device']}\nversions: {prov['versions']}\ngit sha: {prov['git_sha']}")
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(f"multiprocessors: {props.multi_processor_count}, memory: {props.total_memory / 2**30:.1f} GiB")
    except Exception as err:  # the environment printout never stops the run
        print(f"device properties unavailable: {err}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["tests"] and len(argv) >= 2:
        rest = argv[2:]
        return tests(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    if argv[:1] == ["stage"] and len(argv) == 6:
        return stage(*argv[1:])
    if argv[:1] == ["environment"]:
        return environment()
    print(__doc__.strip().splitlines()[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
