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

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TrainConfig", "PRESETS", "apply_overrides", "train", "get_lr", "load_checkpoint_state"]


# ---------------------------------------------------------------------------------------------
# Config: a frozen dataclass; presets are functions; overrides are typed and unknown keys refused
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # model
    model: str = "tiny:llama"  # spec for a fresh model (tiny:<family>) when init_from is not given
    model_overrides: dict = field(default_factory=dict)  # typed overrides of a tiny config
    init_from: str | None = None  # a saved model folder to continue from (the base checkpoint)
    method: str = "rope"  # the experiment's variable: a ropekit method spec
    max_position_embeddings: int | None = None  # recorded in the config; default seq_len
    # data
    data: str = "shakespeare"  # 'shakespeare', a folder of .txt/.txt.gz, or hf:<name>
    val_fraction: float = 0.15
    split_seed: int = 0
    tokenizer: str | None = None  # tokenizer folder; default: init_from's, else train a BPE
    vocab_size: int = 2048  # for a trained BPE
    seq_len: int = 256
    reset_positions: bool = False  # positions restart after each EOS (per-document) or run on
    upsample_long: float = 1.0  # repeat documents longer than long_threshold this many times
    long_threshold: int | None = None
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
    # bookkeeping
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    log_every: int = 1

    def accumulation(self, world_size: int = 1) -> int:
        per_step = self.seq_len * self.micro_batch * world_size
        if self.tokens_per_step % per_step:
            raise ValueError(
                f"tokens_per_step={self.tokens_per_step} is not a multiple of "
                f"seq_len x micro_batch x ranks = {per_step}"
            )
        return self.tokens_per_step // per_step


def _tiny_base() -> TrainConfig:
    """A tiny Llama from scratch at 256 tokens on the built-in text (the demo's base model)."""
    return TrainConfig(
        model="tiny:llama",
        model_overrides=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256),  # fmt: skip
        seq_len=256, steps=300, tokens_per_step=8192, micro_batch=8, lr=3e-3, warmup_steps=30,
        eval_every=100, save_every=100,
    )  # fmt: skip


def _tiny_extend() -> TrainConfig:
    """Continue a tiny base at 8x its length (the paper's 4k -> 32k ratio) with one method."""
    return dataclasses.replace(
        _tiny_base(), init_from="runs/tiny-base/final", method="rope", seq_len=2048, steps=60,
        tokens_per_step=8192, micro_batch=1, lr=1e-3, warmup_steps=6, eval_every=30, save_every=30,
    )  # fmt: skip


def _small_base() -> TrainConfig:
    """One GPU: a ~100M Llama pretrained at 2k on a folder of long documents."""
    return TrainConfig(
        model="tiny:llama",
        model_overrides=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000),  # fmt: skip
        vocab_size=32000, seq_len=2048, steps=4000, tokens_per_step=262_144, micro_batch=16, lr=1e-3,
        warmup_steps=200, eval_every=500, save_every=500, data="../shared/corpora/clic",
    )  # fmt: skip


def _small_extend() -> TrainConfig:
    return dataclasses.replace(
        _small_base(), init_from="runs/small-base/final", seq_len=16384, steps=500, micro_batch=2,
        tokens_per_step=262_144, lr=3e-4, warmup_steps=50, activation_checkpointing=True,
    )  # fmt: skip


def _paper() -> TrainConfig:
    """Llama 2 7B, 4k -> 32k: the paper's hyper-parameters (Section 2.1): lr 2e-5, 2,000 warm-up steps,
    cosine, 4M tokens per step (128 x 32,768), 80B tokens = 20,000 steps for the PE ablation."""
    return TrainConfig(
        init_from="meta-llama/Llama-2-7b-hf", method="abf:base=500000", seq_len=32768, steps=20_000,
        tokens_per_step=4_194_304, micro_batch=1, lr=2e-5, min_lr_ratio=0.1, warmup_steps=2000,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, activation_checkpointing=True, fsdp=True,
        eval_every=1000, save_every=500, data="hf:pg19",
    )  # fmt: skip


PRESETS = {
    "tiny-base": _tiny_base,
    "tiny-extend": _tiny_extend,
    "small-base": _small_base,
    "small-extend": _small_extend,
    "paper": _paper,
}


def _parse_value(text: str, annotation: str, key: str) -> Any:
    kinds = [a.strip() for a in annotation.split("|")]
    if "None" in kinds and text.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        try:
            if kind == "bool":
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
                continue
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if kind == "str":
                return text
            if kind == "dict":
                value = json.loads(text)
                if isinstance(value, dict):
                    return value
        except ValueError:
            continue
    raise ValueError(f"override {key}={text!r}: expected {annotation}")


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
        changes[key] = _parse_value(text.strip(), str(fields[key].type), key)
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
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that may differ on resume: they do not change what the run computes.
_RESUME_FREE = {"steps", "eval_every", "save_every", "log_every", "device", "compile"}


def _check_resume(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = _config_dict(cfg)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in now
        if k not in _RESUME_FREE and saved.get(k) != now[k]
    ]
    if diffs:
        raise ValueError("cannot resume with a different config: " + "; ".join(diffs))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Checkpoints: a new folder per save + an atomically replaced ``latest`` pointer; a manifest of hashes
# ---------------------------------------------------------------------------------------------
def save_checkpoint(
    out: Path, step: int, model, model_state: dict, optimizer_state: dict, tokenizer, state: dict[str, Any]
) -> Path:
    folder = out / f"checkpoint-{step:07d}"
    tmp = out / f".tmp-checkpoint-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    pointer = out / ".latest.tmp"
    pointer.write_text(folder.name)
    os.replace(pointer, out / "latest")
    for old in sorted(out.glob("checkpoint-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    folder = out / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    """Verify a checkpoint against its manifest and return its trainer state; a corrupt one is refused."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {folder} is corrupt: no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"checkpoint {folder} is corrupt: {name} is missing or does not match its hash")
    return json.loads((folder / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns {'losses': [...], 'val': [...], 'final': path, ...}.

    ``stop_after`` ends the run early after that many steps (used to test resuming).
    """
    from tqdm.auto import tqdm

    import ropekit
    from ropekit import data as data_mod
    from ropekit import parallel
    from ropekit.models import load_model
    from ropekit.results import atomic_write_text

    # -- setup: ranks, device, seeds -------------------------------------------------------------
    out = Path(out)
    rank, world = parallel.rank_and_world()
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    accumulation = cfg.accumulation(world)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    ckpt = latest_checkpoint(out) if resume else None
    state: dict[str, Any] = {"step": 0, "sequences": 0, "losses": [], "val": []}
    if ckpt is not None:
        state = load_checkpoint_state(ckpt)
        _check_resume(state["config"], cfg)
    elif not resume and rank == 0 and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    # -- data: documents, split, tokenizer, token caches -------------------------------------------
    docs = data_mod.load_documents(cfg.data)
    train_docs, val_docs = data_mod.split_documents(docs, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if ckpt is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    elif cfg.tokenizer or cfg.init_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.init_from)
    else:
        tokenizer = data_mod.load_or_train_tokenizer(train_docs, cfg.vocab_size)
    eos = tokenizer.eos_token_id
    train_cache = data_mod.tokenize_documents(train_docs, tokenizer)
    val_cache = data_mod.tokenize_documents(val_docs, tokenizer)

    # -- model: load or build, then patch with the method (the experiment's variable) ----------------
    attn = _attention_implementation(device)
    if ckpt is not None:
        model = load_model(str(ckpt), reapply=True, attn_implementation=attn)
    elif cfg.init_from:
        model = load_model(cfg.init_from, reapply=False, attn_implementation=attn)
    else:
        model = load_model(cfg.model, seed=cfg.seed, vocab_size=len(tokenizer), attn_implementation=attn,
                           **cfg.model_overrides)  # fmt: skip
    if ckpt is None:
        ropekit.patch(model, cfg.method, max_position_embeddings=cfg.max_position_embeddings or cfg.seq_len)
    model.config.use_cache = False
    model.to(device)
    model.train()
    model = parallel.parallelize(model, activation_checkpointing=cfg.activation_checkpointing,
                                 compile=cfg.compile, fsdp=cfg.fsdp and world > 1)  # fmt: skip

    # -- optimizer: AdamW, decay on matrices only ----------------------------------------------------
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
    )  # fmt: skip
    if ckpt is not None:
        parallel.load_optimizer_state(model, optimizer, torch.load(ckpt / "optimizer.pt", weights_only=False))
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- the data stream, fast-forwarded past what earlier runs consumed ------------------------------
    stream = data_mod.pack(train_cache, cfg.seq_len, eos_id=eos, seed=cfg.seed, reset_positions=cfg.reset_positions,
                           upsample_long=cfg.upsample_long, long_threshold=cfg.long_threshold)  # fmt: skip
    for _ in range(state["sequences"]):
        next(stream)
    val_stream = data_mod.pack(val_cache, cfg.seq_len, eos_id=eos, seed=cfg.seed + 1)
    val_batches = [next(val_stream) for _ in range(cfg.eval_batches)]

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    per_step = cfg.micro_batch * accumulation * world

    def next_micro_batch():
        rows = [next(stream) for _ in range(cfg.micro_batch * world)]
        mine = rows[rank::world]  # each rank its share of the global batch
        ids = torch.from_numpy(np.stack([r[0] for r in mine])).to(device)
        pos = torch.from_numpy(np.stack([r[1] for r in mine])).to(device)
        return ids, pos

    def loss_of(ids, pos):
        with autocast:
            logits = model(input_ids=ids, position_ids=pos).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        losses = []
        for toks, pos in val_batches:
            ids = torch.from_numpy(toks[None]).to(device)
            losses.append(loss_of(ids, torch.from_numpy(pos[None]).to(device)).item())
        model.train()
        return float(np.mean(losses))

    # -- the loop ---------------------------------------------------------------------------------------
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(_config_dict(cfg), indent=1))
    metrics_path = out / "metrics.jsonl"
    last = cfg.steps if stop_after is None else min(cfg.steps, state["step"] + stop_after)
    bar = tqdm(range(state["step"], last), initial=state["step"], total=cfg.steps, disable=rank != 0, desc="train")
    t_start, tokens_done = time.perf_counter(), 0
    for step in bar:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(accumulation):
            ids, pos = next_micro_batch()
            loss = loss_of(ids, pos) / accumulation
            loss.backward()
            total += loss.item()
        total = parallel.mean_across_ranks(total, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"], state["sequences"] = step + 1, state["sequences"] + per_step
        state["losses"].append(total)
        tokens_done += per_step * cfg.seq_len
        tok_s = tokens_done / (time.perf_counter() - t_start)
        row = {"step": step + 1, "loss": total, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["val_loss"] = validation_loss()
            state["val"].append([step + 1, row["val_loss"]])
        if rank == 0:
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tok_s:.0f}")
            if (step + 1) % cfg.log_every == 0 or "val_loss" in row:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(out, step + 1, model, tokenizer, optimizer, {**state, "config": _config_dict(cfg)}, rank)
    bar.close()

    result = {"losses": state["losses"], "val": state["val"], "step": state["step"], "out": str(out)}
    if state["step"] >= cfg.steps:
        final = out / "final"
        final_state = parallel.full_model_state(model)
        if rank == 0:
            tmp = out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            parallel.unwrap(model).save_pretrained(tmp, state_dict=final_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        result["final"] = str(final)
        result["tokens_per_s"] = tokens_done / max(1e-9, time.perf_counter() - t_start)
    return result


def _save(out, step, model, tokenizer, optimizer, state, rank):
    from ropekit import parallel

    model_state, optimizer_state = parallel.full_state(model, optimizer)  # FSDP: gathers shards on every rank
    if rank == 0:
        save_checkpoint(out, step, parallel.unwrap(model), model_state, optimizer_state, tokenizer, state)
    parallel.barrier()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
