"""ropekit sweep: paired per-sample evaluation, reproducible ranking, resumable rows, clear errors."""

import json
import re

import numpy as np
import pytest
import torch

from ropekit import data
from ropekit.cli import main
from ropekit.models import load_model
from ropekit.results import read_rows
from ropekit.stats import paired_interval
from ropekit.studies import sweep

METHODS = "pi:factor=2;yarn:factor=2,original_max_position_embeddings=128;abf:base=80000"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    docs = data.load_documents("shakespeare")
    train, _ = data.split_documents(docs, val_fraction=0.15, seed=0)
    folder = tmp_path_factory.mktemp("tiny_sweep")
    load_model("tiny:llama", max_position_embeddings=128).save_pretrained(folder)
    data.load_or_train_tokenizer(train[:6], vocab_size=512).save_pretrained(folder)
    return folder


def _argv(model, out, *extra):
    return ["sweep", "--model", str(model), "--target-length", "192", "--methods", METHODS, "--n-ppl", "2",
            "--n-fsr", "1", "--n-passkey", "1", "--out", str(out), *extra]  # fmt: skip


def _table(path):
    return {(r["variant"], r["metric"]): r["value"] for r in read_rows(sweep.summary_path(path))}


def test_sweep_ranks_reproducibly_and_resumes(tmp_path, saved_model, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(_argv(saved_model, a, "--plot", str(tmp_path / "a.png"))) == 0
    assert main(_argv(saved_model, b)) == 0
    table = _table(a)
    assert table == _table(b)  # same seed, same samples: the same numbers and ranking
    ranks = sorted(int(float(v)) for (_, m), v in table.items() if m == "rank")
    assert ranks == [1, 2, 3, 4] and (tmp_path / "a.png").is_file()
    md = sweep.table_path(a).read_text()  # the ranked table docs/results.md quotes, in rank order
    order = [line.split("`")[1] for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert order == [v for _, v in sorted((int(float(x)), v) for (v, m), x in table.items() if m == "rank")]
    assert "n = 2" in md and "n = 1" in md and "Seconds per candidate" in md
    rows = read_rows(a)
    per = {(r["variant"], r["metric"]) for r in rows}
    for variant in ("native", "pi:factor=2", "abf:base=80000"):
        for metric in sweep.SAMPLE_METRICS:
            assert (variant, metric) in per or metric.startswith("ruler_sample@"), (variant, metric)
    # the paired difference and its interval come from the differences of the same prompts
    nll = {(r["variant"], json.loads(r["config"])["sample"]): float(r["value"]) for r in rows
           if r["metric"] == "window_nll@target"}  # fmt: skip
    base, pi = ([nll[(v, i)] for i in (0, 1)] for v in ("native", "pi:factor=2"))
    got = [float(table[("pi:factor=2", f"{k}:window_nll@target")]) for k in ("delta", "delta_low", "delta_high")]
    assert got == pytest.approx(list(paired_interval(pi, base)))
    assert got[0] == pytest.approx(np.mean(np.subtract(pi, base)))
    capsys.readouterr()
    assert main(_argv(saved_model, a)) == 0  # resumed: nothing left to evaluate
    assert "already in" in capsys.readouterr().out and len(read_rows(a)) == len(rows)
    from .conftest import held_by_another_process

    with held_by_another_process(a, "file"):  # an identical sweep running elsewhere: a second doubles every row
        assert main(_argv(saved_model, a)) == 2
    assert "being written by another ropekit process" in capsys.readouterr().err and len(read_rows(a)) == len(rows)


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--methods", "pi:fctor=2"], "unknown key"),
        (["--target-length", "64"], "target length"),
        (["--tasks", "ppl,mmlu"], "unknown sweep task"),
        (["--from-advise"], "exactly one of"),
        (["--out", "DIR"], "is a directory"),
        (["--model", "/no/such/model"], "not found"),
    ],
)
def test_sweep_cli_bad_inputs(extra, word, tmp_path, saved_model, capsys):
    argv = _argv(saved_model, tmp_path / "rows.csv") + [str(tmp_path) if e == "DIR" else e for e in extra]
    assert main(argv) == 2
    assert word in capsys.readouterr().err
    assert not (tmp_path / "rows.csv").exists()


def test_one_forward_scores_each_task_as_a_forward_of_its_own_would(saved_model):
    """The sweep reads PPL (over the prompt's text and its first L tokens, the needle left out), FSR
    and passkey from one forward of the teacher-forced sequence; each equals its own forward.
    Dynamic NTK scores the first L tokens apart."""
    import ropekit
    from ropekit.eval import perplexity, retrieval
    from ropekit.models import load_tokenizer

    model, tok = load_model(str(saved_model)), load_tokenizer(str(saved_model))
    _, val = data.split_documents(data.load_documents("shakespeare"), val_fraction=0.15, seed=0)
    settings = sweep.SweepSettings(model="m", data="d", trained_length=128, target_length=192)
    plain = retrieval.build_fsr_samples(val, tok, 192, n=1, seed=3)[0]
    assert 128 < plain.context_end < len(plain.prompt_ids) == 192
    s = retrieval.plant_passkey(tok, plain, 0.3)
    a, b = s.needle
    assert len(s.fsr.prompt_ids) == 192 and s.fsr.prompt_ids[: plain.context_start + 5] == plain.prompt_ids[:5]
    assert s.key in tok.decode(s.fsr.prompt_ids[a:b]) and 0.15 < a / s.fsr.context_end < 0.45
    assert s.fsr.target == plain.target and tok.decode(s.fsr.prompt_ids[b - 1 :]).count(s.key) == 0
    for spec, dependent in (("yarn:factor=2,original_max_position_embeddings=128", False),
                            ("dynamic:factor=2,original_max_position_embeddings=128", True)):  # fmt: skip
        with ropekit.patch(model, spec):
            values = sweep._prompt_values(model, s, sweep.TASKS, settings, dependent)
            got = {m: v for m, _, v, _ in values}
            scored = {m: extra["window_tokens"] for m, _, _, extra in values if "window_tokens" in extra}
            ctx = torch.tensor(s.fsr.prompt_ids[: s.fsr.context_end])
            nll = perplexity.token_nll(model, ctx)
            text = torch.cat([nll[: a - 1], nll[b - 1 :]])  # the needle's tokens left out
            first_L = perplexity.token_nll(model, ctx[:128])
            first_L = torch.cat([first_L[: a - 1], first_L[b - 1 :]])
            assert scored == {"window_nll@target": len(text), "window_nll@trained": len(first_L)}
            text, first_L = text.mean().item(), first_L.mean().item()
            acc, fsr_nll = retrieval.score_target(model, s.fsr.prompt_ids, s.fsr.target_ids)
            key_acc, key_nll = retrieval.score_target(model, s.ids[: -len(s.key_ids)], s.key_ids)
        tol = dict(rel=1e-5, abs=1e-5)  # float32 forwards of different lengths: summation order only
        assert got["window_nll@trained"] == pytest.approx(first_L, **tol)
        if dependent:  # dynamic NTK's frequencies are those of the whole sequence's length
            continue
        assert got["window_nll@target"] == pytest.approx(text, **tol)
        assert got["fsr_sample_target_nll"] == pytest.approx(fsr_nll, **tol)
        assert got["fsr_sample_token_accuracy"] == acc
        assert got["passkey_sample_target_nll"] == pytest.approx(key_nll, **tol)
        assert got["passkey_sample_token_accuracy"] == key_acc


def test_an_interrupted_sweep_resumes_at_the_prompt_where_it_stopped(tmp_path, saved_model, capsys):
    whole, cut = tmp_path / "whole.csv", tmp_path / "cut.csv"
    assert main(_argv(saved_model, whole)) == 0
    rows = read_rows(whole)
    keep = len(rows) - 2  # lose the last variant's second prompt (its two PPL rows)
    cut.write_text("".join(whole.read_text().splitlines(keepends=True)[: keep + 1]))
    capsys.readouterr()
    assert main(_argv(saved_model, cut)) == 0
    log = capsys.readouterr().out
    assert "abf:base=80000: 1 prompts in" in log  # only what was lost was scored again
    key = lambda r: (r["variant"], r["metric"], json.loads(r["config"])["sample"])  # noqa: E731
    value = lambda path: {key(r): r["value"] for r in read_rows(path)}  # noqa: E731
    assert len(read_rows(cut)) == len(read_rows(whole))  # nothing scored twice, nothing lost
    assert value(cut) == value(whole) and _table(cut) == _table(whole)


def test_a_sweep_without_ppl_lists_every_candidate_unranked(tmp_path, saved_model):
    out = tmp_path / "retrieval.csv"
    assert main(_argv(saved_model, out, "--tasks", "fsr,passkey")) == 0
    md = sweep.table_path(out).read_text()
    listed = [line.split("`")[1] for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert sorted(listed) == sorted(["native", *sweep.parse_methods(METHODS)])
    assert "Not ranked (no PPL task)" in md and "FSR acc: n = 1" in md


def test_ruler_joins_an_earlier_sweep_on_the_same_prompts_for_every_candidate(tmp_path, saved_model, capsys):
    """RULER tasks added to a finished sweep's --out run alone (its FSR rows are reused), through lm-eval, on
    lm-eval's prompts, the same for every candidate; the table pairs them with the baseline."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "rows.csv"
    argv = ["sweep", "--model", str(saved_model), "--target-length", "4096", "--methods", "pi:factor=32",
            "--n-fsr", "1", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--tasks", "fsr"]) == 0
    before = read_rows(out)
    capsys.readouterr()
    assert main([*argv, "--tasks", "fsr,niah_single_1", "--n-ruler", "1"]) == 0
    log = capsys.readouterr().out
    assert "native: 0 prompts, RULER 1 tasks in" in log and "pi:factor=32: 0 prompts, RULER 1 tasks in" in log
    assert main([*argv, "--tasks", "fsr,niah_single_1", "--n-ruler", "2"]) == 0  # more prompts: only the new one
    assert capsys.readouterr().out.count("RULER niah_single_1, 1 prompts in") == 2
    rows = read_rows(out)
    assert rows[: len(before)] == before and len(rows) == len(before) + 4
    ruler_rows = [r for r in rows if r["metric"] == "ruler_sample@niah_single_1"]
    prompts = {}
    for r in ruler_rows:
        cfg = json.loads(r["config"])
        prompts.setdefault(r["variant"], {})[cfg["sample"]] = cfg["prompt_sha"]
        assert r["context_length"] == "4096" and cfg["prompt_tokens"] <= 4096 and 0 <= float(r["value"]) <= 1
    assert prompts["native"] == prompts["pi:factor=32"] and sorted(prompts["native"]) == [0, 1]
    table = _table(out)
    assert ("pi:factor=32", "delta:ruler_sample@niah_single_1") in table
    md = sweep.table_path(out).read_text()
    assert "RULER niah_single_1" in md and "RULER niah_single_1: n = 2" in md and "hashes checked" in md
    # a changed prompt (another lm-eval version, say) cannot be paired: refused, not averaged
    lines = out.read_text().splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if "pi:factor=32" in line and "ruler_sample@" in line)
    changed = re.sub(r'(prompt_sha""?: ""?)[0-9a-f]{16}', r"\g<1>" + "0" * 16, lines[i])
    assert changed != lines[i]
    out.write_text("".join(lines[:i] + [changed] + lines[i + 1 :]))
    assert main([*argv, "--tasks", "fsr,niah_single_1", "--n-ruler", "2"]) == 2
    assert "cannot be paired" in capsys.readouterr().err


def test_a_sweep_with_ruler_below_4096_is_refused_before_the_model_loads(tmp_path, saved_model, capsys):
    assert main(_argv(saved_model, tmp_path / "rows.csv", "--tasks", "fsr,ruler-offline")) == 2
    assert "RULER length 192 is too short" in capsys.readouterr().err
    assert main(_argv(saved_model, tmp_path / "rows.csv", "--tasks", "fsr,niah_single_9")) == 2
    assert "unknown sweep task(s) ['niah_single_9']" in capsys.readouterr().err
