"""ropekit sweep: paired per-sample evaluation, reproducible ranking, resumable rows, clear errors."""

import numpy as np
import pytest

from ropekit import data, sweep
from ropekit.cli import main
from ropekit.models import load_model
from ropekit.results import read_rows

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
    rows = read_rows(a)
    per = {(r["variant"], r["metric"]) for r in rows}
    for variant in ("native", "pi:factor=2", "abf:base=80000"):
        for metric in sweep.SAMPLE_METRICS:
            assert (variant, metric) in per, (variant, metric)
    # the paired difference is the mean of the per-sample differences
    nll = {(r["variant"], r["config"]): float(r["value"]) for r in rows if r["metric"] == "window_nll@target"}
    base = [v for (var, _), v in sorted(nll.items()) if var == "native"]
    pi = [v for (var, _), v in sorted(nll.items()) if var == "pi:factor=2"]
    assert float(table[("pi:factor=2", "delta:window_nll@target")]) == pytest.approx(np.mean(np.subtract(pi, base)))
    capsys.readouterr()
    assert main(_argv(saved_model, a)) == 0  # resumed: nothing left to evaluate
    assert "already in" in capsys.readouterr().out and len(read_rows(a)) == len(rows)


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
