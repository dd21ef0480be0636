"""Calibrating the positive control: which pretraining recipe teaches the tiny base model to retrieve
the first sentence at its own length, and how many steps it takes (the demo's shipped base was trained
and scored this way: ``--preset cpu-base --recipe cpu_base_fit``).

    python experiments/tiny_control.py --recipe base                      # the tiny-base preset as it is
    python experiments/tiny_control.py --recipe weight8 --set retrieval_weight=8
    python experiments/tiny_control.py --recipe w8_curve --set retrieval_weight=8 --set steps=2400 --every 400
    python experiments/tiny_control.py --report                           # every recipe's accuracy so far

Each recipe is a training preset (``--preset``, default ``tiny-base``) with ``--set`` overrides, trained
from scratch into runs/tiny_control/<recipe>, then scored as the demo scores its positive control: FSR teacher-forced
token accuracy at 128 and 256 tokens on held-out plays, the same prompts for every recipe. With
``--every K`` it is also scored at every K steps (a learning curve: how long the recipe takes to
reach a given accuracy). Per-prompt rows, with the step and the training seconds so far, are appended
to figures/tiny_control.csv. An interrupted run resumes with the same command: training from its last
checkpoint, scoring from the first step without rows.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ropekit import data
from ropekit.eval import run as ev
from ropekit.models import load_model
from ropekit.results import append_rows, read_rows
from ropekit.train import PRESETS, apply_overrides, find_checkpoint, train

METRIC = "fsr_sample_token_accuracy"


def report(path: str) -> None:
    """Each recipe's mean accuracy [95% CI] per length, at every scored step."""
    from ropekit.stats import mean_interval

    rows = [r for r in read_rows(path) if r["metric"] == METRIC]
    for recipe in dict.fromkeys(r["variant"] for r in rows):
        mine = [(json.loads(r["config"]), r) for r in rows if r["variant"] == recipe]
        first, commits = mine[0][0], ", ".join(sorted({r["git_sha"][:7] for _, r in mine}))
        preset = f"{first.get('preset', 'tiny-base')} {' '.join(first['overrides']) or '(as it is)'}"
        print(f"{recipe}: {preset}, as the preset was at {commits}")
        for step in sorted({c.get("step", c["steps"]) for c, _ in mine}):
            at = [(c, r) for c, r in mine if c.get("step", c["steps"]) == step]
            cells = []
            for length in sorted({int(r["context_length"]) for _, r in at}):
                m, lo, hi = mean_interval([float(r["value"]) for _, r in at if int(r["context_length"]) == length])
                cells.append(f"{length}: {m:.3f} [{lo:.3f}, {hi:.3f}]")
            print(f"  step {step:5} ({at[0][0]['train_seconds']:5.0f} s)  {'; '.join(cells)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="a name for the overrides (its run folder and rows)")
    p.add_argument("--report", action="store_true", help="print each recipe's mean accuracy [95%% CI] and exit")
    scratch = sorted(name for name, preset in PRESETS.items() if preset().init_from is None)
    p.add_argument("--preset", default="tiny-base", choices=scratch, help="the from-scratch preset a recipe changes")
    p.add_argument("--set", action="append", default=[], help="key=value override of the preset (repeatable)")
    p.add_argument("--every", type=int, default=0, help="also score every this many steps (a learning curve)")
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--n", type=int, default=32, help="FSR prompts per length")
    p.add_argument("--out", default="figures/tiny_control.csv")
    a = p.parse_args()
    if a.report:
        report(a.out)
        raise SystemExit(0)
    if not a.recipe:
        p.error("--recipe is required (or --report)")
    if a.every < 0:
        p.error(f"--every {a.every}: accepted: 0 (score the end only) or a number of steps >= 1")

    cfg = apply_overrides(PRESETS[a.preset](), a.set)
    if a.every:  # a checkpoint at every scored step (the curve is scored from them)
        cfg = dataclasses.replace(cfg, save_every=a.every)
    earlier = [json.loads(r["config"]) for r in read_rows(a.out) if r["variant"] == a.recipe and r["metric"] == METRIC]
    if any((c.get("preset", "tiny-base"), c["overrides"]) != (a.preset, a.set) for c in earlier):
        raise SystemExit(f"recipe {a.recipe!r} has rows in {a.out} from another preset or overrides: choose a new name")
    scored = {c.get("step", c["steps"]) for c in earlier}
    seconds = max([c["train_seconds"] for c in earlier], default=0.0)
    corpus = data.prepare_corpus(cfg.data, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                 vocab_size=cfg.vocab_size)  # fmt: skip
    folder = Path("runs/tiny_control") / a.recipe
    lengths = [int(x) for x in a.lengths.split(",")]
    todo = [s for s in [*range(a.every, cfg.steps, a.every or cfg.steps), cfg.steps] if s not in scored]
    if not todo:
        print(f"{a.recipe}: every step is scored already (--report prints them)")
    for step in todo:
        checkpoint = find_checkpoint(folder)
        done = 0 if checkpoint is None else json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        if done > step:
            continue  # a checkpoint past it (an interrupted run is scored from here on)
        t = time.perf_counter()
        result = train(cfg, folder, resume=True, stop_after=step - done, corpus=corpus)
        seconds = round(seconds + time.perf_counter() - t, 1)
        model = load_model(result.get("final") or str(find_checkpoint(folder)))
        config = {"preset": a.preset, "overrides": a.set, "train_seconds": seconds, "steps": cfg.steps, "step": step,
                  "final_loss": result["losses"][-1]}  # fmt: skip
        rows = ev.eval_fsr_samples(model, corpus.tokenizer, corpus.val_docs, lengths, n=a.n, generate=False,
                                   experiment="tiny_control", variant=a.recipe, config=config)  # fmt: skip
        append_rows(a.out, rows)
        for length in lengths:
            values = [r["value"] for r in rows if r["metric"] == METRIC and r["context_length"] == length]
            print(f"{a.recipe} step {step} ({seconds:.0f} s): FSR accuracy at {length}: "
                  f"{sum(values) / len(values):.3f} (n = {len(values)})")  # fmt: skip
