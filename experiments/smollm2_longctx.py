"""SmolLM2-135M (trained at 8,192) beyond its window, training-free, on CPU: PPL and FSR per method.

    python experiments/smollm2_longctx.py --out figures/smollm2_longctx.csv

Methods: rope, pi:factor=2, yarn:factor=2,original_max_position_embeddings=8192, abf:base=1000000.
PPL at 2k, 8k, 16k on held-out Shakespeare plays (a few windows each); FSR at 1k-8k. The rows carry
the device and versions; docs/results.md quotes them.
"""

import argparse
import time

import ropekit
from ropekit import data
from ropekit.eval import run
from ropekit.models import load_model, load_tokenizer
from ropekit.results import append_rows

METHODS = ["rope", "pi:factor=2", "yarn:factor=2,original_max_position_embeddings=8192", "abf:base=1000000"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="figures/smollm2_longctx.csv")
    p.add_argument("--ppl-lengths", default="2048,8192,16384")
    p.add_argument("--fsr-lengths", default="1024,2048,4096,8192")
    p.add_argument("--n-ppl", type=int, default=2)
    p.add_argument("--n-fsr", type=int, default=4)
    p.add_argument("--methods", default=";".join(METHODS), help="';'-separated method specs")
    args = p.parse_args()
    ppl_lengths = [int(x) for x in args.ppl_lengths.split(",") if x]
    fsr_lengths = [int(x) for x in args.fsr_lengths.split(",") if x]
    docs = data.load_documents("shakespeare")
    _, val = data.split_documents(docs, val_fraction=0.15, seed=0)
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    config = {"model": "smollm2-135m", "data": "shakespeare", "val_fraction": 0.15, "split_seed": 0}
    for spec in args.methods.split(";"):
        t0 = time.perf_counter()
        handle = ropekit.patch(model, spec)
        variant = str(handle.method)
        rows = run.eval_ppl(model, tok, val, ppl_lengths, n=args.n_ppl, experiment="smollm2_longctx",
                            variant=variant, config=config)  # fmt: skip
        rows += run.eval_fsr(model, tok, val, fsr_lengths, n=args.n_fsr, experiment="smollm2_longctx",
                             variant=variant, config=config)  # fmt: skip
        append_rows(args.out, rows)
        handle.undo()
        for r in rows:
            if r["metric"] in ("ppl", "fsr_rouge_l", "fsr_token_accuracy", "fsr_target_nll"):
                print(f"{variant:55s} {r['metric']:20s} {r['context_length']:>6} {r['value']:.3f}", flush=True)
        print(f"{variant}: {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
