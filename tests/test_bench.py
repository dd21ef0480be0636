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
