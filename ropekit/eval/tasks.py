"""The evaluation tasks and their metrics, named once: every other room (the evaluation runners, the CLI, the
ablation, the sweep, the lm-eval export, the figures) asks this registry for a task's metrics, their labels
and which way is better.

A task writes two kinds of result rows:

- **per-sample** rows, one value per window or prompt (``sample`` in the row's config; the same samples for
  every model at a seed), which paired comparisons use (``ropekit demo``, ``ropekit sweep``);
- **summary** rows, one value per length, which ``ropekit eval`` prints and appends; they are computed from
  the same per-sample scores (``ropekit.eval.run``), so the two never disagree.

Adding a task: its ``Task`` entry here, its scoring in ``ropekit.eval`` (one per-sample path), and its test.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "Task", "TASKS", "METRICS", "metric", "task_of"]


@dataclass(frozen=True)
class Metric:
    name: str  # the ``metric`` column of a result row
    label: str  # in tables and figure titles
    short: str  # in table headers
    higher_is_better: bool
    as_ppl: bool = False  # a mean next-token NLL, shown as exp(mean), perplexity
    per_sample: bool = True  # one row per window or prompt (else one per length)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    metrics: tuple[Metric, ...]

    @property
    def sample_metrics(self) -> tuple[Metric, ...]:
        return tuple(m for m in self.metrics if m.per_sample)

    @property
    def summary_metrics(self) -> tuple[Metric, ...]:
        return tuple(m for m in self.metrics if not m.per_sample)


PPL = Task(
    "ppl",
    "perplexity vs context length (+ per-position loss bins)",
    (
        Metric("window_nll", "perplexity", "NLL", False, as_ppl=True),
        Metric("position_nll", "mean NLL in a bin of positions", "position NLL", False),
        Metric("ppl", "perplexity", "PPL", False, per_sample=False),
        Metric("ppl_low", "perplexity, 95% interval low", "PPL low", False, per_sample=False),
        Metric("ppl_high", "perplexity, 95% interval high", "PPL high", False, per_sample=False),
        Metric("nll", "mean next-token NLL", "NLL", False, per_sample=False),
        Metric("position_loss", "mean NLL in bin", "position NLL", False, per_sample=False),
        Metric("ppl_sliding", "perplexity, sliding window", "PPL (sliding)", False, per_sample=False),
    ),
)
FSR = Task(
    "fsr",
    "FIRST-SENTENCE-RETRIEVAL: ROUGE-L of the greedy answer, teacher-forced accuracy and NLL",
    (
        Metric("fsr_sample_token_accuracy", "FSR teacher-forced token accuracy", "FSR acc", True),
        Metric("fsr_sample_target_nll", "NLL of the first sentence", "FSR NLL", False),
        Metric("fsr_sample_rouge_l", "FSR ROUGE-L F1 x 100 (greedy generation)", "FSR ROUGE-L", True),
        Metric("fsr_token_accuracy", "FSR teacher-forced token accuracy", "FSR acc", True, per_sample=False),
        Metric("fsr_target_nll", "NLL of the first sentence", "FSR NLL", False, per_sample=False),
        Metric("fsr_rouge_l", "ROUGE-L F1 x 100", "FSR ROUGE-L", True, per_sample=False),
    ),
)
PASSKEY = Task(
    "passkey",
    "5-digit passkey at several depths: exact match and teacher-forced accuracy",
    (
        Metric("passkey_sample_token_accuracy", "passkey teacher-forced token accuracy", "key acc", True),
        Metric("passkey_sample_target_nll", "NLL of the passkey", "key NLL", False),
        Metric("passkey_exact_match", "passkey exact match", "key exact", True, per_sample=False),
        Metric("passkey_token_accuracy", "passkey teacher-forced token accuracy", "key acc", True, per_sample=False),
    ),
)

RULER = Task(
    "ruler",
    "RULER's tasks through lm-eval (niah, vt, cwe, fwe, qa): string-match score per prompt, per task",
    (  # the row's metric names the RULER task after '@': ruler_sample@niah_single_1
        Metric("ruler_sample", "RULER score (lm-eval string match, 0-1)", "RULER", True),
        Metric("ruler_score", "RULER score (lm-eval string match, 0-1)", "RULER", True, per_sample=False),
    ),
)

TASKS: dict[str, Task] = {t.name: t for t in (PPL, FSR, PASSKEY, RULER)}
METRICS: dict[str, Metric] = {m.name: m for t in TASKS.values() for m in t.metrics}
_TASK_OF = {m.name: t.name for t in TASKS.values() for m in t.metrics}


def _base(name: str) -> str:
    """A metric's registered name: a study's qualifier after ``@`` (``window_nll@target``,
    ``passkey_exact_match@depth=0.5``) is dropped."""
    return name.split("@", 1)[0]


def metric(name: str) -> Metric:
    """The registered metric of a result row's ``metric`` (``@`` qualifiers dropped)."""
    try:
        return METRICS[_base(name)]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}") from None


def task_of(name: str) -> str | None:
    """The task that writes metric ``name`` (``@`` qualifiers dropped), or None for a metric of no task."""
    return _TASK_OF.get(_base(name))
