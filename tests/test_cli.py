"""A user's mistake, on any command: exit status 2 and one line naming the bad value, no traceback."""

import sys

import pytest

from ropekit.cli import main

CASES = [
    (["info", "pi:factor=8", "--base", "10000", "--head-dim", "7"], "head_dim must be a positive even integer"),
    (["info", "pi:factor=8"], "no 'base' given"),
    (["info", "yarn:factor=2"], "original_max_position_embeddings' is required"),
    (["check", "--model", "tiny:nope"], "unknown tiny model 'nope'"),
    (["check", "--model", "/no/such/model"], "not found"),
    (["check", "--model", "tiny:llama", "--length", "0"], "--length: expected an integer in [2, 1048576]"),
    (["train", "--preset", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--set", "lr"], "must be key=value"),
    (["train", "--preset", "small-extend", "--out", "OUT"], "init_from 'runs/small-base/final' not found"),
    (["demo", "--preset", "bogus"], "invalid choice: 'bogus'"),
    (["demo", "--world-size", "0", "--dry-run"], "--world-size: expected an integer >= 1"),
    (["figures", "--results", "/no/such.csv", "--out", "OUT"], "results file '/no/such.csv' not found"),
    (["eval", "export-lm-eval", "--out", "OUT", "--tokenizer", "/no/such/tokenizer"], "not found"),
    (
        ["eval", "export-lm-eval", "--out", "OUT", "--tokenizer", "ropekit-tiny-256", "--lengths", "16"],
        "length 16 is too short to export: the answer budget alone takes",
    ),
    (["bench", "--smoke", "--plot", "OUT"], "bench --plot needs --out"),
    (["bench", "--static", "--liger-rope", "/no/such/rope.py"], "--liger-rope '/no/such/rope.py' not found"),
    (["check", "--model", "tiny:llama", "--rope", "ntk:factor=1e300"], "gives no finite frequencies"),  # overflowed
    (["eval", "ppl", "--model", "tiny:llama", "--device", ""], "--device '' is not a device"),
    (["eval", "ppl", "--model", "tiny:llama", "--tokenizer", "ropekit-tiny-256"], "has 2048 tokens but the model"),
    (["eval", "ppl", "--model", "tiny:llama", "--out", ""], "the output path is empty"),
    (["eval", "fsr", "--model", "ropekit-tiny-256", "--lengths", "2"], "use a length of at least"),
    (["figures", "--out", ""], "the output path is empty"),
    (["info", "rope", "--base", "10000", "--head-dim", "100000000"], "--head-dim must be <= 1024"),  # was a hang
    (["check", "--model", "ropekit-tiny-256", "--prompt", ""], "--prompt '' gives no tokens"),
    (["check", "--model", "ropekit-tiny-256", "--length", "100000000"], "expected an integer in [2, 1048576]"),
    (["bench", "--static", "--jobs", "0"], "expected an integer >= 1"),
    (["bench", "--train-step", "--models", "micro", "--mmap-threshold-mib", "64"], "mmap threshold 64 MiB out of"),
    (["train", "--set", 'model_overrides={"hidden_size": -1}', "--out", "OUT"], "invalid overrides"),
]
if sys.platform == "linux":
    CASES.append((["figures", "--out", "/proc/ropekit-figures"], "cannot write output '/proc/ropekit-figures'"))
    CASES.append((["bench", "--smoke", "--out", "/proc/ropekit-bench.csv"], "cannot write output"))


@pytest.mark.parametrize("argv,word", CASES, ids=[" ".join(a)[:50] for a, _ in CASES])
def test_mistakes_exit_2_with_one_line(argv, word, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own checks
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and word in lines[0], err


def test_an_unreachable_hub_id_is_one_line(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as without a network, without waiting for retries
    run = subprocess.run([sys.executable, "-m", "ropekit.cli", "check", "--model", "no-such-org/no-such-model"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ropekit: error: cannot load model 'no-such-org/no-such-model'")
