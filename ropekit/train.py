"""(Continued) pretraining with one RoPE method as the variable, top to bottom.

    ropekit train --preset tiny-base --out runs/base
    ropekit train --preset tiny-extend --set init_from=runs/base/final --set method=pi:factor=8 --out runs/pi
    torchrun --nproc-per-node 8 -m ropekit.cli train --preset paper --set init_from=PATH --out runs/paper-abf

The recipe (Xiong et al. 2023, Section 4.1 and 2.1): patch the short-context model with the method
first, then AdamW with linear warm-up and cosine decay to a tokens-per-step budget reached by
gradient accumulation, bf16 autocast on CUDA (float32 on CPU), gradient clipping, SDPA attention,
activation checkpointing on request, periodic validation loss. Checkpoints hold weights
(safetensors), optimizer, scheduler, RNG and the data position, and are written atomically;
``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ropekit import data as data_mod
from ropekit import mix, parallel
from ropekit.analysis import regime_variants
from ropekit.files import atomic_folder, atomic_write_text, check_writable, sole_writer
from ropekit.hf import parse_layered, patch
from ropekit.loss import check_head, head_input, head_of, linear_cross_entropy
from ropekit.models import load_model, load_tokenizer, looks_like_path
from ropekit.typed import config_differences, parse_typed

__all__ = [
    "TrainConfig",
    "PRESETS",
    "MODEL_SIZES",
    "apply_overrides",
    "train",
    "get_lr",
    "find_checkpoint",
    "load_checkpoint_state",
]


# ---------------------------------------------------------------------------------------------
# Config: a frozen dataclass; presets are functions; overrides are typed and unknown keys refused
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # model
    model: str = "tiny:llama"  # spec for a fresh model (tiny:<family>) when init_from is not given
    model_overrides: dict = field(default_factory=dict)  # typed overrides of a tiny config
    init_from: str | None = None  # a saved model folder (or hub id) to continue from: the base checkpoint
    method: str = "rope"  # the experiment's variable: a ropekit method spec
    max_position_embeddings: int | None = None  # recorded in the config; default seq_len
    # data
    data: str = "shakespeare"  # 'shakespeare', a folder of .txt/.txt.gz, or hf:<name>
    val_fraction: float = data_mod.VAL_FRACTION
    split_seed: int = 0
    tokenizer: str | None = None  # tokenizer folder; default: init_from's, else train a BPE
    vocab_size: int = 2048  # for a trained BPE
    seq_len: int = 256
    reset_positions: bool = False  # positions restart after each EOS (per-document) or run on
    upsample_long: float = 1.0  # repeat documents longer than long_threshold this many times
    long_threshold: int | None = None
    # a share of rows packed with FIRST-SENTENCE-RETRIEVAL examples from the training documents (loss on
    # their answers only; ropekit.mix.mix_retrieval), contexts of min..max tokens (max: default seq_len,
    # each context cut to what fits a row with its question and answer)
    retrieval_share: float = 0.0
    retrieval_min_context: int = 16
    retrieval_max_context: int | None = None
    retrieval_weight: float = 1.0  # loss weight of an answer token (a text token weighs 1)
    retrieval_copy: float = 0.0  # share of the retrieval examples that ask for the whole context back
    # optimisation
    steps: int = 100
    tokens_per_step: int = 8192  # global batch in tokens (seq_len x micro_batch x accumulation x ranks)
    micro_batch: int = 8  # sequences per forward on each rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # systems
    device: str = "auto"  # auto: cuda if available else cpu
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False  # shard with FSDP2 when launched under torchrun
    release_cpu_memory: bool = True  # CPU, glibc: freed tensors' pages back to the system at each layer
    # bookkeeping
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    log_every: int = 1

    def __post_init__(self) -> None:
        """Refuse values that cannot run, naming the key and what is accepted (before any work starts)."""
        rules = {
            "steps": (self.steps >= 1, ">= 1"),
            "seq_len": (self.seq_len >= 2, ">= 2"),
            "micro_batch": (self.micro_batch >= 1, ">= 1"),
            "tokens_per_step": (self.tokens_per_step >= 1, ">= 1"),
            "vocab_size": (self.vocab_size >= 300, ">= 300 (256 bytes + merges)"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"),
            "upsample_long": (self.upsample_long >= 1, ">= 1"),
            "retrieval_share": (0 <= self.retrieval_share <= 1, "in [0, 1]"),
            "retrieval_min_context": (
                not self.retrieval_share or 16 <= self.retrieval_min_context <= self.retrieval_context_max,
                f">= 16 and <= the longest retrieval context ({self.retrieval_context_max})",
            ),
            "retrieval_weight": (self.retrieval_weight > 0, "> 0"),
            "retrieval_copy": (0 <= self.retrieval_copy <= 1, "in [0, 1]"),
            "lr": (0 < self.lr <= 1, "in (0, 1]"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "weight_decay": (0 <= self.weight_decay < math.inf, ">= 0, finite"),
            "beta1": (0 <= self.beta1 < 1, "in [0, 1)"),
            "beta2": (0 <= self.beta2 < 1, "in [0, 1)"),
            "grad_clip": (0 < self.grad_clip < math.inf, "> 0, finite"),
            "eval_every": (self.eval_every >= 1, ">= 1"),
            "eval_batches": (self.eval_batches >= 1, ">= 1"),
            "save_every": (self.save_every >= 1, ">= 1"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "device": (self.device in ("auto", "cpu") or self.device.startswith("cuda"), "auto, cpu, cuda[:N]"),
        }
        if self.max_position_embeddings is not None:
            rules["max_position_embeddings"] = (self.max_position_embeddings >= 1, ">= 1 or none")
        if self.long_threshold is not None:
            rules["long_threshold"] = (self.long_threshold >= 1, ">= 1 or none")
        for key, (ok, accepted) in rules.items():
            if not ok:
                raise ValueError(f"config {key}={getattr(self, key)!r} is invalid; accepted: {accepted}")

        parse_layered(self.method)  # a malformed method spec fails here, not after the data is prepared

    @property
    def retrieval_context_max(self) -> int:
        return self.retrieval_max_context or max(16, self.seq_len)

    def accumulation(self, world_size: int = 1) -> int:
        per_step = self.seq_len * self.micro_batch * world_size
        if self.tokens_per_step % per_step:
            raise ValueError(
                f"tokens_per_step={self.tokens_per_step} is not a multiple of "
                f"seq_len x micro_batch x ranks = {per_step}"
            )
        return self.tokens_per_step // per_step


# One flavour table: model sizes by name (Llama architecture; max_position_embeddings follows seq_len).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1),  # ~40k parameters: tests
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),  # ~1.3M with a 2,048-token BPE: two CPU cores
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4),  # ~110M with a 32k BPE: one GPU
}  # fmt: skip


def model_of(size: str, seq_len: int) -> dict[str, int]:
    """The ``model_overrides`` of a size of ``MODEL_SIZES`` trained at ``seq_len``."""
    return {**MODEL_SIZES[size], "max_position_embeddings": seq_len}


def _tiny_base() -> TrainConfig:
    """A tiny Llama from scratch at 256 tokens on the built-in text, in about five minutes on two CPU cores.
    RoPE base 625 (the paper's regime at 256 tokens: ``ropekit.analysis.regime_base``). 60% of the rows
    are packed with FIRST-SENTENCE-RETRIEVAL examples from the training plays (the positive control's
    skill), contexts up to the whole row; an answer token weighs 8 text tokens and a quarter of the
    examples are copies (the whole context asked back): ``experiments/tiny_control.py`` calibrated this
    mix. ``cpu-base`` trains it 7x longer; the demo starts from that model as shipped (``ropekit-tiny-256``)."""
    return TrainConfig(
        model="tiny:llama", model_overrides=model_of("tiny", 256), method=regime_variants(256)[0],
        data="shakespeare", vocab_size=2048, retrieval_share=0.6, retrieval_weight=8.0, retrieval_copy=0.25,
        seq_len=256, steps=450, tokens_per_step=4096, micro_batch=16, lr=3e-3, warmup_steps=30,
        eval_every=90, save_every=90,
    )  # fmt: skip


def _tiny_extend() -> TrainConfig:
    """Continue the shipped base (``ropekit-tiny-256``: ``cpu-base``'s model) at 8x its length (the paper's
    4k -> 32k ratio) with one method, on the base's mix (retrieval contexts up to the 2,048-token row)."""
    return dataclasses.replace(
        _tiny_base(), init_from="ropekit-tiny-256", seq_len=2048, steps=20, tokens_per_step=8192,
        micro_batch=2, lr=1e-3, warmup_steps=2, eval_every=10, save_every=10,
    )  # fmt: skip


def _cpu_base() -> TrainConfig:
    """``tiny-base`` trained 7x longer (13.5M tokens, about 35 minutes on two CPU cores)."""
    return dataclasses.replace(_tiny_base(), steps=3300, warmup_steps=60, eval_every=500, save_every=250)


def _cpu_extend() -> TrainConfig:
    """``tiny-extend`` 3x longer (492k tokens per variant), from the same shipped base."""
    return dataclasses.replace(_tiny_extend(), steps=60, warmup_steps=6, eval_every=30, save_every=30)


# PG19 (Rae et al. 2019) as parquet on the Hugging Face hub, for users with a network; offline, pass --data.
LONG_DOCUMENTS = "hf:emozilla/pg19"


def _small_base() -> TrainConfig:
    """One GPU inside one 30-minute device session: a ~110M Llama pretrained at 2k on long documents.
    Step counts assume ~150k tokens/s at 2k on an H100 (an estimate: measure first, override with --set)."""
    return TrainConfig(
        model="tiny:llama", model_overrides=model_of("small", 2048), data=LONG_DOCUMENTS, vocab_size=32000,
        seq_len=2048, steps=500, tokens_per_step=131_072, micro_batch=16, lr=1e-3, warmup_steps=50,
        eval_every=250, save_every=250, val_fraction=0.1,
    )  # fmt: skip


def _small_extend() -> TrainConfig:
    """The small base continued at 16k (8x) with one method (~100k tokens/s estimated on an H100)."""
    return dataclasses.replace(
        _small_base(), init_from="runs/small-base/final", seq_len=16384, steps=100, micro_batch=2, lr=3e-4,
        warmup_steps=10, eval_every=50, save_every=50, activation_checkpointing=True,
    )  # fmt: skip


def _paper() -> TrainConfig:
    """Llama 2 7B, 4k -> 32k: the paper's hyper-parameters (Section 2.1): lr 2e-5, 2,000 warm-up steps,
    cosine, 4M tokens per step (128 x 32,768), 80B tokens = 20,000 steps for the PE ablation."""
    return TrainConfig(
        init_from="meta-llama/Llama-2-7b-hf", method="abf:base=500000", seq_len=32768, steps=20_000,
        tokens_per_step=4_194_304, micro_batch=1, lr=2e-5, min_lr_ratio=0.1, warmup_steps=2000,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, activation_checkpointing=True, fsdp=True,
        eval_every=1000, save_every=500, data=LONG_DOCUMENTS,
    )  # fmt: skip


PRESETS = {
    "tiny-base": _tiny_base,
    "tiny-extend": _tiny_extend,
    "cpu-base": _cpu_base,
    "cpu-extend": _cpu_extend,
    "small-base": _small_base,
    "small-extend": _small_extend,
    "paper": _paper,
}


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides, typed by the field; an unknown key is an error naming the accepted ones."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"override {item!r} must be key=value")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; accepted: {', '.join(fields)}")
        try:
            changes[key] = parse_typed(text.strip(), str(fields[key].type))
        except ValueError as err:
            raise ValueError(f"override {key}={text.strip()!r}: {err}") from None
    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------
def get_lr(step: int, cfg: TrainConfig) -> float:
    """1) linear warm-up to lr over warmup_steps, 2) cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _attention_implementation(device: torch.device) -> str:
    """flash-attention 2 when it is installed and the run is on CUDA, else PyTorch SDPA (no L x L matrix)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _architecture(model) -> dict[str, Any]:
    """The model's own sizes, as its config holds them."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")  # fmt: skip
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that may differ on resume: they do not change what the run computes.
# not steps: it sets the schedule
_RESUME_FREE = {"eval_every", "save_every", "log_every", "device", "compile", "release_cpu_memory"}


def _check_resume(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume under another config (a key the checkpoint's ropekit did not have yet counts at its default)."""
    diffs = [d for d in config_differences(saved, cfg) if d.split(":")[0] not in _RESUME_FREE]
    if diffs:
        raise ValueError("cannot resume with a different config (checkpoint -> now): " + "; ".join(diffs))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Checkpoints: one folder per save (written whole or not at all), a manifest of hashes, no pickled code
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, step: int, model, model_state: dict, optimizer_state: dict, tokenizer, state: dict[str, Any]
) -> Path:
    """Write ``out/checkpoint-<step>`` whole (or not at all) and point ``out/latest`` at it; keep the last two."""
    folder = out / f"checkpoint-{step:07d}"
    try:
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except Exception as err:  # noqa: BLE001 - a full disk surfaces as OSError, SafetensorError or RuntimeError
        kept = _checkpoints(out)
        raise ValueError(
            f"cannot write {folder.name} in {out}: {type(err).__name__}: {str(err).strip()[:200]}; "
            f"{'the last checkpoint, ' + kept[-1].name + ', is intact' if kept else 'no checkpoint was written'}"
        ) from err
    atomic_write_text(out / "latest", folder.name)  # a hint for people and tools; resume scans the folders
    for old in _checkpoints(out)[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders in ``out``, oldest first (names sort by step)."""
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-") :].isdigit())


def find_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint in ``out``, verified against its manifest; None when there is none.

    Found by scanning the folders: a missing or garbage ``latest`` pointer does not matter. A newest
    checkpoint that fails verification is refused (never skipped silently, never overwritten).
    """
    found = _checkpoints(Path(out))
    if not found:
        return None
    try:
        load_checkpoint_state(found[-1])  # raises, naming the file, when corrupt
    except ValueError as err:
        for older in reversed(found[:-1]):  # say whether an older one is intact, to resume from by hand
            try:
                load_checkpoint_state(older)
            except ValueError:
                continue
            raise ValueError(f"{err}; {older.name} before it is intact: move {found[-1].name} aside to resume from "
                             f"{older.name}") from None  # fmt: skip
        raise ValueError(f"{err}; no older checkpoint is intact") from None
    return found[-1]


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    """Verify a checkpoint against its manifest and return its trainer state; a corrupt one is refused."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError
    except (OSError, ValueError):
        raise ValueError(f"checkpoint {folder} is corrupt: manifest.json is missing or unreadable") from None
    for name in ("trainer_state.json", "optimizer.pt", "rng.pt"):
        if name not in manifest:
            raise ValueError(f"checkpoint {folder} is corrupt: its manifest does not list {name}")
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"checkpoint {folder} is corrupt: {name} is missing or does not match its hash")
    return json.loads((folder / "trainer_state.json").read_text())


def _load_tensors(path: Path) -> Any:
    """torch.load without executing pickled code: tensors, numbers, strings and containers only."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError for anything outside the allow-list
        raise ValueError(f"{path} holds objects other than tensors and plain values; refusing to load it "
                         f"({type(err).__name__})") from None  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The run, in named steps
# ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Where and how this process trains (what every step below needs)."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    accumulation: int
    checkpoint: Path | None  # the checkpoint to resume from
    state: dict[str, Any]  # step, sequences consumed, losses, validation losses


def setup(cfg: TrainConfig, out: str | Path, resume: bool) -> _Run:
    """Ranks, device, seeds, the output folder and the checkpoint to resume from; every check that can
    fail does so here, before data or model is touched."""
    out = Path(out)
    rank, world = parallel.rank_and_world()
    if cfg.device != "auto" and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} needs CUDA, which this machine lacks; accepted here: auto, cpu")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    accumulation = cfg.accumulation(world)
    if cfg.init_from and not Path(cfg.init_from).expanduser().exists() and looks_like_path(cfg.init_from):
        raise ValueError(f"init_from {cfg.init_from!r} not found: pass the folder of a saved model (e.g. a base "
                         "run's final/) or a hub id")  # fmt: skip
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    if rank == 0:  # a save killed mid-way (SIGKILL) leaves its temporary folder; no other run writes here now
        for stale in [*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*"), *out.glob(".tmp-final-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    state: dict[str, Any] = {"step": 0, "sequences": 0, "losses": [], "val": []}
    checkpoint = find_checkpoint(out)
    if checkpoint is None and resume and rank == 0:
        print(f"ropekit train: nothing to resume in {out}: starting a new run", file=sys.stderr)
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        _check_resume(state["config"], cfg)
    return _Run(cfg, out, rank, world, device, accumulation, checkpoint, state)


def prepare_data(run: _Run, corpus=None):
    """The corpus (documents, split, tokenizer, token caches): the one handed in, or prepared here."""
    cfg = run.cfg
    tokenizer = None
    if run.checkpoint is not None:
        tokenizer = load_tokenizer(str(run.checkpoint))
    elif cfg.tokenizer or cfg.init_from:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    if corpus is None:
        return data_mod.prepare_corpus(cfg.data, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                       tokenizer=tokenizer, vocab_size=cfg.vocab_size)  # fmt: skip
    if not corpus.matches(cfg.data, cfg.val_fraction, cfg.split_seed):
        raise ValueError(f"the corpus handed to train() is {corpus.source!r} split ({corpus.val_fraction}, "
                         f"{corpus.split_seed}); the config asks for {cfg.data!r} ({cfg.val_fraction}, "
                         f"{cfg.split_seed})")  # fmt: skip
    if tokenizer is not None and tokenizer.get_vocab() != corpus.tokenizer.get_vocab():
        raise ValueError("the corpus handed to train() was tokenised with another vocabulary than the model's")
    return corpus


def build_model(run: _Run, tokenizer):
    """Load or build the model (``tokenizer``: a new model's vocabulary), patch it with the method (the
    experiment's variable), place and shard it, and check that its loss can be scored from its head's
    input (``check_head``) where that is how it is scored."""
    cfg = run.cfg
    attn = _attention_implementation(run.device)
    if run.checkpoint is not None:
        model = load_model(str(run.checkpoint), reapply=True, attn_implementation=attn)
    elif cfg.init_from:
        model = load_model(cfg.init_from, reapply=False, attn_implementation=attn)
    else:
        model = load_model(cfg.model, seed=cfg.seed, vocab_size=len(tokenizer), attn_implementation=attn,
                           **cfg.model_overrides)  # fmt: skip
    if run.checkpoint is None:
        patch(model, cfg.method, max_position_embeddings=cfg.max_position_embeddings or cfg.seq_len)
    model.config.use_cache = False
    model.to(run.device)
    model.train()
    model = parallel.parallelize(model, activation_checkpointing=cfg.activation_checkpointing,
                                 compile=cfg.compile, fsdp=cfg.fsdp and run.world > 1,
                                 release_cpu_memory=cfg.release_cpu_memory)  # fmt: skip
    if head_of(model) is not None:  # the loss is scored from the head's input (loss_of)
        check_head(model, run.device)
    return model


def adamw(model, *, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The trainer's optimizer: AdamW with weight decay on matrices only (torch's default implementation for
    the device: a loop over parameters on CPU, ``foreach`` on CUDA). ``ropekit bench --train-step`` uses it too."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def build_optimizer(run: _Run, model) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; on resume, its state and the RNGs from the checkpoint."""
    cfg = run.cfg
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    if run.checkpoint is not None:
        parallel.load_optimizer_state(model, optimizer, _load_tensors(run.checkpoint / "optimizer.pt"))
        _set_rng_state(_load_tensors(run.checkpoint / "rng.pt"))
    return optimizer


def _batch(rows: list[tuple[np.ndarray, ...]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, positions[, loss weights]) rows -> input_ids, position_ids (B, T) int64 and weights (B, T)
    float32 (None when no row has any) on ``device``."""
    ids = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
    pos = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
    weights = None
    if any(len(r) > 2 for r in rows):
        ones = np.r_[np.ones(ids.shape[1] - 1, np.float32), 0.0].astype(np.float32)
        weights = torch.from_numpy(np.stack([r[2] if len(r) > 2 else ones for r in rows])).to(device)
    return ids, pos, weights


def loss_of(
    model, ids: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None, *, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy of a (B, T) batch, weighted by ``weights[:, :-1]`` when given (each the
    weight of predicting the next token): the weighted mean, or with ``reduction="sum"`` the weighted
    sum; bf16 autocast on CUDA, float32 elsewhere. Scored from the head's input in chunks
    (``ropekit.loss``) where the head is a bias-free linear layer, from the full logits otherwise."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ids.is_cuda else contextlib.nullcontext()
    head = head_of(model)
    n = ids.shape[0] * (ids.shape[1] - 1)
    w = torch.ones(n, device=ids.device) if weights is None else weights[:, :-1].reshape(-1).float()
    with autocast:
        if head is not None:  # from the head's input in chunks: no (B x T x vocabulary) float32 logits
            hidden, transform, _ = head_input(model, ids, pos)
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            total = linear_cross_entropy(hidden, head.weight, ids[:, 1:].reshape(-1), token_weights=w,
                                         reduction="sum", transform=transform)  # fmt: skip
        else:
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="none")  # fmt: skip
            total = (ce * w).sum()
    return total if reduction == "sum" else total / w.sum().clamp_min(1e-6)


def _loss_weight(row: tuple[np.ndarray, ...]) -> float:
    """How many next-token predictions of a (tokens, positions[, weights]) row carry loss (weighted)."""
    return float(row[2][:-1].sum()) if len(row) > 2 else float(len(row[0]) - 1)


def train_step(run: _Run, model, optimizer, stream, step: int) -> tuple[float, float]:
    """One optimizer step over ``accumulation`` micro-batches; returns (mean loss across ranks, grad norm).

    The loss is the weighted mean over the whole global batch (every micro-batch of every rank): each
    micro-batch contributes its weighted sum over the global weight, times the ranks whose gradients
    FSDP averages, so rows with few weighted tokens (retrieval examples) count as much on any layout."""
    cfg = run.cfg
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, cfg)
    steps = [[next(stream) for _ in range(cfg.micro_batch * run.world)] for _ in range(run.accumulation)]
    weight = max(1e-6, sum(_loss_weight(r) for rows in steps for r in rows))
    total = 0.0
    for rows in steps:
        ids, pos, weights = _batch(rows[run.rank :: run.world], run.device)  # each rank its share of the batch
        loss = loss_of(model, ids, pos, weights, reduction="sum") * run.world / weight
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parallel.mean_across_ranks(total, run.device), float(grad_norm)


@torch.no_grad()
def validate(model, batches, device) -> float:
    """Mean loss over the fixed validation sequences."""
    model.eval()
    losses = [loss_of(model, *_batch([b], device)).item() for b in batches]  # plain text: no weights
    model.train()
    return float(np.mean(losses))


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (what the checkpoint holds): a resumed run never logs a step twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(kept))


def save(run: _Run, model, tokenizer, optimizer, step: int) -> None:
    """A checkpoint (collective under FSDP: every rank gathers, rank 0 writes)."""
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    if run.rank == 0:
        save_checkpoint(run.out, step, model, model_state, optimizer_state, tokenizer,
                        {**run.state, "config": _config_dict(run.cfg)})  # fmt: skip
    parallel.barrier()


def save_final(run: _Run, model, tokenizer) -> Path:
    """``out/final``: the trained model and its tokenizer, written whole or not at all."""
    final = run.out / "final"
    final_state = parallel.full_model_state(model)
    if run.rank == 0:
        with atomic_folder(final) as tmp:
            model.save_pretrained(tmp, state_dict=final_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return final


def train(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, stop_after: int | None = None, corpus=None
) -> dict[str, Any]:
    """Run (or resume) training; returns {'losses': [...], 'val': [...], 'final': path, ...}.

    ``corpus``: a ``ropekit.data.Corpus`` already prepared for ``cfg.data`` (the ablation shares one).
    ``stop_after`` ends the run early after that many steps (used to test resuming).

    One run writes a folder at a time: a second ``train`` into the same ``out`` while one runs is refused
    (naming the holder). A loss or gradient norm that is not finite stops the run with a ValueError; that
    step is never saved, and the checkpoints before it are left as they were.
    """
    rank, _ = parallel.rank_and_world()
    check_writable(out, kind="folder")
    with sole_writer(out, kind="folder") if rank == 0 else contextlib.nullcontext():
        return _train(cfg, out, resume=resume, stop_after=stop_after, corpus=corpus)


def _train(cfg: TrainConfig, out: str | Path, *, resume: bool, stop_after: int | None, corpus) -> dict[str, Any]:

    run = setup(cfg, out, resume)
    # A model that brings its tokenizer comes first, so that one ropekit cannot patch or score stops the run
    # before the data are prepared; a new model's vocabulary is the tokenizer's, which may be trained on them.
    if run.checkpoint is not None or cfg.init_from:
        model = build_model(run, None)
        corpus = prepare_data(run, corpus)
    else:
        corpus = prepare_data(run, corpus)
        model = build_model(run, corpus.tokenizer)
    tokenizer, eos = corpus.tokenizer, corpus.tokenizer.eos_token_id
    optimizer = build_optimizer(run, model)

    # the data stream, fast-forwarded past what earlier runs consumed; fixed validation sequences
    stream = data_mod.pack(corpus.train_tokens, cfg.seq_len, eos_id=eos, seed=cfg.seed,
                           reset_positions=cfg.reset_positions, upsample_long=cfg.upsample_long,
                           long_threshold=cfg.long_threshold)  # fmt: skip
    if cfg.retrieval_share:
        examples = mix.retrieval_examples(corpus.train_docs, tokenizer, max_context=cfg.retrieval_context_max,
                                               seed=cfg.seed)  # fmt: skip
        stream = mix.mix_retrieval(stream, examples, seq_len=cfg.seq_len, share=cfg.retrieval_share,
                                        min_context=cfg.retrieval_min_context, max_context=cfg.retrieval_context_max,
                                        eos_id=eos, seed=cfg.seed, answer_weight=cfg.retrieval_weight,
                                        copy_share=cfg.retrieval_copy)  # fmt: skip
    for _ in range(run.state["sequences"]):
        next(stream)
    val_stream = data_mod.pack(corpus.val_tokens, cfg.seq_len, eos_id=eos, seed=cfg.seed + 1)
    val_batches = [next(val_stream) for _ in range(cfg.eval_batches)]

    state, metrics = run.state, run.out / "metrics.jsonl"
    if run.rank == 0:  # the config, and the sizes of the model really trained (init_from's, not the preset's)
        written = {**_config_dict(cfg), "model_architecture": _architecture(model)}
        atomic_write_text(run.out / "config.json", json.dumps(written, indent=1))
        _trim_metrics(metrics, state["step"])
    per_step = cfg.micro_batch * run.accumulation * run.world
    last = cfg.steps if stop_after is None else min(cfg.steps, state["step"] + stop_after)
    bar = tqdm(range(state["step"], last), initial=state["step"], total=cfg.steps, disable=run.rank != 0,
               desc="train")  # fmt: skip
    t_start, tokens_done = time.perf_counter(), 0
    for step in bar:
        loss, grad_norm = train_step(run, model, optimizer, stream, step)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = find_checkpoint(run.out)
            raise ValueError(
                f"training stopped at step {step + 1}: loss {loss}, gradient norm {grad_norm} (lr "
                f"{get_lr(step, cfg):.3g}); nothing of this step is saved, the last checkpoint "
                f"({kept.name if kept else 'none yet'}) is as it was; lower the learning rate (--set lr=...)"
            )
        state["step"], state["sequences"] = step + 1, state["sequences"] + per_step
        state["losses"].append(loss)
        tokens_done += per_step * cfg.seq_len
        tok_s = tokens_done / (time.perf_counter() - t_start)
        row = {"step": step + 1, "loss": loss, "lr": get_lr(step, cfg), "grad_norm": grad_norm, "tokens_per_s": tok_s}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["val_loss"] = validate(model, val_batches, run.device)
            state["val"].append([step + 1, row["val_loss"]])
        if run.rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
            if (step + 1) % cfg.log_every == 0 or "val_loss" in row:
                with open(metrics, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(run, model, tokenizer, optimizer, step + 1)
    bar.close()

    result = {"losses": state["losses"], "val": state["val"], "step": state["step"], "out": str(run.out)}
    if state["step"] >= cfg.steps:
        result["final"] = str(save_final(run, model, tokenizer))
        result["tokens_per_s"] = tokens_done / max(1e-9, time.perf_counter() - t_start)
    return result
