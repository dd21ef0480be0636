"""Long-sequence perplexity: PPL vs context length, per-position loss, sliding windows.

The paper scores each variant on validation sequences of the target length (Table 5: 32,768-token
sequences) and, in its Appendix C, plots the loss at each position of the window averaged in bins.
Here, for each length L: N validation documents with at least L tokens, one window of L tokens from
each (at a seeded offset), the mean next-token NLL over all scored tokens -> PPL, with a bootstrap
interval over windows.

Memory at long L: attention runs through SDPA (no L x L matrix), and the logits are formed and
scored in chunks of ``chunk`` positions from the final hidden states, never as one (L x vocab)
float32 tensor.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ropekit.data import TokenCache
from ropekit.loss import head_input
from ropekit.stats import mean_interval

__all__ = [
    "token_nll",
    "PPLResult",
    "perplexity_at_length",
    "sliding_window_nll",
    "select_windows",
    "score_windows",
    "summarize_windows",
]


@torch.no_grad()
def token_nll(
    model,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk: int = 1024,
    with_hits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NLL of every next token of one sequence, in float32, computed in chunks.

    Args:
        input_ids: (1, L) or (L,) token ids.
        with_hits: also return whether each next token is the model's argmax (teacher-forced accuracy).
    Returns:
        (L-1,) float32: nll[i] = -log p(input_ids[i+1] | input_ids[:i+1]); with ``with_hits``, also
        (L-1,) bool: hits[i] = argmax p(. | input_ids[:i+1]) == input_ids[i+1].
    """
    ids = input_ids.reshape(1, -1)
    hidden, transform, _ = head_input(model, ids, None if position_ids is None else position_ids.reshape(1, -1))
    hidden, head, targets = hidden[0], model.get_output_embeddings(), ids[0, 1:]  # hidden: (L, H)
    out = torch.empty(targets.numel(), dtype=torch.float32, device=hidden.device)
    hits = torch.empty(targets.numel(), dtype=torch.bool, device=hidden.device)
    for start in range(0, targets.numel(), chunk):
        end = min(start + chunk, targets.numel())
        logits = transform(head(hidden[start:end]).float())  # (c, V): one chunk at a time
        out[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
        hits[start:end] = logits.argmax(-1) == targets[start:end]
    return (out, hits) if with_hits else out


@dataclass
class PPLResult:
    length: int
    n: int
    nll: float  # mean token NLL over all scored tokens
    ppl: float
    ppl_low: float  # bootstrap interval over windows
    ppl_high: float
    bins: list[tuple[int, float]] = field(default_factory=list)  # (bin start position, mean NLL)
    windows: list[tuple[str, int]] = field(default_factory=list)  # (document, start token)


def select_windows(cache: TokenCache, length: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(document index, start) of up to ``n`` windows of ``length`` tokens, one per document.

    Documents are those with >= length tokens, in a seeded order; the start is seeded too, so
    every method sees the same windows.
    """
    eligible = [i for i in range(len(cache)) if cache.lengths()[i] >= length]
    if not eligible:
        longest = int(cache.lengths().max()) if len(cache) else 0
        raise ValueError(
            f"context length {length} is longer than every validation document (longest: {longest} tokens)"
        )
    rng = random.Random(seed * 1_000_003 + length)
    rng.shuffle(eligible)
    return [(i, rng.randint(0, int(cache.lengths()[i]) - length)) for i in sorted(eligible[:n])]


@torch.no_grad()
def score_windows(
    model, cache: TokenCache, length: int, *, n: int = 8, seed: int = 0, chunk: int = 1024, progress=None
) -> list[tuple[int, int, torch.Tensor]]:
    """The perplexity task's one scoring path: (document index, start, per-token NLL of shape (length - 1,)
    on the CPU) for each window ``select_windows`` picks, the same windows for every model at a seed."""
    device = next(model.parameters()).device
    out = []
    for doc, start in select_windows(cache, length, n, seed):
        ids = torch.from_numpy(cache.doc(doc)[start : start + length].astype(np.int64)).to(device)
        out.append((doc, start, token_nll(model, ids, chunk=chunk).cpu()))
        if progress is not None:
            progress.update(1)
    return out


def summarize_windows(
    cache: TokenCache, length: int, scored: list[tuple[int, int, torch.Tensor]], *, seed: int = 0,
    bin_size: int | None = None,
) -> PPLResult:  # fmt: skip
    """PPL over scored windows (``score_windows``): the mean token NLL, a bootstrap interval over windows,
    and the mean NLL per bin of ``bin_size`` positions."""
    stacked = torch.stack([nll for _, _, nll in scored])  # (n, L-1)
    per_window = stacked.mean(1).tolist()
    mean_nll = stacked.mean().item()
    _, low, high = mean_interval(per_window, seed=seed)
    if math.isnan(low):  # one window: no interval
        low = high = per_window[0]
    bins = []
    if bin_size:
        per_pos = stacked.mean(0)
        for s in range(0, per_pos.numel(), bin_size):
            bins.append((s + 1, per_pos[s : s + bin_size].mean().item()))  # position of the first predicted token
    return PPLResult(
        length=length,
        n=len(scored),
        nll=mean_nll,
        ppl=math.exp(mean_nll),
        ppl_low=math.exp(low),
        ppl_high=math.exp(high),
        bins=bins,
        windows=[(cache.names[d], s) for d, s, _ in scored],
    )


def perplexity_at_length(
    model,
    cache: TokenCache,
    length: int,
    *,
    n: int = 8,
    seed: int = 0,
    bin_size: int | None = None,
    chunk: int = 1024,
    progress=None,
) -> PPLResult:
    """PPL over one window of ``length`` tokens from each of up to ``n`` validation documents."""
    scored = score_windows(model, cache, length, n=n, seed=seed, chunk=chunk, progress=progress)
    return summarize_windows(cache, length, scored, seed=seed, bin_size=bin_size)


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, *, window: int, stride: int, chunk: int = 1024) -> torch.Tensor:
    """NLL of every token of a long sequence with a sliding window: each window of ``window`` tokens
    scores only its last ``stride`` tokens (all of them for the first), so each token is scored once
    with at least window - stride tokens of context.  -> (len(ids) - 1,) float32"""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}]; got {stride}")
    ids = ids.reshape(-1)
    n = ids.numel()
    out = torch.empty(n - 1, dtype=torch.float32)
    scored = 0  # tokens 1..scored have their NLL
    end = min(window, n)
    while True:
        begin = max(0, end - window)
        nll = token_nll(model, ids[begin:end], chunk=chunk).cpu()  # targets begin+1 .. end-1
        first_new = scored + 1  # first target position not yet scored
        out[first_new - 1 : end - 1] = nll[first_new - begin - 1 :]
        scored = end - 1
        if end == n:
            return out
        end = min(end + stride, n)
