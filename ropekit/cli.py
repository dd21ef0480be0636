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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _load_for_eval(args):
    from ropekit.models import load_model, load_tokenizer

    model = load_model(args.model, device=args.device)
    if args.rope:
        import ropekit

        ropekit.patch(model, args.rope)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    return model, tokenizer


def _cmd_eval(args: argparse.Namespace) -> int:
    from ropekit import data
    from ropekit.eval import run
    from ropekit.results import append_rows

    if args.rope:
        from ropekit.methods import parse

        parse(args.rope)  # a malformed spec fails before any model is loaded
    t0 = time.perf_counter()
    model, tokenizer = _load_for_eval(args)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    common = dict(n=args.n, seed=args.seed, experiment=args.experiment, config=config)
    if args.task == "passkey":
        rows = run.eval_passkey(model, tokenizer, args.lengths, **common)
    else:
        docs = data.load_documents(args.data)
        _, val = data.split_documents(docs, val_fraction=args.val_fraction, seed=args.split_seed)
        if args.task == "ppl" and args.stride:
            span = args.span or 4 * max(args.lengths)
            rows = run.eval_ppl_sliding(model, tokenizer, val, args.lengths, stride=args.stride, span=span, **common)
        elif args.task == "ppl":
            rows = run.eval_ppl(model, tokenizer, val, args.lengths, bin_size=args.bin_size, **common)
        else:
            rows = run.eval_fsr(model, tokenizer, val, args.lengths, generate=not args.no_generate, **common)
    for row in rows:
        shown = ("ppl", "ppl_sliding", "fsr_rouge_l", "fsr_token_accuracy", "fsr_target_nll", "passkey_exact_match")
        if row["metric"] in shown:
            name, length = row["metric"], row["context_length"]
            print(f"{row['variant']:40s} {name:22s} L={length:<7} {row['value']:.4f} (n={row['n']})")
    if args.out:
        append_rows(args.out, rows)
        print(f"{len(rows)} rows appended to {args.out}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ropekit.eval.harness import export_tasks

    paths = export_tasks(args.out, data=args.data, tokenizer=args.tokenizer, lengths=args.lengths, n=args.n,
                         seed=args.seed, val_fraction=args.val_fraction, split_seed=args.split_seed)  # fmt: skip
    for p in paths:
        print(p)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ropekit import parallel
    from ropekit.train import PRESETS, apply_overrides, train

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; accepted: {', '.join(PRESETS)}")
    cfg = apply_overrides(PRESETS[args.preset](), args.set or [])
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    parallel.init_distributed()
    result = train(cfg, args.out, resume=args.resume)
    rank, _ = parallel.rank_and_world()
    if rank == 0:
        print(f"steps {result['step']}, last loss {result['losses'][-1]:.4f}, "
              f"{result.get('tokens_per_s', 0):.0f} tokens/s; final model: {result.get('final')}")  # fmt: skip
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ropekit.ablation import PRESETS, plan, run, with_data

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; accepted: {', '.join(PRESETS)}")
    cfg = PRESETS[args.preset]()
    if args.data:
        cfg = with_data(cfg, args.data)
    print(plan(cfg, world_size=args.world_size))
    if args.dry_run:
        return 0
    if cfg.name in ("small", "paper") and not args.force:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"preset {cfg.name!r} needs CUDA GPUs; use --dry-run to see its plan, or --force")
    out = args.out or f"runs/{cfg.name}"
    from ropekit import parallel

    parallel.init_distributed()  # under torchrun (the paper preset): FSDP2 training on every rank
    result = run(cfg, out)
    print(f"results: {result['results']}\ntable: {result['table']}\nfigures: {', '.join(result['figures'])}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from ropekit.figures import draw_all

    for path in draw_all(args.out, args.results or []):
        print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ropekit import bench

    if args.static:
        bench.run_static(args.out, stage=args.stage, cases=args.cases, jobs=args.jobs, liger_rope=args.liger_rope,
                         flash_attn_rotary=args.flash_attn_rotary)  # fmt: skip
        return 0
    shapes = bench.SMOKE_SHAPES if args.smoke else bench.TRAINING_SHAPES
    rows = bench.run_benchmark(shapes, flash_attn_rotary=args.flash_attn_rotary)
    if args.out:
        bench.write_rows(args.out, rows)
        print(f"{len(rows)} rows appended to {args.out}")
        if args.plot:
            bench.plot(args.out, args.plot)
    if args.e2e:
        for seq_len in (8192, 32768):
            for patched in (False, True):
                print(bench.e2e_training_step(seq_len, patched=patched))
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

    p = sub.add_parser("eval", help="long-context evaluation: ppl, fsr, passkey; export-lm-eval")
    esub = p.add_subparsers(dest="task", required=True)
    for task, help_text in (
        ("ppl", "perplexity vs context length (+ per-position loss bins)"),
        ("fsr", "FIRST-SENTENCE-RETRIEVAL: ROUGE-L of the greedy answer, teacher-forced accuracy and NLL"),
        ("passkey", "5-digit passkey at several depths: exact match and teacher-forced accuracy"),
    ):
        e = esub.add_parser(task, help=help_text)
        e.add_argument("--model", required=True, help="tiny:<family>, smollm2-135m, a .gguf, a folder or hub id")
        e.add_argument("--rope", default=None, help="method spec to patch in (default: the model as saved)")
        e.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        e.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096], help="comma-separated lengths")
        e.add_argument("--n", type=int, default=8, help="windows / samples per length")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--out", default=None, help="result CSV to append rows to")
        e.add_argument("--experiment", default="eval", help="experiment name in the rows")
        e.add_argument("--device", default=None)
        if task != "passkey":
            e.add_argument(
                "--data", default="shakespeare", help="'shakespeare', a folder of .txt/.txt.gz, or hf:<name>"
            )
            e.add_argument("--val-fraction", type=float, default=0.15)
            e.add_argument("--split-seed", type=int, default=0, help="seed of the document-level split")
        if task == "ppl":
            e.add_argument("--bin-size", type=int, default=None, help="per-position loss bin size (tokens)")
            e.add_argument("--stride", type=int, default=None,
                           help="sliding-window mode: each length is a window moved by this stride")  # fmt: skip
            e.add_argument("--span", type=int, default=None, help="tokens scored per document in sliding mode")
        if task == "fsr":
            e.add_argument("--no-generate", action="store_true", help="teacher-forced scores only (no ROUGE-L)")
        e.set_defaults(func=_cmd_eval)
    e = esub.add_parser("export-lm-eval", help="write lm-evaluation-harness task YAMLs + data for ropekit's tasks")
    e.add_argument("--out", required=True, help="folder for the tasks (pass it to lm_eval --include_path)")
    e.add_argument("--tokenizer", required=True, help="tokenizer (model spec or folder) that sets prompt lengths")
    e.add_argument("--data", default="shakespeare")
    e.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096])
    e.add_argument("--n", type=int, default=20)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--val-fraction", type=float, default=0.15)
    e.add_argument("--split-seed", type=int, default=0)
    e.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="(continued) pretraining with one RoPE method; see ropekit/train.py")
    p.add_argument("--preset", default="tiny-base", help="tiny-base, tiny-extend, small-base, small-extend, paper")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="typed config override (repeatable)")
    p.add_argument("--out", required=False, default="runs/train", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the paper's positional-encoding ablation (tiny preset: 2 CPU cores, ~10 min)")
    p.add_argument("--preset", default="tiny", help="micro, tiny (default), small (1 GPU), paper (Llama 2 7B node)")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>); run again to resume")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--world-size", type=int, default=1, help="ranks, for the plan's accumulation")
    p.add_argument("--force", action="store_true", help="run a GPU preset without a GPU")
    p.add_argument("--data", default=None, help="text source for both stages (default: the preset's)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("figures", help="draw the paper's analytic figures and figures from result CSVs")
    p.add_argument("--out", default="figures")
    p.add_argument("--results", action="append", help="result CSV to draw (repeatable)")
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser("bench", help="rotary kernel benchmark against peers (see ropekit/bench.py)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (runs anywhere, torch providers only on CPU)")
    p.add_argument("--out", default=None, help="CSV to append rows to")
    p.add_argument("--plot", default=None, help="PNG of GB/s against sequence length (needs --out)")
    p.add_argument("--flash-attn-rotary", default=None, help="path to flash_attn/ops/triton/rotary.py")
    p.add_argument("--e2e", action="store_true", help="also time a ~100M Llama training step with/without the patch")
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: compile the kernel for sm_80/sm_90 and report registers, access widths,\n"
                        "instructions per 16 B and a roofline model (static figures, not timings)")  # fmt: skip
    p.add_argument("--stage", default="current", help="--static: label of the kernel version (before/after)")
    p.add_argument("--cases", choices=("all", "ci"), default="all", help="--static: all 324 cases or the CI subset")
    p.add_argument("--jobs", type=int, default=1, help="--static: compile processes")
    p.add_argument("--liger-rope", default=None, help="--static: path to liger_kernel/ops/rope.py")
    p.set_defaults(func=_cmd_bench)
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
