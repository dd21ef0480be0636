"""The ``ropekit`` command.

ropekit methods                                   list the methods and their keys
ropekit info SPEC --head-dim 128 [--base 10000]   frequencies, wavelengths and scale of a method
ropekit check --model SPEC --rope SPEC            load, patch, compare logits, generate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

__all__ = ["main"]


def _cmd_methods(args: argparse.Namespace) -> int:
    from ropekit.methods import METHODS

    for name, cls in METHODS.items():
        keys = ", ".join(f"{f.name}={'<model>' if f.default is None else f.default}" for f in dataclasses.fields(cls))
        hf = cls.hf_type or "none (saved under config.ropekit)"
        print(f"{name:8s} HF type: {hf:36s} keys: {keys}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ropekit.methods import parse

    method = parse(args.spec)
    if args.base is not None:
        method = method.resolve(base=args.base, max_position_embeddings=args.max_length)
    inv = method.inv_freq64(args.head_dim, args.max_length)
    rows = {
        "method": str(method),
        "head_dim": args.head_dim,
        "attention_factor": method.attention_factor,
        "inv_freq": [float(f"{v:.6g}") for v in inv.tolist()],
        "wavelength": [float(f"{2 * math.pi / v:.6g}") for v in inv.tolist()],
    }
    rate = method.xpos_rate(args.head_dim)
    if rate is not None:
        rows["xpos_zeta"] = [float(f"{math.exp(v * method.scale_base):.6g}") for v in rate.tolist()]
        rows["xpos_center"] = method.xpos_center
    print(json.dumps(rows, indent=1))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    import ropekit
    from ropekit.models import load_model, load_tokenizer

    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")  # fmt: skip
    if args.model.startswith("tiny:"):
        tok = None
        ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    else:
        tok = load_tokenizer(args.model)
        text = args.prompt * (1 + args.length // max(1, len(tok(args.prompt).input_ids)))
        ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    with torch.no_grad():
        before = model(ids).logits
        handle = ropekit.patch(model, args.rope)
        after = model(ids).logits
        nll_before = torch.nn.functional.cross_entropy(before[0, :-1], ids[0, 1:]).item()
        nll_after = torch.nn.functional.cross_entropy(after[0, :-1], ids[0, 1:]).item()
        gen = model.generate(ids[:, :32], max_new_tokens=args.new_tokens, do_sample=False)
    print(f"patched with {handle.method}; max_position_embeddings={model.config.max_position_embeddings}")
    print(f"max |logit change| = {(after - before).abs().max().item():.3g} over {ids.shape[1]} tokens")
    print(f"next-token loss: {nll_before:.4f} unpatched -> {nll_after:.4f} patched")
    if tok is not None:
        print("greedy continuation:", repr(tok.decode(gen[0, 32:])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropekit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the RoPE methods and their spec keys")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("info", help="frequencies, wavelengths and scales of a method")
    p.add_argument("spec", help="method spec, e.g. 'yarn:factor=8,original_max_position_embeddings=4096'")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--base", type=float, default=None, help="the model's rope_theta, for specs without base")
    p.add_argument("--max-length", type=int, default=None, help="current/target length (dynamic NTK, xPos center)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("check", help="load a model, patch it, compare logits and generate")
    p.add_argument("--model", default="smollm2-135m", help="tiny:<family>, smollm2-135m, a .gguf, a folder or hub id")
    p.add_argument("--rope", default="rope", help="method spec (default: rope, which must leave logits unchanged)")
    p.add_argument("--length", type=int, default=256, help="tokens to score")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt", default="The history of the city begins with a small settlement by the river. ")
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad specs and inputs: one clear line, no traceback
        print(f"ropekit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
