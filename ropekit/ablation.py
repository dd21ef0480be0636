"""The paper's positional-encoding ablation (Xiong et al. 2023, Section 4.1), at any scale.

corpus -> clean -> document split -> BPE tokenizer on train -> pretrain a Llama at length L with plain
RoPE -> for each variant (rope, pi, abf, xpos-abf): patch the base checkpoint with ropekit and continue
pretraining at 8L on the same token budget -> PPL vs length and FSR vs length on validation documents
-> result CSV -> Table 5-form markdown and Fig. 5b-form figures.

Presets are functions returning an ``AblationConfig``: ``micro`` (tests, seconds), ``tiny``
(``ropekit demo``: two CPU cores, about ten minutes), ``small`` (one GPU), ``paper`` (Llama 2 7B on a
node; ``--dry-run`` prints its plan anywhere). Running again resumes: finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ropekit.train import PRESETS as TRAIN
from ropekit.train import TrainConfig, model_of

__all__ = ["AblationConfig", "PRESETS", "demo", "run", "plan"]

PAPER_VARIANTS = ("rope", "pi:factor=8", "abf:base=500000", "xpos:base=500000")


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    name: str
    base: TrainConfig  # pretraining at the short length, plain RoPE
    extend: TrainConfig  # continued pretraining at 8x the length (method and init_from are filled per variant)
    variants: tuple[str, ...] = PAPER_VARIANTS
    ppl_lengths: tuple[int, ...] = ()
    fsr_lengths: tuple[int, ...] = ()
    n_ppl: int = 4
    n_fsr: int = 8
    bin_size: int = 64
    fsr_generate: bool = True
    model_params: str = ""  # for the plan printout
    pretrain_base: bool = True  # False: the base is extend.init_from, a released checkpoint (paper)
    needs_gpu: bool = False  # refused on a machine without CUDA (unless forced)
    notes: dict = field(default_factory=dict)


def _tiny() -> AblationConfig:
    """Two CPU cores, ~10 minutes: the ``tiny-base`` and ``tiny-extend`` training presets (a 4-layer,
    128-wide Llama, ~1.3M parameters with a 2,048-token BPE, 256 -> 2,048 tokens: the paper's 8x)."""
    return AblationConfig(name="tiny", base=TRAIN["tiny-base"](), extend=TRAIN["tiny-extend"](),
                          ppl_lengths=(256, 512, 1024, 2048, 4096), fsr_lengths=(256, 512, 1024, 2048), n_ppl=4,
                          n_fsr=8, bin_size=128, model_params="~1.3M")  # fmt: skip


def _micro() -> AblationConfig:
    """Seconds: the plumbing of ``tiny`` with the micro model (2 layers, 32 wide), 32 -> 256 tokens."""
    base = dataclasses.replace(TRAIN["tiny-base"](), model_overrides=model_of("micro", 32), vocab_size=512,
                               seq_len=32, steps=4, tokens_per_step=256, micro_batch=8, warmup_steps=1, eval_every=4,
                               save_every=4, eval_batches=1)  # fmt: skip
    extend = dataclasses.replace(base, seq_len=256, steps=2, tokens_per_step=256, micro_batch=1, eval_every=2,
                                 save_every=2)  # fmt: skip
    return AblationConfig(name="micro", base=base, extend=extend, ppl_lengths=(32, 256, 512), fsr_lengths=(64, 256),
                          n_ppl=2, n_fsr=2, bin_size=32, model_params="~40k")  # fmt: skip


def _small() -> AblationConfig:
    """One GPU inside one 30-minute device session: the ``small-base`` and ``small-extend`` training presets
    (a ~110M Llama, 12 x 768, GQA 12/4, 32k BPE, 2k -> 16k on long documents)."""
    return AblationConfig(name="small", base=TRAIN["small-base"](), extend=TRAIN["small-extend"](),
                          ppl_lengths=(2048, 4096, 8192, 16384, 32768),
                          fsr_lengths=(256, 1024, 2048, 4096, 8192, 16384), n_ppl=8, n_fsr=20, bin_size=512,
                          model_params="~110M", needs_gpu=True)  # fmt: skip


def _paper() -> AblationConfig:
    """Llama 2 7B, 4k -> 32k, 80B tokens per variant at the paper's hyper-parameters; torchrun + FSDP2."""
    extend = TRAIN["paper"]()
    return AblationConfig(name="paper", base=dataclasses.replace(extend, steps=1), extend=extend,
                          ppl_lengths=(4096, 8192, 16384, 32768),
                          fsr_lengths=(256, 1024, 2048, 4096, 8192, 10240, 12288, 14336, 16384, 20480, 24576, 28672,
                                       30720), n_ppl=50, n_fsr=50, bin_size=500, model_params="6.74B",
                          pretrain_base=False, needs_gpu=True,
                          notes={"base": "the released Llama 2 7B checkpoint (no pretraining stage)"})  # fmt: skip


PRESETS = {"micro": _micro, "tiny": _tiny, "small": _small, "paper": _paper}


def with_data(cfg: AblationConfig, data: str) -> AblationConfig:
    """The same ablation on another text source (both stages)."""
    return dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, data=data),
                               extend=dataclasses.replace(cfg.extend, data=data))  # fmt: skip


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def plan(cfg: AblationConfig, world_size: int = 1) -> str:
    """What the run will do: steps, tokens, sequence lengths and (for 7B) the memory per GPU."""
    b, e = cfg.base, cfg.extend
    lines = [f"ablation '{cfg.name}': model {cfg.model_params} parameters"]
    if cfg.pretrain_base:
        lines.append(f"  base: {b.steps} steps x {b.tokens_per_step:,} tokens = {b.steps * b.tokens_per_step:,} tokens "
                     f"at {b.seq_len} (plain RoPE)")  # fmt: skip
    else:
        lines.append(f"  base: {cfg.notes.get('base', e.init_from)}")
    lines.append(f"  extend x{len(cfg.variants)} ({', '.join(cfg.variants)}): {e.steps} steps x {e.tokens_per_step:,} "
                 f"tokens = {e.steps * e.tokens_per_step:,} tokens each at {e.seq_len}; lr {e.lr}, warm-up "
                 f"{e.warmup_steps}, accumulation {e.accumulation(world_size)} x micro-batch {e.micro_batch} "
                 f"on {world_size} rank(s)")  # fmt: skip
    lines.append(
        f"  eval: PPL at {list(cfg.ppl_lengths)} (n={cfg.n_ppl}); FSR at {list(cfg.fsr_lengths)} (n={cfg.n_fsr})"
    )
    if cfg.name == "paper":
        lines.append("  memory per GPU (8 x 80 GB, FSDP2 + activation checkpointing, bf16): "
                     "~13.5 GB weights+grads+AdamW "
                     "shards, ~8.6 GB checkpointed activations, ~9 GB recompute, ~8.4 GB fp32 logits+grad: ~40 GB "
                     "(derivation in ropekit/parallel.py)")  # fmt: skip
        lines.append("  launch: torchrun --nproc-per-node 8 experiments/pe_ablation.py --preset paper")
    return "\n".join(lines)


def run(cfg: AblationConfig, out: str | Path, *, log=print) -> dict:
    """Run (or resume) the ablation into ``out``; returns wall times and output paths."""
    from ropekit import data, figures
    from ropekit.eval import run as ev
    from ropekit.files import atomic_write_text, check_writable
    from ropekit.models import load_model
    from ropekit.results import append_rows, read_rows
    from ropekit.train import train

    out = check_writable(out, kind="folder")
    resolved = json.dumps(dataclasses.asdict(cfg), indent=1, default=str)
    saved = out / "ablation_config.json"
    if saved.is_file() and saved.read_text() != resolved:  # resuming must not mix two ablations' stages
        raise ValueError(f"{out} holds another ablation (its ablation_config.json differs from this one); "
                         "choose another --out, or run the same preset and data again to resume")  # fmt: skip
    atomic_write_text(saved, resolved)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    @contextlib.contextmanager
    def stage(name):
        t = time.perf_counter()
        log(f"[{name}] ...")
        yield
        times[name] = time.perf_counter() - t
        log(f"[{name}] {times[name]:.1f}s")

    with stage("data"):  # read, split and tokenise once; every stage below shares it
        tokenizer = None
        if not cfg.pretrain_base:  # a released base model brings its tokenizer
            from ropekit.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.extend.init_from)
        corpus = data.prepare_corpus(cfg.base.data, val_fraction=cfg.base.val_fraction,
                                     split_seed=cfg.base.split_seed, tokenizer=tokenizer,
                                     vocab_size=cfg.base.vocab_size)  # fmt: skip
        n_train, n_val = (int(c.lengths().sum()) for c in (corpus.train_tokens, corpus.val_tokens))
        log(f"  {len(corpus.train_docs)} train / {len(corpus.val_docs)} validation documents, "
            f"{n_train:,} / {n_val:,} tokens")  # fmt: skip

    base_final = out / "base" / "final"
    with stage("pretrain base"):
        if not cfg.pretrain_base:
            base_final = cfg.extend.init_from
            log(f"  starting from {base_final}")
        elif base_final.is_dir():
            log("  done earlier: skipped")
        else:
            r = train(cfg.base, out / "base", resume=True, corpus=corpus)
            log(f"  final loss {r['losses'][-1]:.3f}, {r.get('tokens_per_s', 0):.0f} tokens/s")

    results = out / "results.csv"
    done = {(r["variant"], r["metric"]) for r in read_rows(results)}
    for spec in cfg.variants:
        folder = out / _slug(spec)
        with stage(f"extend {spec}"):
            if (folder / "final").is_dir():
                log("  done earlier: skipped")
            else:  # the same base checkpoint and token budget for every variant; only the method differs
                ecfg = dataclasses.replace(cfg.extend, init_from=str(base_final), method=spec)
                r = train(ecfg, folder, resume=True, corpus=corpus)
                log(f"  final loss {r['losses'][-1]:.3f}, {r.get('tokens_per_s', 0):.0f} tokens/s")
        with stage(f"eval {spec}"):
            model = load_model(str(folder / "final"))
            variant = model.config.ropekit["method"]
            config = {"ablation": cfg.name, "variant_spec": spec}
            common = dict(experiment=f"pe_ablation_{cfg.name}", variant=variant, config=config)
            rows = []
            if (variant, "ppl") not in done:
                rows += ev.eval_ppl(model, corpus.tokenizer, corpus.val_docs, list(cfg.ppl_lengths), n=cfg.n_ppl,
                                    bin_size=cfg.bin_size, tokens=corpus.val_tokens, **common)  # fmt: skip
            if (variant, "fsr_target_nll") not in done:
                rows += ev.eval_fsr(model, corpus.tokenizer, corpus.val_docs, list(cfg.fsr_lengths), n=cfg.n_fsr,
                                    generate=cfg.fsr_generate, **common)  # fmt: skip
            if rows:
                append_rows(results, rows)
            else:
                log("  done earlier: skipped")

    with stage("table and figures"):
        target = cfg.extend.seq_len
        table = figures.table5(results, target)
        atomic_write_text(out / "table5.md", table)
        written = figures.draw_results(results, out / "figures", prefix=f"pe_ablation_{cfg.name}")
        log(table)
    times["total"] = time.perf_counter() - t_all
    log("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    atomic_write_text(out / "wall_times.json", json.dumps(times, indent=1))
    return {
        "times": times,
        "results": str(results),
        "table": str(out / "table5.md"),
        "figures": [str(p) for p in written],
    }


def demo(
    preset: str = "tiny",
    *,
    out: str | Path | None = None,
    data: str | None = None,
    dry_run: bool = False,
    world_size: int = 1,
    force: bool = False,
    log=print,
) -> dict | None:
    """``ropekit demo``: print the plan of ``preset``, then run it into ``out`` (default runs/<preset>)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    if data:
        cfg = with_data(cfg, data)
    log(plan(cfg, world_size=world_size))
    if dry_run:
        return None
    if cfg.needs_gpu and not force:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"preset {cfg.name!r} needs CUDA GPUs; use --dry-run to see its plan, or --force")
    from ropekit import parallel

    parallel.init_distributed()  # under torchrun (the paper preset): FSDP2 training on every rank
    return run(cfg, out or f"runs/{cfg.name}", log=log)
