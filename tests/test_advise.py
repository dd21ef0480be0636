"""ropekit advise: the published defaults, the closed forms, and the base lower bound's grid search."""

import math

import numpy as np
import pytest

from ropekit import analysis
from ropekit.cli import main
from ropekit.methods import parse
from ropekit.studies.advise import PAPER_ABF_BASE, advise


@pytest.fixture(scope="module")
def paper():
    """Llama 2 7B's RoPE (d = 128, base 10,000) extended 4k -> 32k, the paper's setting."""
    return advise(128, 10_000.0, 4096, 32768)


def _by_label(advice):
    return {c.label: (parse(c.spec), g) for c, g in zip(advice.candidates, advice.diagnostics, strict=True)}


def test_advised_numbers_are_the_published_rules(paper):
    m = {label: method for label, (method, _) in _by_label(paper).items()}
    assert m["native"].base == 10_000 and m["native"].name == "rope"
    assert m["ABF paper"].base == PAPER_ABF_BASE == 500_000
    assert m["PI"].factor == 8 and m["PI"].base == 10_000  # L'/L
    assert m["NTK"].factor == 8 and m["NTK"].scaled_base(128) == pytest.approx(10_000 * 8 ** (128 / 126))
    assert m["dynamic NTK"].factor == 8 and m["dynamic NTK"].original_max_position_embeddings == 4096
    y = m["YaRN"]
    assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow) == (8, 4096, 32, 1)
    assert y.attention_factor == pytest.approx(0.1 * math.log(8) + 1)
    ll = m["Llama 3"]
    assert (ll.factor, ll.low_freq_factor, ll.high_freq_factor, ll.original_max_position_embeddings) == (8, 1, 4, 4096)


def test_abf_bound_candidate_is_the_men_et_al_lower_bound(paper):
    base = _by_label(paper)["ABF bound"][0].base
    exact = analysis.base_lower_bound(32768, 128)
    assert exact <= base <= exact * 1.01 and analysis.bound_holds(base, 32768, 128)
    assert 6.0e5 < exact < 6.6e5  # Men et al. report 6.4e5 for 32k at d = 128


def test_diagnostics_are_the_closed_forms(paper):
    rows = _by_label(paper)
    abf, g = rows["ABF paper"]
    assert g.score_at_target == pytest.approx(analysis.attention_decay("abf:base=500000", [32768], 128)[0])
    assert g.granularity == pytest.approx(analysis.granularity_sum("ABF", 50) / 64)  # beta = 500,000 / 10,000
    _, g_pi = rows["PI"]
    assert g_pi.granularity == pytest.approx(analysis.granularity_sum("PI", 1 / 8) / 64)
    theta = 10_000.0 ** (-np.arange(0, 128, 2) / 128)
    _, g_rope = rows["native"]
    assert g_rope.full_periods_trained == int((2 * np.pi / theta <= 4096).sum())
    assert g_rope.full_periods_target == int((2 * np.pi / theta <= 32768).sum())
    assert not g_rope.bound_ok and rows["ABF bound"][1].bound_ok
    dyn, g_dyn = rows["dynamic NTK"]  # frequencies at L'
    inv = dyn.inv_freq64(128, 32768).numpy()
    assert g_dyn.granularity == pytest.approx(np.sin(inv).mean())
    assert paper.advised_candidate.label != "native"


@pytest.mark.parametrize("head_dim,length", [(16, 256), (32, 512), (64, 512)])
def test_base_lower_bound_matches_a_dense_scan(head_dim, length):
    """The condition is not monotone in the base; the grid search must find the first passing base that
    a dense scan (1,000 points a decade) finds, to the search's tolerance."""
    found = analysis.base_lower_bound(length, head_dim)
    assert analysis.bound_holds(found, length, head_dim)
    dense = np.geomspace(10, found * 1.01, int(1000 * math.log10(found * 1.01 / 10)))
    first = next(b for b in dense if analysis.bound_holds(float(b), length, head_dim))
    assert found / (1 + 1e-3) <= first * (1 + 1e-9) and first <= found * (1 + 1e-9) + found * 1e-3


def test_the_condition_is_not_monotone_in_the_base():
    """Why bisection was wrong: at d = 64, L = 8192 a passing base has failing bases just above it."""
    b = analysis.base_lower_bound(8192, 64)
    above = np.geomspace(b, 2 * b, 200)
    assert not all(analysis.bound_holds(float(x), 8192, 64) for x in above)


def test_advise_cli_table_and_figure(tmp_path, capsys):
    png = tmp_path / "advice.png"
    argv = ["advise", "--head-dim", "64", "--base", "10000", "--trained-length", "1024", "--target-length", "4096"]
    assert main([*argv, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "pi:base=10000,factor=4" in out and "* advised" in out and "Men et al. 2024" in out
    assert png.is_file() and (tmp_path / "advice_decay.csv").read_text().startswith("distance,rope:base=10000,")


def test_advise_plot_never_replaces_a_csv_it_did_not_write(tmp_path, capsys):
    theirs = tmp_path / "results.csv"
    theirs.write_text("model,accuracy\nllama,0.5\n")
    argv = ["advise", "--head-dim", "64", "--base", "10000", "--trained-length", "1024", "--target-length", "4096"]
    assert main([*argv, "--plot", str(tmp_path / "results.png")]) == 0
    assert theirs.read_text() == "model,accuracy\nllama,0.5\n"  # the curves went to results_decay.csv
    (tmp_path / "other_decay.csv").write_text("model,accuracy\n")
    assert main([*argv, "--plot", str(tmp_path / "other.png")]) == 2
    assert "holds no decay curves" in capsys.readouterr().err
    assert (tmp_path / "other_decay.csv").read_text() == "model,accuracy\n"


@pytest.mark.parametrize(
    "argv,word",
    [
        (["advise", "--target-length", "4096"], "--head-dim"),
        (["advise", "--head-dim", "64", "--base", "1e4", "--trained-length", "4096", "--target-length", "2048"],
         "target length"),
        (["advise", "--head-dim", "63", "--base", "1e4", "--trained-length", "1024", "--target-length", "2048"],
         "head dim"),
        (["advise", "--head-dim", "100000000", "--base", "1e4", "--trained-length", "1024", "--target-length", "2048"],
         "head dim must be an even integer in (2, 1024]"),  # was an out-of-memory kill
        (["advise", "--head-dim", "64", "--base", "1e4", "--trained-length", "1024", "--target-length", "1000000000"],
         "and <= 1048576"),
    ],
)  # fmt: skip
def test_advise_cli_bad_inputs(argv, word, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert word in err and len(err.strip().splitlines()) == 1


def test_advise_reads_the_model(capsys):
    """--model: head dim, rope_theta and trained length come from the model's config."""
    from ropekit.models import load_model

    config = load_model("tiny:llama").config
    assert main(["advise", "--model", "tiny:llama", "--target-length", str(4 * config.max_position_embeddings)]) == 0
    out = capsys.readouterr().out
    assert f"trained at L = {config.max_position_embeddings}," in out and "factor=4" in out


def test_advise_reads_a_saved_model_s_config_without_its_weights(tmp_path, capsys):
    """A saved ABF model: advise starts from its patched base (config.ropekit), as load_model would."""
    from ropekit import patch
    from ropekit.hf import read_method
    from ropekit.models import load_config, load_model

    model = load_model("tiny:llama")
    patch(model, "abf:base=250000")
    model.save_pretrained(tmp_path)
    assert read_method(load_config(str(tmp_path))).base == read_method(load_model(str(tmp_path)).config).base == 250000
    L = model.config.max_position_embeddings
    assert main(["advise", "--model", str(tmp_path), "--target-length", str(4 * L)]) == 0
    assert f"base 250000, trained at L = {L}," in capsys.readouterr().out
