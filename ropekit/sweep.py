"""Training-free sweep: each candidate method on the user's model and text, against the model as it is.

For a model trained at L and a target L', every candidate (a method spec) is patched in turn and
scored on the same samples as the unpatched model (``native``, the baseline):

- ``ppl``: the mean next-token NLL of each of ``n_ppl`` windows of L' tokens and of the first L tokens
  of the same windows (the in-window cost); one forward per window, since attention is causal, except
  for methods whose frequencies depend on the length (dynamic NTK), which score the L prefix apart;
- ``fsr``: FIRST-SENTENCE-RETRIEVAL prompts of L' tokens, teacher-forced token accuracy and NLL of
  the first sentence (one forward per prompt; no generation);
- ``passkey``: passkey prompts of L' tokens at evenly spread depths, teacher-forced accuracy and NLL
  of the key tokens.

Per-sample values are result rows (``ropekit.results``), appended after each (candidate, task), so
an interrupted sweep resumes where it stopped: a (candidate, task) whose rows exist for the same
sweep settings is skipped. From the per-sample rows the sweep computes, for every candidate, the
mean paired difference to the baseline with a 95% bootstrap interval (``scipy.stats.bootstrap``,
paired, percentile), marks the differences whose interval excludes 0, ranks the candidates by NLL at
L', and writes these as rows of ``<out>_summary.csv`` (rewritten each run) for the table and figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.methods import parse
from ropekit.results import COLUMNS, append_rows, atomic_write_text, make_row, provenance, read_rows
from ropekit.stats import compare, paired_interval

__all__ = [
    "TASKS",
    "BASELINE",
    "SweepSettings",
    "parse_methods",
    "check_writable",
    "run_sweep",
    "paired_interval",
    "summarize",
    "format_summary",
    "summary_path",
]

TASKS = ("ppl", "fsr", "passkey")
BASELINE = "native"  # the model as loaded, unpatched

# Per-sample metric -> (task, higher is better, label in tables)
SAMPLE_METRICS = {
    "window_nll@target": ("ppl", False, "NLL@L′"),
    "window_nll@trained": ("ppl", False, "NLL@L"),
    "fsr_sample_target_nll": ("fsr", False, "FSR NLL"),
    "fsr_sample_token_accuracy": ("fsr", True, "FSR acc"),
    "passkey_sample_target_nll": ("passkey", False, "key NLL"),
    "passkey_sample_token_accuracy": ("passkey", True, "key acc"),
}
RANK_BY = "window_nll@target"


@dataclass(frozen=True)
class SweepSettings:
    """What makes two sweeps' samples the same: rows of one are reused by the other only if equal."""

    model: str
    data: str
    trained_length: int
    target_length: int
    tasks: tuple[str, ...] = TASKS
    n_ppl: int = 4
    n_fsr: int = 8
    n_passkey: int = 4
    seed: int = 0
    val_fraction: float = 0.15
    split_seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown sweep task(s) {bad or list(self.tasks)}; accepted: {', '.join(TASKS)}")
        if not (isinstance(self.trained_length, int) and self.trained_length > 1):
            raise ValueError(f"trained length must be an integer > 1; got {self.trained_length!r}")
        if not (isinstance(self.target_length, int) and self.target_length > self.trained_length):
            raise ValueError(
                f"target length must be an integer > the trained length {self.trained_length}; "
                f"got {self.target_length!r}"
            )
        for key in ("n_ppl", "n_fsr", "n_passkey"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1; got {getattr(self, key)!r}")

    @property
    def sweep_id(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def parse_methods(text: str) -> list[str]:
    """';'-separated method specs -> normalized spec strings (ValueError naming a bad one)."""
    specs = [s.strip() for s in (text or "").split(";") if s.strip()]
    if not specs:
        raise ValueError(f"--methods needs ';'-separated method specs like 'pi:factor=2;yarn:...'; got {text!r}")
    out = []
    for spec in specs:
        name = str(parse(spec))  # raises ValueError naming the bad part
        if name in out or name == BASELINE:
            raise ValueError(f"method {spec!r} is given twice (or is the baseline {BASELINE!r}, always run)")
        out.append(name)
    return out


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_summary.csv")


def check_writable(out: str | Path) -> None:
    """Fail before any evaluation if the result CSV or its summary cannot be written."""
    from ropekit.files import check_writable as _check

    for p in (out, summary_path(out)):
        _check(p)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _done(out: Path, experiment: str, sweep_id: str) -> set[tuple[str, str]]:
    done = set()
    for r in read_rows(out):
        if r["experiment"] != experiment or r["metric"] not in SAMPLE_METRICS:
            continue
        try:
            cfg = json.loads(r["config"] or "{}")
        except json.JSONDecodeError:
            continue
        if cfg.get("sweep_id") == sweep_id:
            done.add((r["variant"], SAMPLE_METRICS[r["metric"]][0]))
    return done


def _task_samples(model, tokenizer, docs, settings: SweepSettings, task: str, length_dependent: bool, cache):
    """Per-sample values of one task for the model as it is now: [(metric, length, index, value, extra)]."""
    from ropekit.eval import perplexity, retrieval

    L, Lp, seed = settings.trained_length, settings.target_length, settings.seed
    out = []
    if task == "ppl":
        windows = perplexity.select_windows(cache, Lp, settings.n_ppl, seed)
        full = perplexity.window_nll(model, cache, windows, Lp, prefixes=() if length_dependent else (L,))
        if length_dependent:  # its frequencies at L differ from those at L': a forward of L tokens
            short = perplexity.window_nll(model, cache, windows, L)
            full = [{**f, **s} for f, s in zip(full, short, strict=True)]
        for i, ((doc, start), v) in enumerate(zip(windows, full, strict=True)):
            extra = {"document": cache.names[doc], "start": int(start)}
            out.append(("window_nll@target", Lp, i, v[Lp], extra))
            out.append(("window_nll@trained", L, i, v[L], extra))
    elif task == "fsr":
        samples = retrieval.build_fsr_samples(docs, tokenizer, Lp, n=settings.n_fsr, seed=seed)
        r = retrieval.fsr_evaluate(model, tokenizer, samples, generate=False)
        for i, (s, v) in enumerate(zip(samples, r["samples"], strict=True)):
            extra = {"document": s.document, "char_offset": s.char_offset}
            out.append(("fsr_sample_target_nll", Lp, i, v["target_nll"], extra))
            out.append(("fsr_sample_token_accuracy", Lp, i, v["token_accuracy"], extra))
    else:
        depths = tuple((i + 0.5) / settings.n_passkey for i in range(settings.n_passkey))
        samples = retrieval.build_passkey_samples(tokenizer, Lp, depths=depths, n=1, seed=seed)
        r = retrieval.passkey_evaluate(model, tokenizer, samples, generate=False)
        for i, (s, v) in enumerate(zip(samples, r["samples"], strict=True)):
            extra = {"depth": s.depth}
            out.append(("passkey_sample_target_nll", Lp, i, v["target_nll"], extra))
            out.append(("passkey_sample_token_accuracy", Lp, i, v["token_accuracy"], extra))
    return out


def run_sweep(
    model,
    tokenizer,
    docs,
    methods: list[str],
    settings: SweepSettings,
    out: str | Path,
    *,
    experiment: str = "sweep",
    log=print,
) -> list[dict[str, Any]]:
    """Evaluate the baseline and every method in ``methods`` (skipping what ``out`` already holds for
    these settings), append per-sample rows to ``out``, write the summary; return the summary rows."""
    import time

    import ropekit
    from ropekit.data import tokenize_documents
    from ropekit.eval.run import _variant

    out = Path(out)
    check_writable(out)
    methods = [str(parse(m)) for m in methods]
    sweep_id = settings.sweep_id
    done = _done(out, experiment, sweep_id)
    cache = tokenize_documents(docs, tokenizer) if "ppl" in settings.tasks else None
    native = _variant(model)
    prov = provenance(next(model.parameters()).device)
    for variant in [BASELINE, *methods]:
        todo = [t for t in settings.tasks if (variant, t) not in done]
        if not todo:
            log(f"{variant}: already in {out}, skipped")
            continue
        handle = None if variant == BASELINE else ropekit.patch(model, variant)
        try:
            method = str(handle.method) if handle else native
            length_dependent = bool(handle and handle.method.needs_seq_len)
            for task in todo:
                t0 = time.perf_counter()
                values = _task_samples(model, tokenizer, docs, settings, task, length_dependent, cache)
                config = {
                    "sweep_id": sweep_id,
                    "settings": dataclasses.asdict(settings),
                    "method": method,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows = [
                    make_row(
                        experiment=experiment,
                        variant=variant,
                        metric=m,
                        context_length=length,
                        value=v,
                        n=1,
                        seed=settings.seed,
                        config={**config, "sample": i, **extra},
                        prov=prov,
                    )
                    for m, length, i, v, extra in values
                ]
                append_rows(out, rows)
                log(f"{variant}: {task} done in {time.perf_counter() - t0:.0f}s")
        finally:
            if handle is not None:
                handle.undo()
    return summarize(out, settings, experiment=experiment, methods=methods)


# ---------------------------------------------------------------------------------------------
# Paired statistics and the ranked table
# ---------------------------------------------------------------------------------------------
def _samples(rows, sweep_id: str) -> dict[tuple[str, str], dict[int, float]]:
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["metric"] not in SAMPLE_METRICS:
            continue
        cfg = json.loads(r["config"] or "{}")
        if cfg.get("sweep_id") == sweep_id:
            by.setdefault((r["variant"], r["metric"]), {})[int(cfg["sample"])] = float(r["value"])
    return by


def summarize(out: str | Path, settings: SweepSettings, *, experiment: str = "sweep", methods=None) -> list[dict]:
    """Summary rows from the per-sample rows of ``out``: per variant and metric the mean (``mean:<m>``),
    paired difference to the baseline (``delta:<m>``, ``delta_low:<m>``, ``delta_high:<m>``,
    ``resolved:<m>`` 1/0), and ``rank`` (by NLL at L'); written to ``summary_path(out)``."""
    rows = [r for r in read_rows(out) if r["experiment"] == experiment]
    by = _samples(rows, settings.sweep_id)
    variants = [BASELINE] + [v for v in (methods or sorted({v for v, _ in by})) if v != BASELINE]
    prov = provenance()
    cfg = {
        "sweep_id": settings.sweep_id,
        "settings": dataclasses.asdict(settings),
        "baseline": BASELINE,
        "interval": "95% percentile bootstrap of the mean paired difference (scipy.stats.bootstrap)",
    }
    summary, order = [], []
    for variant in variants:
        for metric in SAMPLE_METRICS:
            cand, base = by.get((variant, metric)), by.get((BASELINE, metric))
            if not cand:
                continue
            length = settings.trained_length if metric.endswith("@trained") else settings.target_length
            keys = sorted(cand)
            paired = variant != BASELINE and base and set(keys) <= set(base)
            row = compare({variant: cand, **({BASELINE: base} if paired else {})}, BASELINE if paired else None,
                          seed=settings.seed)[variant]  # fmt: skip
            mean = row["mean"]
            vals = [(k, row[k]) for k in ("mean", "delta", "delta_low", "delta_high", "resolved") if k in row]
            for kind, value in vals:
                summary.append(
                    make_row(
                        experiment=experiment,
                        variant=variant,
                        metric=f"{kind}:{metric}",
                        context_length=length,
                        value=value,
                        n=len(keys),
                        seed=settings.seed,
                        config=cfg,
                        prov=prov,
                    )
                )
            if metric == RANK_BY:
                order.append((mean, variant))
    for rank, (_, variant) in enumerate(sorted(order), start=1):
        summary.append(
            make_row(
                experiment=experiment,
                variant=variant,
                metric="rank",
                context_length=None,
                value=rank,
                n=0,
                seed=settings.seed,
                config=cfg,
                prov=prov,
            )
        )
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    atomic_write_text(summary_path(out), buf.getvalue())
    return summary


def format_summary(summary: list[dict]) -> str:
    """The ranked table: per candidate, PPL at L' and L, FSR and passkey means, and the paired
    difference to the baseline with its interval ('!' marks an interval that excludes 0)."""
    val: dict[tuple[str, str], float] = {(r["variant"], r["metric"]): float(r["value"]) for r in summary}
    ranks = sorted((int(v), var) for (var, m), v in val.items() if m == "rank")
    variants = [v for _, v in ranks] + sorted({v for v, _ in val} - {v for _, v in ranks})
    present = [m for m in SAMPLE_METRICS if any((v, f"mean:{m}") in val for v in variants)]
    lines = []
    for v in variants:
        parts = [f"{len(lines) + 1:>2}. {v}"]
        for m in present:
            if (v, f"mean:{m}") not in val:
                continue
            label, mean = SAMPLE_METRICS[m][2], val[(v, f"mean:{m}")]
            shown = f"PPL {math.exp(mean):.2f}" if m.startswith("window_nll") else f"{mean:.3f}"
            text = f"{label} {shown}"
            if (v, f"delta:{m}") in val:
                d, lo, hi = (val[(v, f"{k}:{m}")] for k in ("delta", "delta_low", "delta_high"))
                mark = "!" if val[(v, f"resolved:{m}")] else ""
                text += f" (Δ {d:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark})"
            parts.append(text)
        lines.append("\n      ".join(parts))
    legend = (
        "Δ: mean paired difference to the baseline 'native' (NLLs: lower is better; acc: higher), "
        "95% bootstrap interval; '!': the interval excludes 0. Ranked by NLL at L′."
    )
    return "\n".join(lines + [legend])
