"""RULER (Hsieh et al. 2024) through lm-evaluation-harness's ``ruler`` tasks, on a model object.

lm-eval synthesises RULER's prompts with the model's tokenizer, one length L at a time: a prompt's tokens
plus the tokens the task may generate fit in L *before* lm-eval appends the task's answer prefix ("The special
magic number for ... is"). Its Hugging Face wrapper keeps ``max_length`` minus the tokens to generate of
each prompt and cuts the rest from the left: with the 4,096 default most of a 16k prompt, with
``max_length = L`` the opening words of a prompt whose haystack came out within a prefix of the limit.
Nothing says so but a log line. Here:

- each length runs on its own (lm-eval's ``max_seq_lengths`` = [L]) with ``max_length`` = L + 128, and every
  prompt is measured as the wrapper encodes it, before it is generated from: one that would be cut stops the
  run (``PromptCut``), so no score comes from a cut prompt. Positions reach the prompt's tokens (rows record
  them) plus the task's generation budget (``max_gen_toks``: 30 to 128);
- the prompt is the base model's: no chat template;
- a task's prompts depend on its name, L and the seed alone (Python's and NumPy's generators are seeded before
  lm-eval builds each task's), so every model at a seed gets the same prompts, whichever tasks run beside it;
  each row carries its prompt's hash to show it;
- L >= 4,096 (``MIN_LENGTH``): RULER's shortest length and lm-eval's default; below it lm-eval's variable
  tracking loops forever (its worked example alone is sized to 500 tokens) and other tasks can build a
  sample with no answer;
- the tasks that synthesise their data (``RULER_OFFLINE``) run on a machine with no network; one that
  downloads (``RULER_DOWNLOADS``) and cannot ends in one line naming what it needs (``DataUnavailable``).

Needs ``lm-eval[ruler]`` (``pip install 'ropekit[eval]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from packaging.version import Version

__all__ = ["RULER_OFFLINE", "RULER_DOWNLOADS", "RULER_GROUPS", "MIN_LENGTH", "HEADROOM", "PromptCut",
           "DataUnavailable", "RulerSample", "check_lm_eval", "resolve_tasks", "ruler_samples"]  # fmt: skip

# lm-eval 0.4's RULER tasks, by where their data comes from.
MIN_LM_EVAL = "0.4.12"  # pyproject.toml's lower bound for lm-eval (tests/test_eval.py checks they agree)
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
_ESSAYS = "Paul Graham's essays (the Hugging Face hub dataset baber/paul_graham_essays, cached under HF_HOME)"
RULER_DOWNLOADS = {
    "niah_single_2": _ESSAYS,
    "niah_single_3": _ESSAYS,
    "niah_multikey_1": _ESSAYS,
    "niah_multiquery": _ESSAYS,
    "niah_multivalue": _ESSAYS,
    "ruler_qa_squad": "SQuAD 2.0's dev set (rajpurkar.github.io; lm-eval fetches it on every run, no cache)",
    "ruler_qa_hotpot": "HotpotQA's dev set (huggingface.co; lm-eval fetches it on every run, no cache)",
}
RULER_GROUPS = {"ruler": RULER_OFFLINE + tuple(RULER_DOWNLOADS), "ruler-offline": RULER_OFFLINE}
MIN_LENGTH = 4096
HEADROOM = 128  # max_length = L + this (the largest max_gen_toks of a RULER task): the answer prefix fits


class PromptCut(ValueError):
    """A prompt longer than the model wrapper keeps: lm-eval would cut it from the left."""


class DataUnavailable(ValueError):
    """A task's data must be downloaded and could not be."""


@dataclass(frozen=True)
class RulerSample:
    task: str
    length: int  # L: lm-eval's max_seq_length for the prompt
    index: int  # the sample's index at (task, L, seed)
    score: float  # lm-eval's string match, 0 to 1
    prompt_tokens: int  # as the wrapper encodes the prompt, answer prefix included
    prompt_sha: str  # sha256 of the prompt text, first 16 hex digits
    response: str


def check_length(length: int) -> None:
    if not (isinstance(length, int) and length >= MIN_LENGTH):
        raise ValueError(f"RULER length {length!r} is too short: lm-eval's RULER prompts need L >= {MIN_LENGTH} "
                         "(below it variable tracking never finishes building its prompts)")  # fmt: skip


def resolve_tasks(names: list[str]) -> list[str]:
    """RULER task names and groups (``ruler``, ``ruler-offline``) to task names, in order, once each."""
    accepted = RULER_GROUPS["ruler"]
    out: list[str] = []
    for name in names:
        expanded = RULER_GROUPS.get(name, (name,))
        for task in expanded:
            if task not in accepted:
                raise ValueError(f"unknown RULER task {task!r}; accepted: {', '.join(RULER_GROUPS)} (groups), "
                                 f"{', '.join(accepted)}")  # fmt: skip
            if task not in out:
                out.append(task)
    return out


def check_lm_eval() -> None:
    """lm-eval and what its RULER tasks import (wonderwords, nltk), or one line saying what to install."""
    for module in ("lm_eval", "wonderwords", "nltk"):
        if importlib.util.find_spec(module) is None:  # found, not imported: nltk prints on import offline
            raise ValueError(f"RULER runs through lm-eval's ruler tasks, which need {module!r}: "
                             "pip install 'ropekit[eval]'")  # fmt: skip
    version = importlib.metadata.version("lm-eval")
    if Version(version) < Version(MIN_LM_EVAL):  # an older one lacks the task API called here
        raise ValueError(f"RULER needs lm-eval >= {MIN_LM_EVAL}, found {version}: pip install 'ropekit[eval]'")


def _import_lm_eval():
    check_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return simple_evaluate, HFLM, TaskManager


def _checked_lm(HFLM, model, tokenizer, max_length: int):
    """lm-eval's HF wrapper, refusing to cut a prompt: each batch of prompts is encoded whole first."""

    class Checked(HFLM):
        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            _, masks = super().tok_batch_encode(strings, padding_side=padding_side, truncation=truncation)
            for text, mask in zip(strings, masks, strict=True):
                n = int(mask.sum())
                self.prompt_tokens[text] = n
                if left_truncate_len is not None and n > left_truncate_len:
                    raise PromptCut(f"a prompt of {n} tokens is longer than the {left_truncate_len} lm-eval keeps "
                                    f"(max_length {self.max_length} - the tokens to generate): it would be cut "
                                    "from the left; no row is written")  # fmt: skip
            return super().tok_batch_encode(
                strings, padding_side=padding_side, left_truncate_len=left_truncate_len, truncation=truncation
            )

    lm = Checked(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    lm.prompt_tokens = {}  # each prompt's tokens as encoded, by its text
    return lm


def _ruler_manager(TaskManager, length: int, tokenizer_folder: str):  # noqa: N803 (lm-eval's class, passed in)
    """lm-eval's task manager over its RULER folder alone: indexing every task lm-eval ships reads thousands
    of YAML files (seconds to tens of seconds) for the same RULER tasks."""
    import lm_eval.tasks

    ruler = Path(lm_eval.tasks.__file__).parent / "ruler"
    return TaskManager(include_path=str(ruler), include_defaults=False,
                       metadata={"max_seq_lengths": [length], "tokenizer": tokenizer_folder})  # fmt: skip


def _load_task(manager, name: str):
    """Build one task (lm-eval synthesises or downloads its data here); a failed download is one line."""
    noise = io.StringIO()  # nltk tries to download a sentence splitter on import and prints the failure
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            return manager.load([name])["tasks"][name]
    except Exception as err:
        if name not in RULER_DOWNLOADS:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise DataUnavailable(
            f"{name} needs {RULER_DOWNLOADS[name]}, which could not be loaded ({type(err).__name__}: {first}); "
            f"run it where that is reachable, or choose the offline tasks: {', '.join(RULER_OFFLINE)}"
        ) from err


def ruler_samples(
    model, tokenizer, tasks: list[str], length: int, *, n: int, seed: int = 0, skip: frozenset[int] = frozenset()
) -> list[RulerSample]:
    """The first ``n`` RULER prompts of each task at ``length`` (the same for every model at a ``seed``),
    but those whose index is in ``skip`` (already scored), generated greedily by ``model`` through lm-eval
    and scored by it."""
    indices = [i for i in range(n) if i not in skip]
    if not indices:
        return []
    check_length(length)
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    tasks = resolve_tasks(tasks)
    out: list[RulerSample] = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)  # lm-eval's RULER loads the tokenizer by name: this folder
        manager = _ruler_manager(TaskManager, length, folder)
        loaded = []
        for name in tasks:  # each task's prompts depend on its name, L and the seed, not on the tasks beside it
            random.seed(seed)
            np.random.seed(seed)
            loaded.append(_load_task(manager, name))
        lm = _checked_lm(HFLM, model, tokenizer, length + HEADROOM)
        with torch.no_grad():
            result = simple_evaluate(model=lm, tasks=loaded, task_manager=manager, log_samples=True,
                                     samples={name: indices for name in tasks},
                                     apply_chat_template=False, random_seed=seed, numpy_random_seed=seed,
                                     torch_random_seed=seed, bootstrap_iters=0)  # fmt: skip
    for name in tasks:
        for s in sorted(result["samples"][name], key=lambda s: s["doc_id"]):
            prompt = s["arguments"][0][0]
            if int(s["doc"]["max_length"]) != length:
                raise RuntimeError(f"{name}: lm-eval built a prompt for {s['doc']['max_length']} tokens, not {length}")
            out.append(RulerSample(
                task=name, length=length, index=int(s["doc_id"]), score=float(s[str(length)]),
                prompt_tokens=lm.prompt_tokens[prompt], prompt_sha=hashlib.sha256(prompt.encode()).hexdigest()[:16],
                response=str(s["filtered_resps"][0]),
            ))  # fmt: skip
    return out
