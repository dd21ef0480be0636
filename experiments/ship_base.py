"""Ship a trained base model inside ropekit, with the record of how it was made.

    python experiments/ship_base.py runs/tiny_control/cpu_base_fit --name ropekit-tiny-256 \
        --command "python experiments/tiny_control.py --preset cpu-base --recipe cpu_base_fit --every 1100" \
        --trained-at 62b38c8

Copies the run's ``final/`` (weights, config, tokenizer) into ``ropekit/assets/<name>/`` and writes
``provenance.json`` beside it: the training config, the last logged step (loss, validation loss,
tokens/s), the commit that trained it, the commit and library versions now, and the sha256 of each file
that ``ropekit.models.shipped_path`` checks on every load. The tokenizer's class is written as one
that transformers 4.x and 5.x both load. The demo (``ropekit demo``)
starts from such a model, as the paper starts from a released Llama 2, and so does ``ropekit demo --preset
cpu``; ``ropekit train --preset cpu-base`` trains the same base from scratch.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from ropekit.files import atomic_write_text
from ropekit.models import SHIPPED_MODELS
from ropekit.results import provenance

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training run's folder (with config.json, metrics.jsonl and final/)")
    p.add_argument("--name", required=True, choices=SHIPPED_MODELS)
    p.add_argument("--command", required=True, help="the command that trained the run (recorded as given)")
    p.add_argument("--trained-at", required=True, help="the commit whose code trained the run")
    a = p.parse_args()
    run = Path(a.run)
    final = run / "final"
    missing = [f for f in FILES if not (final / f).is_file()]
    if missing or not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"{run} is not a finished training run: missing {missing or ['metrics.jsonl']}")
    trained_at = subprocess.run(["git", "rev-parse", "--verify", f"{a.trained_at}^{{commit}}"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
    if not trained_at:
        raise SystemExit(f"--trained-at {a.trained_at}: not a commit of this repository")
    config = json.loads((run / "config.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = steps[-1]
    if last["step"] != config["steps"]:
        raise SystemExit(f"{run} stopped at step {last['step']} of {config['steps']}: finish it first")
    target = Path(__file__).resolve().parents[1] / "ropekit" / "assets" / a.name
    target.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(final / f, target / f)
    # transformers 5 saves its tokenizer class as TokenizersBackend, a name 4.x lacks; both load this one
    tok = json.loads((target / "tokenizer_config.json").read_text())
    tok.pop("backend", None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(target / "tokenizer_config.json", json.dumps(tok, indent=2) + "\n")
    prov = provenance()
    record = {
        "name": a.name,
        "sha256": {f: hashlib.sha256((target / f).read_bytes()).hexdigest() for f in FILES},
        "command": a.command,
        "training_config": config,
        "last_step": {k: last[k] for k in ("step", "loss", "val_loss", "tokens_per_s") if k in last},
        "trained_at_commit": trained_at,
        "shipped_at_commit": prov["git_sha"],
        "device": prov["device"],
        "versions": json.loads(prov["versions"]),
    }
    atomic_write_text(target / "provenance.json", json.dumps(record, indent=1) + "\n")
    print(f"{target}: model.safetensors {record['sha256']['model.safetensors']}")
