"""ropekit's tasks for lm-evaluation-harness: local YAML tasks over data ropekit writes.

``export_tasks(out, ...)`` writes, per context length L:

- ``ropekit_fsr_L``: FIRST-SENTENCE-RETRIEVAL (``generate_until``, metric ``rouge_l`` = ROUGE-L F1 x 100),
- ``ropekit_passkey_L``: passkey retrieval (``generate_until``, ``exact_match``),
- ``ropekit_ppl_L``: windows of validation text (``loglikelihood_rolling``: word and byte perplexity,
  bits per byte),

plus groups ``ropekit_fsr``, ``ropekit_passkey``, ``ropekit_ppl`` (aggregated over lengths, weighted by
size), the JSONL data, and ``ropekit_utils.py`` (needs only ``rouge-score``).

Every task of length L fits in L tokens: lm-eval keeps ``max_length - max_gen_toks`` prompt tokens and
cuts the rest from the left, which for FIRST-SENTENCE-RETRIEVAL would cut the answer itself. So a
generation task's prompt is ``L - max_gen_toks`` tokens (``max_gen_toks`` set per task from its longest
answer), and a perplexity window is ``L - 1`` tokens (lm-eval adds one start token). Run with
``max_length`` >= the largest L and nothing is cut::

    lm_eval --model hf --model_args pretrained=FOLDER,max_length=4096 \\
        --include_path OUT --tasks ropekit_fsr,ropekit_passkey,ropekit_ppl

Prompts are stored as text (lm-eval tokenises them again); ``export_tasks`` re-tokenises each one to
check its length. With another tokenizer than the one given here, lengths differ. ``evaluate_in_process``
runs the tasks on a model object (e.g. a ropekit-patched one) through lm-eval's ``HFLM``, and refuses a
``max_length`` below a requested task's length.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ropekit import data as data_mod
from ropekit.eval.perplexity import select_windows
from ropekit.eval.retrieval import build_fsr_samples, build_passkey_samples
from ropekit.files import atomic_write_text
from ropekit.models import load_tokenizer

__all__ = ["export_tasks", "evaluate_in_process"]

_UTILS = '''"""Hooks for ropekit's lm-eval tasks (written by ropekit.eval.harness.export_tasks)."""
import re

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def fsr_process_results(doc, results):
    answer = results[0].strip().split("\\n")[0].strip()
    return {"rouge_l": 100.0 * _SCORER.score(doc["target"], answer)["rougeL"].fmeasure}


def passkey_process_results(doc, results):
    digits = re.sub(r"\\D", "", results[0])[:5]
    return {"exact_match": float(digits == doc["target"])}


def ppl_process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\\s+", doc["text"].strip()))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
'''


def _task_yaml(name: str, data_file: Path, body: str, length: int, max_gen_toks: int | None) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        f"{body.replace('MAX_GEN_TOKS', str(max_gen_toks))}"
        "metadata:\n"
        "  version: 2.0\n"
        f"  context_length: {length}  # prompt + answer budget; run with max_length >= this\n"
    )


_FSR_BODY = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
process_results: !function ropekit_utils.fsr_process_results
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: MAX_GEN_TOKS
  do_sample: false
metric_list:
  - metric: rouge_l
    aggregation: mean
    higher_is_better: true
"""

_PASSKEY_BODY = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
process_results: !function ropekit_utils.passkey_process_results
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: MAX_GEN_TOKS
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_PPL_BODY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
process_results: !function ropekit_utils.ppl_process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _fits(tokenizer, text: str, budget: int) -> bool:
    """Does ``text``, tokenised again as lm-eval will (special tokens included), fit in ``budget`` tokens?"""
    return len(tokenizer(text).input_ids) <= budget


def _generation_task(build, tokenizer, length: int, gen_toks, n_answer_tokens) -> tuple[list, int]:
    """Samples whose prompt + answer budget fit in ``length`` tokens, and that budget (max_gen_toks).

    The budget depends on the answers, the answers on the samples, the samples on the prompt length:
    iterate until the budget holds for every answer (answers are short; two rounds are typical).
    """
    budget = gen_toks
    for _ in range(5):
        shortfall = 2  # room for a start token and a re-tokenisation that merges differently
        if length - budget - shortfall < 1:
            raise ValueError(f"length {length} is too short to export: the answer budget alone takes {budget} "
                             "tokens; use a larger length")  # fmt: skip
        samples = build(length - budget - shortfall)
        need = max([gen_toks, *(n_answer_tokens(s) for s in samples)])
        texts = [tokenizer.decode(s.prompt_ids) for s in samples]
        if need <= budget and all(_fits(tokenizer, t, length - budget) for t in texts):
            return list(zip(samples, texts, strict=True)), budget
        budget = max(budget, need)
    raise ValueError(f"cannot fit prompts and answers in {length} tokens; use a larger length")


def export_tasks(
    out: str | Path,
    *,
    data: str = "shakespeare",
    tokenizer=None,
    lengths: list[int] = (1024, 2048, 4096),
    n: int = 20,
    seed: int = 0,
    val_fraction: float = data_mod.VAL_FRACTION,
    split_seed: int = 0,
) -> list[Path]:
    """Write the task YAMLs, groups, data and hooks to ``out``; return the written paths.

    Each task of length L fits in L tokens including its answer budget (see the module docstring).
    """
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer) if Path(tokenizer).is_dir() else load_tokenizer(tokenizer)
    if tokenizer is None:
        raise ValueError("export_tasks needs a tokenizer (a model spec, a folder or a tokenizer object)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = data_mod.load_documents(data)
    _, val = data_mod.split_documents(docs, val_fraction=val_fraction, seed=split_seed)
    cache = data_mod.tokenize_documents(val, tokenizer)
    written: list[Path] = []
    groups: dict[str, list[str]] = {"ropekit_fsr": [], "ropekit_passkey": [], "ropekit_ppl": []}
    for L in lengths:
        # FSR: the answer budget is ropekit's own generation limit, 2 x target + 8 tokens
        fsr, fsr_gen = _generation_task(
            lambda m: build_fsr_samples(val, tokenizer, m, n=n, seed=seed), tokenizer, L, 32,
            lambda s: 2 * len(s.target_ids) + 8,
        )  # fmt: skip
        rows = [{"prompt": text, "target": s.target, "length": L, "max_gen_toks": fsr_gen} for s, text in fsr]
        keys, key_gen = _generation_task(
            lambda m: build_passkey_samples(tokenizer, m, n=max(1, n // 5), seed=seed), tokenizer, L, 12,
            lambda s: len(s.key_ids) + 4,
        )  # fmt: skip
        prow = [{"prompt": text, "target": s.key, "depth": s.depth, "length": L} for s, text in keys]
        ppl = [{"text": tokenizer.decode(cache.doc(d)[s : s + L - 1].tolist()), "length": L}
               for d, s in select_windows(cache, L - 1, n, seed)]  # fmt: skip
        for kind, body, items, gen in (
            ("fsr", _FSR_BODY, rows, fsr_gen), ("passkey", _PASSKEY_BODY, prow, key_gen), ("ppl", _PPL_BODY, ppl, None)
        ):  # fmt: skip
            name = f"ropekit_{kind}_{L}"
            data_file = out / f"{name}.jsonl"
            _write_jsonl(data_file, items)
            atomic_write_text(out / f"{name}.yaml", _task_yaml(name, data_file, body, L, gen))
            groups[f"ropekit_{kind}"].append(name)
            written += [out / f"{name}.yaml", data_file]
    metrics = {"ropekit_fsr": ["rouge_l"], "ropekit_passkey": ["exact_match"], "ropekit_ppl": ["bits_per_byte"]}
    for group, tasks in groups.items():
        aggregate = "".join(
            f"  - metric: {m}\n    aggregation: mean\n    weight_by_size: true\n" for m in metrics[group]
        )
        text = (f"group: {group}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks)
                + f"aggregate_metric_list:\n{aggregate}metadata:\n  version: 2.0\n")  # fmt: skip
        atomic_write_text(out / f"{group}.yaml", text)
        written.append(out / f"{group}.yaml")
    atomic_write_text(out / "ropekit_utils.py", _UTILS)
    written.append(out / "ropekit_utils.py")
    return written


def _task_lengths(include_path: str | Path, tasks: list[str]) -> dict[str, int]:
    """context_length of each requested ropekit task (groups expand to their tasks)."""
    import re

    found = {}
    folder = Path(include_path)
    for task in tasks:
        paths = [folder / f"{task}.yaml"]
        if (folder / f"{task}.yaml").is_file() and "group:" in (folder / f"{task}.yaml").read_text():
            paths = [folder / f"{t}.yaml" for t in re.findall(r"^  - (ropekit_\w+)$", paths[0].read_text(), re.M)]
        for path in paths:
            m = re.search(r"^  context_length: (\d+)", path.read_text(), re.M) if path.is_file() else None
            if m:
                found[path.stem] = int(m.group(1))
    return found


def evaluate_in_process(model, tokenizer, tasks: list[str], include_path: str | Path, *, max_length: int, **kwargs):
    """Run lm-eval tasks on a model object (e.g. ropekit-patched) through lm-eval's HFLM."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-eval integration needs 'lm-eval' (pip install 'ropekit[eval]')") from err
    too_long = {t: L for t, L in _task_lengths(include_path, tasks).items() if L > max_length}
    if too_long:
        raise ValueError(f"max_length={max_length} is shorter than tasks {too_long}: lm-eval would cut their prompts "
                         f"from the left; use max_length >= {max(too_long.values())}")  # fmt: skip
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    # lm-eval's own tasks are indexed (thousands of YAML files) only when a task is not one in include_path
    own = all((Path(include_path) / f"{task}.yaml").is_file() for task in tasks)
    manager = TaskManager(include_path=str(include_path), include_defaults=not own)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **kwargs)
