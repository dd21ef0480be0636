"""The paper's positional-encoding ablation (Xiong et al. 2023, Section 4.1), at any scale.

corpus -> clean -> document split -> BPE tokenizer on train -> pretrain a Llama at length L with plain
RoPE -> for each variant (rope, pi, abf, xpos-abf): patch the base checkpoint with ropekit and continue
pretraining at 8L on the same token budget -> PPL vs length and FSR vs length on validation documents
-> result CSV -> Table 5-form markdown and Fig. 5b-form figures.

The instrument carries its controls, and compares on the same samples:

- positive control: the base model, before any extension, evaluated at its own length L (it must
  retrieve there, or the table cannot tell a method that works from one that does not);
- negative control: the same base model at 8L with no extension (plain RoPE past its window: it must
  fail there);
- every variant (and the control) is scored on the same PPL windows and FSR prompts; each mean has a
  95% bootstrap interval, and each variant's paired difference to the reference (RoPE ABF) has a
  paired bootstrap interval (``ropekit.stats``); the table marks the differences that are resolved.

At CPU scale the paper's regime is kept by scaling its RoPE base with the length ratio (10,000 x L /
4,096; ``ropekit.analysis.regime_base`` prints the derivation), ABF at 50x that base, PI at 8, xPos at
the ABF base with its scale base scaled alike (``regime_variants``).

Presets are functions returning an ``AblationConfig``: ``micro`` (tests, seconds), ``tiny``
(``ropekit demo``: two CPU cores, minutes, from the shipped base model), ``cpu`` (the same protocol
with its own base, longer, on two CPU cores), ``small`` (one GPU), ``paper`` (Llama 2 7B on a node;
``--dry-run`` prints its plan anywhere). Running again resumes: finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ropekit import data, parallel, stats
from ropekit.analysis import regime_derivation, regime_variants, xpos_envelope
from ropekit.eval import run as ev
from ropekit.eval import tasks
from ropekit.figures import paper_label, pyplot, save_png
from ropekit.files import atomic_write_text, check_writable, sole_writer
from ropekit.models import SHIPPED_MODELS, load_model, load_tokenizer, shipped_provenance
from ropekit.results import append_rows, git_sha, make_row, provenance, read_rows, write_rows
from ropekit.train import PRESETS as TRAIN
from ropekit.train import TrainConfig, model_of, train
from ropekit.typed import config_differences

__all__ = [
    "AblationConfig",
    "PRESETS",
    "CONTROL",
    "demo",
    "run",
    "plan",
    "summarize",
    "ablation_table",
    "draw_ablation",
]

# the paper's four methods (``analysis.PAPER_VARIANTS`` at 7B scale), each base but ABF's taken from the model
MODEL_BASE_VARIANTS = ("rope", "pi:factor=8", "abf:base=500000", "xpos:base=500000")
CONTROL = "base"  # the variant name of the base model evaluated as it is (the controls' row)
# the per-sample metrics the ablation writes (a finished task is not evaluated again on resume)
SAMPLE_METRICS = {m.name for t in ("ppl", "fsr") for m in tasks.TASKS[t].sample_metrics}


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    name: str
    base: TrainConfig  # pretraining at the short length, plain RoPE
    extend: TrainConfig  # continued pretraining at 8x the length (method and init_from are filled per variant)
    variants: tuple[str, ...] = MODEL_BASE_VARIANTS
    reference: str = "abf:base=500000"  # paired differences are taken against this variant
    controls: bool = True  # evaluate the base model as it is (positive control at <= L, negative at 8L)
    control_accuracy: float = 0.6  # the positive control passes when base FSR accuracy at <= L is >= this
    ppl_lengths: tuple[int, ...] = ()
    fsr_lengths: tuple[int, ...] = ()
    n_ppl: int = 4
    n_fsr: int = 8
    bin_size: int = 64  # per-position loss at the target length, in bins of this many positions
    fsr_generate: bool = True
    model_params: str = ""  # for the plan printout
    pretrain_base: bool = True  # False: the base is extend.init_from, a released checkpoint (paper)
    base_length: int | None = None  # the base model's trained length L (default base.seq_len)
    needs_gpu: bool = False  # refused on a machine without CUDA (unless forced)
    notes: dict = field(default_factory=dict)
    # seeds of the extension stage (its data order and the initialisation of anything new); the base model
    # is the same for every seed. Rows carry their seed; the summary and the table pool them.
    seeds: tuple[int, ...] = (0,)
    # more extensions at the first seed, (variant, steps): a budget curve (a variant at other step counts)
    # or another setting of a method (an xPos scale base). Each is evaluated on the same samples.
    arms: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.reference not in self.variants:
            raise ValueError(f"reference {self.reference!r} is not one of the variants {list(self.variants)}")
        if self.extend.seq_len not in self.ppl_lengths:  # the per-position loss is drawn at the target length
            raise ValueError(
                f"ppl_lengths {list(self.ppl_lengths)} must include the target length {self.extend.seq_len}"
            )

    @property
    def trained_length(self) -> int:
        """L: the length the base model was trained at (the controls are read at <= L and at the target)."""
        return self.base_length or self.base.seq_len

    def extensions(self) -> list[tuple[str, int, int]]:
        """Every extension run as (variant, seed, steps), in run order: the variants seed by seed, then the arms."""
        main = [(v, s, self.extend.steps) for s in self.seeds for v in self.variants]
        return main + [(v, self.seeds[0], n) for v, n in self.arms if (v, self.seeds[0], n) not in main]

    def steps_of(self, row) -> int:
        """The extension steps a result row's model had (the control: 0; rows from before steps were
        recorded: the preset's)."""
        config = row["config"] if isinstance(row["config"], dict) else json.loads(row["config"] or "{}")
        if "extend_steps" in config:
            return int(config["extend_steps"])
        return 0 if row["variant"] == CONTROL else self.extend.steps


def _tiny() -> AblationConfig:
    """Two CPU cores, a few minutes: the ``tiny-extend`` training preset from the shipped base model
    (``ropekit-tiny-256``, a 4-layer, 128-wide Llama, ~1.3M parameters with a 2,048-token BPE, trained by
    ``cpu-base``), 256 -> 2,048 tokens: the paper's 8x. Like the paper, it starts from a released base;
    the ``cpu`` preset trains that base itself."""
    variants = regime_variants(256)
    return AblationConfig(name="tiny", base=TRAIN["cpu-base"](), extend=TRAIN["tiny-extend"](), variants=variants,
                          reference=variants[2], ppl_lengths=(256, 512, 1024, 2048, 4096),
                          fsr_lengths=(128, 256, 512, 1024, 2048), n_ppl=6, n_fsr=32, bin_size=128,
                          model_params="~1.3M", pretrain_base=False, base_length=256)  # fmt: skip


def _cpu() -> AblationConfig:
    """The ``tiny`` protocol longer, on two CPU cores (about two and a half hours; resumable): ``cpu-extend``
    (3x the tokens per variant) from the same shipped base, three seeds of each extension, more prompts,
    the stricter positive control (0.8), and two questions as arms at the first seed: the extension budget
    (PI, ABF and xPos ABF after 20, 180 and 360 steps beside the 60 of the variants) and xPos's scale base
    (128 and 512 beside the regime's 32)."""
    tiny = _tiny()
    extend = TRAIN["cpu-extend"]()
    _, pi, abf, xpos = tiny.variants
    scale_bases = [(xpos.replace("scale_base=32", f"scale_base={b}"), extend.steps) for b in (128, 512)]
    budgets = [(v, n) for n in (20, 180, 360) for v in (pi, abf, xpos)]
    return dataclasses.replace(tiny, name="cpu", extend=extend, n_ppl=12, n_fsr=48, control_accuracy=0.8,
                               seeds=(0, 1, 2), arms=(*scale_bases, *budgets))  # fmt: skip


def _micro() -> AblationConfig:
    """Seconds: the plumbing of ``cpu`` with the micro model (2 layers, 32 wide), 32 -> 256 tokens (the
    retrieval mix is in the extension only: at 32 tokens the question leaves almost no context)."""
    variants = regime_variants(32)
    base = dataclasses.replace(TRAIN["tiny-base"](), model_overrides=model_of("micro", 32), vocab_size=512,
                               method=variants[0], retrieval_share=0.0,
                               seq_len=32, steps=4, tokens_per_step=256, micro_batch=8, warmup_steps=1, eval_every=4,
                               save_every=4, eval_batches=1)  # fmt: skip
    extend = dataclasses.replace(base, seq_len=256, steps=2, tokens_per_step=256, micro_batch=1, eval_every=2,
                                 save_every=2, retrieval_share=0.6)  # fmt: skip
    return AblationConfig(name="micro", base=base, extend=extend, variants=variants, reference=variants[2],
                          ppl_lengths=(32, 256, 512), fsr_lengths=(64, 256), n_ppl=2, n_fsr=3, bin_size=32,
                          model_params="~40k")  # fmt: skip


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
                          pretrain_base=False, needs_gpu=True, base_length=4096,
                          notes={"base": "the released Llama 2 7B checkpoint (no pretraining stage)"})  # fmt: skip


PRESETS = {"micro": _micro, "tiny": _tiny, "cpu": _cpu, "small": _small, "paper": _paper}


def with_data(cfg: AblationConfig, data: str) -> AblationConfig:
    """The same ablation on another text source (both stages)."""
    return dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, data=data),
                               extend=dataclasses.replace(cfg.extend, data=data))  # fmt: skip


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def _shipped_base(spec: str) -> str | None:
    """How a base model shipped with ropekit was made (its provenance.json), or None for other specs."""
    if spec not in SHIPPED_MODELS:
        return None
    record = shipped_provenance(spec)
    t = record["training_config"]
    return (f"{spec}, shipped with ropekit: {t['steps']} steps x {t['tokens_per_step']:,} tokens at {t['seq_len']} "
            f"({t['method']}) from scratch on the training split, by `{record['command']}` at commit "
            f"{record['trained_at_commit'][:12]}")  # fmt: skip


def plan(cfg: AblationConfig, world_size: int = 1) -> str:
    """What the run will do: steps, tokens, sequence lengths and (for 7B) the memory per GPU."""
    b, e = cfg.base, cfg.extend
    lines = [f"ablation '{cfg.name}': model {cfg.model_params} parameters"]
    if cfg.pretrain_base:
        lines.append(f"  base: {b.steps} steps x {b.tokens_per_step:,} tokens = {b.steps * b.tokens_per_step:,} tokens "
                     f"at {b.seq_len} ({b.method})")  # fmt: skip
    else:
        lines.append(f"  base: {cfg.notes.get('base') or _shipped_base(e.init_from) or e.init_from}")
    lines.append(f"  extend x{len(cfg.variants)} ({', '.join(cfg.variants)}): {e.steps} steps x {e.tokens_per_step:,} "
                 f"tokens = {e.steps * e.tokens_per_step:,} tokens each at {e.seq_len}; lr {e.lr}, warm-up "
                 f"{e.warmup_steps}, accumulation {e.accumulation(world_size)} x micro-batch {e.micro_batch} "
                 f"on {world_size} rank(s)")  # fmt: skip
    if len(cfg.seeds) > 1:
        lines.append(f"  seeds: each variant extended with seeds {', '.join(map(str, cfg.seeds))} (data order; the "
                     "base model is the same for every seed)")  # fmt: skip
    if cfg.arms:
        lines.append(f"  arms at seed {cfg.seeds[0]}: " + ", ".join(f"{v} x {n} steps" for v, n in cfg.arms))
    lines.append(f"  {len(cfg.extensions())} extension runs in all")
    for stage, t in (("base", b), ("extend", e)) if cfg.pretrain_base else (("extend", e),):
        if t.retrieval_share:
            copies = f", {t.retrieval_copy:.0%} of them copies" if t.retrieval_copy else ""
            lines.append(
                f"  {stage} mix: {t.retrieval_share:.0%} of the rows retrieval examples from the training "
                f"documents{copies}; an answer token's loss weight {t.retrieval_weight:g} (a text token's: 1)"
            )
    lines.append(f"  eval: PPL at {list(cfg.ppl_lengths)} (n={cfg.n_ppl} windows); FSR at {list(cfg.fsr_lengths)} "
                 f"(n={cfg.n_fsr} prompts); the same samples for every variant, paired differences to "
                 f"{cfg.reference}")  # fmt: skip
    if cfg.controls:
        lines.append(f"  controls: the base model as it is: FSR accuracy >= {cfg.control_accuracy} at <= "
                     f"{cfg.trained_length} (positive), and at {max(cfg.fsr_lengths)} with no extension "
                     "(negative)")  # fmt: skip
    if cfg.variants == regime_variants(b.seq_len):
        m = b.model_overrides
        lines.append(regime_derivation(m["hidden_size"] // m["num_attention_heads"], b.seq_len))
    if cfg.name == "paper":
        lines.append("  memory per GPU (8 x 80 GB, FSDP2 + activation checkpointing, bf16): "
                     "~13.5 GB weights+grads+AdamW "
                     "shards, ~8.6 GB checkpointed activations, ~9 GB recompute, ~8.4 GB fp32 logits+grad: ~40 GB "
                     "(derivation in ropekit/parallel.py)")  # fmt: skip
        lines.append("  launch: torchrun --nproc-per-node 8 experiments/pe_ablation.py --preset paper")
    return "\n".join(lines)


def run(cfg: AblationConfig, out: str | Path, *, log=print) -> dict:
    """Run (or resume) the ablation into ``out``; returns wall times and output paths. One run writes a
    folder at a time: a second one started while it runs is refused, naming the holder."""
    out = check_writable(out, kind="folder")
    rank, _ = parallel.rank_and_world()
    with sole_writer(out, kind="folder") if rank == 0 else contextlib.nullcontext():
        return _run(cfg, out, log=log)


def _run(cfg: AblationConfig, out: Path, *, log) -> dict:
    git_sha()  # read now: the rows of a long run record the commit it started from, not a later one
    resolved = json.dumps(dataclasses.asdict(cfg), indent=1, default=str)
    saved = out / "ablation_config.json"
    if saved.is_file():  # resuming must not mix two ablations' stages
        # more (or fewer) seeds and arms extend the same ablation: each run has its own folder and rows
        differ = [d for d in config_differences(json.loads(saved.read_text()), cfg)
                  if not d.startswith(("seeds:", "arms:"))]  # fmt: skip
        if differ:
            raise ValueError(f"{out} holds another ablation (its ablation_config.json differs in {'; '.join(differ)}); "
                             "choose another --out, or run the same preset and data again to resume")  # fmt: skip
    atomic_write_text(saved, resolved)
    # each stage's wall time; a stage done by an earlier run keeps the time that run recorded
    wall = out / "wall_times.json"
    earlier = json.loads(wall.read_text()) if wall.is_file() else {}
    times: dict[str, float] = {}
    skipped: set[str] = set()
    current = [""]

    def skip() -> None:
        skipped.add(current[0])
        log("  done earlier: skipped")

    @contextlib.contextmanager
    def stage(name):
        t, current[0] = time.perf_counter(), name
        log(f"[{name}] ...")
        yield
        times[name] = time.perf_counter() - t
        if name in skipped:  # the time of the run that did it; none when that run stopped before recording it
            if name not in earlier:
                del times[name]
                log(f"[{name}] (its time was not recorded)")
                return
            times[name] = earlier[name]
        log(f"[{name}] {times[name]:.1f}s")

    with stage("data"):  # read, split and tokenise once; every stage below shares it
        tokenizer = None
        if not cfg.pretrain_base:  # a released base model brings its tokenizer
            tokenizer = load_tokenizer(cfg.extend.init_from)
        corpus = data.prepare_corpus(cfg.base.data, val_fraction=cfg.base.val_fraction,
                                     split_seed=cfg.base.split_seed, tokenizer=tokenizer,
                                     vocab_size=cfg.base.vocab_size)  # fmt: skip
        n_train, n_val = (int(c.lengths().sum()) for c in (corpus.train_tokens, corpus.val_tokens))
        log(f"  {len(corpus.train_docs)} train / {len(corpus.val_docs)} validation documents, "
            f"{n_train:,} / {n_val:,} tokens")  # fmt: skip
        for L in cfg.ppl_lengths:  # one PPL window per validation document long enough
            fit = int((corpus.val_tokens.lengths() >= L).sum())
            if fit < cfg.n_ppl:
                log(f"  note: PPL at {L} gets {fit} windows, not the {cfg.n_ppl} asked: one per validation "
                    f"document of >= {L} tokens (the table states the real n)")  # fmt: skip

    base_final = out / "base" / "final"
    with stage("pretrain base"):
        if not cfg.pretrain_base:
            base_final = cfg.extend.init_from
            log(f"  starting from {base_final}")
        elif base_final.is_dir():
            skip()
        else:
            r = train(cfg.base, out / "base", resume=True, corpus=corpus)
            log(f"  final loss {r['losses'][-1]:.3f}, {r.get('tokens_per_s', 0):.0f} tokens/s")

    results = out / "results.csv"
    done = _done(read_rows(results), cfg)
    experiment = f"pe_ablation_{cfg.name}"
    tokenizer, target = corpus.tokenizer, cfg.extend.seq_len

    def finished(variant: str, seed: int, steps: int) -> bool:
        return all((variant, t, seed, steps) in done for t in ("ppl", "fsr"))

    def evaluate(variant: str, model_folder, seed: int = 0, steps: int = 0) -> None:
        """Per-sample rows of one model on the same windows and prompts as every other model (the
        evaluation's own seed stays 0: ``seed`` is the extension's, written in the rows' seed column)."""
        if finished(variant, seed, steps):
            skip()
            return
        model = load_model(str(model_folder))
        config = {"ablation": cfg.name, "method": ev.variant_of(model),  # a released base has no config.ropekit
                  "extend_steps": steps}  # fmt: skip
        common = dict(experiment=experiment, variant=variant, config=config)
        rows = []
        if (variant, "ppl", seed, steps) not in done:
            rows += ev.eval_ppl_samples(model, tokenizer, corpus.val_docs, list(cfg.ppl_lengths), n=cfg.n_ppl,
                                        bin_length=target, bin_size=cfg.bin_size, tokens=corpus.val_tokens,
                                        **common)  # fmt: skip
        if (variant, "fsr", seed, steps) not in done:
            rows += ev.eval_fsr_samples(model, tokenizer, corpus.val_docs, list(cfg.fsr_lengths), n=cfg.n_fsr,
                                        generate=cfg.fsr_generate, **common)  # fmt: skip
        for r in rows:
            r["seed"] = seed
        append_rows(results, rows)

    if cfg.controls:  # the base model as it is: retrieval at <= L (positive), at 8L without extension (negative)
        with stage("eval base (controls)"):
            evaluate(CONTROL, base_final)
    for spec, seed, steps in cfg.extensions():
        folder, label = out / _run_name(cfg, spec, seed, steps), _run_label(cfg, spec, seed, steps)
        with stage(f"extend {label}"):
            if (folder / "final").is_dir() or finished(spec, seed, steps):
                skip()
            else:  # the same base checkpoint for every run; only the method, the seed or the budget differs
                r = train(_extension(cfg, base_final, spec, seed, steps), folder, resume=True, corpus=corpus)
                log(f"  final loss {r['losses'][-1]:.3f}, {r.get('tokens_per_s', 0):.0f} tokens/s")
        with stage(f"eval {label}"):
            evaluate(spec, folder / "final", seed, steps)

    with stage("table and figures"):
        summary = summarize(results, cfg, experiment=experiment)
        table = ablation_table(summary, cfg)
        atomic_write_text(out / "table.md", table)
        written = draw_ablation(summary, cfg, out / "figures", prefix=experiment)
        log(table)
    times["total"] = sum(times.values())  # of the stages: the wall time of the run that did each
    log("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    atomic_write_text(wall, json.dumps(times, indent=1))
    return {
        "times": times,
        "results": str(results),
        "summary": str(out / "summary.csv"),
        "table": str(out / "table.md"),
        "figures": [str(p) for p in written],
    }


def _run_name(cfg: AblationConfig, spec: str, seed: int, steps: int) -> str:
    """The folder of one extension run: the variant's slug, with the seed and the steps when not the defaults."""
    return _slug(spec) + (f"_seed{seed}" if seed else "") + (f"_steps{steps}" if steps != cfg.extend.steps else "")


def _run_label(cfg: AblationConfig, spec: str, seed: int, steps: int) -> str:
    return spec + (f" seed {seed}" if seed else "") + (f" {steps} steps" if steps != cfg.extend.steps else "")


def _extension(cfg: AblationConfig, base, spec: str, seed: int, steps: int) -> TrainConfig:
    """The training config of one extension run; another budget keeps the preset's schedule in proportion
    (warm-up, evaluation and checkpoint intervals scaled with the steps)."""
    e = dataclasses.replace(cfg.extend, init_from=str(base), method=spec, seed=seed)
    if steps == e.steps:
        return e
    scale = steps / e.steps
    return dataclasses.replace(e, steps=steps, warmup_steps=round(e.warmup_steps * scale),
                               eval_every=max(1, round(e.eval_every * scale)),
                               save_every=max(1, round(e.save_every * scale)))  # fmt: skip


def _done(rows, cfg: AblationConfig) -> set[tuple[str, str, int, int]]:
    """(variant, task, seed, steps) of the evaluations already written."""
    return {
        (r["variant"], tasks.task_of(r["metric"]), int(r["seed"]), cfg.steps_of(r))
        for r in rows
        if r["metric"] in SAMPLE_METRICS
    }


def summarize(results: str | Path, cfg: AblationConfig, *, experiment: str | None = None) -> list[dict]:
    """Summary rows from the per-sample rows, written to ``summary.csv`` beside ``results`` (rewritten each
    run) and returned. For every (metric, length, position) and run (variant, extension steps):

    - ``mean:``, ``low:``, ``high:``: the mean with its 95% interval, each sample averaged over the seeds;
    - ``delta:``, ``delta_low:``, ``delta_high:``, ``resolved:``: the paired difference to ``cfg.reference``
      at the same steps (the control: at the preset's steps), on the seeds both have, pooled the same way;
    - ``seed_mean:`` and ``seed_delta:``, one row per seed (its ``seed`` column): the across-seed spread;
    - ``reproduced:``: 1 when the pooled interval excludes 0 and the difference has its sign in every seed.

    A pooled row's ``seed`` is its seed when it has one, else -1; its config lists ``seeds`` and ``extend_steps``."""
    results = Path(results)
    rows = [
        r
        for r in read_rows(results)
        if r["metric"] in SAMPLE_METRICS and (experiment is None or r["experiment"] == experiment)
    ]
    # (metric, length, position) -> (variant, steps) -> seed -> sample -> value
    groups: dict[tuple[str, str, str], dict[tuple[str, int], dict[int, dict[int, float]]]] = {}
    for r in rows:
        sample = json.loads(r["config"] or "{}")["sample"]
        key = (r["metric"], r["context_length"], r["position"])
        run = (r["variant"], cfg.steps_of(r))
        groups.setdefault(key, {}).setdefault(run, {}).setdefault(int(r["seed"]), {})[int(sample)] = float(r["value"])
    prov = {**provenance(), "device": ", ".join(sorted({r["device"] for r in rows}))}  # where it was evaluated
    summary = []
    for (metric, length, position), runs in sorted(groups.items()):
        for (variant, steps), by_seed in sorted(runs.items()):
            ref = runs.get((cfg.reference, cfg.extend.steps if variant == CONTROL else steps))
            if variant == CONTROL or ref is None or ref is by_seed:  # the control has no seed: it meets each
                seeds = sorted(ref or by_seed) if variant == CONTROL else sorted(by_seed)
            else:
                seeds = sorted(set(by_seed) & set(ref))
            if not seeds:
                continue

            def values(of, seed):
                return of[seed] if seed in of else of[min(of)]  # the control's one evaluation serves every seed

            paired = ref is not None and ref is not by_seed
            pooled = {"run": _pool([values(by_seed, s) for s in seeds])}
            each = {s: {"run": values(by_seed, s)} for s in seeds}
            if paired:
                pooled["ref"] = _pool([values(ref, s) for s in seeds])
                for s in seeds:
                    each[s]["ref"] = values(ref, s)
            compared = stats.compare(pooled, "ref" if paired else None)["run"]
            per_seed = {s: stats.compare(each[s], "ref" if paired else None)["run"] for s in seeds}
            if "delta" in compared:
                signs = {math.copysign(1, v["delta"]) for v in per_seed.values() if v["delta"] != 0}
                held = len(signs) == 1 and all(v["delta"] != 0 for v in per_seed.values())
                compared["reproduced"] = float(bool(compared["resolved"]) and held)
            config = {"ablation": cfg.name, "reference": cfg.reference, "seeds": seeds, "extend_steps": steps,
                      "interval": "95% percentile bootstrap (scipy.stats.bootstrap); deltas paired by sample, "
                                  "each sample averaged over the seeds"}  # fmt: skip
            common = dict(experiment=rows[0]["experiment"], variant=variant, context_length=int(length),
                          position=int(position) if position else None, config=config, prov=prov)  # fmt: skip
            for kind, value in compared.items():
                if kind != "n":
                    summary.append(make_row(metric=f"{kind}:{metric}", value=value, n=int(compared["n"]),
                                            seed=seeds[0] if len(seeds) == 1 else -1, **common))  # fmt: skip
            if len(seeds) > 1:
                for s, v in per_seed.items():
                    for kind in ("mean", "delta"):
                        if kind in v:
                            summary.append(make_row(metric=f"seed_{kind}:{metric}", value=v[kind], n=int(v["n"]),
                                                    seed=s, **common))  # fmt: skip
    write_rows(results.with_name("summary.csv"), summary)
    return summary


def _pool(per_seed: list[dict[int, float]]) -> dict[int, float]:
    """Each sample's mean over the seeds (the samples every seed has: the same prompts and windows)."""
    shared = set.intersection(*(set(v) for v in per_seed))
    return {k: sum(v[k] for v in per_seed) / len(per_seed) for k in sorted(shared)}


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
        if not torch.cuda.is_available():
            raise ValueError(f"preset {cfg.name!r} needs CUDA GPUs; use --dry-run to see its plan, or --force")
    parallel.init_distributed()  # under torchrun (the paper preset): FSDP2 training on every rank
    return run(cfg, out or f"runs/{cfg.name}", log=log)


# ---------------------------------------------------------------------------------------------
# Its table and figures, drawn from the summary rows (``summarize``)
# ---------------------------------------------------------------------------------------------
# the per-sample metrics the table shows, in order (labels and directions from ``ropekit.eval.tasks``)
TABLE_METRICS = ("fsr_sample_token_accuracy", "fsr_sample_rouge_l", "window_nll")


def _ablation_values(summary, cfg, steps: int | None = None) -> dict[tuple[str, str, int, int | None], float]:
    """{(variant, kind:metric, length, position): value} from the pooled summary rows (dicts or CSV rows)
    of the runs at ``steps`` extension steps (default: the preset's; the control's row always)."""
    steps = cfg.extend.steps if steps is None else steps
    out = {}
    for r in summary:
        if r["metric"].startswith("seed_") or (r["variant"] != CONTROL and cfg.steps_of(r) != steps):
            continue
        pos = r["position"]
        out[(r["variant"], r["metric"], int(r["context_length"]), int(pos) if pos not in (None, "") else None)] = float(
            r["value"]
        )
    return out


def _seed_deltas(summary, cfg) -> dict[tuple[str, str, int], list[float]]:
    """{(variant, metric, length): [each seed's paired difference, by seed]} at the preset's steps."""
    out: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for r in summary:
        if (
            r["metric"].startswith("seed_delta:")
            and not r["position"]
            and (r["variant"] == CONTROL or cfg.steps_of(r) == cfg.extend.steps)
        ):
            key = (r["variant"], r["metric"].split(":", 1)[1], int(r["context_length"]))
            out.setdefault(key, []).append((int(r["seed"]), float(r["value"])))
    return {k: [v for _, v in sorted(pairs)] for k, pairs in out.items()}


def _variant_label(variant: str, cfg) -> str:
    if variant == CONTROL:
        return f"base model, no extension ({cfg.base.method}; control)"
    return paper_label(variant) + (" (reference)" if variant == cfg.reference else "")


def _table_variants(cfg) -> list[str]:
    """The table's rows: the control, the variants, then the arms run at the preset's steps (other settings)."""
    extra = [v for v, n in cfg.arms if n == cfg.extend.steps and v not in cfg.variants]
    return [CONTROL, *cfg.variants, *dict.fromkeys(extra)]


def _budgets(summary, cfg) -> tuple[list[str], list[int]]:
    """The variants run at more than one step count, and every step count (0: the base model as it is)."""
    steps_by: dict[str, set[int]] = {}
    for r in summary:
        if r["variant"] != CONTROL and r["metric"].startswith("mean:"):
            steps_by.setdefault(r["variant"], set()).add(cfg.steps_of(r))
    variants = [v for v in _table_variants(cfg) if len(steps_by.get(v, ())) > 1]
    return variants, sorted({0, *(n for v in variants for n in steps_by[v])})


def budget_values(summary, cfg, metric: str, length: int) -> dict[str, list[tuple[int, float, float, float]]]:
    """The budget curve of ``metric`` at ``length``: {variant: [(steps, mean, low, high)]}, 0 steps being the
    base model as it is (the control)."""
    variants, steps = _budgets(summary, cfg)
    out = {}
    for v in variants:
        points = []
        for n in steps:
            val = _ablation_values(summary, cfg, n)
            who = CONTROL if n == 0 else v
            if (who, f"mean:{metric}", length, None) in val:
                points.append((n, *(val[(who, f"{k}:{metric}", length, None)] for k in ("mean", "low", "high"))))
        out[v] = points
    return out


def _budget_table(summary, cfg) -> list[str]:
    """Markdown lines: FSR accuracy at the target length and PPL there against the extension's steps."""
    variants, steps = _budgets(summary, cfg)
    if not variants:
        return []
    target, top = cfg.extend.seq_len, max(cfg.fsr_lengths)
    lines = []
    for metric, length in (("fsr_sample_token_accuracy", top), ("window_nll", target)):
        info = tasks.metric(metric)
        f = math.exp if info.as_ppl else (lambda x: x)
        lines += ["", f"**Extension budget: {info.label} at {length}** against the extension's steps (0: the base "
                  f"model as it is; mean [95% interval]; Δ: paired difference to {paper_label(cfg.reference)} at "
                  "the same steps; **bold**: resolved)", "",
                  "| variant | " + " | ".join(str(n) for n in steps) + " |", "|---|" + "---|" * len(steps)]  # fmt: skip
        for v in variants:
            cells = []
            for n in steps:
                val = _ablation_values(summary, cfg, n)
                who = CONTROL if n == 0 else v
                key = (who, f"mean:{metric}", length, None)
                if key not in val:
                    cells.append("")
                    continue
                lo, hi = val[(who, f"low:{metric}", length, None)], val[(who, f"high:{metric}", length, None)]
                cell = f"{f(val[key]):.2f} [{f(lo):.2f}, {f(hi):.2f}]"
                if n and (v, f"delta:{metric}", length, None) in val:
                    d = val[(v, f"delta:{metric}", length, None)]
                    mark = val.get(
                        (v, f"reproduced:{metric}", length, None), val[(v, f"resolved:{metric}", length, None)]
                    )
                    cell += f"<br>{'**' if mark else ''}Δ {d:+.3f}{'**' if mark else ''}"
                cells.append(cell)
            lines.append(f"| {_variant_label(v, cfg)} | " + " | ".join(cells) + " |")
    return lines


def _xpos_notes(cfg, variants) -> list[str]:
    """One line per xPos variant: the decay its scale base implies at the target length (closed form)."""
    m = cfg.base.model_overrides
    if "hidden_size" not in m:
        return []
    head_dim, target = m["hidden_size"] // m["num_attention_heads"], cfg.extend.seq_len
    notes = []
    for v in variants:
        if v == CONTROL:
            continue
        low, high = xpos_envelope(v, target, head_dim)
        if (low, high) != (1.0, 1.0):
            notes.append(f"{paper_label(v)}: at distance {target} xPos multiplies each rotary pair's score "
                         f"contribution by between {low:.2g} (fastest pair) and {high:.2g} (slowest; head dim "
                         f"{head_dim}; `analysis.xpos_envelope`).")  # fmt: skip
    return notes


def ablation_table(summary, cfg) -> str:
    """Markdown: the controls' verdict, then per metric a variant x length table of means with 95%
    intervals and each variant's paired difference to the reference (bold: the interval excludes 0)."""
    val = _ablation_values(summary, cfg)
    L = cfg.trained_length
    variants = [v for v in _table_variants(cfg) if any(k[0] == v for k in val)]
    spread = _seed_deltas(summary, cfg)
    acc = "fsr_sample_token_accuracy"
    lines = []
    short = sorted(n for (v, m, n, p) in val if v == CONTROL and m == f"mean:{acc}" and n <= L)
    if short:
        worst = min(val[(CONTROL, f"mean:{acc}", n, None)] for n in short)
        verdict = ("passes" if worst >= cfg.control_accuracy else
                   "FAILS: the base model retrieves too little at its own length for the FSR comparisons below "
                   "to measure more than a weak skill")  # fmt: skip
        lines.append(f"- **Positive control** {verdict}: the base model's lowest FSR accuracy at "
                     f"{', '.join(map(str, short))} tokens (<= its length {L}) is {worst:.2f} (threshold "
                     f"{cfg.control_accuracy}).")  # fmt: skip
    longest = max((n for (v, m, n, p) in val if v == CONTROL and m == f"mean:{acc}"), default=0)
    if longest > L:  # the longest FSR length (the target, where the lengths reach it)
        far = val[(CONTROL, f"mean:{acc}", longest, None)]
        lo, hi = val[(CONTROL, f"low:{acc}", longest, None)], val[(CONTROL, f"high:{acc}", longest, None)]
        lines.append(f"- **Negative control**: the same model at {longest} tokens with no extension: {far:.2f} "
                     f"[{lo:.2f}, {hi:.2f}].")  # fmt: skip
    bold = "reproduced in every seed (below)" if len(cfg.seeds) > 1 else "resolved"
    for metric in TABLE_METRICS:
        info = tasks.metric(metric)
        label, higher, as_ppl = info.label, info.higher_is_better, info.as_ppl
        lengths = sorted({n for (v, m, n, p) in val if m == f"mean:{metric}" and p is None})
        if not lengths:
            continue
        f = math.exp if as_ppl else (lambda x: x)
        lines += ["", f"**{label}** (mean [95% interval]; Δ: paired difference to {paper_label(cfg.reference)}"
                  f"{' in NLL' if as_ppl else ''}, {'higher' if higher else 'lower'} is better; **bold**: {bold})",
                  "", "| variant | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]  # fmt: skip
        for v in variants:
            cells = []
            for n in lengths:
                key = (v, f"mean:{metric}", n, None)
                if key not in val:
                    cells.append("")
                    continue
                lo, hi = val[(v, f"low:{metric}", n, None)], val[(v, f"high:{metric}", n, None)]
                cell = f"{f(val[key]):.2f}" + ("" if math.isnan(lo) else f" [{f(lo):.2f}, {f(hi):.2f}]")
                if (v, f"delta:{metric}", n, None) in val:
                    d, dlo, dhi = (val[(v, f"{k}:{metric}", n, None)] for k in ("delta", "delta_low", "delta_high"))
                    delta = f"Δ {d:+.3f}" + ("" if math.isnan(dlo) else f" [{dlo:+.3f}, {dhi:+.3f}]")
                    if (v, metric, n) in spread:  # several seeds: the verdict needs its sign in every one
                        delta += " (seeds " + ", ".join(f"{x:+.3f}" for x in spread[(v, metric, n)]) + ")"
                    mark = val.get((v, f"reproduced:{metric}", n, None), val[(v, f"resolved:{metric}", n, None)])
                    cell += f"<br>{'**' + delta + '**' if mark else delta}"
                cells.append(cell)
            lines.append(f"| {_variant_label(v, cfg)} | " + " | ".join(cells) + " |")
    n_fsr = next((int(r["n"]) for r in summary if r["metric"] == f"mean:{acc}"), 0)
    n_ppl = next((int(r["n"]) for r in summary if r["metric"] == "mean:window_nll"), 0)
    lines += ["", f"FSR: {n_fsr} prompts per length, PPL: {n_ppl} windows per length, the same for every variant; "
              "intervals: 95% percentile bootstrap (scipy.stats.bootstrap), deltas paired by sample."]  # fmt: skip
    if len(cfg.seeds) > 1:
        lines.append(f"Extension seeds {', '.join(map(str, cfg.seeds))} (data order; the base model is the same for "
                     "every seed): each sample is averaged over the seeds a row has; a difference is **bold** only "
                     "when that pooled interval excludes 0 and its sign holds in every seed (each seed's Δ in "
                     "brackets); a row without seeds in brackets ran at the first seed only, and its bold means "
                     "resolved there.")  # fmt: skip
    lines += _xpos_notes(cfg, variants)
    lines += _budget_table(summary, cfg)
    return "\n".join(lines) + "\n"


def draw_ablation(summary, cfg, out: str | Path, *, prefix: str) -> list[Path]:
    """``<prefix>_fsr.png`` (teacher-forced accuracy and ROUGE-L against length, the control dashed),
    ``<prefix>_ppl.png`` and ``<prefix>_position_loss.png`` (at the target length only), each with 95%
    intervals, and ``<prefix>_summary.csv`` (the rows they were drawn from)."""
    plt = pyplot()
    val = _ablation_values(summary, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L, target = cfg.trained_length, cfg.extend.seq_len
    variants = [v for v in _table_variants(cfg) if any(k[0] == v for k in val)]
    colour = {v: f"C{i}" for i, v in enumerate(_table_variants(cfg)[1:])}
    device = ", ".join(sorted({r["device"] for r in summary}))

    def curve(ax, metric, *, by_position=False, transform=lambda x: x):
        for v in variants:
            xs = sorted(p if by_position else n for (vv, m, n, p) in val
                        if vv == v and m == f"mean:{metric}" and (p is not None) == by_position
                        and (not by_position or n == target))  # fmt: skip
            if not xs:
                continue
            key = (lambda x: (target, x)) if by_position else (lambda x: (x, None))
            y = [transform(val[(v, f"mean:{metric}", *key(x))]) for x in xs]
            lo = [transform(val[(v, f"low:{metric}", *key(x))]) for x in xs]
            hi = [transform(val[(v, f"high:{metric}", *key(x))]) for x in xs]
            style = (dict(color="k", ls="--", marker="s") if v == CONTROL
                     else dict(color=colour[v], marker="o"))  # fmt: skip
            ax.plot(xs, y, ms=3, label=_variant_label(v, cfg), **style)
            ax.fill_between(xs, lo, hi, alpha=0.15, color=style["color"])
        if not by_position:
            ax.set_xscale("log", base=2)
            ax.axvline(L, color="grey", lw=0.6, ls=":")
            ax.set_xlabel(f"context length (tokens); dotted: the base model's length {L}")
        ax.legend(fontsize=6)

    written = []
    panels = [("fsr", [("fsr_sample_token_accuracy", "teacher-forced token accuracy"),
                       ("fsr_sample_rouge_l", "ROUGE-L F1 x 100")]),
              ("ppl", [("window_nll", "perplexity")])]  # fmt: skip
    for name, metrics in panels:
        metrics = [(m, y) for m, y in metrics if any(k[1] == f"mean:{m}" for k in val)]
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
        for ax, (m, ylabel) in zip(axes[0], metrics, strict=True):
            curve(ax, m, transform=math.exp if m == "window_nll" else (lambda x: x))
            ax.set_ylabel(ylabel)
            ax.set_title(tasks.metric(m).label if m != "window_nll" else "validation perplexity", fontsize=9)
            if m == "window_nll":
                ax.set_yscale("log")
        fig.suptitle(f"{prefix}: mean and 95% bootstrap interval; {device}", fontsize=8)
        save_png(fig, out / f"{prefix}_{name}.png")
        plt.close(fig)
        written.append(out / f"{prefix}_{name}.png")
    if any(k[1] == "mean:position_nll" for k in val):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        curve(ax, "position_nll", by_position=True)
        ax.axvline(L, color="grey", lw=0.6, ls=":")
        ax.set(xlabel=f"position in a {target}-token window (bins; dotted: {L})", ylabel="mean NLL in bin")
        ax.set_title(f"per-position loss at the target length {target}", fontsize=9)
        fig.suptitle(f"{prefix}: mean and 95% bootstrap interval over windows; {device}", fontsize=8)
        save_png(fig, out / f"{prefix}_position_loss.png")
        plt.close(fig)
        written.append(out / f"{prefix}_position_loss.png")
    budget_panels = [("fsr_sample_token_accuracy", n) for n in (min(cfg.fsr_lengths), max(cfg.fsr_lengths))]
    budget_panels.append(("window_nll", target))
    if _budgets(summary, cfg)[0]:  # a budget curve: each variant against its extension steps
        fig, axes = plt.subplots(1, len(budget_panels), figsize=(4.8 * len(budget_panels), 4), squeeze=False)
        for ax, (metric, length) in zip(axes[0], budget_panels, strict=True):
            f = math.exp if tasks.metric(metric).as_ppl else (lambda x: x)
            for v, points in budget_values(summary, cfg, metric, length).items():
                xs = [p[0] for p in points]
                ax.plot(xs, [f(p[1]) for p in points], marker="o", ms=3, color=colour[v], label=_variant_label(v, cfg))
                ax.fill_between(xs, [f(p[2]) for p in points], [f(p[3]) for p in points], alpha=0.15, color=colour[v])
            ax.set(xlabel="extension steps (0: the base model as it is)",
                   ylabel="perplexity" if metric == "window_nll" else "teacher-forced token accuracy")  # fmt: skip
            ax.set_title(f"{tasks.metric(metric).label} at {length} tokens", fontsize=9)
            ax.legend(fontsize=6)
        fig.suptitle(f"{prefix}: extension budget, mean and 95% bootstrap interval; {device}", fontsize=8)
        save_png(fig, out / f"{prefix}_budget.png")
        plt.close(fig)
        written.append(out / f"{prefix}_budget.png")
    write_rows(out / f"{prefix}_summary.csv", summary)
    return [*written, out / f"{prefix}_summary.csv"]
