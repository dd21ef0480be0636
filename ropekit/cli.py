"""The ``ropekit`` command: one subcommand per job (``ropekit <command> --help`` for each).

A user's mistake (a bad value, a missing file, an output that cannot be written) ends with exit
status 2 and one line naming the value and what is accepted, before any long work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from ropekit import data, parallel
from ropekit.eval import ruler, run, tasks
from ropekit.eval.harness import export_tasks
from ropekit.eval.perplexity import select_windows
from ropekit.eval.retrieval import build_fsr_samples
from ropekit.figures import draw_all
from ropekit.files import check_writable
from ropekit.hf import head_and_rotary_dim, parse_layered, patch, read_method
from ropekit.methods import MAX_HEAD_DIM, METHODS, parse
from ropekit.models import load_config, load_model, load_tokenizer
from ropekit.results import append_rows, read_rows
from ropekit.studies import bench, sweep
from ropekit.studies.ablation import PRESETS as DEMO_PRESETS
from ropekit.studies.ablation import demo
from ropekit.studies.advise import advise, draw_advice, format_table
from ropekit.studies.bench import draw_bench
from ropekit.studies.sweep import SweepSettings, draw_sweep
from ropekit.train import PRESETS as TRAIN_PRESETS
from ropekit.train import apply_overrides, train

__all__ = ["main"]

_MODEL_HELP = "tiny:<family>, smollm2-135m, ropekit-tiny-256, a .gguf, a folder or hub id (ropekit.models)"


def _cmd_methods(args: argparse.Namespace) -> int:

    for name, cls in METHODS.items():
        if name == "native":
            print(f"{name:12s} the model's own configured method (per layer type), run through ropekit")
            continue
        keys = ", ".join(f"{f.name}={'<model>' if f.default is None else f.default}" for f in dataclasses.fields(cls))
        hf = cls.hf_type or "none (saved under config.ropekit)"
        print(f"{name:12s} HF type: {hf:34s} keys: {keys}")
    print("list values join items with '/' (longrope:short_factor=1/1.5/2,...); per layer type: 'spec@full_attention'")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:

    if args.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"--head-dim must be <= {MAX_HEAD_DIM}; got {args.head_dim}")

    method = parse(args.spec)
    if args.base is not None:
        method = method.resolve(base=args.base, max_position_embeddings=args.max_length)
    inv = method.inv_freq64(args.head_dim, args.max_length)
    rows = {
        "method": str(method),
        "head_dim": args.head_dim,
        "attention_factor": method.attention_factor,
        "inv_freq": [float(f"{v:.6g}") for v in inv.tolist()],
        "wavelength": [float(f"{2 * math.pi / v:.6g}") if v else None for v in inv.tolist()],  # None: no rotation
    }
    rate = method.xpos_rate(args.head_dim)
    if rate is not None:
        rows["xpos_zeta"] = [float(f"{math.exp(v * method.scale_base):.6g}") for v in rate.tolist()]
        rows["xpos_center"] = method.xpos_center
    print(json.dumps(rows, indent=1))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:

    if not args.prompt.strip():
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens; pass some text")
    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")  # fmt: skip
    if args.model.startswith("tiny:"):
        tok = None
        ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    else:
        tok = load_tokenizer(args.model)
        per_prompt = len(tok(args.prompt).input_ids)
        if per_prompt == 0:
            raise ValueError(f"--prompt {args.prompt!r} gives no tokens; pass some text")
        text = args.prompt * (1 + args.length // per_prompt)
        ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    with torch.no_grad():
        before = model(ids).logits
        handle = patch(model, args.rope)
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


def _at_least(low: int, high: int | None = None):
    """argparse type: an integer >= ``low`` (and <= ``high``)."""
    accepted = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {accepted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {accepted}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """Comma-separated context lengths, each >= 2 (a length-1 window has no next token to score)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected lengths >= 2 (comma-separated), got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    """Comma-separated names (validated by the command that uses them, before any work)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _check_device(device: str | None) -> None:

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; accepted: cpu, cuda, cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} needs CUDA, which this machine lacks; accepted here: cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device} needs Apple's MPS, which this machine lacks; accepted here: cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r} is not supported; accepted: cpu, cuda, cuda:N, mps")


def _load_for_eval(args, tokenizer):

    model = load_model(args.model, device=args.device)
    if args.rope:
        patch(model, args.rope)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer ({args.tokenizer or args.model}) has {len(tokenizer)} tokens but the model "
                         f"embeds {vocab}: pass the model's own tokenizer")  # fmt: skip
    return model


def _cmd_eval(args: argparse.Namespace) -> int:

    if args.rope:
        parse_layered(args.rope)  # a malformed spec fails before any model is loaded ('...@full_attention' too)
    _check_device(args.device)
    if args.out is not None:
        check_writable(args.out)  # before the evaluation, not after it
    t0 = time.perf_counter()
    if args.task == "ruler":  # task names and lm-eval before the model is loaded
        ruler.resolve_tasks(args.tasks)
        for length in args.lengths:
            ruler.check_length(length)
        ruler.check_lm_eval()
    if args.task not in ("passkey", "ruler"):  # the text source is checked before the model is loaded
        docs = data.load_documents(args.data)
        _, val = data.split_documents(docs, val_fraction=args.val_fraction, seed=args.split_seed)
    tokenizer = load_tokenizer(args.tokenizer or args.model)  # before the model: the checks below need only it
    stride = getattr(args, "stride", None)  # ppl's options
    span = getattr(args, "span", None) or 4 * max(args.lengths)  # one span for every window size (sliding)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if stride:
        config["span"] = span  # as the rows record it, so a rerun recognises them
    common = dict(n=args.n, seed=args.seed, experiment=args.experiment, config=config)
    done = _lengths_done(args.out, args.experiment, config) if args.out else set()
    tokens = None
    if args.task == "ppl":  # tokenised once; every length must fit a document before the first is scored
        tokens = data.tokenize_documents(val, tokenizer)
        for length in args.lengths:
            select_windows(tokens, span if stride else length, 1, args.seed)
    elif args.task == "fsr":  # a length too short for the prompt template fails before any scoring
        for length in args.lengths:
            build_fsr_samples(val, tokenizer, length, n=1, seed=args.seed)
    model = _load_for_eval(args, tokenizer)
    for length in args.lengths:  # each length's rows are kept as soon as they exist
        if length in done:
            print(f"L={length}: its rows are already in {args.out} (same experiment and settings): skipped")
            continue
        if args.task == "passkey":
            rows = run.eval_passkey(model, tokenizer, [length], **common)
        elif args.task == "ruler":
            rows = run.eval_ruler(model, tokenizer, [length], tasks=args.tasks, **common)
        elif args.task == "ppl" and stride:
            rows = run.eval_ppl_sliding(model, tokenizer, val, [length], stride=stride, span=span, tokens=tokens,
                                        **common)  # fmt: skip
        elif args.task == "ppl":
            rows = run.eval_ppl(model, tokenizer, val, [length], bin_size=args.bin_size, tokens=tokens, **common)
        else:
            rows = run.eval_fsr(model, tokenizer, val, [length], generate=not args.no_generate, **common)
        nan = next((r for r in rows if math.isnan(r["value"])), None)
        if nan is not None:
            raise ValueError(f"{nan['metric']} at L={length} is NaN: the model's outputs are not finite (a diverged "
                             f"or damaged model?); no row of L={length} is written")  # fmt: skip
        for row in rows:
            if row["metric"] in _SHOWN or row["metric"].startswith("ruler_score@"):
                name = row["metric"]
                print(f"{row['variant']:40s} {name:22s} L={length:<7} {row['value']:.4f} (n={row['n']})")
                if row["n"] < args.n and row["metric"] != "ruler_score@average":  # its n counts tasks
                    print(f"  only {row['n']} of the {args.n} samples asked for exist at L={length} in this text")
        if args.out:
            append_rows(args.out, rows)
            print(f"{len(rows)} rows appended to {args.out}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


_SHOWN = ("ppl", "ppl_sliding", "fsr_rouge_l", "fsr_token_accuracy", "fsr_target_nll", "passkey_exact_match")


def _lengths_done(out: str, experiment: str, config: dict) -> set[int]:
    """Lengths whose rows ``out`` already holds from an evaluation of this experiment with these settings
    (every setting but the list of lengths): a rerun after an interruption skips them."""
    want = json.loads(json.dumps({k: v for k, v in config.items() if k != "lengths"}, default=str))
    done = set()
    for row in read_rows(out):
        if row["experiment"] != experiment or not row["context_length"]:
            continue
        saved = json.loads(row["config"] or "{}")
        if all(saved.get(k) == v for k, v in want.items()):
            done.add(int(row["context_length"]))
    return done


def _cmd_export(args: argparse.Namespace) -> int:

    check_writable(args.out, kind="folder")

    paths = export_tasks(args.out, data=args.data, tokenizer=args.tokenizer, lengths=args.lengths, n=args.n,
                         seed=args.seed, val_fraction=args.val_fraction, split_seed=args.split_seed)  # fmt: skip
    for p in paths:
        print(p)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:

    cfg = apply_overrides(TRAIN_PRESETS[args.preset](), args.set or [])  # validated: a bad value fails here
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
    result = demo(args.preset, out=args.out, data=args.data, dry_run=args.dry_run, world_size=args.world_size,
                  force=args.force)  # fmt: skip
    if result:
        print(f"results: {result['results']}\ntable: {result['table']}\nfigures: {', '.join(result['figures'])}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:

    check_writable(args.out, kind="folder")

    for path in draw_all(args.out, args.results or []):
        print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:

    if args.plot and not args.out:
        raise ValueError("bench --plot needs --out: the plot is drawn from the rows written there")
    peers = (("--liger-rope", getattr(args, "liger_rope", None)), ("--flash-attn-rotary", args.flash_attn_rotary))
    for flag, path in peers:
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path!r} not found: pass the path of the peer's .py file")
    for path in (args.out, args.plot):
        if path:
            check_writable(path)  # before the benchmark, not after it

    if args.static:
        bench.run_static(args.out, stage=args.stage, cases=args.cases, jobs=args.jobs, liger_rope=args.liger_rope,
                         flash_attn_rotary=args.flash_attn_rotary)  # fmt: skip
        return 0
    # rows land after each shape (each model and length), so a run cut short keeps what it measured

    if args.train_step:
        lengths = args.lengths or [8192, 16384, 32768]
        bench.check_train_step(args.models, lengths, args.providers, args.mmap_threshold_mib)
        count = 0
        for model in args.models:
            for length in lengths:
                rows = bench.run_train_step([model], [length], providers=args.providers, steps=args.steps,
                                            mmap_mib=args.mmap_threshold_mib,
                                            release_cpu_memory=not args.keep_freed_pages)  # fmt: skip
                if args.out:
                    append_rows(args.out, rows)
                count += len(rows)
        if args.out:
            print(f"{count} rows appended to {args.out}")
        return 0
    if args.smoke:
        plan = [(shape, ("fwd", "bwd", "fwd+bwd")) for shape in bench.SMOKE_SHAPES]
    else:  # training shapes forward and backward, decoding shapes forward only
        kept = [shape for shape in bench.TRAINING_SHAPES if not args.lengths or shape.T in args.lengths]
        if not kept:
            known = sorted({shape.T for shape in bench.TRAINING_SHAPES})
            raise ValueError(f"bench --lengths {args.lengths}: no training shape has them; accepted: {known}")
        plan = [(shape, ("fwd", "bwd", "fwd+bwd")) for shape in kept]
        plan += [(shape, ("fwd",)) for shape in bench.DECODING_SHAPES]
    count = 0
    for shape, ops in plan:
        rows = bench.result_rows(bench.run_benchmark([shape], ops=ops, flash_attn_rotary=args.flash_attn_rotary))
        if args.out:
            append_rows(args.out, rows)
        count += len(rows)
    if args.out:
        print(f"{count} rows appended to {args.out}")
        if args.plot:
            print(draw_bench(args.out, args.plot))
    return 0


def _rope_of(config) -> tuple[int, float, int]:
    """(rotary dim, base, trained length) a model config describes."""
    return head_and_rotary_dim(config)[1], float(read_method(config).base), int(config.max_position_embeddings)


def _model_rope(spec: str, device=None):
    """(model, rotary dim, base, trained length) of a model spec; ValueError if it cannot be loaded."""
    model = load_model(spec, device=device)  # a missing or unreachable model is a one-line ValueError
    return model, *_rope_of(model.config)


def _advice_from_args(args: argparse.Namespace, model_info=None):

    if model_info is not None:
        _, head_dim, base, trained = model_info
    else:
        keys = ("head_dim", "base", "trained_length")
        missing = [f"--{k.replace('_', '-')}" for k in keys if getattr(args, k) is None]
        if missing:
            need = "--model, or all of --head-dim --base --trained-length"
            raise ValueError(f"advise needs {need} (missing {', '.join(missing)})")
        head_dim, base, trained = args.head_dim, args.base, args.trained_length
    return advise(head_dim, base, args.trained_length or trained, args.target_length)


def _cmd_advise(args: argparse.Namespace) -> int:

    if args.plot:
        check_writable(args.plot)
    info = (None, *_rope_of(load_config(args.model))) if args.model else None  # closed forms: no weights needed
    advice = _advice_from_args(args, info)
    print(format_table(advice))
    if args.plot:
        for path in draw_advice(advice, args.plot):
            print(path)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:

    if bool(args.methods) == bool(args.from_advise):
        raise ValueError("sweep needs exactly one of --methods 'spec;spec;...' and --from-advise")
    methods = sweep.parse_methods(args.methods) if args.methods else []
    forward, ruler_tasks = sweep.split_tasks(args.tasks)
    if ruler_tasks:  # before the model loads
        ruler.check_length(args.target_length)
        ruler.check_lm_eval()
    out = args.out or f"runs/sweep_{args.model.replace('/', '_').replace(':', '_')}.csv"
    sweep.check_writable(out)  # before the model loads or anything runs
    if args.plot:
        check_writable(args.plot)
    _check_device(args.device)
    t0 = time.perf_counter()
    info = _model_rope(args.model, device=args.device)
    model, _, _, trained = info
    settings = sweep.SweepSettings(
        model=args.model, data=args.data, trained_length=args.trained_length or trained,
        target_length=args.target_length, tasks=forward, ruler=ruler_tasks, seed=args.seed,
        val_fraction=args.val_fraction, split_seed=args.split_seed, tokenizer=args.tokenizer,
        **{k: getattr(args, k) for k in ("n_ppl", "n_fsr", "n_passkey", "n_ruler") if getattr(args, k) is not None},
    )  # fmt: skip
    if args.from_advise:
        advice = _advice_from_args(args, info)
        methods = [c.spec for c in advice.candidates[1:]]
        print(f"candidates from advise (advised: {advice.advised_candidate.spec}):", *methods, sep="\n  ")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    docs = data.load_documents(args.data)
    _, val = data.split_documents(docs, val_fraction=args.val_fraction, seed=args.split_seed)
    summary = sweep.run_sweep(model, tokenizer, val, methods, settings, out, experiment=args.experiment)
    print(sweep.format_summary(summary))
    print(f"rows: {out}\nsummary: {sweep.summary_path(out)}\ntable: {sweep.table_path(out)}")
    if args.plot:
        for path in draw_sweep(sweep.summary_path(out), args.plot):
            print(path)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a user's mistake reported as one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # --help lists the commands from the parsers themselves (argparse does), so it cannot fall behind them
    parser = _Parser(prog="ropekit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the RoPE methods and their spec keys")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("info", help="frequencies, wavelengths and scales of a method")
    p.add_argument("spec", help="method spec, e.g. 'yarn:factor=8,original_max_position_embeddings=4096'")
    p.add_argument("--head-dim", type=_at_least(2), default=128)
    p.add_argument("--base", type=float, default=None, help="the model's rope_theta, for specs without base")
    p.add_argument("--max-length", type=int, default=None, help="current/target length (dynamic NTK, xPos center)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("check", help="load a model, patch it, compare logits and generate")
    p.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)
    p.add_argument("--rope", default="rope", help="method spec (default: rope, which must leave logits unchanged)")
    p.add_argument("--length", type=_at_least(2, 1 << 20), default=256, help="tokens to score")
    p.add_argument("--new-tokens", type=_at_least(1), default=16)
    p.add_argument("--prompt", default="The history of the city begins with a small settlement by the river. ")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("eval", help="long-context evaluation: ppl, fsr, passkey, ruler (lm-eval); export-lm-eval")
    esub = p.add_subparsers(dest="task", required=True)
    for task, spec in tasks.TASKS.items():
        e = esub.add_parser(task, help=spec.description)
        e.add_argument("--model", required=True, help=_MODEL_HELP)
        e.add_argument("--rope", default=None, help="method spec to patch in (default: the model as saved)")
        e.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        lengths = [ruler.MIN_LENGTH] if task == "ruler" else [1024, 2048, 4096]
        e.add_argument("--lengths", type=_int_list, default=lengths, help="comma-separated lengths")
        e.add_argument("--n", type=_at_least(1), default=8, help="windows / samples per length (per task: ruler)")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--out", default=None, help="result CSV to append rows to")
        e.add_argument("--experiment", default="eval", help="experiment name in the rows")
        e.add_argument("--device", default=None)
        if task not in ("passkey", "ruler"):
            e.add_argument(
                "--data", default="shakespeare", help="'shakespeare', a folder of .txt/.txt.gz, or hf:<name>"
            )
            e.add_argument("--val-fraction", type=_fraction, default=data.VAL_FRACTION)
            e.add_argument("--split-seed", type=int, default=0, help="seed of the document-level split")
        if task == "ppl":
            e.add_argument("--bin-size", type=_at_least(1), default=None, help="per-position loss bin size (tokens)")
            e.add_argument("--stride", type=_at_least(1), default=None,
                           help="sliding-window mode: each length is a window moved by this stride")  # fmt: skip
            e.add_argument("--span", type=_at_least(2), default=None, help="tokens scored per document in sliding mode")
        if task == "fsr":
            e.add_argument("--no-generate", action="store_true", help="teacher-forced scores only (no ROUGE-L)")
        if task == "ruler":
            e.add_argument("--tasks", type=_name_list, default=["ruler-offline"],
                           help="RULER tasks and groups, comma-separated: ruler (all 13), ruler-offline (the 6 "
                                "whose data lm-eval synthesises; default), or names such as niah_single_1")  # fmt: skip
        e.set_defaults(func=_cmd_eval)
    e = esub.add_parser("export-lm-eval", help="write lm-evaluation-harness task YAMLs + data for ropekit's tasks")
    e.add_argument("--out", required=True, help="folder for the tasks (pass it to lm_eval --include_path)")
    e.add_argument("--tokenizer", required=True, help="tokenizer (model spec or folder) that sets prompt lengths")
    e.add_argument("--data", default="shakespeare")
    e.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096])
    e.add_argument("--n", type=_at_least(1), default=20)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--val-fraction", type=_fraction, default=data.VAL_FRACTION)
    e.add_argument("--split-seed", type=int, default=0)
    e.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="(continued) pretraining with one RoPE method; see ropekit/train.py")
    p.add_argument("--preset", default="tiny-base", choices=list(TRAIN_PRESETS), help="training preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="typed config override (repeatable)")
    p.add_argument("--out", required=False, default="runs/train", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the paper's positional-encoding ablation (tiny preset: 2 CPU cores, ~10 min)")
    p.add_argument(
        "--preset",
        default="tiny",
        choices=list(DEMO_PRESETS),
        help="tiny (default: 2 CPU cores), small (1 GPU), paper (a Llama 2 7B node), micro (tests)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>); run again to resume")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--world-size", type=_at_least(1), default=1, help="ranks, for the plan's accumulation")
    p.add_argument("--force", action="store_true", help="run a GPU preset without a GPU")
    p.add_argument("--data", default=None, help="text source for both stages (default: the preset's)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("figures", help="draw the paper's analytic figures and figures from result CSVs")
    p.add_argument("--out", default="figures")
    p.add_argument("--results", action="append", help="result CSV to draw (repeatable)")
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser("bench", help="rotary kernel benchmark against peers (see ropekit/studies/bench.py)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (runs anywhere, torch providers only on CPU)")
    p.add_argument("--out", default=None, help="CSV to append rows to")
    p.add_argument("--plot", default=None, help="PNG of GB/s against sequence length (needs --out)")
    p.add_argument("--flash-attn-rotary", default=None, help="path to flash_attn/ops/triton/rotary.py")
    p.add_argument("--train-step", action="store_true",
                   help="time whole training steps instead (HF unpatched, patched, ropekit's loss): tokens/s,\n"
                        "TFLOP/s, MFU, peak memory per model shape and length, and the live tensors of one\n"
                        "more step by phase (ropekit.live_memory)")  # fmt: skip
    p.add_argument("--models", type=_name_list, default=["smollm2-135m", "llama-1b"],
                   help="--train-step: shapes (smollm2-135m, llama-1b, vocab49k-256, micro)")  # fmt: skip
    p.add_argument("--providers", type=_name_list, default=["hf", "ropekit-patch", "ropekit-train"],
                   help="--train-step: hf (unpatched, HF's loss), ropekit-patch (patched, HF's loss),\n"
                        "ropekit-train (patched, ropekit's chunked loss)")  # fmt: skip
    p.add_argument("--steps", type=_at_least(1), default=2, help="--train-step: timed steps after one warm-up")
    p.add_argument("--mmap-threshold-mib", type=int, default=None,
                   help="--train-step on CPU: fix glibc's mmap threshold (1-32 MiB) in each measuring process,\n"
                        "so freed tensors' memory goes back to the system (default: glibc's dynamic one)")  # fmt: skip
    p.add_argument("--keep-freed-pages", action="store_true",
                   help="--train-step on CPU: ropekit-train without the trainer's release of freed pages at\n"
                        "each layer (as `ropekit train --set release_cpu_memory=false`)")  # fmt: skip
    p.add_argument("--lengths", type=_int_list, default=None,
                   help="sequence lengths: --train-step's (default 8192,16384,32768), or the training shapes'\n"
                        "to keep (default all; decoding shapes always run)")  # fmt: skip
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: compile the kernel for sm_80/sm_90 and report registers, access widths,\n"
                        "instructions per 16 B and a roofline model (static figures, not timings)")  # fmt: skip
    p.add_argument("--stage", default="current", help="--static: label of the kernel version (before/after)")
    p.add_argument("--cases", choices=("all", "ci"), default="all", help="--static: all 324 cases or the CI subset")
    p.add_argument("--jobs", type=_at_least(1), default=1, help="--static: compile processes")
    p.add_argument("--liger-rope", default=None, help="--static: path to liger_kernel/ops/rope.py")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("advise", help="closed-form choice of base / factor per method for a target length")
    p.add_argument("--model", default=None, help="model spec (reads head dim, rope_theta, trained length)")
    p.add_argument("--target-length", type=int, required=True, help="the length L' to extend to")
    p.add_argument("--head-dim", type=int, default=None, help="rotary dimension (without --model)")
    p.add_argument("--base", type=float, default=None, help="the model's rope_theta (without --model)")
    p.add_argument("--trained-length", type=int, default=None, help="the trained length L (overrides the model's)")
    p.add_argument("--plot", default=None, help="PNG of the candidates' decay curves (a CSV is written beside it)")
    p.set_defaults(func=_cmd_advise)

    p = sub.add_parser("sweep", help="training-free evaluation of candidate methods against the model as it is")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--target-length", type=int, required=True, help="the length L' to extend to")
    p.add_argument("--methods", default=None, help="';'-separated method specs")
    p.add_argument("--from-advise", action="store_true", help="the candidates of `ropekit advise`")
    p.add_argument("--trained-length", type=int, default=None, help="L (default: max_position_embeddings)")
    p.add_argument("--head-dim", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tasks", default="ppl,fsr,passkey",
                   help="comma-separated: ppl, fsr, passkey (one forward per prompt) and RULER tasks or groups "
                        "through lm-eval (ruler-offline, niah_single_1, ...; L' >= 4096)")  # fmt: skip

    S = SweepSettings  # the defaults
    p.add_argument("--n-ppl", type=int, default=None, help=f"prompts whose text is a PPL window ({S.n_ppl})")
    p.add_argument("--n-fsr", type=int, default=None, help=f"prompts scored for FSR, teacher-forced ({S.n_fsr})")
    p.add_argument("--n-passkey", type=int, default=None, help=f"prompts with a passkey, spread depths ({S.n_passkey})")
    p.add_argument("--n-ruler", type=int, default=None, help=f"prompts per RULER task ({S.n_ruler})")
    p.add_argument("--data", default="shakespeare", help="'shakespeare', a folder of .txt/.txt.gz, or hf:<name>")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--val-fraction", type=_fraction, default=data.VAL_FRACTION)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result CSV (resumed if it holds rows of the same sweep)")
    p.add_argument("--experiment", default="sweep", help="experiment name in the rows")
    p.add_argument("--plot", default=None, help="PNG of the ranked paired differences")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad specs and inputs: one clear line, no traceback
        print(f"ropekit: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:  # a path the user gave
        print(f"ropekit: error: {err.strerror or err}: {err.filename!r}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
