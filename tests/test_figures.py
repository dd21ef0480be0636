"""Analytic curves against closed forms; figures render from CSVs; the ablation's plumbing on the micro preset."""

import math

import numpy as np
import pytest

from ropekit import analysis, figures
from ropekit.results import make_row, read_rows
from ropekit.studies.ablation import PRESETS, plan, run, with_data


@pytest.mark.parametrize("name,spec", list(analysis.PAPER_VARIANTS.items()))
def test_attention_decay_intercept_is_d_over_sqrt_d(name, spec):
    assert analysis.attention_decay(spec, np.array([0]))[0] == pytest.approx(128 / math.sqrt(128))  # 11.31


def test_attention_decay_matches_the_papers_reading():
    far = np.arange(20_000, 30_001, 50)
    rope = np.abs(analysis.attention_decay("rope:base=10000", far)).mean()
    abf = analysis.attention_decay("abf:base=500000", np.array([10_000]))[0]
    xpos = analysis.attention_decay("xpos:base=500000,scale_base=512", far)
    assert rope < 1.5  # RoPE oscillates around 0 at long range
    assert 2 <= abf <= 4  # ABF stays around 2-4 (paper: decays much more slowly)
    assert np.abs(np.diff(xpos)).mean() < np.abs(np.diff(analysis.attention_decay("abf:base=500000", far))).mean()


def test_xpos_envelope_is_zeta_to_the_distance_over_the_scale_base():
    """zeta_j = (2j/d + 0.4) / 1.4: the fastest pair (j = 0) and the slowest (j = d/2 - 1) at D / B."""
    for d, B, D in ((32, 32, 2048), (32, 128, 2048), (128, 512, 32768)):
        low, high = analysis.xpos_envelope(f"xpos:base=31250,scale_base={B}", D, d)
        assert low == pytest.approx((0.4 / 1.4) ** (D / B), rel=1e-9)
        assert high == pytest.approx((((d - 2) / d + 0.4) / 1.4) ** (D / B), rel=1e-9)
    # a head of 32 at 2,048 / 32 keeps 5% of its slowest pair; the paper's head of 128 at 32,768 / 512 about half
    assert analysis.xpos_envelope("xpos:base=31250,scale_base=32", 2048, 32)[1] == pytest.approx(0.054, abs=1e-3)
    assert analysis.xpos_envelope("xpos:base=500000,scale_base=512", 32768, 128)[1] == pytest.approx(0.488, abs=1e-3)
    assert analysis.xpos_envelope("abf:base=31250", 2048, 32) == (1.0, 1.0)


def test_granularity_matches_the_papers_numbers():
    # paper: b = 10,000, beta = 50, alpha = 1/4 -> C_ABF ~ 0.076, C_PI ~ 0.027 (per pair; finite sums 0.079, 0.029)
    assert analysis.granularity_limit("ABF", 50) == pytest.approx(0.076, abs=0.001)
    assert analysis.granularity_limit("PI", 0.25) == pytest.approx(0.027, abs=0.001)
    assert analysis.granularity_sum("ABF", 50) / 64 == pytest.approx(0.079, abs=0.001)
    assert analysis.granularity_sum("PI", 0.25) / 64 == pytest.approx(0.029, abs=0.001)
    # closed form of the finite sum for small angles: sum_j sin(w_j) with w_j = alpha b^(-2j/d)
    j = np.arange(64)
    assert analysis.granularity_sum("PI", 0.01) == pytest.approx((0.01 * 1e4 ** (-j / 64)).sum(), rel=1e-4)


def test_base_lower_bound_brackets_the_condition():
    b = analysis.base_lower_bound(2048, 64)
    assert analysis.bound_holds(b, 2048, 64) and not analysis.bound_holds(b * 0.99, 2048, 64)
    assert analysis.base_lower_bound(8192, 64) > b  # longer contexts need larger bases


def test_helix_shapes():
    t = np.arange(11)
    rope, pi, abf = (analysis.helix(k, t) for k in ("RoPE", "RoPE+PI", "RoPE+ABF"))
    step = lambda h: np.linalg.norm(np.diff(h[:, :2], axis=0), axis=1).mean()  # noqa: E731
    assert step(pi) < step(rope) / 3 and step(abf) == pytest.approx(step(rope))


def test_analytic_figures_render_with_their_csvs(tmp_path):
    written = figures.draw_analytic(tmp_path, bound_lengths=(1024, 2048))  # short lengths keep the test fast
    names = {p.name for p in written}
    for stem in ("fig4_attention_decay", "fig8_helix", "theorem1_granularity", "base_lower_bound"):
        assert f"{stem}.png" in names and f"{stem}.csv" in names
        assert (tmp_path / f"{stem}.png").stat().st_size > 10_000


def test_result_figures_and_table_render_from_a_csv(tmp_path):
    from ropekit.results import append_rows

    prov = {"git_sha": "x", "device": "cpu", "versions": "{}", "timestamp": "t"}
    rows = []
    for variant, shift in (("rope:base=10000", 0.5), ("abf:base=500000", 0.0)):
        for L in (256, 512, 1024):
            for metric, value in (("ppl", 10 + shift + L / 1000), ("ppl_low", 9.5), ("ppl_high", 11),
                                  ("fsr_target_nll", 3 - shift), ("fsr_rouge_l", 50 * shift)):  # fmt: skip
                rows.append(make_row(experiment="t", variant=variant, metric=metric, context_length=L, value=value,
                                     n=2, seed=0, prov=prov))  # fmt: skip
        for L in (256, 512, 1024):  # per-position loss at several windows: the figure must not mix them
            for position in range(1, L, 128):
                rows.append(make_row(experiment="t", variant=variant, metric="position_loss", context_length=L,
                                     position=position, value=4.0 + L / 1000, n=2, seed=0, prov=prov))  # fmt: skip
    append_rows(tmp_path / "r.csv", rows)
    written = figures.draw_results(tmp_path / "r.csv", tmp_path / "figs")
    assert {p.name for p in written} >= {"t_fsr.png", "t_ppl.png", "t_position_loss.png", "t_ppl.csv"}
    assert len(read_rows(tmp_path / "figs" / "t_ppl.csv")) == 2 * 3 * 3  # the rows the PPL figure was drawn from
    drawn = read_rows(tmp_path / "figs" / "t_position_loss.csv")
    assert {r["context_length"] for r in drawn} == {"1024"}  # one window: one curve per variant
    assert sorted(int(r["position"]) for r in drawn if r["variant"] == "rope:base=10000") == list(range(1, 1024, 128))
    table = figures.table5(tmp_path / "r.csv", 1024)
    assert "| RoPE ABF (abf:base=500000) | **11.024** |" in table and "RoPE (rope:base=10000) | 11.524" in table
    with pytest.raises(ValueError, match="no ppl rows at length 4096"):
        figures.table5(tmp_path / "r.csv", 4096)


def test_rows_of_two_experiments_with_one_variant_are_two_lines_and_a_rerun_is_drawn_once(tmp_path):
    from ropekit.results import append_rows

    prov = {"git_sha": "x", "device": "cpu", "versions": "{}", "timestamp": "t"}

    def ppl(experiment, L, value):
        return make_row(experiment=experiment, variant="rope:base=10000", metric="ppl", context_length=L,
                        value=value, n=2, seed=0, prov=prov)  # fmt: skip

    rows = [ppl("base", L, 10.0) for L in (256, 512)] + [ppl("trained", L, 5.0) for L in (256, 512)]
    rows.append(ppl("trained", 512, 4.0))  # a rerun wrote the point again
    append_rows(tmp_path / "r.csv", rows)
    series = figures.series(read_rows(tmp_path / "r.csv"), "ppl")
    assert series == {"base: rope:base=10000": [(256, 10.0), (512, 10.0)],
                      "trained: rope:base=10000": [(256, 5.0), (512, 4.0)]}  # fmt: skip
    with pytest.warns(UserWarning, match="1 rows repeat a point"):
        written = figures.draw_results(tmp_path / "r.csv", tmp_path / "figs")
    assert {p.name for p in written} >= {"r_ppl.png"}  # named after the file, not after its first experiment
    with pytest.raises(ValueError, match="results file .*missing.csv' not found"):
        figures.draw_all(tmp_path / "figs", [tmp_path / "missing.csv"])
    with pytest.raises(ValueError, match="is a folder; pass a result CSV"):
        figures.draw_all(tmp_path / "figs", [tmp_path])


def test_demo_plumbing_on_the_micro_preset_and_resume(tmp_path):
    import json

    from ropekit.studies.ablation import CONTROL

    cfg = PRESETS["micro"]()
    logs = []
    result = run(cfg, tmp_path, log=logs.append)
    rows = read_rows(result["results"])
    assert {r["variant"] for r in rows} == {CONTROL, *cfg.variants}  # the controls' row and the four variants
    assert cfg.variants == ("rope:base=78.125", "pi:factor=8,base=78.125", "abf:base=3906.25",
                            "xpos:base=3906.25,scale_base=4")  # the paper's regime at L = 32  # fmt: skip
    # every variant is scored on the same samples (windows, prompts): the comparison is paired
    samples = {}
    for r in rows:
        key = (r["metric"], r["context_length"], r["position"])
        samples.setdefault(key, {}).setdefault(r["variant"], set()).add(json.loads(r["config"])["sample"])
    for key, by_variant in samples.items():
        assert len({frozenset(v) for v in by_variant.values()}) == 1 and len(by_variant) == 5, key
    assert {r["context_length"] for r in rows if r["metric"] == "position_nll"} == {"256"}  # the target length only
    summary = read_rows(result["summary"])
    deltas = {(r["variant"], r["context_length"]) for r in summary if r["metric"] == "delta:fsr_sample_token_accuracy"}
    assert deltas == {(v, n) for v in (CONTROL, *cfg.variants) if v != cfg.reference for n in ("64", "256")}
    table = (tmp_path / "table.md").read_text()
    assert "Negative control" in table and "(reference)" in table and "Δ" in table
    assert {p.rsplit("_", 1)[-1] for p in result["figures"]} == {"fsr.png", "ppl.png", "loss.png", "summary.csv"}
    assert set(result["times"]) >= {"data", "pretrain base", "eval base (controls)", "extend " + cfg.variants[0]}
    # a second run resumes: nothing is trained or evaluated again
    logs.clear()
    run(cfg, tmp_path, log=logs.append)
    assert sum("done earlier" in line for line in logs) == 1 + 1 + 2 * 4
    assert len(read_rows(result["results"])) == len(rows)
    from .conftest import held_by_another_process

    with held_by_another_process(tmp_path, "folder"):  # a second demo into a folder another one is writing
        with pytest.raises(ValueError, match="being written by another ropekit process"):
            run(cfg, tmp_path, log=logs.append)


def test_the_plan_prints_the_regime_derivation_and_the_controls():
    text = plan(PRESETS["tiny"]())
    assert "RoPE base 625 = 10,000 x 256 / 4096" in text and "scale base 32 = 512 x 256 / 4096" in text
    assert "controls: the base model as it is" in text and "paired differences to abf:base=31250" in text


def test_paper_preset_dry_run_plan():
    text = plan(PRESETS["paper"](), world_size=8)
    assert "20000 steps x 4,194,304 tokens" in text and "32768" in text and "~40 GB" in text
    assert "accumulation 16 x micro-batch 1 on 8 rank(s)" in text


def _shrunk(cfg, init_from=None):
    """A demo preset at micro size: its own pipeline and pretrain/base choice, one step per stage."""
    import dataclasses

    from ropekit.train import model_of

    def one_step(t, seq_len):
        return dataclasses.replace(t, model="tiny:llama", model_overrides=model_of("micro", seq_len),
                                   data="shakespeare", vocab_size=512, seq_len=seq_len, tokens_per_step=seq_len,
                                   micro_batch=1, steps=1,
                                   warmup_steps=0, eval_batches=1, device="cpu", fsdp=False, compile=False,
                                   activation_checkpointing=False, init_from=init_from,
                                   retrieval_share=t.retrieval_share if seq_len >= 128 else 0.0)  # fmt: skip

    return dataclasses.replace(cfg, base=one_step(cfg.base, 32), extend=one_step(cfg.extend, 128),
                               variants=cfg.variants[2:3], ppl_lengths=(64, 128), fsr_lengths=(128,), n_ppl=1,
                               n_fsr=1, bin_size=32, needs_gpu=False, seeds=(0,), arms=())  # fmt: skip


@pytest.mark.parametrize("name", ["tiny", "cpu", "small", "paper"])
def test_every_demo_preset_runs_its_pipeline_one_step_on_cpu(name, tmp_path):
    from ropekit.train import train

    init_from = None
    if not PRESETS[name]().pretrain_base:  # the paper starts from a released model: a saved micro one here
        base = _shrunk(PRESETS["tiny"]()).base
        init_from = train(base, tmp_path / "released")["final"]
    result = run(_shrunk(PRESETS[name](), init_from), tmp_path / "run", log=lambda *_: None)
    rows = read_rows(result["results"])
    assert {r["metric"] for r in rows} >= {"window_nll", "fsr_sample_token_accuracy", "position_nll"}
    assert {r["variant"] for r in rows} == {"base", PRESETS[name]().reference}


def test_the_demo_extends_the_shipped_base(tmp_path):
    """``ropekit demo`` starts from ropekit-tiny-256: its tokenizer, its weights, its controls (one step of
    one variant here, at the base's own length)."""
    import dataclasses

    cfg = PRESETS["tiny"]()
    assert cfg.extend.init_from == "ropekit-tiny-256" and not cfg.pretrain_base and cfg.trained_length == 256
    assert "ropekit-tiny-256, shipped with ropekit: 3300 steps x 4,096 tokens at 256 (rope:base=625)" in plan(cfg)
    extend = dataclasses.replace(cfg.extend, seq_len=256, steps=1, tokens_per_step=256, micro_batch=1,
                                 warmup_steps=0, eval_batches=1)  # fmt: skip
    cfg = dataclasses.replace(cfg, extend=extend, variants=cfg.variants[2:3], ppl_lengths=(256,), fsr_lengths=(128,),
                              n_ppl=1, n_fsr=4, bin_size=128, fsr_generate=False)  # fmt: skip
    rows = read_rows(run(cfg, tmp_path, log=lambda *_: None)["results"])
    control = [float(r["value"]) for r in rows if r["variant"] == "base" and r["metric"] == "fsr_sample_token_accuracy"]
    assert len(control) == 4 and sum(control) / 4 >= 0.6  # the shipped base retrieves at 128
    assert {r["variant"] for r in rows} == {"base", cfg.reference}


def test_an_ablation_folder_is_not_resumed_with_another_config(tmp_path):
    import dataclasses
    import json

    cfg = PRESETS["micro"]()
    (tmp_path / "ablation_config.json").write_text(
        json.dumps(dataclasses.asdict(with_data(cfg, "/some/books")), indent=1, default=str)
    )
    with pytest.raises(ValueError, match="holds another ablation .*base.data: '/some/books' -> 'shakespeare'"):
        run(cfg, tmp_path, log=lambda *_: None)


def test_a_saved_ablation_config_is_compared_by_value_with_new_settings_at_their_defaults():
    import dataclasses
    import json

    from ropekit.typed import config_differences

    cfg = PRESETS["cpu"]()
    saved = json.loads(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    assert config_differences(saved, cfg) == []
    older = {k: v for k, v in saved.items() if k != "controls"}  # a run from before the setting existed
    older["base"] = {k: v for k, v in saved["base"].items() if k != "retrieval_min_context"}
    assert config_differences(older, cfg) == []  # both hold their defaults: the same ablation
    changed = dataclasses.replace(cfg, controls=False, extend=dataclasses.replace(cfg.extend, steps=7))
    assert config_differences(older, changed) == ["extend.steps: 60 -> 7", "controls: (not set) -> False"]
    assert config_differences({**saved, "gone": 1}, cfg) == ["gone: 1 -> (no such setting now)"]


def test_a_setting_added_with_a_dataclass_default_is_equal_at_that_default():
    import dataclasses

    from ropekit.typed import config_differences

    @dataclasses.dataclass
    class Inner:
        a: int = 1

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        x: int = 0

    assert config_differences({"x": 0}, Outer()) == []  # saved before `inner` existed: it ran at its default
    assert config_differences({"x": 0}, Outer(inner=Inner(a=2))) == ["inner: (not set) -> {'a': 2}"]


def test_seeds_and_arms_pool_into_one_paired_summary_and_resume(tmp_path):
    """Each variant at two extension seeds, one variant at another budget and another setting: rows carry their
    seed and steps, the summary pools the seeds sample by sample, and each seed's difference is kept."""
    import dataclasses
    import json

    from ropekit.studies.ablation import CONTROL, budget_values, summarize

    micro = PRESETS["micro"]()
    pi, abf = micro.variants[1], micro.variants[2]
    cfg = dataclasses.replace(micro, variants=(pi, abf), seeds=(0, 3), arms=((pi, 4), (abf, 4), ("rope:base=99", 2)))
    assert cfg.extensions() == [(pi, 0, 2), (abf, 0, 2), (pi, 3, 2), (abf, 3, 2), (pi, 0, 4), (abf, 0, 4),
                                ("rope:base=99", 0, 2)]  # fmt: skip
    assert "seeds 0, 3" in plan(cfg) and "7 extension runs in all" in plan(cfg)
    result = run(cfg, tmp_path, log=lambda *_: None)
    rows = read_rows(result["results"])
    runs = {(r["variant"], r["seed"], cfg.steps_of(r)) for r in rows}
    assert runs == {(CONTROL, "0", 0), *((v, str(s), n) for v, s, n in cfg.extensions())}
    assert (tmp_path / "pi_factor_8_base_78.125_seed3").is_dir() and (tmp_path / "abf_base_3906.25_steps4").is_dir()
    # the seeds differ (data order), so pooling has something to pool
    acc = {(r["variant"], r["seed"], cfg.steps_of(r), json.loads(r["config"])["sample"], r["context_length"]):
           float(r["value"]) for r in rows if r["metric"] == "window_nll"}  # fmt: skip
    assert any(
        acc[(pi, "0", 2, k, L)] != acc[(pi, "3", 2, k, L)] for (v, s, n, k, L) in acc if (v, s, n) == (pi, "0", 2)
    )

    summary = summarize(result["results"], cfg)

    def one(variant, metric, steps=2, length="256"):
        found = [r for r in summary if (r["variant"], r["metric"], str(r["context_length"]), r["position"])
                 == (variant, metric, length, "") and cfg.steps_of(r) == steps]  # fmt: skip
        assert len(found) == 1, (variant, metric, steps, found)
        return found[0]

    def value(v, s, n=2, L="256", k=0):
        return acc[(v, str(s), n, k, L)]

    pooled = one(pi, "delta:window_nll")
    samples = {k for (v, s, n, k, L) in acc if (v, n, L) == (pi, 2, "256")}
    expect = sum((value(pi, 0, k=k) + value(pi, 3, k=k)) / 2 - (value(abf, 0, k=k) + value(abf, 3, k=k)) / 2
                 for k in samples) / len(samples)  # fmt: skip
    assert float(pooled["value"]) == pytest.approx(expect) and pooled["seed"] == -1
    assert json.loads(pooled["config"])["seeds"] == [0, 3]
    for s in (0, 3):  # each seed's own paired difference
        seed_row = [r for r in summary if r["metric"] == "seed_delta:window_nll" and r["variant"] == pi
                    and str(r["context_length"]) == "256" and r["seed"] == s and cfg.steps_of(r) == 2]  # fmt: skip
        own = sum(value(pi, s, k=k) - value(abf, s, k=k) for k in samples) / len(samples)
        assert len(seed_row) == 1 and float(seed_row[0]["value"]) == pytest.approx(own)
    # the other budget is compared with the reference at the same budget and one seed; the other setting with seed 0
    assert one(pi, "delta:window_nll", steps=4)["seed"] == 0
    assert json.loads(one("rope:base=99", "delta:window_nll")["config"])["seeds"] == [0]
    # the control has no seed: it is paired with the reference pooled over both
    assert json.loads(one(CONTROL, "delta:window_nll", steps=0)["config"])["seeds"] == [0, 3]
    curve = budget_values(summary, cfg, "window_nll", 256)
    assert [p[0] for p in curve[pi]] == [0, 2, 4] and set(curve) == {pi, abf}
    table = (tmp_path / "table.md").read_text()
    assert "Extension seeds 0, 3" in table and "(seeds " in table and "Extension budget" in table
    assert "| RoPE (rope:base=99) |" in table  # the other setting is a row of the table
    assert any(p.endswith("_budget.png") for p in result["figures"])
    # resuming does nothing again; a run with more seeds or arms extends the same folder
    logs = []
    run(cfg, tmp_path, log=logs.append)
    assert sum("done earlier" in line for line in logs) == 1 + 1 + 2 * 7  # base, controls, 7 runs
    more = dataclasses.replace(cfg, arms=cfg.arms[:2])
    run(more, tmp_path, log=lambda *_: None)
    assert len(read_rows(result["results"])) == len(rows)
