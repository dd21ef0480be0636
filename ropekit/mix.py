"""The training mix: retrieval-format examples packed among the text windows of continued pretraining.

A share of the training rows holds FIRST-SENTENCE-RETRIEVAL examples made from the *training* documents in
the evaluation's own format (``ropekit.eval.retrieval``: the same paragraph starts, template and first
sentence), loss on the answers only; the rest are the corpus' text windows (``ropekit.data.pack``). It sits
above both ``data`` and ``eval``, and ``train`` uses it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ropekit.data import Document
from ropekit.eval.retrieval import DEFAULT_FSR_TEMPLATE, first_sentence, fsr_candidates, template_parts

__all__ = ["RetrievalExamples", "COPY_QUESTION", "retrieval_examples", "mix_retrieval"]


@dataclass
class RetrievalExamples:
    """FIRST-SENTENCE-RETRIEVAL examples from training documents, in the evaluation's format."""

    contexts: list[list[int]]  # text from a paragraph start, up to max_context tokens
    answers: list[list[int]]  # " " + the paragraph's first sentence
    question: list[int]  # the evaluation template's text after the context
    copy_question: list[int] = field(default_factory=list)  # COPY_QUESTION: its answer is the whole context


# The question of a copy example (``mix_retrieval``'s ``copy_share``): the same start-anchored copying as
# FIRST-SENTENCE-RETRIEVAL with every context token a target, so the skill is learnt from more targets a row.
COPY_QUESTION = "\n\nQuestion: Repeat the text above.\nAnswer:"


def retrieval_examples(docs: Sequence[Document], tokenizer, *, max_context: int, seed: int = 0,
                       pool_tokens: int = 1_000_000) -> RetrievalExamples:  # fmt: skip
    """Examples from ``docs`` (the training documents): paragraph starts chosen as the evaluation chooses
    them (``eval.retrieval.fsr_candidates``), a seeded sample of at most ``pool_tokens / max_context``."""
    candidates = fsr_candidates(list(docs))
    if not candidates:
        raise ValueError("no paragraph start in the training documents has a first sentence of 4-40 words")
    random.Random(seed).shuffle(candidates)
    candidates = candidates[: max(64, pool_tokens // max_context)]
    texts = [docs[di].text[s : s + 6 * max_context] for di, s in candidates]  # ~4 characters a token
    contexts = [ids[:max_context] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    answers = tokenizer([" " + first_sentence(t) for t in texts], add_special_tokens=False).input_ids
    question = tokenizer(template_parts(DEFAULT_FSR_TEMPLATE)[1], add_special_tokens=False).input_ids
    keep = [i for i, (c, a) in enumerate(zip(contexts, answers, strict=True)) if len(c) > len(a) and len(c) >= 16]
    if not keep:
        raise ValueError("no retrieval example from the training documents has 16+ tokens of context")
    copy_question = tokenizer(COPY_QUESTION, add_special_tokens=False).input_ids
    return RetrievalExamples([contexts[i] for i in keep], [answers[i] for i in keep], question, copy_question)


def mix_retrieval(
    text: Iterator[tuple[np.ndarray, np.ndarray]],
    examples: RetrievalExamples,
    *,
    seq_len: int,
    share: float,
    min_context: int,
    max_context: int,
    eos_id: int,
    seed: int = 0,
    answer_weight: float = 1.0,
    copy_share: float = 0.0,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, positions, loss weights) rows: a ``share`` of them packed with retrieval examples, the
    rest the ``text`` stream's windows (weight 1 on every next-token prediction).

    An example is ``context + question + answer + EOS`` with a context length drawn uniformly in
    [min_context, max_context], then cut to fit (below); its positions start at 0, so with no attention
    mask transformers keeps each example to itself (packed sequences), as an evaluation prompt is alone.
    Only the answer and its EOS carry loss (weight ``answer_weight``); the row's unused end is text, with
    weight 1. A ``copy_share`` of the examples are copy examples instead: ``context + COPY_QUESTION + context + EOS``
    (the context at most half the row), the copy and its EOS carrying the loss. A drawn context longer
    than fits a row with its question and answer is cut to fit (so it may end below ``min_context``):
    with ``max_context`` near ``seq_len`` the model is taught to retrieve from as far back as its window
    reaches, as the evaluation at the trained length asks. ``weights[i]`` weighs the prediction of
    ``tokens[i + 1]``."""
    rng = random.Random(seed)
    q = examples.question
    while True:
        if rng.random() >= share:
            window, positions = next(text)
            yield window, positions, np.r_[np.ones(seq_len - 1, np.float32), 0.0].astype(np.float32)
            continue
        ids: list[int] = []
        pos: list[int] = []
        w: list[float] = []
        for _ in range(64):  # examples until one does not fit
            i = rng.randrange(len(examples.contexts))
            ctx, ans, question = examples.contexts[i], examples.answers[i], q
            n = min(rng.randint(min_context, max_context), len(ctx))
            if copy_share and rng.random() < copy_share:  # (no draw without copies: the stream is unchanged)
                question = examples.copy_question
                n = min(n, (seq_len - len(question) - 1) // 2)
                ans = ctx[:n]
            else:  # at most what fits a row with its question and answer: the longest reaches the row's end
                n = min(n, seq_len - len(question) - len(ans) - 1)
            if n <= len(ans) and question is q:
                continue  # a context no longer than its answer: draw another
            if len(ids) + n + len(question) + len(ans) + 1 > seq_len:
                break
            ex = ctx[:n] + question + ans + [eos_id]
            ids += ex
            pos += range(len(ex))
            w += [0.0] * (n + len(question) - 1) + [answer_weight] * (len(ans) + 1) + [0.0]
        pad = seq_len - len(ids)
        if pad:
            window, _ = next(text)
            ids += window[:pad].tolist()
            pos += range(pad)
            w += [1.0] * (pad - 1) + [0.0]
        yield np.asarray(ids, np.int64), np.asarray(pos, np.int64), np.asarray(w, np.float32)
