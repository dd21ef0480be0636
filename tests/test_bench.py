"""The kernel benchmark runs end to end (on CPU: the torch providers on tiny shapes) and records provenance."""

from ropekit.studies import bench


def test_benchmark_smoke_rows_have_times_bandwidth_and_provenance(tmp_path):
    logs = []
    rows = bench.run_benchmark(bench.SMOKE_SHAPES[:1], ops=("fwd", "fwd+bwd"), log=logs.append)
    providers = {r["provider"] for r in rows}
    assert {"copy", "hf-eager", "hf-eager+table", "torch-compile"} <= providers
    assert any("ropekit-triton" in line and "skipped" in line for line in logs) or "ropekit-triton" in providers
    for r in rows:
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["gb_per_s"] > 0
        assert r["device"] and r["git_sha"] and "torch" in r["versions"]
    hf = next(r for r in rows if r["provider"] == "hf-eager" and r["op"] == "fwd+bwd")
    shape = bench.SMOKE_SHAPES[0]
    table = 2 * shape.T * shape.D * 4
    assert hf["bytes"] == 2 * (2 * shape.qk_bytes() + table)  # q, k read and written (twice for fwd+bwd) + table
    from ropekit.results import append_rows, read_rows
    from ropekit.studies.bench import draw_bench

    append_rows(tmp_path / "b.csv", bench.result_rows(rows))  # the one result-row format, one value per row
    stored = read_rows(tmp_path / "b.csv")
    assert len(stored) == 5 * len(rows)
    p50 = next(r for r in stored if r["variant"] == f"hf-eager @ {str(shape).replace(f'T={shape.T},', '')}"
               and r["metric"] == "fwd+bwd ms_p50")  # fmt: skip
    assert float(p50["value"]) == hf["ms_p50"] and p50["context_length"] == str(shape.T)
    assert draw_bench(tmp_path / "b.csv", tmp_path / "b.png").stat().st_size > 1000


def test_the_sdpa_recorder_sees_the_backend_and_a_materialised_mask():
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, 2, 64, 16)
    recorder = bench._SDPARecorder()
    with recorder.watching():
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert recorder.backends == {"flash_attention"} and recorder.mask_bytes == 0  # linear in T: no scores kept
    with recorder.watching():  # the negative controls: a (T x T) mask, and values the fused kernel refuses
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(64, 64, dtype=torch.bool).tril())
        F.scaled_dot_product_attention(q, q, torch.randn(1, 2, 64, 8), is_causal=True)  # v narrower than q, k
    assert recorder.mask_bytes == 64 * 64 and "math" in recorder.backends
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention  # put back


def test_a_training_step_reports_its_attention_backend_and_the_trainers_optimizer():
    got = bench.measure_train_step("micro", 128, "ropekit-train", steps=1)
    assert got["sdpa_backends"] == ["flash_attention"] and got["attention_mask_gb"] == 0.0
    assert got["peak_gb"] >= got["baseline_gb"] > 0 and got["params"] > 0


def test_memory_growth_says_when_memory_grows_faster_than_the_length():
    from ropekit.results import make_row

    prov = {"git_sha": "x", "device": "cpu", "versions": "{}", "timestamp": "t"}

    def rows(peaks):
        return [make_row(experiment="train_step", variant="ropekit-train @ micro", metric="peak_mem_gb",
                         context_length=T, value=v, n=1, seed=0, config={"sdpa_backends": ["flash_attention"]},
                         prov=prov) for T, v in peaks.items()]  # fmt: skip

    (linear,) = bench.memory_growth(rows({1024: 1.0, 4096: 3.5}))
    assert "at most linear" in linear and "flash_attention" in linear and "x3.50 for length x4" in linear
    (quadratic,) = bench.memory_growth(rows({1024: 1.0, 4096: 16.0}))
    assert "faster than linear" in quadratic
    newer = rows({1024: 2.0})  # a later commit measured only the shortest length
    for r in newer:
        r.update(git_sha="y", timestamp="u")
    (one_commit,) = bench.memory_growth(rows({1024: 1.0, 4096: 3.5}) + newer)  # never 2.0 at 1,024 and 3.5 at 4,096
    assert one_commit.startswith("- `ropekit-train` on `micro` at x: 1,024: 1.00 GB, 4,096: 3.50 GB;")
    assert bench.memory_growth(newer) == []  # one length: no growth


def test_a_cpu_step_under_a_fixed_mmap_threshold_is_recorded_and_shown_beside_the_default(tmp_path):
    import json

    from ropekit.results import make_row

    got = bench._measure_in_child("micro", 64, "ropekit-train", 1, mmap_mib=1)  # the process ran under it
    assert got["mmap_threshold"] == 2**20 and got["sdpa_backends"] == ["flash_attention"]
    assert got["release_cpu_memory"]  # as the trainer on a CPU
    prov = {"git_sha": "x", "device": "cpu", "versions": "{}", "timestamp": "t"}

    def rows(threshold, peaks, speed):
        config = {"sdpa_backends": ["flash_attention"], "malloc_mmap_threshold": threshold}
        metrics = lambda T, m: {"peak_mem_gb": m, "tokens_per_s": speed, "peak_over_static": m / 0.5}  # noqa: E731
        return [make_row(experiment="train_step", variant="ropekit-train @ micro", metric=metric, context_length=T,
                         value=v, n=1, seed=0, config=config, prov=prov)
                for T, m in peaks.items() for metric, v in metrics(T, m).items()]  # fmt: skip

    both = rows(None, {1024: 2.0, 4096: 5.0}, 100.0) + rows(2**20, {1024: 0.6, 4096: 1.2}, 80.0)
    assert json.loads(both[-1]["config"])["malloc_mmap_threshold"] == 2**20
    table = bench.allocator_table(both)
    assert table[2:] == [
        "| micro | 1,024 | ropekit-train | glibc default, freed pages released at every layer (the trainer's) | 100 | "
        "2.00 | 4.00 |",
        "| micro | 1,024 | ropekit-train | mmap >= 1 MiB | 80 | 0.60 | 1.20 |",
        "| micro | 4,096 | ropekit-train | glibc default, freed pages released at every layer (the trainer's) | 100 | "
        "5.00 | 10.00 |",
        "| micro | 4,096 | ropekit-train | mmap >= 1 MiB | 80 | 1.20 | 2.40 |",
    ]
    growth = bench.memory_growth(both)  # one line per allocator: the rows are not mixed
    mmap = "(mmap >= 1 MiB)` on `micro` at x: 1,024: 0.60 GB, 4,096: 1.20 GB"
    assert len(growth) == 2 and any(mmap in g for g in growth)
    assert bench.allocator_table(rows(None, {1024: 2.0}, 1.0)) == []  # nothing to compare: no table
    main = bench.train_step_table(both)  # the main table holds the default allocator's rows
    assert "| micro | 1,024 |" in main[2] and "2.00 |" in main[2] and len(main) == 4


def test_a_cpu_row_of_ropekit_train_without_the_trainers_release_is_labelled_so():
    cpu = {"memory": "resident high-water mark of a fresh process"}
    assert bench.provider_label("ropekit-train", {**cpu, "release_cpu_memory": True}) == "ropekit-train"
    assert bench.provider_label("ropekit-train", cpu) == "ropekit-train (no release per layer)"  # rows before it
    assert bench.provider_label("hf", cpu) == "hf"  # HF's step is measured as HF runs it
    assert bench.provider_label("ropekit-train", {"memory": "CUDA allocator peak"}) == "ropekit-train"


def test_keep_freed_pages_measures_ropekit_train_without_the_per_layer_release(monkeypatch):
    from ropekit import parallel

    calls = []
    monkeypatch.setattr(parallel, "release_freed_memory", lambda: calls.append(1))
    kept = bench.measure_train_step("micro", 32, "ropekit-train", steps=1, release_cpu_memory=False)
    assert not kept["release_cpu_memory"] and calls == []
    released = bench.measure_train_step("micro", 32, "ropekit-train", steps=1)  # the trainer's default
    layers = bench.TRAIN_STEP_MODELS["micro"]["num_hidden_layers"]
    assert released["release_cpu_memory"] and len(calls) >= 2 * layers  # before each forward, after each backward


def test_the_cli_passes_keep_freed_pages_to_the_measurement(monkeypatch):
    from ropekit.cli import main

    seen = []
    monkeypatch.setattr(bench, "run_train_step", lambda *a, **kw: seen.append(kw["release_cpu_memory"]) or [])
    argv = ["bench", "--train-step", "--models", "micro", "--lengths", "64"]
    assert main(argv) == 0 and main([*argv, "--keep-freed-pages"]) == 0
    assert seen == [True, False]


def _step_rows(release, stamp, speed, peak, sha="abc1234def", provider="ropekit-train"):
    """The tokens/s and peak rows of one CPU train-step run (one bench call: its timestamp)."""
    from ropekit.results import make_row

    prov = {"git_sha": sha, "device": "cpu", "versions": "{}", "timestamp": stamp}
    config = {"memory": "resident high-water mark of a fresh process", "release_cpu_memory": release}
    return [make_row(experiment="train_step", variant=f"{provider} @ micro", metric=metric, context_length=64,
                     value=v, n=1, seed=0, config=config, prov=prov)
            for metric, v in (("tokens_per_s", speed), ("peak_mem_gb", peak))]  # fmt: skip


def test_the_train_step_table_names_the_commit_of_each_providers_cells_when_they_differ():
    run = _step_rows
    one = run(True, "t1", 100, 1.0) + run(True, "t1", 50, 4.0, provider="hf")
    assert bench.train_step_table(one)[2] == "| micro | 64 | 50, –, 100 | –, – | 4.00, –, 1.00 | – | – | abc1234 |"
    two = run(True, "t1", 100, 1.0) + run(True, "t0", 50, 4.0, sha="fff0000aaa", provider="hf")
    assert bench.train_step_table(two)[2].endswith("| fff0000 (hf), abc1234 (ropekit loss) |")


def test_repeated_runs_at_one_commit_are_listed_run_by_run_and_paired_in_order():
    run = _step_rows
    rows = (
        run(True, "t1", 100, 1.0) + run(False, "t2", 90, 2.0) + run(True, "t3", 120, 1.0) + run(False, "t4", 132, 1.5)
    )
    table = bench.repeated_runs(rows)
    released = "glibc default, freed pages released at every layer (the trainer's)"
    assert table[2] == f"| micro | 64 | abc1234 | ropekit-train | {released} | 100, 120 | 1.00, 1.00 |"
    assert table[3] == "| micro | 64 | abc1234 | ropekit-train | no release per layer | 90, 132 | 2.00, 1.50 |"
    paired = table[-1]  # calls of their own, as often each: the i-th run against the i-th
    assert "paired in the order they ran (separate calls): tokens/s x0.90, 1.10, mean difference +1 tok/s " \
           "(95% paired bootstrap -10 to +12)" in paired  # fmt: skip
    assert "peak x2.00, 1.50, mean difference +0.75 GB" in paired and paired.count("not resolved (2 pairs; 5") == 2
    five = [
        r for i in range(5) for r in run(True, f"u{2 * i}", 100 + i, 1.0) + run(False, f"u{2 * i + 1}", 110 + i, 1.0)
    ]
    assert "+10 tok/s (95% paired bootstrap +10 to +10): resolved;" in bench.repeated_runs(five)[-1]
    assert bench.repeated_runs(rows[:6]) == []  # one run of a way: nothing to pair
    b = "fff0000aaa"
    two_commits = (
        run(True, "t1", 100, 1.0) + run(False, "t2", 90, 2.0, b) + run(True, "t3", 1, 1) + run(False, "t4", 1, 1, b)
    )
    assert bench.repeated_runs(two_commits) == []  # runs at two commits are never paired


def test_the_trainers_repeated_runs_are_paired_against_hfs_and_a_way_against_the_trainers():
    run = _step_rows
    rows = []
    for i in range(5):  # one call per pair runs both providers (one timestamp); the keep runs in calls of their own
        stamp = f"t{i}"
        rows += run(True, stamp, 100 + i, 1.0) + run(True, stamp, 95 + i, 4.0, provider="hf")
        rows += run(False, f"k{i}", 99 + i, 2.0)
    table = bench.repeated_runs(rows)
    assert [line.split(" | ")[3:5] for line in table[2:5]] == [
        ["hf", "glibc default"],
        ["ropekit-train", "glibc default, freed pages released at every layer (the trainer's)"],
        ["ropekit-train", "no release per layer"],
    ]
    pairs = [line for line in table if line.startswith("- ")]
    assert len(pairs) == 2
    assert "`ropekit-train` against `hf`, paired by call: tokens/s x1.05, 1.05, 1.05, 1.05, 1.05" in pairs[0]
    assert "mean difference +5 tok/s (95% paired bootstrap +5 to +5): resolved;" in pairs[0]
    assert "peak x0.25, 0.25, 0.25, 0.25, 0.25, mean difference -3.00 GB" in pairs[0]
    assert "`ropekit-train (no release per layer)` against `ropekit-train`, paired in the order" in pairs[1]
    assert "mean difference -1 tok/s (95% paired bootstrap -1 to -1): resolved" in pairs[1]


def test_the_paired_speed_ratio_is_taken_run_by_run_at_the_newest_commit_that_repeated_both():
    run = _step_rows
    old = [r for i in range(2) for r in run(True, f"a{i}", 50, 1.0, "old") + run(True, f"a{i}", 100, 4.0, "old", "hf")]
    new = [r for i, (ours, hf) in enumerate(((90, 100), (110, 100), (100, 125)))
           for r in run(True, f"b{i}", ours, 1.0, "new") + run(True, f"b{i}", hf, 4.0, "new", "hf")]  # fmt: skip
    got = bench.paired_speed_ratio(old + new, "micro", 64)
    assert got["commit"] == "new" and got["ratios"] == [0.9, 1.1, 0.8]
    assert abs(got["mean"] - 0.9333333) < 1e-6 and got["low"] <= got["mean"] <= got["high"]
    assert bench.paired_speed_ratio(old, "micro", 64)["ratios"] == [0.5, 0.5]
    assert bench.paired_speed_ratio(old[:4], "micro", 64) is None  # one run of each: no pairs
    assert bench.paired_speed_ratio(old, "micro", 128) is None


def test_runs_are_paired_by_call_and_a_run_without_its_partner_never_shifts_the_pairs():
    run = _step_rows
    calls = [(100, 50), (110, 55), (120, 60)]  # (ours, hf) of three calls that ran both: x2.00 each
    rows = [r for i, (a, b) in enumerate(calls)
            for r in run(True, f"t{i}", a, 1.0) + run(True, f"t{i}", b, 4.0, provider="hf")]  # fmt: skip
    lonely = run(True, "t0b", 999, 1.0, provider="hf")  # a call whose trainer's run failed (no row): HF's alone
    got = bench.paired_speed_ratio(rows[:4] + lonely + rows[4:], "micro", 64)
    assert got["ratios"] == [2.0, 2.0, 2.0]  # in order: x2.00, 0.11, 2.18 (shifted by one)
    assert got["paired"] == "paired by call; 1 run without a partner in its call left out"
    line = bench.repeated_runs(rows + lonely)[-1]
    assert "paired by call; 1 run without a partner in its call left out: tokens/s x2.00, 2.00, 2.00," in line


def test_runs_of_separate_calls_are_not_paired_when_their_counts_differ():
    run = _step_rows
    rows = run(True, "t1", 100, 1.0) + run(False, "t2", 90, 2.0) + run(True, "t3", 120, 1.0)
    rows += run(False, "t4", 132, 1.5) + run(False, "t5", 95, 1.5)  # three runs without release, two with
    assert bench.repeated_runs(rows)[-1] == (
        "- `micro` at 64 (commit abc1234), `ropekit-train (no release per layer)` against `ropekit-train`: "
        "not paired: 3 and 2 runs in separate calls."
    )
    one = run(True, "t1", 100, 1.0) + run(True, "t1", 50, 1.0, provider="hf")
    one += run(True, "t2", 100, 1.0) + run(True, "t3", 50, 1.0, provider="hf")  # one shared call, one alone each
    assert bench.repeated_runs(one)[-1].endswith(
        "paired by call; 2 runs without a partner in its call left out (one pair: no interval)."
    )
    assert bench.paired_speed_ratio(one, "micro", 64) is None


def _training_page():
    """experiments/train_memory.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "train_memory.py"
    spec = importlib.util.spec_from_file_location("train_memory", path)
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    return page


def test_the_training_pages_speed_goal_is_decided_by_the_paired_interval():
    page = _training_page()

    def verdict(ratios, low, high, memory_met=True):
        mean = sum(ratios) / len(ratios)
        paired = {"commit": "abc1234def", "ratios": ratios, "paired": "paired by call", "mean": mean, "low": low,
                  "high": high}  # fmt: skip
        return page._paired_verdict(paired, memory_met)

    five = [1.0] * 5
    assert verdict(five, 0.95, 1.05)[0] == "met"
    assert verdict(five, 0.95, 1.05)[1] == "at 1.00x HF's tokens/s (the mean of 5 paired runs at abc1234, " \
                                           "paired by call; 95% bootstrap 0.95x to 1.05x)"  # fmt: skip
    assert verdict(five, 0.8, 0.89)[0] == "not met"
    assert verdict(five, 0.85, 0.95)[0] == "undecided (the interval holds 0.9x)"
    assert verdict([1.0] * 4, 0.95, 1.05)[0] == "undecided (4 pairs; 5 needed)"
    assert verdict(five, 0.95, 1.05, memory_met=False)[0] == "not met"


def test_the_training_pages_peak_against_hfs_names_the_commits_when_they_differ():
    page = _training_page()

    def values(hf_commit):
        return {
            ("micro", 64, "hf"): {"peak_mem_gb": 4.0, "tokens_per_s": 100.0, "commit": hf_commit},
            ("micro", 64, "ropekit-train"): {"peak_mem_gb": 1.0, "tokens_per_s": 150.0, "commit": "abc1234def"},
        }

    same = page._versus_hf(values("abc1234def"), {("micro", 64, "abc1234def"): 100.0})
    assert same == ["- `micro` at 64: ropekit's step peaks at 1.00 GB against 4.00 GB for HF's loss (0.25x), "
                    "at 1.50x its tokens/s."]  # fmt: skip
    (mixed,) = page._versus_hf(values("fff0000aaa"), {("micro", 64, "fff0000aaa"): 100.0})
    assert mixed.endswith("(0.25x), its tokens/s measured at another commit: no speed ratio (peaks from two commits: "
                          "ropekit's abc1234, HF's fff0000).")  # fmt: skip


def test_a_release_tried_past_a_growth_slack_is_labelled_so():
    cpu = {"memory": "resident high-water mark of a fresh process", "release_cpu_memory": True}
    assert (
        bench.provider_label("ropekit-train", {**cpu, "release_slack": 0.1})
        == "ropekit-train (release past 10% growth)"
    )
    assert bench._malloc_way("ropekit-train (release past 10% growth)", "ropekit-train") == "release past 10% growth"
