"""The prepared GPU run: its dry run on this CPU writes every stage's rows; its report and the GPU block of
docs/kernel.md are generated from the committed rows; the training-step FLOPs match a count of the model's own
matmuls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ropekit.results import read_rows
from ropekit.studies.ablation import CONTROL
from ropekit.studies.bench import TRAIN_STEP_MODELS, model_flops_per_step

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_rows_of_every_stage_in_eight_files_or_fewer(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "ROPEKIT_GIT_SHA"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # python3 is this interpreter
    result = subprocess.run(["bash", "experiments/device/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stages = {}
    for r in read_rows(out / "stages.csv"):
        stages.setdefault(r["variant"], {})[r["metric"]] = float(r["value"])
    log = (out / "log.txt").read_text()
    assert set(stages) == {"a", "b", "c", "d"}
    assert all(s["exit_status"] == 0 for s in stages.values()), (stages, log[-3000:])
    tests = read_rows(out / "gpu_tests.csv")
    summary = {r["metric"]: float(r["value"]) for r in tests if r["variant"] == "all"}
    assert summary["passed"] >= 1 and summary["failed"] == 0  # the interpreter test ran; the GPU ones skip here
    bench = read_rows(out / "bench_rope.csv")
    assert {r["variant"].split(" @ ")[0] for r in bench} >= {"copy", "ropekit-triton", "hf-eager"}
    train = read_rows(out / "train_step.csv")
    assert {(r["variant"], int(r["context_length"])) for r in train} == {
        (f"{p} @ micro", T) for p in ("hf", "ropekit-patch", "ropekit-train") for T in (64, 256)
    }
    assert all(float(r["value"]) > 0 for r in train if r["metric"] == "tokens_per_s")
    demo = read_rows(out / "demo_results.csv")
    assert CONTROL in {r["variant"] for r in demo}  # the demo's controls landed
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and not any(name.endswith(".lock") for name in files), files  # the device returns 8
    # every row names its provenance
    for rows in (tests, bench, train):
        assert all(r["device"] and r["git_sha"] and json.loads(r["versions"])["torch"] for r in rows)


def test_git_sha_of_a_tree_without_git_comes_from_the_environment(tmp_path):
    code = "from ropekit.results import provenance; print(provenance()['git_sha'])"
    env = {**os.environ, "ROPEKIT_GIT_SHA": "0123456789ab", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "0123456789ab"


def test_gpu_report_and_kernel_page_block_are_generated_from_the_committed_rows():
    result = subprocess.run([sys.executable, "experiments/device/gpu_report.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["micro", "smollm2-135m"])
def test_train_step_flops_count_every_matmul_of_the_model(name):
    from transformers import AutoModelForCausalLM

    from ropekit.models import tiny_config

    shape = dict(TRAIN_STEP_MODELS[name])
    if name != "micro":  # the full SmolLM2 shape, thinned to 2 layers: the count is per layer
        shape["num_hidden_layers"] = 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", **shape))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    T = 1000
    q_width = shape["num_attention_heads"] * (shape["hidden_size"] // shape["num_attention_heads"])
    want = 6 * linear * T + 6 * shape["num_hidden_layers"] * q_width * T * T
    assert model_flops_per_step(shape, T) == want


def test_train_step_refuses_an_unknown_model_before_any_work():
    command = [sys.executable, "-m", "ropekit.cli", "bench", "--train-step", "--models", "micro,nope"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "ropekit: error: unknown train-step model 'nope'; accepted: smollm2-135m, llama-1b, vocab49k-256, micro"
    ]
