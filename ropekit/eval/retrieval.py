"""FIRST-SENTENCE-RETRIEVAL (Xiong et al. 2023, Fig. 5b) and passkey retrieval.

FSR: the model reads a long context and is asked for its first sentence; the answer sits at the
very start and the question at the very end, so it tests attention over exactly the prompt length.

Construction (ropekit's; the paper does not publish its prompt):

- context: validation text starting at a paragraph start (a seeded choice among paragraphs whose
  first sentence has 4-40 words), cut to as many tokens as make the whole prompt exactly L tokens;
- target: the first sentence of the context: the text up to and including the first '.', '!' or '?'
  that is followed by whitespace or a closing quote/bracket, or to the end of the paragraph if that
  comes first;
- prompt: ``template`` with ``{context}`` (default
  ``{context}\\n\\nQuestion: What was the first sentence of the text above?\\nAnswer:``);
- scores per sample: (a) ROUGE-L F1 x 100 (``rouge-score``) of the greedy generation, stopped at a
  newline or EOS or after 2 x target tokens + 8; (b) teacher-forced token accuracy and mean NLL of
  the target (" " + sentence) given the prompt, which separates methods even on models too small to
  follow the instruction. Both come from one forward of the prompt (``score_and_generate``): the
  target is teacher-forced on top of the prompt's KV cache, the cache is cut back to the prompt, and
  generation continues from it.

Passkey (Mohtashami & Jaggi 2023): a 5-digit key stated at a chosen depth of repeated filler text,
then asked for; exact match of the generated digits and teacher-forced accuracy of the key tokens.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ropekit import hf
from ropekit.data import Document
from ropekit.hf import cache_kwarg, kv_cache_of
from ropekit.loss import head_input

__all__ = [
    "DEFAULT_FSR_TEMPLATE",
    "first_sentence",
    "fsr_candidates",
    "FSRSample",
    "build_fsr_samples",
    "score_target",
    "greedy_generate",
    "score_and_generate",
    "rouge_l",
    "fsr_evaluate",
    "PasskeySample",
    "build_passkey_samples",
    "passkey_evaluate",
    "NeedleSample",
    "plant_passkey",
]

DEFAULT_FSR_TEMPLATE = "{context}\n\nQuestion: What was the first sentence of the text above?\nAnswer:"
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def first_sentence(paragraph: str) -> str:
    """The first sentence of a paragraph (rule in the module docstring)."""
    paragraph = paragraph.split("\n", 1)[0].strip()
    m = _SENTENCE_END.search(paragraph)
    return paragraph[: m.end()].strip() if m else paragraph


@dataclass
class FSRSample:
    prompt_ids: list[int]  # exactly L tokens
    target: str  # the first sentence
    target_ids: list[int]  # tokens of " " + target
    document: str
    char_offset: int
    context_start: int = 0  # prompt_ids[context_start:context_end] is the context (natural text)
    context_end: int = 0


def fsr_candidates(docs: list[Document]) -> list[tuple[int, int]]:
    """(document index, character offset) of every paragraph start whose first sentence has 4-40 words:
    where an FSR context may begin (evaluation prompts here, training examples in ``ropekit.data``)."""
    out = []
    for di, doc in enumerate(docs):
        starts = [0] + [m.end() for m in re.finditer("\n", doc.text) if m.end() < len(doc.text)]
        for s in starts:
            if 4 <= len(first_sentence(doc.text[s : s + 600]).split()) <= 40:
                out.append((di, s))
    return out


def template_parts(template: str) -> tuple[str, str]:
    if template.count("{context}") != 1:
        raise ValueError(f"the FSR template must contain '{{context}}' exactly once; got {template!r}")
    return tuple(template.split("{context}"))  # type: ignore[return-value]


def build_fsr_samples(
    docs: list[Document],
    tokenizer,
    length: int,
    *,
    n: int = 20,
    seed: int = 0,
    template: str = DEFAULT_FSR_TEMPLATE,
) -> list[FSRSample]:
    """Up to ``n`` FSR prompts of exactly ``length`` tokens from validation documents."""
    prefix, suffix = template_parts(template)
    pre_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    suf_ids = tokenizer(suffix, add_special_tokens=False).input_ids
    budget = length - len(pre_ids) - len(suf_ids)
    if budget < 16:
        need = length - budget + 16
        raise ValueError(f"FSR length {length} is too short: the prompt template takes {length - budget} tokens and a "
                         f"context at least 16; use a length of at least {need}")  # fmt: skip
    rng = random.Random(seed * 7919 + length)
    candidates = fsr_candidates(docs)
    rng.shuffle(candidates)
    samples: list[FSRSample] = []
    for di, s in candidates:
        if len(samples) >= n:
            break
        text = docs[di].text[s : s + budget * 12]  # enough characters for `budget` tokens
        ctx_ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ctx_ids) < budget:
            continue  # too close to the end of its document
        ctx_ids = ctx_ids[:budget]
        target = first_sentence(text)
        if len(tokenizer(target, add_special_tokens=False).input_ids) >= budget:
            continue
        samples.append(
            FSRSample(
                prompt_ids=pre_ids + ctx_ids + suf_ids,
                target=target,
                target_ids=tokenizer(" " + target, add_special_tokens=False).input_ids,
                document=docs[di].name,
                char_offset=s,
                context_start=len(pre_ids),
                context_end=len(pre_ids) + budget,
            )
        )
    if not samples:
        raise ValueError(f"no validation document is long enough for an FSR prompt of {length} tokens")
    return samples


@torch.no_grad()
def score_target(model, prompt_ids: list[int], target_ids: list[int]) -> tuple[float, float]:
    """Teacher-forced (token accuracy, mean NLL) of ``target_ids`` after ``prompt_ids``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    hidden, transform, _ = head_input(model, ids)
    # positions that predict the target tokens: len(prompt)-1 .. len(prompt)+len(target)-2
    logits = transform(model.get_output_embeddings()(hidden[0, len(prompt_ids) - 1 : -1]).float())
    targets = torch.tensor(target_ids, device=device)
    acc = (logits.argmax(-1) == targets).float().mean().item()
    nll = F.cross_entropy(logits, targets).item()
    return acc, nll


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], *, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding with the KV cache; stops after a token in ``stop_ids`` that follows the first
    other token (a leading newline before the answer does not end it)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    return _continue_greedy(model, kv_cache_of(out), int(out.logits[0, -1].argmax()), max_new_tokens, stop_ids)


def _continue_greedy(model, cache, next_id: int, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy tokens from ``next_id`` on, continuing ``cache`` (see ``greedy_generate`` for the stop rule)."""
    device, name = next(model.parameters()).device, cache_kwarg(model)
    generated, started = [], False
    for _ in range(max_new_tokens):
        generated.append(next_id)
        if next_id in stop_ids and started:
            break
        started = started or next_id not in stop_ids
        out = model(input_ids=torch.tensor([[next_id]], device=device), use_cache=True, **{name: cache})
        cache = kv_cache_of(out)
        next_id = int(out.logits[0, -1].argmax())
    return generated


def length_dependent(model) -> bool:
    """Whether the model's frequencies change with the length (dynamic NTK): then a cache cut back to
    the prompt is not the prompt's cache, and scoring and generation take a forward each."""
    decoder = hf.decoder_of(model)
    method = getattr(hf.rotary_of(decoder), "method", None) if decoder is not None else None
    if method is not None:
        return bool(getattr(method, "needs_seq_len", False))
    params = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    return isinstance(params, dict) and params.get("rope_type", params.get("type")) == "dynamic"


@torch.no_grad()
def score_and_generate(
    model,
    prompt_ids: list[int],
    target_ids: list[int],
    *,
    generate: bool = True,
    max_new_tokens: int = 0,
    stop_ids: set[int] = frozenset(),
) -> tuple[float, float, list[int] | None]:
    """Teacher-forced (token accuracy, mean NLL) of ``target_ids`` after ``prompt_ids`` and, if
    ``generate``, the greedy continuation of the prompt, from one forward of the prompt.

    The prompt is run once with a KV cache; the target (all but its last token) continues from that
    cache; the cache is then cut back to the prompt and greedy decoding starts from the prompt's last
    logits. Same numbers as ``score_target`` + ``greedy_generate`` (asserted in tests/test_eval.py).
    Models with length-dependent frequencies (dynamic NTK) take those two calls instead.
    """
    if not generate:
        acc, nll = score_target(model, prompt_ids, target_ids)
        return acc, nll, None
    if length_dependent(model):
        acc, nll = score_target(model, prompt_ids, target_ids)
        return acc, nll, greedy_generate(model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    hidden, transform, out = head_input(model, torch.tensor([prompt_ids], device=device), use_cache=True)
    cache = kv_cache_of(out)
    first = transform(head(hidden[0, -1:]).float())  # (1, V): predicts target[0] and the first new token
    logits = [first]
    if len(target_ids) > 1:
        ids = torch.tensor([target_ids[:-1]], device=device)
        rest = head_input(model, ids, use_cache=True, **{cache_kwarg(model): cache})
        logits.append(rest.transform(head(rest.hidden[0]).float()))
        cache.crop(-(len(target_ids) - 1))  # back to the prompt's cache (drop the target's entries)
    logits = torch.cat(logits)  # (T, V)
    targets = torch.tensor(target_ids, device=device)
    acc = (logits.argmax(-1) == targets).float().mean().item()
    nll = F.cross_entropy(logits, targets).item()
    return acc, nll, _continue_greedy(model, cache, int(first[0].argmax()), max_new_tokens, stop_ids)


def _newline_ids(tokenizer) -> set[int]:
    """Token ids whose text contains a newline, plus EOS: where an answer stops."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = {i for i, text in enumerate(texts) if "\n" in text}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 x 100 (rouge-score, stemming on)."""
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as err:
            raise ImportError("FSR scoring needs 'rouge-score' (pip install 'ropekit[eval]')") from err
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _SCORER.score(reference, prediction)["rougeL"].fmeasure


def fsr_evaluate(model, tokenizer, samples: list[FSRSample], *, generate: bool = True, progress=None) -> dict:
    """Mean scores over samples: rouge_l (if ``generate``), token_accuracy, target_nll; plus per-sample rows."""
    stop = _newline_ids(tokenizer)
    per = []
    for s in samples:
        max_new = 2 * len(s.target_ids) + 8
        acc, nll, gen = score_and_generate(
            model, s.prompt_ids, s.target_ids, generate=generate, max_new_tokens=max_new, stop_ids=stop
        )
        row = {"token_accuracy": acc, "target_nll": nll}
        if generate:
            text = tokenizer.decode(gen, skip_special_tokens=True).strip().split("\n")[0].strip()
            row.update(rouge_l=rouge_l(text, s.target), generation=text)
        per.append(row)
        if progress is not None:
            progress.update(1)
    keys = ["token_accuracy", "target_nll"] + (["rouge_l"] if generate else [])
    return {"n": len(per), **{k: float(np.mean([r[k] for r in per])) for k in keys}, "samples": per}


# ---------------------------------------------------------------------------------------------
# Passkey
# ---------------------------------------------------------------------------------------------
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
_QUESTION = "What is the pass key? The pass key is"


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass
class PasskeySample:
    prompt_ids: list[int]
    key: str
    key_ids: list[int]
    depth: float


def build_passkey_samples(
    tokenizer, length: int, *, depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), n: int = 5, seed: int = 0
) -> list[PasskeySample]:
    """``n`` prompts of exactly ``length`` tokens per depth, with a random 5-digit key at that depth."""
    rng = random.Random(seed * 31 + length)
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    intro, filler = enc(_INTRO), enc(_FILLER)
    samples = []
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must be in [0, 1]; got {depth}")
        for _ in range(n):
            key = f"{rng.randint(10000, 99999)}"
            needle = enc(_needle(key))
            question = enc(_QUESTION)
            budget = length - len(intro) - len(needle) - len(question)
            if budget < 0:
                raise ValueError(f"passkey length {length} is too short for the prompt ({length - budget} tokens)")
            hay = (filler * (budget // max(1, len(filler)) + 1))[:budget]
            cut = int(round(depth * budget))
            samples.append(PasskeySample(intro + hay[:cut] + needle + hay[cut:] + question, key, enc(" " + key), depth))
    return samples


def passkey_evaluate(model, tokenizer, samples: list[PasskeySample], *, generate: bool = True, progress=None) -> dict:
    """Exact match of the generated key (if ``generate``) and teacher-forced accuracy and NLL of its
    tokens, per depth and overall; ``samples`` holds the per-prompt rows."""
    per = []
    for s in samples:
        acc, nll, gen = score_and_generate(
            model, s.prompt_ids, s.key_ids, generate=generate, max_new_tokens=len(s.key_ids) + 2, stop_ids=set()
        )
        row = {"depth": s.depth, "token_accuracy": acc, "target_nll": nll}
        if generate:
            digits = re.sub(r"\D", "", tokenizer.decode(gen, skip_special_tokens=True))[:5]
            row["exact_match"] = float(digits == s.key)
        per.append(row)
        if progress is not None:
            progress.update(1)
    keys = (["exact_match"] if generate else []) + ["token_accuracy", "target_nll"]
    by_depth = {}
    for d in sorted({r["depth"] for r in per}):
        rows = [r for r in per if r["depth"] == d]
        by_depth[d] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    means = {k: float(np.mean([r[k] for r in per])) for k in keys}
    return {"n": len(per), **means, "by_depth": by_depth, "samples": per}


@dataclass
class NeedleSample:
    """An FSR prompt of L tokens with a passkey planted in its context, and both questions: the
    sequence ``fsr.prompt_ids + fsr.target_ids + question_ids + key_ids`` asks the FSR question,
    answers it, then asks for the key; one teacher-forced forward scores both answers."""

    fsr: FSRSample  # its prompt holds the needle; its context is text around it
    key: str
    key_ids: list[int]
    question_ids: list[int]
    needle: tuple[int, int]  # prompt_ids[start:end] is the needle
    depth: float

    @property
    def ids(self) -> list[int]:
        return self.fsr.prompt_ids + self.fsr.target_ids + self.question_ids + self.key_ids


def plant_passkey(tokenizer, sample: FSRSample, depth: float, *, seed: int = 0) -> NeedleSample:
    """``sample`` with a passkey sentence at ``depth`` of its context (after the sentence end or line
    break nearest to it, past the first line so the first sentence stays first) and the passkey question after the
    FSR answer; the context loses as many tokens at its end as the needle takes, so the prompt keeps
    its length. The needle in natural text, as in needle-in-a-haystack tests, rather than in the
    repeated filler of ``build_passkey_samples``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1]; got {depth}")
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    key = f"{random.Random(seed * 31 + len(sample.prompt_ids) + round(depth * 1e6)).randint(10000, 99999)}"
    needle = enc(_needle(key).strip() + "\n")
    a, b = sample.context_start, sample.context_end
    context = sample.prompt_ids[a : b - len(needle)]
    pieces = [tokenizer.decode([t]) for t in context]
    first_line = next((i + 1 for i, p in enumerate(pieces) if "\n" in p), len(context))
    ends = [
        i + 1 for i, p in enumerate(pieces[:-1]) if i >= first_line and ("\n" in p or p.rstrip().endswith(tuple(".!?")))
    ]
    if not ends:
        raise ValueError(f"the FSR context of {sample.document!r} has no sentence end past its first line")
    cut = min(ends, key=lambda i: abs(i - depth * len(context)))
    prompt = sample.prompt_ids[:a] + context[:cut] + needle + context[cut:] + sample.prompt_ids[b:]
    fsr = FSRSample(prompt, sample.target, sample.target_ids, sample.document, sample.char_offset, a, b)
    return NeedleSample(fsr, key, enc(" " + key), enc("\n" + _QUESTION), (a + cut, a + cut + len(needle)), depth)
