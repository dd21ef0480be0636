"""ropekit's tasks for lm-evaluation-harness: local YAML tasks over data ropekit writes.

``export_tasks(out, ...)`` writes, per context length L:

- ``ropekit_fsr_L``: FIRST-SENTENCE-RETRIEVAL prompts of L tokens (``generate_until``, metric
  ``rouge_l`` = ROUGE-L F1 x 100),
- ``ropekit_passkey_L``: passkey prompts of L tokens (``generate_until``, ``exact_match``),
- ``ropekit_ppl_L``: windows of L tokens of validation text (``loglikelihood_rolling``: word and byte
  perplexity, bits per byte),

plus groups ``ropekit_fsr``, ``ropekit_passkey``, ``ropekit_ppl`` over all lengths, the JSONL data,
and ``ropekit_utils.py`` (needs only ``rouge-score``). Run them like lm-eval's own ``ruler``::

    lm_eval --model hf --model_args pretrained=FOLDER,max_length=4096 \\
        --include_path OUT --tasks ropekit_fsr,ropekit_passkey,ropekit_ppl

Prompts are stored as text (lm-eval tokenises them again), so with another tokenizer than the one
given here the lengths are approximate. ``evaluate_in_process`` runs the tasks on a model object
(e.g. a ropekit-patched one) through lm-eval's ``HFLM``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ropekit.results import atomic_write_text

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


def _task_yaml(name: str, data_file: Path, body: str, length: int) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        f"{body}"
        "metadata:\n"
        "  version: 1.0\n"
        f"  context_length: {length}\n"
    )


_FSR_BODY = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
process_results: !function ropekit_utils.fsr_process_results
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 96
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
  max_gen_toks: 12
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


def export_tasks(
    out: str | Path,
    *,
    data: str = "shakespeare",
    tokenizer=None,
    lengths: list[int] = (1024, 2048, 4096),
    n: int = 20,
    seed: int = 0,
    val_fraction: float = 0.15,
    split_seed: int = 0,
) -> list[Path]:
    """Write the task YAMLs, groups, data and hooks to ``out``; return the written paths."""
    from ropekit import data as data_mod
    from ropekit.eval.perplexity import select_windows
    from ropekit.eval.retrieval import build_fsr_samples, build_passkey_samples

    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        from ropekit.models import load_tokenizer

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
        fsr = build_fsr_samples(val, tokenizer, L, n=n, seed=seed)
        rows = [{"prompt": tokenizer.decode(s.prompt_ids), "target": s.target, "length": L} for s in fsr]
        keys = build_passkey_samples(tokenizer, L, n=max(1, n // 5), seed=seed)
        prow = [
            {"prompt": tokenizer.decode(s.prompt_ids), "target": s.key, "depth": s.depth, "length": L} for s in keys
        ]
        ppl = [{"text": tokenizer.decode(cache.doc(d)[s : s + L].tolist()), "length": L}
               for d, s in select_windows(cache, L, n, seed)]  # fmt: skip
        for kind, body, items in (("fsr", _FSR_BODY, rows), ("passkey", _PASSKEY_BODY, prow), ("ppl", _PPL_BODY, ppl)):
            name = f"ropekit_{kind}_{L}"
            data_file = out / f"{name}.jsonl"
            _write_jsonl(data_file, items)
            atomic_write_text(out / f"{name}.yaml", _task_yaml(name, data_file, body, L))
            groups[f"ropekit_{kind}"].append(name)
            written += [out / f"{name}.yaml", data_file]
    for group, tasks in groups.items():
        text = f"group: {group}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks) + "metadata:\n  version: 1.0\n"
        atomic_write_text(out / f"{group}.yaml", text)
        written.append(out / f"{group}.yaml")
    atomic_write_text(out / "ropekit_utils.py", _UTILS)
    written.append(out / "ropekit_utils.py")
    return written


def evaluate_in_process(model, tokenizer, tasks: list[str], include_path: str | Path, *, max_length: int, **kwargs):
    """Run lm-eval tasks on a model object (e.g. ropekit-patched) through lm-eval's HFLM."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-eval integration needs 'lm-eval' (pip install 'ropekit[eval]')") from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include_path)), **kwargs)
