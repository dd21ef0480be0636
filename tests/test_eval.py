"""Evaluation: perplexity, FIRST-SENTENCE-RETRIEVAL, passkey, lm-eval export, the eval CLI."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ropekit import data
from ropekit.cli import main
from ropekit.eval import perplexity, retrieval
from ropekit.models import load_model, load_tokenizer
from ropekit.results import read_rows


@pytest.fixture(scope="module")
def corpus():
    docs = data.load_documents("shakespeare")
    train, val = data.split_documents(docs, val_fraction=0.15, seed=0)
    tok = data.load_or_train_tokenizer(train[:6], vocab_size=512)
    return SimpleNamespace(train=train, val=val[:3], tok=tok)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_model("tiny:llama", max_position_embeddings=512)
    model.save_pretrained(folder)
    corpus.tok.save_pretrained(folder)
    return folder


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(corpus):
    model = load_model("tiny:llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over 512 tokens
    cache = data.tokenize_documents(corpus.val, corpus.tok)
    r = perplexity.perplexity_at_length(model, cache, 256, n=3, bin_size=64)
    assert r.ppl == pytest.approx(512, rel=1e-5) and r.n == 3
    assert r.ppl_low == pytest.approx(512, rel=1e-5) and r.ppl_high == pytest.approx(512, rel=1e-5)
    assert [b[0] for b in r.bins] == [1, 65, 129, 193] and all(v == pytest.approx(math.log(512)) for _, v in r.bins)


def test_chunked_nll_equals_the_full_logits_loss():
    model = load_model("tiny:llama")
    ids = torch.randint(0, 512, (1, 100))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(perplexity.token_nll(model, ids, chunk=7), full, rtol=1e-5, atol=1e-5)


def test_sliding_window_scores_every_token_once_with_its_window():
    model = load_model("tiny:llama")
    ids = torch.randint(0, 512, (90,))
    whole = perplexity.token_nll(model, ids)
    torch.testing.assert_close(perplexity.sliding_window_nll(model, ids, window=200, stride=50), whole)
    slid = perplexity.sliding_window_nll(model, ids, window=40, stride=10)
    assert slid.shape == (89,)
    torch.testing.assert_close(slid[:39], whole[:39])  # the first window sees the same context
    last = perplexity.token_nll(model, ids[50:90])  # the last window starts at 90 - 40
    torch.testing.assert_close(slid[-10:], last[-10:])


def test_length_beyond_every_document_is_refused(corpus):
    cache = data.tokenize_documents(corpus.val, corpus.tok)
    with pytest.raises(ValueError, match="longer than every validation document"):
        perplexity.select_windows(cache, 10**8, 4, 0)


def test_rouge_l_of_a_copy_is_100_and_of_unrelated_text_about_0():
    s = "It was the best of times, it was the worst of times."
    assert retrieval.rouge_l(s, s) == pytest.approx(100.0)
    assert retrieval.rouge_l("Purple elephants dance quietly.", s) < 5


def test_first_sentence_rule():
    assert retrieval.first_sentence('He said "Stop!" Then he left.') == 'He said "Stop!"'
    assert retrieval.first_sentence("Mr. Smith went to Washington. He stayed.") == "Mr."
    assert retrieval.first_sentence("No terminator here\nnext paragraph.") == "No terminator here"
    assert retrieval.first_sentence("Is it 3.5 or 4? Neither.") == "Is it 3.5 or 4?"


class CopyModel(torch.nn.Module):
    """Predicts the token ``shift`` positions back of the next one: a perfect copier of the context."""

    def __init__(self, shift, vocab=512):
        super().__init__()
        self.shift, self.vocab = shift, vocab
        self.head = torch.nn.Identity()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        T = input_ids.shape[1]
        src = (torch.arange(T) + 1 - self.shift).clamp(min=0)
        hidden = torch.nn.functional.one_hot(input_ids[0, src], self.vocab).float() * 30
        return SimpleNamespace(logits=self.head(hidden[None]))

    def get_output_embeddings(self):
        return self.head


def test_teacher_forced_accuracy_is_one_for_a_copying_model():
    context = torch.randint(0, 512, (50,)).tolist()
    question = [7, 8, 9]
    prompt = context + question
    target = context[:12]
    acc, nll = retrieval.score_target(CopyModel(shift=len(prompt)), prompt, target)
    assert acc == 1.0 and nll < 1e-6
    acc_off, _ = retrieval.score_target(CopyModel(shift=len(prompt) - 1), prompt, target)
    assert acc_off < 0.5


@pytest.mark.parametrize("length", [128, 300, 1024])
def test_fsr_prompts_have_exactly_l_tokens_and_the_target_is_the_first_sentence(corpus, length):
    samples = retrieval.build_fsr_samples(corpus.val, corpus.tok, length, n=5, seed=1)
    pre = corpus.tok("Question", add_special_tokens=False).input_ids  # sanity: tokenizer works
    assert pre
    for s in samples:
        assert len(s.prompt_ids) == length
        text = corpus.tok.decode(s.prompt_ids)
        context = text.split("\n\nQuestion: What was the first sentence")[0]
        assert context.startswith(s.target) and 4 <= len(s.target.split()) <= 40
        assert text.endswith("\nAnswer:")
        para = next(d for d in corpus.val if d.name == s.document).text[s.char_offset :]
        assert s.target == retrieval.first_sentence(para)


def test_fsr_template_must_hold_the_context_once(corpus):
    with pytest.raises(ValueError, match="exactly once"):
        retrieval.build_fsr_samples(corpus.val, corpus.tok, 256, template="no context here")


def test_passkey_depth_places_the_key(corpus):
    tok = corpus.tok
    for depth in (0.0, 0.5, 1.0):
        (s,) = retrieval.build_passkey_samples(tok, 400, depths=(depth,), n=1, seed=2)
        assert len(s.prompt_ids) == 400
        text = tok.decode(s.prompt_ids)
        needle = f"The pass key is {s.key}. Remember it. {s.key} is the pass key. "
        start = text.index("Find it and memorize it. ") + len("Find it and memorize it. ")
        at, end = text.index(needle), text.index("What is the pass key?")
        where = (at - start) / (end - start - len(needle))  # share of the filler that comes before the key
        assert abs(where - depth) < 0.02, (depth, where)
        assert text.endswith("What is the pass key? The pass key is")


def test_eval_cli_end_to_end_on_a_tiny_model(tmp_path, saved_model, capsys):
    out = tmp_path / "rows.csv"
    common = ["--model", str(saved_model), "--n", "2", "--out", str(out)]
    assert main(["eval", "ppl", *common, "--lengths", "128,512,1024", "--bin-size", "64", "--rope", "pi:factor=2"]) == 0
    assert main(["eval", "fsr", *common, "--lengths", "128,256"]) == 0
    assert main(["eval", "passkey", *common, "--lengths", "200"]) == 0
    assert main(["eval", "ppl", *common, "--lengths", "128", "--stride", "32", "--span", "300"]) == 0
    rows = read_rows(out)
    metrics = {(r["metric"], r["context_length"]) for r in rows}
    for m in [("ppl", "128"), ("ppl", "1024"), ("fsr_rouge_l", "256"), ("fsr_token_accuracy", "128"),
              ("fsr_target_nll", "256"), ("passkey_exact_match", "200"), ("position_loss", "1024"),
              ("ppl_sliding", "128")]:  # fmt: skip
        assert m in metrics, m
    bins = {(r["context_length"], r["position"]) for r in rows if r["metric"] == "position_loss"}
    assert ("1024", "65") in bins and ("128", "65") in bins  # each window's bins, told apart by context_length
    ppl = next(r for r in rows if r["metric"] == "ppl" and r["context_length"] == "1024")
    assert ppl["variant"] == "pi:base=10000,factor=2" and ppl["git_sha"] and ppl["device"].startswith("cpu")
    assert '"beyond_trained_length": false' in ppl["config"]  # PI x2 raised 512 -> 1024
    beyond = next(r for r in rows if r["metric"] == "fsr_rouge_l" and r["context_length"] == "256")
    assert '"trained_length": 512' in beyond["config"]
    assert float(ppl["value"]) > 1


def test_an_interrupted_eval_keeps_each_finished_length_and_a_rerun_skips_it(tmp_path, saved_model, capsys):
    out = tmp_path / "rows.csv"
    common = ["eval", "ppl", "--model", str(saved_model), "--n", "2", "--out", str(out)]
    assert main([*common, "--lengths", "128,256"]) == 0
    first = read_rows(out)
    assert main([*common, "--lengths", "128,256,512"]) == 0  # the rerun of a run that stopped after 256
    assert "L=128: its rows are already in" in capsys.readouterr().out
    rows = read_rows(out)
    assert rows[: len(first)] == first and {r["context_length"] for r in rows[len(first) :]} == {"512"}
    assert main([*common, "--lengths", "128", "--n", "3"]) == 0  # other settings: a new evaluation
    assert sum(r["metric"] == "ppl" and r["context_length"] == "128" for r in read_rows(out)) == 2
    sliding = [*common, "--lengths", "64,128", "--stride", "32"]  # its span defaults to 4 x the longest window
    assert main(sliding) == 0
    before = len(read_rows(out))
    capsys.readouterr()
    assert main(sliding) == 0 and len(read_rows(out)) == before
    assert "L=64: its rows are already in" in capsys.readouterr().out


def test_a_model_with_non_finite_outputs_writes_no_row(tmp_path, saved_model, capsys):
    broken = tmp_path / "broken"
    model = load_model(str(saved_model))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # what a diverged run leaves
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((saved_model / name).read_bytes())
    out = tmp_path / "rows.csv"
    assert main(["eval", "ppl", "--model", str(broken), "--n", "2", "--lengths", "128", "--out", str(out)]) == 2
    assert "ppl at L=128 is NaN" in capsys.readouterr().err and not read_rows(out)


def test_asking_for_more_samples_than_the_text_holds_is_said(saved_model, capsys):
    assert main(["eval", "ppl", "--model", str(saved_model), "--n", "100000", "--lengths", "128"]) == 0
    assert "of the 100000 samples asked for exist at L=128" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,word",
    [
        (["eval", "ppl", "--model", "tiny:llama", "--rope", "pi:fctor=2"], "unknown key"),
        (["eval", "ppl", "--model", "MODEL", "--data", "/no/such/dir"], "unknown text source"),
        (["eval", "ppl", "--model", "MODEL", "--lengths", "100000000"], "longer than every validation document"),
        (["eval", "ppl", "--model", "MODEL", "--lengths", "1"], "lengths >= 2"),
        (["eval", "ppl", "--model", "MODEL", "--n", "-1"], "--n: expected an integer >= 1"),
        (["eval", "ppl", "--model", "MODEL", "--n", "0"], "--n: expected an integer >= 1"),
        (["eval", "ppl", "--model", "MODEL", "--stride", "0"], "--stride: expected an integer >= 1"),
        (["eval", "ppl", "--model", "MODEL", "--bin-size", "0"], "--bin-size: expected an integer >= 1"),
        (["eval", "fsr", "--model", "MODEL", "--val-fraction", "1.5"], "--val-fraction"),
        (["eval", "ppl", "--model", "/no/such/model"], "not found"),
        (["eval", "ppl", "--model", "MODEL", "--out", "OUTDIR"], "is a directory"),
        (["eval", "ppl", "--model", "MODEL", "--device", "cuda:0"], "needs CUDA"),
        (["eval", "ppl", "--model", "MODEL", "--device", "banana"], "is not a device; accepted: cpu, cuda"),
    ],
)
def test_eval_cli_bad_inputs_give_clear_errors(argv, word, saved_model, capsys, tmp_path):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = [str(saved_model) if a == "MODEL" else str(tmp_path) if a == "OUTDIR" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (progress bars of a model load may come before it)
    assert last.startswith("ropekit") and ": error: " in last and word in last, err


def test_eval_api_refuses_lengths_that_give_nan(saved_model, corpus):
    from ropekit.eval import run as ev

    model = load_model(str(saved_model))
    with pytest.raises(ValueError, match="lengths must be integers >= 2"):
        ev.eval_ppl(model, corpus.tok, corpus.val, [1], n=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        ev.eval_fsr(model, corpus.tok, corpus.val, [64], n=0)


def test_lm_eval_export_runs_under_lm_eval(tmp_path, corpus, saved_model):
    pytest.importorskip("lm_eval")
    import ropekit
    from ropekit.eval.harness import evaluate_in_process, export_tasks

    paths = export_tasks(tmp_path, data="shakespeare", tokenizer=str(saved_model), lengths=[256], n=2)
    assert (tmp_path / "ropekit_fsr_256.yaml").is_file() and (tmp_path / "ropekit_utils.py").is_file()
    model = load_model(str(saved_model))
    ropekit.patch(model, "abf:base=500000")
    with pytest.raises(ValueError, match="use max_length >= 256"):  # lm-eval would cut the prompts
        evaluate_in_process(model, corpus.tok, ["ropekit_fsr"], tmp_path, max_length=100)
    results = evaluate_in_process(
        model, corpus.tok, ["ropekit_fsr_256", "ropekit_passkey_256", "ropekit_ppl_256"], tmp_path, max_length=256
    )
    r = results["results"]
    assert 0 <= r["ropekit_fsr_256"]["rouge_l,none"] <= 100
    assert r["ropekit_passkey_256"]["exact_match,none"] in (0.0, 1.0)
    assert r["ropekit_ppl_256"]["word_perplexity,none"] > 1
    assert len(paths) >= 9 and re.search(r"context_length: 256", (tmp_path / "ropekit_ppl_256.yaml").read_text())


_SPY = """
import json, sys
from lm_eval.models.huggingface import HFLM

seen = []
original = HFLM._model_generate

def spy(self, context, *args, **kwargs):  # record the token ids the model is actually given
    seen.extend(context.tolist())
    return original(self, context, *args, **kwargs)

HFLM._model_generate = spy
from lm_eval.__main__ import cli_evaluate

sys.argv = ["lm_eval", *json.loads(sys.argv[1])]
try:
    cli_evaluate()
finally:
    open(sys.argv[-1] + "/contexts.json", "w").write(json.dumps(seen))
"""


def test_lm_eval_command_line_at_max_length_equal_to_the_task_length_keeps_every_answer(tmp_path, saved_model):
    """The real lm_eval entry point, max_length = L: every FSR prompt the model receives holds its answer."""
    pytest.importorskip("lm_eval")
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from ropekit.eval.harness import export_tasks

    L, tasks = 256, tmp_path / "tasks"
    export_tasks(tasks, data="shakespeare", tokenizer=str(saved_model), lengths=[L], n=4)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", "hf", "--model_args", f"pretrained={saved_model},max_length={L}", "--include_path",
            str(tasks), "--tasks", "ropekit_fsr", "--device", "cpu", "--batch_size", "1",
            "--output_path", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", _SPY, json.dumps(args), str(out)], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    contexts = json.loads((out / "contexts.json").read_text())
    targets = [json.loads(line)["target"] for line in (tasks / f"ropekit_fsr_{L}.jsonl").read_text().splitlines()]
    assert len(contexts) == len(targets) == 4
    tok = AutoTokenizer.from_pretrained(str(saved_model))
    seen = [tok.decode(ids) for ids in contexts]
    for target in targets:  # matched as a set: lm-eval reorders requests by length
        assert any(target in text for text in seen), target
    assert all(len(ids) <= L for ids in contexts)


@pytest.mark.parametrize("rope", [None, "yarn:factor=2,original_max_position_embeddings=256", "dynamic:factor=2"])
def test_one_prompt_forward_scores_and_generates_as_two_passes(corpus, saved_model, rope):
    """score_and_generate reuses the prompt's KV cache: the same numbers as score_target + greedy_generate."""
    import ropekit

    model = load_model(str(saved_model))
    if rope:
        ropekit.patch(model, rope)
    stop = retrieval._newline_ids(corpus.tok)
    for s in retrieval.build_fsr_samples(corpus.val, corpus.tok, 300, n=2, seed=3):
        kw = dict(max_new_tokens=12, stop_ids=stop)
        acc, nll, gen = retrieval.score_and_generate(model, s.prompt_ids, s.target_ids, **kw)
        acc2, nll2 = retrieval.score_target(model, s.prompt_ids, s.target_ids)
        assert acc == acc2 and nll == pytest.approx(nll2, rel=1e-5, abs=1e-5)
        assert gen == retrieval.greedy_generate(model, s.prompt_ids, **kw)


def test_retrieval_scores_apply_the_models_post_head_transform():
    model = load_model("tiny:granite", logits_scaling=4.0)  # Granite divides its logits by 4
    prompt, target = torch.randint(0, 512, (40,)).tolist(), torch.randint(0, 512, (6,)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
    want = float(F.cross_entropy(logits, torch.tensor(target)))
    assert retrieval.score_target(model, prompt, target)[1] == pytest.approx(want, rel=1e-5)
    _, nll, _ = retrieval.score_and_generate(model, prompt, target, max_new_tokens=2, stop_ids=set())
    assert nll == pytest.approx(want, rel=1e-5)


def test_every_metric_the_evaluations_write_is_registered_under_its_task(saved_model, corpus):
    from ropekit.eval import run as ev
    from ropekit.eval import tasks

    model = load_model(str(saved_model))
    written = {
        "ppl": ev.eval_ppl(model, corpus.tok, corpus.val, [128], n=2, bin_size=64)
        + ev.eval_ppl_samples(model, corpus.tok, corpus.val, [128], n=2, bin_length=128, bin_size=64)
        + ev.eval_ppl_sliding(model, corpus.tok, corpus.val, [64], stride=32, span=128, n=1),
        "fsr": ev.eval_fsr(model, corpus.tok, corpus.val, [128], n=2)
        + ev.eval_fsr_samples(model, corpus.tok, corpus.val, [128], n=2),
        "passkey": ev.eval_passkey(model, corpus.tok, [256], n=1, depths=(0.5,)),
    }
    for task, rows in written.items():
        assert rows and {tasks.task_of(r["metric"]) for r in rows} == {task}, task
        for r in rows:  # per-sample rows carry their sample; summary rows do not
            assert tasks.metric(r["metric"]).per_sample == ('"sample"' in r["config"]), r["metric"]
    # the summary and the per-sample rows come from one scoring path: the same windows, the same numbers
    nll = next(float(r["value"]) for r in written["ppl"] if r["metric"] == "nll")
    windows = [float(r["value"]) for r in written["ppl"] if r["metric"] == "window_nll"]
    assert nll == pytest.approx(sum(windows) / len(windows), rel=1e-6)
    acc = next(float(r["value"]) for r in written["fsr"] if r["metric"] == "fsr_token_accuracy")
    per_prompt = [float(r["value"]) for r in written["fsr"] if r["metric"] == "fsr_sample_token_accuracy"]
    assert acc == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# RULER through lm-eval
# ---------------------------------------------------------------------------------------------
_RULER = ["eval", "ruler", "--model", "ropekit-tiny-256", "--tasks", "niah_single_1,niah_multikey_2",
          "--lengths", "4096", "--n", "2"]  # fmt: skip


def test_ruler_through_lm_eval_scores_the_same_prompts_for_every_method(tmp_path, capsys):
    """The real lm-eval RULER tasks on the shipped model, patched with xPos and with plain RoPE: one row per
    prompt and task, the same prompts (hashes) for both whatever the tasks' order, none cut, and per-length
    means that match them."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "ruler.csv"
    for rope, order in (
        ("xpos:base=10000,scale_base=32", "niah_single_1,niah_multikey_2"),
        ("rope", "niah_multikey_2,niah_single_1"),
    ):  # a task's prompts do not depend on the others
        assert main([*_RULER[:5], order, *_RULER[6:], "--rope", rope, "--out", str(out)]) == 0
    assert "ruler_score@average" in capsys.readouterr().out
    rows = read_rows(out)
    samples = [r for r in rows if r["metric"].startswith("ruler_sample@")]
    assert sorted(r["variant"].split(":")[0] for r in rows if r["metric"] == "ruler_score@average") == ["rope", "xpos"]
    prompts = {}
    for r in samples:
        cfg = json.loads(r["config"])
        assert 0.0 <= float(r["value"]) <= 1.0 and r["context_length"] == "4096"
        assert 1000 < cfg["prompt_tokens"] <= 4096 and cfg["chat_template"] is None
        prompts.setdefault(r["variant"], set()).add((r["metric"], cfg["sample"], cfg["prompt_sha"]))
    rope, xpos = sorted(prompts)
    assert prompts[rope] == prompts[xpos] and len(prompts[rope]) == 4
    for variant in prompts:
        mine = [r for r in samples if r["variant"] == variant and r["metric"].endswith("@niah_single_1")]
        score = next(r for r in rows if r["variant"] == variant and r["metric"] == "ruler_score@niah_single_1")
        assert float(score["value"]) == pytest.approx(sum(float(r["value"]) for r in mine) / 2)


def test_a_ruler_prompt_that_lm_eval_would_cut_stops_the_run(monkeypatch):
    """With a max_length too small for the prompts (lm-eval's 4,096 default at 16k, say), its wrapper would
    cut each prompt from the left and score what is left: ropekit's check refuses instead."""
    pytest.importorskip("lm_eval")
    from ropekit.eval import ruler

    model, tok = load_model("ropekit-tiny-256"), load_tokenizer("ropekit-tiny-256")
    monkeypatch.setattr(ruler, "HEADROOM", -2048)  # max_length = 2,048 for prompts of ~3,000 tokens
    with pytest.raises(ruler.PromptCut, match="would be cut from the left"):
        ruler.ruler_samples(model, tok, ["niah_single_1"], 4096, n=1)


def test_a_ruler_task_whose_data_cannot_be_downloaded_is_one_line(monkeypatch, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'baber/paul_graham_essays' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "rows.csv"
    argv = [*_RULER[:5], "niah_single_2", *_RULER[6:], "--out", str(out)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars before it are not errors
    err = [line for line in lines if "ropekit: error" in line]
    assert err == lines[-1:] and "baber/paul_graham_essays" in err[0] and "niah_single_1" in err[0], lines
    assert not out.exists() or not read_rows(out)


def test_an_unknown_ruler_task_or_a_short_length_is_refused_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr("ropekit.cli.load_tokenizer", lambda *a: pytest.fail("loaded before the check"))
    assert main([*_RULER[:5], "niah_single_9", *_RULER[6:]]) == 2
    err = capsys.readouterr().err
    assert "unknown RULER task 'niah_single_9'" in err and "ruler-offline" in err
    assert main([*_RULER[:7], "2048", *_RULER[8:]]) == 2  # lm-eval's variable tracking would never finish
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RULER length 2048 is too short" in err[0] and "4096" in err[0]


def test_an_lm_eval_older_than_the_declared_bound_is_refused_in_one_line(monkeypatch):
    """The bound ropekit checks is pyproject.toml's; an lm-eval older than it (a task API ropekit calls is
    missing) is named with the fix, before any model loads."""
    import importlib.metadata
    from pathlib import Path

    from ropekit.eval import ruler

    pytest.importorskip("lm_eval")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"lm-eval[ruler]>={ruler.MIN_LM_EVAL},' in pyproject
    ruler.check_lm_eval()  # the installed one passes
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.11" if name == "lm-eval" else real(name))
    with pytest.raises(ValueError, match=rf"lm-eval >= {re.escape(ruler.MIN_LM_EVAL)}, found 0\.4\.11"):
        ruler.check_lm_eval()
