"""Training-free sweep: each candidate method on the user's model and text, against the model as it is.

For a model trained at L and a target L', every candidate (a method spec) is patched in turn and
scored on the same samples as the unpatched model (``native``, the baseline). A forward of L'
tokens is the cost that matters (on two CPU cores, about 2.5 minutes for a 135M model at 16k), so
each serves every task.

Every prompt is an FSR prompt of L' tokens (``ropekit.eval.retrieval``: natural validation text
from a paragraph start, then the question), run once with its answers teacher-forced. The first
``n_passkey`` carry a passkey too (``retrieval.plant_passkey``): a needle sentence at an evenly
spread depth of the text, and after the FSR answer the question for the key. One forward scores

- ``ppl``: the mean next-token NLL over the prompt's text (L' minus the question's tokens; the
  needle's tokens left out) and over its first L tokens (the in-window cost). Attention is causal,
  so the first L tokens score as a forward of L tokens would, except for methods whose frequencies
  depend on the length (dynamic NTK), which take that forward (and score the rest at the length of
  the whole sequence, L' plus the answers and the passkey question);
- ``fsr``: teacher-forced token accuracy and NLL of the first sentence;
- ``passkey``: teacher-forced token accuracy and NLL of the key.

RULER tasks (``ruler``: names or groups of ``ropekit.eval.ruler``) run through lm-eval at L', the first
``n_ruler`` prompts of each, generated greedily: prompts of lm-eval's own, the same for every candidate at a
seed (the rows carry their hashes and the summary refuses to pair two that differ). They are identified by
``ruler_id`` (model, tokenizer, L', seed), not by the text settings, so RULER added to an earlier sweep's
``--out`` reuses its PPL, FSR and passkey rows and runs RULER alone.

``n_ppl``, ``n_fsr`` and ``n_passkey`` count the prompts that record each task; the sweep runs as
many prompts as the largest. The passkey sits in natural text, as in needle-in-a-haystack tests,
not in the repeated filler of ``ropekit eval passkey``, and the FSR prompts that carry it hold one
sentence that is not the document's: the sweep's scores compare candidates on identical prompts and
are not those of the standalone evaluations.

Per-sample values are result rows (``ropekit.results``), appended after each prompt, so an
interrupted sweep resumes at the prompt where it stopped (rows of the same sweep settings are
reused). From the per-sample rows the sweep computes, for every candidate, the mean paired
difference to the baseline with a 95% bootstrap interval (``ropekit.stats``), marks the differences
whose interval excludes 0, ranks the candidates by NLL at L', and writes these as rows of
``<out>_summary.csv`` (rewritten each run) for the table and figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropekit import files
from ropekit.data import VAL_FRACTION
from ropekit.eval import retrieval, ruler, tasks
from ropekit.eval.perplexity import token_nll
from ropekit.eval.run import variant_of
from ropekit.figures import pyplot, save_png
from ropekit.files import atomic_write_text, sole_writer
from ropekit.hf import format_layered, parse_layered, patch
from ropekit.results import append_rows, make_row, provenance, read_rows, write_rows
from ropekit.stats import compare, paired_interval

__all__ = [
    "TASKS",
    "BASELINE",
    "split_tasks",
    "SweepSettings",
    "parse_methods",
    "check_writable",
    "run_sweep",
    "paired_interval",
    "summarize",
    "format_summary",
    "summary_path",
    "table_path",
    "markdown_table",
    "draw_sweep",
]

TASKS = ("ppl", "fsr", "passkey")  # the registry's tasks one forward per prompt scores (RULER runs through lm-eval)
BASELINE = "native"  # the model as loaded, unpatched

# The per-sample metrics a sweep prompt records, in table order: the registry's, the perplexity window's at two
# lengths (``@target``: L′, ``@trained``: L); metric -> (task, higher is better, label in tables)
_AT = {"target": "@L′", "trained": "@L"}
SAMPLE_METRICS = {
    name: (tasks.task_of(name), tasks.metric(name).higher_is_better,
           tasks.metric(name).short + (_AT[name.split("@")[1]] if "@" in name else ""))
    for name in ("window_nll@target", "window_nll@trained", "fsr_sample_target_nll", "fsr_sample_token_accuracy",
                 "passkey_sample_target_nll", "passkey_sample_token_accuracy")
} | {f"ruler_sample@{t}": ("ruler", True, f"RULER {t}") for t in ruler.RULER_GROUPS["ruler"]}  # fmt: skip
RANK_BY = "window_nll@target"


@dataclass(frozen=True)
class SweepSettings:
    """What makes two sweeps' samples the same: rows of one are reused by the other only if equal."""

    model: str
    data: str
    trained_length: int
    target_length: int
    tasks: tuple[str, ...] = TASKS
    n_ppl: int = 8  # prompts that record each task; one forward per prompt serves all three
    n_fsr: int = 8
    n_passkey: int = 8
    ruler: tuple[str, ...] = ()  # RULER tasks through lm-eval at L' (not in sweep_id: see ruler_id)
    n_ruler: int = 4  # prompts per RULER task
    seed: int = 0
    val_fraction: float = VAL_FRACTION
    split_seed: int = 0
    tokenizer: str | None = None  # another tokenizer than the model's makes other prompts
    protocol: int = 4  # raised when what a sample is changes (3: PPL, FSR and passkey share prompts; 4: needle
    # only after a sentence end, never after a whitespace-only token)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not (self.tasks or self.ruler):
            raise ValueError(f"unknown sweep task(s) {bad or list(self.tasks)}; accepted: {', '.join(TASKS)} "
                             "and RULER's tasks and groups")  # fmt: skip
        if self.ruler:
            object.__setattr__(self, "ruler", tuple(ruler.resolve_tasks(list(self.ruler))))
            ruler.check_length(self.target_length)
        if not (isinstance(self.trained_length, int) and self.trained_length > 1):
            raise ValueError(f"trained length must be an integer > 1; got {self.trained_length!r}")
        if not (isinstance(self.target_length, int) and self.target_length > self.trained_length):
            raise ValueError(
                f"target length must be an integer > the trained length {self.trained_length}; "
                f"got {self.target_length!r}"
            )
        for key in ("n_ppl", "n_fsr", "n_passkey", "n_ruler"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1; got {getattr(self, key)!r}")

    @property
    def sweep_id(self) -> str:
        """What the one-forward prompts depend on (RULER's fields left out: an earlier sweep keeps its id)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("ruler", "n_ruler")}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def ruler_id(self) -> str:
        """What lm-eval's RULER prompts depend on: the tokenizer, the length and the seed."""
        fields = {"model": self.model, "tokenizer": self.tokenizer, "length": self.target_length, "seed": self.seed}
        return "ruler-" + hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def holds(self, metric: str, cfg: dict) -> bool:
        """Whether a per-sample row (its metric and config) is one of this sweep's samples."""
        if metric.startswith("ruler_sample@"):
            return (cfg.get("ruler_id") == self.ruler_id and metric.split("@")[1] in self.ruler
                    and int(cfg["sample"]) < self.n_ruler)  # fmt: skip
        return cfg.get("sweep_id") == self.sweep_id


def split_tasks(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--tasks``: the one-forward tasks (``TASKS``) and the RULER tasks (names or groups) it names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    forward = tuple(t for t in names if t in TASKS)
    rest = [t for t in names if t not in TASKS]
    try:
        return forward, tuple(ruler.resolve_tasks(rest))
    except ValueError:
        bad = [t for t in rest if t not in ruler.RULER_GROUPS and t not in ruler.RULER_GROUPS["ruler"]]
        accepted = (
            f"{', '.join(TASKS)}, and RULER's {', '.join(ruler.RULER_GROUPS)} or {', '.join(ruler.RULER_OFFLINE)}"
        )
        raise ValueError(f"unknown sweep task(s) {bad}; accepted: {accepted}, ...") from None


def parse_methods(text: str) -> list[str]:
    """';'-separated method specs -> normalized spec strings (ValueError naming a bad one); a spec may name
    the layer type it applies to ('yarn:factor=4,...@full_attention', one layer type per candidate)."""
    specs = [s.strip() for s in (text or "").split(";") if s.strip()]
    if not specs:
        raise ValueError(f"--methods needs ';'-separated method specs like 'pi:factor=2;yarn:...'; got {text!r}")
    out = []
    for spec in specs:
        name = _normalized(spec)  # raises ValueError naming the bad part
        if name in out or name == BASELINE:
            raise ValueError(f"method {spec!r} is given twice (or is the baseline {BASELINE!r}, always run)")
        out.append(name)
    return out


def _normalized(spec: str) -> str:
    return format_layered(parse_layered(spec))


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_summary.csv")


def table_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_table.md")


def check_writable(out: str | Path) -> None:
    """Fail before any evaluation if the result CSV or its summary cannot be written."""
    for p in (out, summary_path(out), table_path(out)):
        files.check_writable(p)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _done(out: Path, experiment: str, settings: SweepSettings) -> set[tuple[str, str, int]]:
    """(variant, metric, sample) of every per-sample row ``out`` holds for this sweep."""
    done = set()
    for r in read_rows(out):
        if r["experiment"] != experiment or r["metric"] not in SAMPLE_METRICS:
            continue
        try:
            cfg = json.loads(r["config"] or "{}")
        except json.JSONDecodeError:
            continue
        if settings.holds(r["metric"], cfg):
            done.add((r["variant"], r["metric"], int(cfg["sample"])))
    return done


def _metrics(task: str) -> list[str]:
    return [m for m, (t, _, _) in SAMPLE_METRICS.items() if t == task]


def _work(settings: SweepSettings) -> list[tuple[int, tuple[str, ...]]]:
    """The prompts one variant needs, one forward each: (i, tasks) for prompt i, an FSR prompt whose
    context is PPL window i, whose target is FSR sample i and, for i < n_passkey, which carries
    passkey sample i."""
    n = {t: getattr(settings, f"n_{t}") if t in settings.tasks else 0 for t in TASKS}
    return [(i, tuple(t for t in TASKS if i < n[t])) for i in range(max(n.values()))]


def _window_mean(nll, end: int, skip: tuple[int, int] | None) -> tuple[float, int]:
    """(mean, count) of the NLL of tokens 1 .. end-1 (nll[i] scores token i + 1), the tokens in ``skip`` left out."""
    keep = torch.ones(end - 1, dtype=torch.bool)
    if skip is not None:
        keep[max(skip[0] - 1, 0) : max(skip[1] - 1, 0)] = False
    return nll[: end - 1][keep].mean().item(), int(keep.sum())


def _prompt_values(model, sample, tasks, settings: SweepSettings, length_dependent: bool):
    """PPL window, FSR and passkey scores of one prompt (an ``FSRSample`` or a ``NeedleSample``),
    from one forward of the whole teacher-forced sequence."""
    L, Lp = settings.trained_length, settings.target_length
    planted = getattr(sample, "fsr", None) is not None
    fsr = sample.fsr if planted else sample
    seq = sample.ids if planted else fsr.prompt_ids + fsr.target_ids
    needle = sample.needle if planted else None
    device = next(model.parameters()).device
    ids = torch.tensor(seq, device=device)
    nll, hits = (t.cpu() for t in token_nll(model, ids, with_hits=True))
    extra = {"document": fsr.document, "char_offset": fsr.char_offset}
    out = []
    if "ppl" in tasks:  # the window is the prompt up to its question, the needle's tokens left out
        end_L = min(L, fsr.context_end)  # never a token of the question
        if length_dependent:  # its frequencies at L differ from those at L': a forward of L tokens
            at_L, n_L = _window_mean(token_nll(model, ids[:end_L]).cpu(), end_L, needle)
        else:  # causal attention: the first L tokens scored alone score the same
            at_L, n_L = _window_mean(nll, end_L, needle)
        at_target, n_target = _window_mean(nll, fsr.context_end, needle)
        out.append(("window_nll@target", Lp, at_target, {**extra, "window_tokens": n_target}))  # tokens scored
        out.append(("window_nll@trained", L, at_L, {**extra, "window_tokens": n_L}))
    P = len(fsr.prompt_ids)
    if "fsr" in tasks:
        t = slice(P - 1, P - 1 + len(fsr.target_ids))  # the positions that predict the target
        out.append(("fsr_sample_target_nll", Lp, nll[t].mean().item(), extra))
        out.append(("fsr_sample_token_accuracy", Lp, hits[t].float().mean().item(), extra))
    if "passkey" in tasks:
        k = slice(len(seq) - 1 - len(sample.key_ids), len(seq) - 1)
        key = {**extra, "depth": sample.depth}
        out.append(("passkey_sample_target_nll", Lp, nll[k].mean().item(), key))
        out.append(("passkey_sample_token_accuracy", Lp, hits[k].float().mean().item(), key))
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
    """Evaluate the baseline and every method in ``methods`` (skipping the samples ``out`` already
    holds for these settings), append each sample's rows to ``out`` as soon as it is scored, write
    the summary; return the summary rows. One sweep writes ``out`` at a time: a second one started
    while it runs is refused (it would score every sample twice)."""
    out = Path(out)
    check_writable(out)
    with sole_writer(out, kind="file"):
        return _run_sweep(model, tokenizer, docs, methods, settings, out, experiment=experiment, log=log)


def _run_sweep(model, tokenizer, docs, methods, settings: SweepSettings, out: Path, *, experiment, log):
    methods = [_normalized(m) for m in methods]
    done = _done(out, experiment, settings)
    work = _work(settings)
    Lp = settings.target_length
    prompts = retrieval.build_fsr_samples(docs, tokenizer, Lp, n=len(work), seed=settings.seed) if work else []
    if len(prompts) < len(work):
        raise ValueError(
            f"the validation text holds only {len(prompts)} FSR prompts of {Lp} tokens; the sweep needs "
            f"{len(work)} (lower --n-ppl/--n-fsr/--n-passkey or give longer documents with --data)"
        )
    n_key = settings.n_passkey if "passkey" in settings.tasks else 0
    for i in range(n_key):  # depths evenly spread: (i + 0.5) / n
        prompts[i] = retrieval.plant_passkey(tokenizer, prompts[i], (i + 0.5) / n_key, seed=settings.seed)
    native = variant_of(model)
    prov = provenance(next(model.parameters()).device)

    def keep(variant, method, values, extra):
        rows = [make_row(experiment=experiment, variant=variant, metric=m, context_length=length, value=v, n=1,
                         seed=settings.seed, config={**extra, "settings": dataclasses.asdict(settings),
                                                     "method": method, **more}, prov=prov)
                for m, length, v, more in values]  # fmt: skip
        append_rows(out, rows)

    for variant in [BASELINE, *methods]:
        todo = [(i, ts) for i, ts in work if any((variant, m, i) not in done for t in ts for m in _metrics(t))]
        todo_ruler = [
            t
            for t in settings.ruler
            if any((variant, f"ruler_sample@{t}", i) not in done for i in range(settings.n_ruler))
        ]
        if not (todo or todo_ruler):
            log(f"{variant}: already in {out}, skipped")
            continue
        handle = None if variant == BASELINE else patch(model, variant)
        try:
            method = str(handle.method) if handle else native
            length_dependent = retrieval.length_dependent(model)  # a patched or a natively dynamic model
            t_variant = time.perf_counter()
            for i, tasks in todo:
                t0 = time.perf_counter()
                values = _prompt_values(model, prompts[i], tasks, settings, length_dependent)
                seconds = round(time.perf_counter() - t0, 1)
                keep(variant, method, values, {"sweep_id": settings.sweep_id, "seconds": seconds, "sample": i})
                log(f"{variant}: prompt {i} ({', '.join(tasks)}) in {time.perf_counter() - t0:.0f}s")
            for task in todo_ruler:  # one lm-eval run per task: its rows are kept before the next starts
                t0 = time.perf_counter()
                scored = frozenset(i for v, m, i in done if v == variant and m == f"ruler_sample@{task}")
                samples = ruler.ruler_samples(
                    model, tokenizer, [task], Lp, n=settings.n_ruler, seed=settings.seed, skip=scored
                )
                seconds = round((time.perf_counter() - t0) / max(len(samples), 1), 1)
                values = [(f"ruler_sample@{task}", Lp, s.score, {"sample": s.index, "prompt_tokens": s.prompt_tokens,
                           "prompt_sha": s.prompt_sha, "response": s.response[:200]}) for s in samples]  # fmt: skip
                keep(variant, method, values, {"ruler_id": settings.ruler_id, "seconds": seconds})
                log(f"{variant}: RULER {task}, {len(samples)} prompts in {time.perf_counter() - t0:.0f}s")
            ruler_done = f", RULER {len(todo_ruler)} tasks" if todo_ruler else ""
            log(f"{variant}: {len(todo)} prompts{ruler_done} in {time.perf_counter() - t_variant:.0f}s")
        finally:
            if handle is not None:
                handle.undo()
    return summarize(out, settings, experiment=experiment, methods=methods)


# ---------------------------------------------------------------------------------------------
# Paired statistics and the ranked table
# ---------------------------------------------------------------------------------------------
def _samples(rows, settings: SweepSettings) -> dict[tuple[str, str], dict[int, float]]:
    """(variant, metric) -> sample -> value. Two variants' RULER prompts of one index must be the same
    prompt (its hash): lm-eval builds them, and a different lm-eval could build others."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    sha: dict[tuple[str, int], tuple[str, str]] = {}
    for r in rows:
        if r["metric"] not in SAMPLE_METRICS:
            continue
        cfg = json.loads(r["config"] or "{}")
        if not settings.holds(r["metric"], cfg):
            continue
        i = int(cfg["sample"])
        if "prompt_sha" in cfg:
            first = sha.setdefault((r["metric"], i), (cfg["prompt_sha"], r["variant"]))
            if first[0] != cfg["prompt_sha"]:
                raise ValueError(f"{r['metric']} prompt {i} differs between {first[1]} and {r['variant']} (hash "
                                 f"{first[0]} vs {cfg['prompt_sha']}: another lm-eval version?); they cannot be "
                                 "paired: rerun both into a new --out")  # fmt: skip
        by.setdefault((r["variant"], r["metric"]), {})[i] = float(r["value"])
    return by


def summarize(out: str | Path, settings: SweepSettings, *, experiment: str = "sweep", methods=None) -> list[dict]:
    """Summary rows from the per-sample rows of ``out``: per variant and metric the mean (``mean:<m>``),
    paired difference to the baseline (``delta:<m>``, ``delta_low:<m>``, ``delta_high:<m>``,
    ``resolved:<m>`` 1/0), and ``rank`` (by NLL at L'); written to ``summary_path(out)``."""
    rows = [r for r in read_rows(out) if r["experiment"] == experiment]
    by = _samples(rows, settings)
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
    write_rows(summary_path(out), summary)
    atomic_write_text(table_path(out), markdown_table(summary, rows, settings))
    return summary


def _order(val: dict[tuple[str, str], float]) -> list[str]:
    """The candidates by rank (NLL at L′), then those without one (no PPL task), by name."""
    ranked = [v for _, v in sorted((int(x), v) for (v, m), x in val.items() if m == "rank")]
    return ranked + sorted({v for v, _ in val} - set(ranked))


_RULER_NOTE = (
    " RULER: lm-eval's prompts sized to L′ (none cut; the rows give each prompt's tokens), the same for every "
    "candidate (hashes checked), answers generated greedily, string-match score 0-1; no chat template."
)


def markdown_table(summary: list[dict], rows: list[dict], settings: SweepSettings) -> str:
    """``<out>_table.md``: the ranked candidates, per metric the mean and the paired difference to the
    baseline with its 95% interval (**bold**: resolved), then what was run, where and how long."""
    val = {(r["variant"], r["metric"]): float(r["value"]) for r in summary}
    ranked = _order(val)
    metrics = [m for m in SAMPLE_METRICS if any((v, f"mean:{m}") in val for v in ranked)]
    L, Lp = settings.trained_length, settings.target_length
    head = [SAMPLE_METRICS[m][2].replace("L′", f"{Lp:,}").replace("@L", f"@{L:,}") for m in metrics]
    lines = ["| rank | candidate | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(metrics)]
    for rank, v in enumerate(ranked, start=1):
        cells = []
        for m in metrics:
            if (v, f"mean:{m}") not in val:
                cells.append("")
                continue
            mean = val[(v, f"mean:{m}")]
            cell = f"PPL {math.exp(mean):.2f}" if m.startswith("window_nll") else f"{mean:.3f}"
            if (v, f"delta:{m}") in val:
                d, lo, hi = (val[(v, f"{k}:{m}")] for k in ("delta", "delta_low", "delta_high"))
                delta = f"Δ {d:+.3f}" + ("" if math.isnan(lo) else f" [{lo:+.3f}, {hi:+.3f}]")
                cell += f"<br>{'**' + delta + '**' if val[(v, f'resolved:{m}')] else delta}"
            cells.append(cell)
        shown = rank if (v, "rank") in val else "–"
        lines.append(f"| {shown} | `{v}` | " + " | ".join(cells) + " |")
    per = _samples(rows, settings)
    n = {m: max((len(per.get((v, m), {})) for v in ranked), default=0) for m in metrics}
    seconds: dict[str, dict[tuple[str, int], float]] = {}  # variant -> (forward or RULER task, sample) -> s
    mine = []
    for r in rows:
        cfg = json.loads(r["config"] or "{}")
        if r["metric"] not in SAMPLE_METRICS or not settings.holds(r["metric"], cfg):
            continue
        mine.append(r)
        what = r["metric"] if r["metric"].startswith("ruler_sample@") else "forward"
        if "seconds" in cfg:
            seconds.setdefault(r["variant"], {})[(what, int(cfg["sample"]))] = float(cfg["seconds"])
    has_ruler = any(m.startswith("ruler_sample@") for m in metrics)
    shas, devices = sorted({r["git_sha"] for r in mine}), sorted({r["device"] for r in mine})
    versions = sorted({", ".join(f"{k} {v}" for k, v in json.loads(r["versions"]).items()) for r in mine})
    forward = [m for m in metrics if not m.startswith("ruler_sample@")]
    if forward:
        counts = ", ".join(f"{SAMPLE_METRICS[m][2]}: n = {n[m]}" for m in forward)
        what = (f" on `{settings.data}` (validation split {settings.val_fraction}, seed {settings.split_seed}); "
                f"{counts} prompts of L′ tokens")  # fmt: skip
    else:
        what = ""
    if has_ruler:
        what += ("; " if forward else ": ") + ", ".join(f"{SAMPLE_METRICS[m][2]}: n = {n[m]}" for m in metrics
                                                       if m not in forward) + " prompts"  # fmt: skip
    lines += [
        "",
        f"{settings.model}, trained at L = {L:,}, extended training-free to L′ = {Lp:,}{what}, the same for every "
        f"candidate. Means; Δ: mean paired difference to `{BASELINE}` (the model as loaded; "
        + ("NLL for PPL columns, lower is better; accuracies higher" if forward else "higher is better")
        + "), 95% percentile bootstrap interval; **bold**: the interval excludes 0 (n >= 5). "
        + ("Ranked by NLL at L′." if any(m == "rank" for _, m in val) else "Not ranked (no PPL task).")
        + (_RULER_NOTE if has_ruler else ""),
        "",
        f"Seconds per candidate (its prompts' forwards{' and RULER generations' if has_ruler else ''}): "
        + ", ".join(f"`{v}` {sum(seconds.get(v, {}).values()):.0f}" for v in ranked)
        + f"; {sum(sum(x.values()) for x in seconds.values()):.0f} in all. Device: {', '.join(devices)}; "
        f"git {', '.join(shas)}; {'; '.join(versions)}.",
    ]
    return "\n".join(lines) + "\n"


def format_summary(summary: list[dict]) -> str:
    """The ranked table: per candidate, PPL at L' and L, FSR and passkey means, and the paired
    difference to the baseline with its interval ('!' marks an interval that excludes 0)."""
    val: dict[tuple[str, str], float] = {(r["variant"], r["metric"]): float(r["value"]) for r in summary}
    variants = _order(val)
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


def draw_sweep(summary_csv: str | Path, png: str | Path) -> list[Path]:
    """One panel per metric of a sweep summary: each candidate's paired difference to the baseline with
    its 95% interval, in rank order (filled markers: the interval excludes 0)."""
    plt = pyplot()
    rows = read_rows(summary_csv)
    if not rows:
        raise ValueError(f"no summary rows in {summary_csv}")
    val = {(r["variant"], r["metric"]): float(r["value"]) for r in rows}
    ranked = [v for _, v in sorted((int(val[(v, "rank")]), v) for v, m in val if m == "rank")]
    metrics = [m for m in SAMPLE_METRICS if any((v, f"delta:{m}") in val for v in ranked)]
    if not metrics:
        raise ValueError(f"no paired differences in {summary_csv}")
    cands = [v for v in ranked if (v, f"delta:{metrics[0]}") in val]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(cands) + 1.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for y, v in enumerate(cands):
            if (v, f"delta:{m}") not in val:
                continue
            d, lo, hi = (val[(v, f"{k}:{m}")] for k in ("delta", "delta_low", "delta_high"))
            filled = bool(val.get((v, f"resolved:{m}")))
            ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]] if lo == lo else None, fmt="o",
                        mfc="C0" if filled else "white", color="C0", capsize=3)  # fmt: skip
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(range(len(cands)), cands if ax is axes[0][0] else [""] * len(cands), fontsize=6)
        ax.invert_yaxis()
        better = "higher" if SAMPLE_METRICS[m][1] else "lower"
        ax.set_title(f"Δ {SAMPLE_METRICS[m][2]} ({better} is better)", fontsize=8)
    n = int(next(r["n"] for r in rows if r["metric"].startswith("delta:")))
    fig.suptitle(f"{Path(summary_csv).stem}: paired difference to the model as it is, 95% bootstrap "
                 f"interval (n = {n}); rank order top to bottom", fontsize=8)  # fmt: skip
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, png)
    plt.close(fig)
    return [png]
