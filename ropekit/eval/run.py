"""Evaluations that return result rows (``ropekit.results``): what the CLI and the experiments call.

Every row records the model's trained length (``max_position_embeddings`` before any patch raised
it is not known here, so the config's current value) and whether the length is past it: lengths
beyond are allowed, that is the experiment.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from ropekit.data import Document, TokenCache, tokenize_documents
from ropekit.eval import ruler
from ropekit.eval.perplexity import score_windows, select_windows, sliding_window_nll, summarize_windows
from ropekit.eval.retrieval import (
    DEFAULT_FSR_TEMPLATE,
    build_fsr_samples,
    build_passkey_samples,
    fsr_evaluate,
    passkey_evaluate,
)
from ropekit.hf import read_method
from ropekit.results import make_row, provenance

__all__ = [
    "variant_of",
    "eval_ppl",
    "eval_ppl_sliding",
    "eval_fsr",
    "eval_passkey",
    "eval_ppl_samples",
    "eval_fsr_samples",
    "eval_ruler",
]


def variant_of(model) -> str:
    """The method spec a model runs: a saved ropekit method, else the one its config names."""
    saved = getattr(model.config, "ropekit", None)
    if saved and saved.get("method"):
        return saved["method"]
    return str(read_method(model.config))


def _check(lengths, n: int, **positive) -> None:
    """The numbers every evaluation needs, refused with one line naming the bad value (no NaN rows)."""
    if not lengths or any(isinstance(L, bool) or not isinstance(L, int) or L < 2 for L in lengths):
        raise ValueError(f"lengths must be integers >= 2 (a window needs a next token to score); got {lengths!r}")
    for key, value in {"n": n, **positive}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1; got {value!r}")


def _rows(model, experiment, variant, seed, config, metrics: list[tuple[str, int, float, int, dict]]):
    prov = provenance(next(model.parameters()).device)
    trained = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    out = []
    for metric, length, value, n, extra in metrics:
        extra = dict(extra)
        position, depth = extra.pop("position", None), extra.pop("depth", None)  # columns of their own
        cfg = {
            **config,
            "trained_length": trained,
            "beyond_trained_length": bool(trained and length > trained),
            **extra,
        }
        out.append(
            make_row(
                experiment=experiment, variant=variant, metric=metric, context_length=length, value=value,
                n=n, seed=seed, config=cfg, prov=prov, position=position, depth=depth,
            )
        )  # fmt: skip
    return out


def eval_ppl(
    model,
    tokenizer,
    docs: list[Document],
    lengths: list[int],
    *,
    n: int = 8,
    seed: int = 0,
    bin_size: int | None = None,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    tokens: TokenCache | None = None,
) -> list[dict]:
    """Rows: ppl, ppl_low, ppl_high, nll per length; position_loss per bin (context_length = the window
    length L, position = the bin's first predicted position). ``tokens``: ``docs`` already tokenised."""
    _check(lengths, n, bin_size=bin_size)
    cache = tokens if tokens is not None else tokenize_documents(docs, tokenizer)
    metrics = []
    with tqdm(total=len(lengths) * n, desc="ppl", leave=False) as bar:
        for L in lengths:
            scored = score_windows(model, cache, L, n=n, seed=seed, progress=bar)
            r = summarize_windows(cache, L, scored, seed=seed, bin_size=bin_size)
            metrics += [
                ("ppl", L, r.ppl, r.n, {"windows": r.windows}),
                ("ppl_low", L, r.ppl_low, r.n, {}),
                ("ppl_high", L, r.ppl_high, r.n, {}),
                ("nll", L, r.nll, r.n, {}),
            ]
            metrics += [("position_loss", L, v, r.n, {"position": pos, "bin_size": bin_size}) for pos, v in r.bins]
    return _rows(model, experiment, variant or variant_of(model), seed, config or {}, metrics)


def eval_ppl_sliding(
    model,
    tokenizer,
    docs: list[Document],
    windows: list[int],
    *,
    stride: int,
    span: int,
    n: int = 4,
    seed: int = 0,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    tokens: TokenCache | None = None,
) -> list[dict]:
    """Rows ``ppl_sliding`` per window size: ``span`` tokens from each of ``n`` documents scored with a
    sliding window of that size and ``stride`` (each token once, with >= window - stride tokens of context)."""
    _check(windows, n, stride=stride, span=span)
    cache = tokens if tokens is not None else tokenize_documents(docs, tokenizer)
    device = next(model.parameters()).device
    metrics = []
    for W in windows:
        nll = []
        for doc, start in select_windows(cache, span, n, seed):
            ids = torch.from_numpy(cache.doc(doc)[start : start + span].astype("int64")).to(device)
            nll.append(sliding_window_nll(model, ids, window=W, stride=min(stride, W)))
        mean = torch.cat(nll).mean().item()
        metrics.append(("ppl_sliding", W, math.exp(mean), len(nll), {"stride": stride, "span": span}))
    return _rows(model, experiment, variant or variant_of(model), seed, config or {}, metrics)


def _fsr_scored(model, tokenizer, docs, lengths, n, seed, template, generate):
    """The FSR task's one scoring path: per length, its prompts (the same for every model at a seed) and
    ``fsr_evaluate``'s scores (per prompt and aggregated)."""
    _check(lengths, n)
    with tqdm(total=len(lengths) * n, desc="fsr", leave=False) as bar:
        for L in lengths:
            samples = build_fsr_samples(docs, tokenizer, L, n=n, seed=seed, template=template)
            yield L, samples, fsr_evaluate(model, tokenizer, samples, generate=generate, progress=bar)


def eval_fsr(
    model,
    tokenizer,
    docs: list[Document],
    lengths: list[int],
    *,
    n: int = 20,
    seed: int = 0,
    template: str = DEFAULT_FSR_TEMPLATE,
    generate: bool = True,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
) -> list[dict]:
    """Rows per length: fsr_rouge_l (if ``generate``), fsr_token_accuracy, fsr_target_nll."""
    metrics = []
    for L, _, r in _fsr_scored(model, tokenizer, docs, lengths, n, seed, template, generate):
        metrics += [
            ("fsr_token_accuracy", L, r["token_accuracy"], r["n"], {}),
            ("fsr_target_nll", L, r["target_nll"], r["n"], {}),
        ]
        if generate:
            metrics.append(("fsr_rouge_l", L, r["rouge_l"], r["n"], {}))
    return _rows(
        model, experiment, variant or variant_of(model), seed, {**(config or {}), "template": template}, metrics
    )


def eval_passkey(
    model,
    tokenizer,
    lengths: list[int],
    *,
    n: int = 5,
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
) -> list[dict]:
    """Rows per length: passkey_exact_match, passkey_token_accuracy (overall and per depth)."""
    _check(lengths, n)
    metrics = []
    with tqdm(total=len(lengths) * n * len(depths), desc="passkey", leave=False) as bar:
        for L in lengths:
            r = passkey_evaluate(
                model, tokenizer, build_passkey_samples(tokenizer, L, depths=depths, n=n, seed=seed), progress=bar
            )
            metrics += [
                ("passkey_exact_match", L, r["exact_match"], r["n"], {}),
                ("passkey_token_accuracy", L, r["token_accuracy"], r["n"], {}),
            ]
            for d, v in r["by_depth"].items():
                metrics.append((f"passkey_exact_match@depth={d:g}", L, v["exact_match"], n, {"depth": d}))
    return _rows(model, experiment, variant or variant_of(model), seed, config or {}, metrics)


# ---------------------------------------------------------------------------------------------
# Per-sample rows: the same windows and prompts for every variant, for paired comparisons
# ---------------------------------------------------------------------------------------------
def eval_ppl_samples(
    model,
    tokenizer,
    docs: list[Document],
    lengths: list[int],
    *,
    n: int = 8,
    seed: int = 0,
    bin_length: int | None = None,
    bin_size: int | None = None,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    tokens: TokenCache | None = None,
) -> list[dict]:
    """Rows ``window_nll`` (mean next-token NLL of one window; ``sample`` = its index, the same windows
    for every model at a seed), and at ``bin_length`` one ``position_nll`` row per (window, bin of
    ``bin_size`` positions; ``position`` = the bin's first predicted position)."""
    _check(lengths, n, bin_size=bin_size)
    if (bin_length is None) != (bin_size is None) or (bin_length is not None and bin_length not in lengths):
        raise ValueError(f"bin_length ({bin_length}) must be one of the lengths {lengths} and come with a bin_size")
    cache = tokens if tokens is not None else tokenize_documents(docs, tokenizer)
    metrics = []
    with tqdm(total=len(lengths) * n, desc="ppl", leave=False) as bar:
        for L in lengths:
            for i, (doc, start, nll) in enumerate(score_windows(model, cache, L, n=n, seed=seed, progress=bar)):
                where = {"sample": i, "document": cache.names[doc], "start": int(start)}
                metrics.append(("window_nll", L, nll.mean().item(), 1, where))
                if L == bin_length:
                    for s in range(0, nll.numel(), bin_size):
                        value = nll[s : s + bin_size].mean().item()
                        metrics.append(
                            ("position_nll", L, value, 1, {**where, "position": s + 1, "bin_size": bin_size})
                        )
    return _rows(model, experiment, variant or variant_of(model), seed, config or {}, metrics)


def eval_fsr_samples(
    model,
    tokenizer,
    docs: list[Document],
    lengths: list[int],
    *,
    n: int = 20,
    seed: int = 0,
    template: str = DEFAULT_FSR_TEMPLATE,
    generate: bool = True,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
) -> list[dict]:
    """Rows per prompt (``sample`` = its index, the same prompts for every model at a seed):
    ``fsr_sample_token_accuracy``, ``fsr_sample_target_nll`` and, if ``generate``, ``fsr_sample_rouge_l``."""
    metrics = []
    for L, samples, r in _fsr_scored(model, tokenizer, docs, lengths, n, seed, template, generate):
        for i, (s, v) in enumerate(zip(samples, r["samples"], strict=True)):
            where = {"sample": i, "document": s.document, "char_offset": s.char_offset}
            metrics.append(("fsr_sample_token_accuracy", L, v["token_accuracy"], 1, where))
            metrics.append(("fsr_sample_target_nll", L, v["target_nll"], 1, where))
            if generate:
                metrics.append(("fsr_sample_rouge_l", L, v["rouge_l"], 1, where))
    return _rows(
        model, experiment, variant or variant_of(model), seed, {**(config or {}), "template": template}, metrics
    )


def eval_ruler(
    model,
    tokenizer,
    lengths: list[int],
    *,
    tasks: list[str],
    n: int = 8,
    seed: int = 0,
    experiment: str = "eval",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
) -> list[dict]:
    """RULER through lm-eval (``ropekit.eval.ruler``): per prompt ``ruler_sample@TASK`` (``sample`` = its
    index, the same prompts for every model at a seed; its tokens and hash), per length ``ruler_score@TASK``
    (their mean) and ``ruler_score@average`` (the mean over the tasks, RULER's headline number)."""
    _check(lengths, n)
    for L in lengths:
        ruler.check_length(L)
    metrics = []
    for L in lengths:
        samples = ruler.ruler_samples(model, tokenizer, tasks, L, n=n, seed=seed)
        means = []
        for task in ruler.resolve_tasks(tasks):
            mine = [s for s in samples if s.task == task]
            for s in mine:
                where = {"sample": s.index, "prompt_tokens": s.prompt_tokens, "prompt_sha": s.prompt_sha,
                         "response": s.response[:200]}  # fmt: skip
                metrics.append((f"ruler_sample@{task}", L, s.score, 1, where))
            if not mine:
                raise ValueError(f"RULER task {task} made no prompt at L={L}: too short a length for it")
            means.append(sum(s.score for s in mine) / len(mine))
            metrics.append((f"ruler_score@{task}", L, means[-1], len(mine), {}))
        metrics.append(("ruler_score@average", L, sum(means) / len(means), len(means), {"tasks": len(means)}))
    config = {**(config or {}), "chat_template": None, "max_length": f"L+{ruler.HEADROOM}"}
    return _rows(model, experiment, variant or variant_of(model), seed, config, metrics)
