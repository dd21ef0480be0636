"""Calibrating the demo's positive control: which pretraining recipe teaches the tiny base model to
retrieve the first sentence at its own length, within the demo's CPU budget.

    python experiments/tiny_control.py --recipe base                      # the tiny-base preset as it is
    python experiments/tiny_control.py --recipe weight8 --set retrieval_weight=8
    python experiments/tiny_control.py --recipe steps900 --set steps=900 --set retrieval_weight=8
    python experiments/tiny_control.py --report                           # every recipe's accuracy so far

Each recipe is the ``tiny-base`` training preset with ``--set`` overrides, trained from scratch into
runs/tiny_control/<recipe> (resumable), then scored as the demo scores its positive control: FSR
teacher-forced token accuracy at 128 and 256 tokens on held-out plays, the same prompts for every
recipe. Per-prompt rows and the training wall time are appended to figures/tiny_control.csv.
"""

import argparse
import json
import time
from pathlib import Path

from ropekit import data
from ropekit.eval import run as ev
from ropekit.models import load_model
from ropekit.results import append_rows, read_rows
from ropekit.train import PRESETS, apply_overrides, train

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="a name for the overrides (its run folder and rows)")
    p.add_argument("--report", action="store_true", help="print each recipe's mean accuracy [95%% CI] and exit")
    p.add_argument("--set", action="append", default=[], help="key=value override of tiny-base (repeatable)")
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--n", type=int, default=32, help="FSR prompts per length")
    p.add_argument("--out", default="figures/tiny_control.csv")
    a = p.parse_args()
    if a.report:
        from ropekit.stats import mean_interval

        rows = [r for r in read_rows(a.out) if r["metric"] == "fsr_sample_token_accuracy"]
        for recipe in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == recipe]
            cfg = json.loads(mine[0]["config"])
            cells = []
            for length in sorted({int(r["context_length"]) for r in mine}):
                m, lo, hi = mean_interval([float(r["value"]) for r in mine if int(r["context_length"]) == length])
                cells.append(f"{length}: {m:.3f} [{lo:.3f}, {hi:.3f}]")
            run = f"{cfg['steps']} steps, {cfg['train_seconds']:.0f}s; {cfg['overrides']}"
            print(f"{recipe:14} {'; '.join(cells)}; {run}")
        raise SystemExit(0)
    if not a.recipe:
        p.error("--recipe is required (or --report)")

    cfg = apply_overrides(PRESETS["tiny-base"](), a.set)
    if any(r["variant"] == a.recipe for r in read_rows(a.out)):
        raise SystemExit(f"recipe {a.recipe!r} already has rows in {a.out}: choose another name")
    corpus = data.prepare_corpus(cfg.data, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                 vocab_size=cfg.vocab_size)  # fmt: skip
    folder = Path("runs/tiny_control") / a.recipe
    t = time.perf_counter()
    result = train(cfg, folder, resume=True, corpus=corpus)
    seconds = round(time.perf_counter() - t, 1)
    model = load_model(str(folder / "final"))
    config = {"overrides": a.set, "train_seconds": seconds, "steps": cfg.steps, "final_loss": result["losses"][-1]}
    rows = ev.eval_fsr_samples(model, corpus.tokenizer, corpus.val_docs, [int(x) for x in a.lengths.split(",")],
                               n=a.n, generate=False, experiment="tiny_control", variant=a.recipe,
                               config=config)  # fmt: skip
    append_rows(a.out, rows)
    acc = [r for r in rows if r["metric"] == "fsr_sample_token_accuracy"]
    for length in sorted({r["context_length"] for r in acc}):
        values = [r["value"] for r in acc if r["context_length"] == length]
        print(f"{a.recipe}: FSR accuracy at {length}: {sum(values) / len(values):.3f} (n = {len(values)})")
    print(f"{a.recipe}: trained {cfg.steps} steps in {seconds:.0f}s; overrides {a.set}")
