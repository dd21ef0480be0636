"""Rotary-embedding benchmark: ropekit's Triton kernel against every peer on the same tensors.

    ropekit bench --out figures/bench_rope.csv                   # on a CUDA GPU: the training shapes
    ropekit bench --smoke --out /tmp/bench.csv                   # anywhere: tiny shapes, torch providers

Providers (each skipped with a note when it cannot run here):

- ``ropekit-triton``: the Triton kernel as a patched model calls it (``apply_rope_params``: the method's
  numbers made once per forward, angles from positions, no table); ``ropekit-triton+params`` the public
  ``apply_rope(q, k, positions, "abf:base=500000")``, which parses, checks and makes those numbers per call;
- ``hf-eager``: transformers' ``apply_rotary_pos_emb`` with the cos/sin of its rotary module, with the
  table built inside the timed call (``hf-eager+table``) and outside it (``hf-eager``);
- ``hf-compile``: ``torch.compile`` of transformers' ``apply_rotary_pos_emb`` (the table made outside the call);
- ``torch-compile``: ``torch.compile`` of the ropekit torch reference (float64 angles: exact, not fast);
- ``liger``: Liger-Kernel's ``LigerRopeFunction`` (PyPI ``liger-kernel``);
- ``flash-attn-triton``: flash-attention's pure-Triton ``apply_rotary`` loaded from the file given with
  ``--flash-attn-rotary PATH`` (``flash_attn/ops/triton/rotary.py`` from the sdist).

Times are p20/p50/p80 from ``triton.testing.do_bench`` on CUDA (a perf_counter loop elsewhere).
GB/s counts the bytes that must move: q and k read and written once (plus any cos/sin table a
provider reads). ``copy`` is ``torch.Tensor.copy_`` of the same byte count in the same run: the
ratio to it is the fraction of achievable bandwidth. ``result_rows`` turns the measurements into
result rows (``ropekit.results``: device, library versions, git sha); ``draw_bench``
draws GB/s against sequence length per provider from that CSV.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ropekit.figures import pyplot, save_png, series
from ropekit.hf import patch
from ropekit.live_memory import PHASES, LiveTensors, phases
from ropekit.methods import parse
from ropekit.models import tiny_config
from ropekit.parallel import parallelize
from ropekit.reference import RopeParams, apply_rope_reference
from ropekit.results import append_rows, make_row, provenance, read_rows
from ropekit.rotary import apply_rope, apply_rope_params, rope_params
from ropekit.stats import MIN_RESOLVED, compare, mean_interval
from ropekit.studies import kernel_static as static
from ropekit.train import TrainConfig, adamw, loss_of

__all__ = [
    "Shape",
    "TRAINING_SHAPES",
    "DECODING_SHAPES",
    "SMOKE_SHAPES",
    "run_benchmark",
    "result_rows",
    "TRAIN_STEP_MODELS",
    "model_flops_per_step",
    "check_train_step",
    "measure_train_step",
    "memory_split",
    "run_train_step",
    "train_step_table",
    "memory_growth",
    "live_measures",
    "live_table",
    "repeated_runs",
    "paired_speed_ratio",
    "draw_bench",
]


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Hq: int
    Hk: int
    D: int
    R: int | None = None  # rotary dim (default D)
    dtype: str = "bfloat16"

    def __str__(self) -> str:
        r = f",R={self.R}" if self.R and self.R != self.D else ""
        return f"B={self.B},T={self.T},Hq={self.Hq},Hk={self.Hk},D={self.D}{r},{self.dtype}"

    def qk_bytes(self) -> int:
        elem = torch.finfo(getattr(torch, self.dtype)).bits // 8
        return self.B * self.T * (self.Hq + self.Hk) * self.D * elem


TRAINING_SHAPES = [
    *(Shape(1, T, 32, 8, 128) for T in (2048, 8192, 32768, 131072)),
    Shape(8, 4096, 32, 32, 128),
    Shape(1, 8192, 32, 8, 64),
    Shape(1, 8192, 32, 8, 128, R=64),
]
# decoding: one new token per sequence (T is the batch's new tokens, B sequences), Llama 3 8B's heads
DECODING_SHAPES = [Shape(B, 1, 32, 8, 128) for B in (1, 64, 256)]
SMOKE_SHAPES = [Shape(1, 64, 4, 2, 32, dtype="float32"), Shape(1, 128, 4, 2, 32, R=16, dtype="float32")]


def _timer(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds: on CUDA Triton's ``do_bench``; on a CPU one warm-up call and ``repeats``
    timed ones, or a single call for ``repeats=1`` (Triton's interpreter: a plumbing check, not a speed)."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return p20, p50, p80
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10)
    return q[1], statistics.median(times), q[7]


def _hf_tables(shape: Shape, positions: torch.Tensor, dtype, device):
    rotary_dim = shape.R or shape.D
    # the table covers the rotary channels only (head_dim = rotary_dim here): (1, T, R) cos and sin
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=shape.Hq * shape.D, num_attention_heads=shape.Hq, num_key_value_heads=shape.Hk,
                      head_dim=rotary_dim, rope_parameters=rope)  # fmt: skip
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    x = torch.empty(1, dtype=dtype, device=device)
    return rotary, x


def _providers(shape: Shape, device: torch.device, flash_attn_rotary: str | None):
    """name -> (forward fn(q, k) -> (q, k), extra table bytes) for this shape, or a reason it cannot run."""
    dtype = getattr(torch, shape.dtype)
    rotary_dim = shape.R or shape.D
    positions = torch.arange(shape.T, device=device)
    method = "abf:base=500000"
    elem = torch.finfo(dtype).bits // 8
    table_bytes = 2 * shape.T * rotary_dim * elem  # cos + sin, (T, R) each, in the activation dtype
    out: dict[str, tuple] = {}

    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: plumbing, not speed
        # as a patched model calls it: the method's numbers made once per forward, outside the timed call
        params = rope_params(parse(method), rotary_dim, positions)
        out["ropekit-triton"] = (lambda q, k: apply_rope_params(q, k, positions, params, backend="triton"), 0)
    if device.type == "cuda":
        # the public one-call API: parses the spec, checks the inputs, makes the numbers (a host sync for
        # int64 positions, a host-to-device copy of the frequencies) on every call
        out["ropekit-triton+params"] = (lambda q, k: apply_rope(q, k, positions, method, rotary_dim=rotary_dim,
                                                                backend="triton"), 0)  # fmt: skip
    elif "ropekit-triton" not in out:
        out["ropekit-triton"] = "needs CUDA (or TRITON_INTERPRET=1, a correctness path, not a speed)"

    rotary, x = _hf_tables(shape, positions, dtype, device)
    pos2d = positions[None]
    cos, sin = rotary(x, pos2d)

    def hf_with_table(q, k):
        c, s = rotary(x, pos2d)
        return _hf_apply(apply_rotary_pos_emb, q, k, c, s, rotary_dim)

    out["hf-eager+table"] = (hf_with_table, table_bytes)
    out["hf-eager"] = (lambda q, k: _hf_apply(apply_rotary_pos_emb, q, k, cos, sin, rotary_dim), table_bytes)

    # torch.compile of transformers' own rotation, the table made outside the call (as hf-eager)
    hf_compiled = torch.compile(lambda q, k: _hf_apply(apply_rotary_pos_emb, q, k, cos, sin, rotary_dim))
    out["hf-compile"] = (hf_compiled, table_bytes)
    # torch.compile of ropekit's reference: float64 angles (exact, and slow on GPUs without fast float64)
    params = RopeParams(parse(method).inv_freq64(rotary_dim).to(device))
    compiled = torch.compile(lambda q, k: apply_rope_reference(q, k, positions, params))
    out["torch-compile"] = (compiled, 0)

    if importlib.util.find_spec("liger_kernel") is not None and device.type == "cuda":
        from liger_kernel.ops.rope import LigerRopeFunction

        if rotary_dim != shape.D:
            out["liger"] = "no partial rotary"
        else:
            out["liger"] = (lambda q, k: LigerRopeFunction.apply(q, k, cos, sin), table_bytes)
    else:
        out["liger"] = "liger-kernel not installed or no CUDA"

    if flash_attn_rotary and device.type == "cuda":
        spec = importlib.util.spec_from_file_location("fa_rotary", flash_attn_rotary)
        fa = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fa)
        c, s = cos[0, :, : rotary_dim // 2].contiguous(), sin[0, :, : rotary_dim // 2].contiguous()

        class FARotary(torch.autograd.Function):  # its backward is the same launcher, conjugated
            @staticmethod
            def forward(ctx, x):
                return fa.apply_rotary(x, c, s)

            @staticmethod
            def backward(ctx, g):
                return fa.apply_rotary(g, c, s, conjugate=True)

        def fa_apply(q, k):  # flash-attention wants (B, T, H, D)
            return FARotary.apply(q.transpose(1, 2)).transpose(1, 2), FARotary.apply(k.transpose(1, 2)).transpose(1, 2)

        out["flash-attn-triton"] = (fa_apply, table_bytes)
    else:
        out["flash-attn-triton"] = "pass --flash-attn-rotary PATH (CUDA only)"
    return out


def _hf_apply(fn, q, k, cos, sin, rotary_dim):
    if rotary_dim == q.shape[-1]:
        return fn(q, k, cos, sin)
    qr, kr = fn(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
    return torch.cat([qr, q[..., rotary_dim:]], -1), torch.cat([kr, k[..., rotary_dim:]], -1)


def run_benchmark(shapes: list[Shape], *, ops=("fwd", "bwd", "fwd+bwd"), flash_attn_rotary: str | None = None,
                  device: str | None = None, log=print) -> list[dict]:  # fmt: skip
    """Time every provider on every shape and op; returns long-format rows (one per provider/op/shape)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    rows = []
    for shape in shapes:
        dtype = getattr(torch, shape.dtype)
        q = torch.randn(shape.B, shape.T, shape.Hq, shape.D, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(shape.B, shape.T, shape.Hk, shape.D, device=dev, dtype=dtype).transpose(1, 2)
        moved = 2 * shape.qk_bytes()  # read + write
        src = torch.empty(shape.qk_bytes(), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = _timer(lambda src=src, dst=dst: dst.copy_(src), dev)
        rows.append(_row(prov, "copy", "copy", shape, copy_ms, moved, copy_ms[1]))
        for name, provider in _providers(shape, dev, flash_attn_rotary).items():
            if isinstance(provider, str):
                log(f"  {name:18s} {shape}: skipped ({provider})")
                continue
            fn, extra = provider
            for op in ops:
                call = _op_call(fn, op, q, k)
                scale = 2 if op == "fwd+bwd" else 1  # fwd+bwd moves the tensors twice
                interpreted = name.startswith("ropekit-triton") and dev.type != "cuda"  # seconds a call
                ms = _timer(call, dev, repeats=1 if interpreted else 10)
                rows.append(_row(prov, name, op, shape, ms, (moved + extra) * scale, copy_ms[1] * scale))
                r = rows[-1]
                log(f"  {name:18s} {op:8s} {shape}: {ms[1]:.4f} ms, {r['gb_per_s']:.1f} GB/s, "
                    f"{r['pct_of_copy']:.1f}% of copy")  # fmt: skip
    return rows


def _op_call(fn, op: str, q: torch.Tensor, k: torch.Tensor) -> Callable[[], object]:
    """The timed call: forward only, backward only (graph built once), or forward + backward."""
    qq, kk = q.detach().requires_grad_(op != "fwd"), k.detach().requires_grad_(op != "fwd")
    if op == "fwd":
        return lambda: fn(qq, kk)
    oq, ok = fn(qq, kk)
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    if op == "bwd":
        return lambda: torch.autograd.grad((oq, ok), (qq, kk), (gq, gk), retain_graph=True)
    return lambda: torch.autograd.grad(fn(qq, kk), (qq, kk), (gq, gk))


def _row(prov, provider, op, shape, ms, nbytes, copy_p50):
    p20, p50, p80 = ms
    return {
        "provider": provider,
        "op": op,
        "shape": str(shape),
        "T": shape.T,
        "ms_p20": p20,
        "ms_p50": p50,
        "ms_p80": p80,
        "bytes": nbytes,
        "gb_per_s": nbytes / (p50 * 1e-3) / 1e9,
        "pct_of_copy": 100.0 * copy_p50 / p50 if provider != "copy" else 100.0,
        **prov,
    }


_RESULT_METRICS = ("ms_p20", "ms_p50", "ms_p80", "gb_per_s", "pct_of_copy")


def result_rows(rows: list[dict]) -> list[dict]:
    """Measurements as long-format result rows (``ropekit.results``), one value per row.

    variant = provider @ shape family (the shape without T), metric = "<op> <measure>", context_length = T,
    so a figure groups by columns only; bytes moved and the full shape go in the config.
    """
    prov_keys = ("git_sha", "device", "versions", "timestamp")
    out = []
    for r in rows:
        family = ",".join(p for p in r["shape"].split(",") if not p.startswith("T="))
        for measure in _RESULT_METRICS:
            out.append(make_row(
                experiment="kernel_bench", variant=f"{r['provider']} @ {family}", metric=f"{r['op']} {measure}",
                context_length=r["T"], value=r[measure], n=1, seed=0,
                config={"shape": r["shape"], "bytes": r["bytes"]}, prov={k: r[k] for k in prov_keys},
            ))  # fmt: skip
    return out


# A training step of a whole model: three providers on the same model, batch and seed.
#   hf             the unpatched transformers model, its own loss (``model(input_ids, labels=...)``);
#   ropekit-patch  the same model patched with ``TRAIN_METHOD`` (the Triton kernel on CUDA), the same loss;
#   ropekit-train  the patched model with the trainer's loss (``ropekit.train.loss_of``).
# Model shapes: random initialisation (weights never travel), float32 weights and AdamW state with bf16 autocast
# on CUDA (as ``ropekit train``), SDPA attention, activation checkpointing, micro-batch 1.
TRAIN_STEP_MODELS: dict[str, dict] = {
    # SmolLM2-135M's shape (ropekit.models' ``smollm2-135m``): 30 x 576, GQA 9/3, a 49,152-token vocabulary
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # Llama 3.2 1B's shape: 16 x 2048, GQA 32/8, a 128,256-token vocabulary
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # a 49,152-token vocabulary on a narrow model: the loss head dominates memory (a 32k step on a 24 GB CPU)
    "vocab49k-256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    # the dry run's: seconds on a CPU
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}  # fmt: skip
TRAIN_STEP_PROVIDERS = ("hf", "ropekit-patch", "ropekit-train")
TRAIN_METHOD = "abf:base=500000"
MAX_TRAIN_STEP_LENGTH = 2**17
# glibc's malloc keeps freed blocks below its mmap threshold (by default raised up to 32 MiB as blocks are freed)
# in the process for reuse, so a CPU step's resident peak counts holes between live tensors; with a fixed
# threshold, every tensor of at least that size gets pages of its own that go back to the system when it is
# freed (set through the environment at the process's start: MALLOC_MMAP_THRESHOLD_).
MALLOC_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MAX_MMAP_THRESHOLD_MIB = 32  # glibc refuses a larger threshold on 64-bit systems
# Dense bf16 tensor-core peak by device name (vendor datasheets, TFLOP/s): the MFU denominator. A device not
# listed gets no MFU row (its achieved TFLOP/s row still lands).
PEAK_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA A100-SXM4-80GB": 312.0,
                    "NVIDIA A100-SXM4-40GB": 312.0}  # fmt: skip


def model_flops_per_step(shape: dict, seq_len: int, batch: int = 1) -> float:
    """Model FLOPs of one causal-LM training step (forward + backward, recomputation not counted):
    6 x (matmul parameters incl. the LM head) x tokens, plus causal attention's 6 x layers x width x T^2."""
    d, L, V = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = shape.get("head_dim") or d // shape["num_attention_heads"]
    q_width, kv_width = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    per_layer = d * q_width * 2 + d * kv_width * 2 + 3 * d * shape["intermediate_size"]  # q,o + k,v + MLP
    dense = 6 * (L * per_layer + d * V) * seq_len
    attention = 6 * L * q_width * seq_len * seq_len  # QK^T and AV, half of them under the causal mask
    return float(batch * (dense + attention))


def _max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def check_train_step(models, lengths, providers=TRAIN_STEP_PROVIDERS, mmap_mib: int | None = None) -> None:
    """Refuse an unknown model shape or provider, a length out of range and an mmap threshold glibc would not
    take (or on a system without glibc), before any work."""
    if mmap_mib is not None:
        if not 1 <= mmap_mib <= MAX_MMAP_THRESHOLD_MIB:
            raise ValueError(f"mmap threshold {mmap_mib} MiB out of range; accepted: 1 to {MAX_MMAP_THRESHOLD_MIB}")
        if platform.libc_ver()[0] != "glibc":
            raise ValueError("an mmap threshold needs glibc's malloc (Linux); this system has none")
    for name in models:
        if name not in TRAIN_STEP_MODELS:
            raise ValueError(f"unknown train-step model {name!r}; accepted: {', '.join(TRAIN_STEP_MODELS)}")
    for name in providers:
        if name not in TRAIN_STEP_PROVIDERS:
            raise ValueError(f"unknown train-step provider {name!r}; accepted: {', '.join(TRAIN_STEP_PROVIDERS)}")
    for T in lengths:
        if not 2 <= T <= MAX_TRAIN_STEP_LENGTH:
            raise ValueError(f"train-step length {T} out of range; accepted: 2 to {MAX_TRAIN_STEP_LENGTH}")


class _SDPARecorder:
    """During a forward, which SDPA backend each attention call takes for its arguments (as the dispatcher
    chooses: ``torch._fused_sdp_choice``, with autocast's dtype where autocast is on) and the largest mask it
    was handed: a (T x T) mask or a math backend would make attention's memory quadratic in T."""

    def __init__(self):
        self.backends: set[str] = set()
        self.mask_bytes = 0

    @contextlib.contextmanager
    def watching(self):
        original = F.scaled_dot_product_attention

        def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
            args3 = (q, k, v)
            if q.is_cuda and torch.is_autocast_enabled("cuda"):
                args3 = tuple(t.to(torch.get_autocast_dtype("cuda")) for t in args3)
            if k.shape[1] != q.shape[1] and kwargs.get("enable_gqa"):  # the choice is made on matching heads
                rep = q.shape[1] // k.shape[1]
                args3 = (args3[0], *(t.repeat_interleave(rep, dim=1) for t in args3[1:]))
            with torch.no_grad():
                choice = torch._fused_sdp_choice(*args3, attn_mask, dropout_p, is_causal, scale=kwargs.get("scale"))
            self.backends.add(SDPBackend(choice).name.lower())
            if attn_mask is not None:
                self.mask_bytes = max(self.mask_bytes, attn_mask.numel() * attn_mask.element_size())
            return original(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs)

        F.scaled_dot_product_attention = recorded
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = original


def _time_train_steps(model, opt, ids: torch.Tensor, provider: str, steps: int, label: str,
                      recorder: _SDPARecorder | None = None, live: bool = False,
                      ) -> tuple[float, dict | None]:  # fmt: skip
    """Seconds per optimizer step, over ``steps`` steps after one warm-up (kernels compile, the allocator
    fills, the optimizer makes its state; ``recorder`` watches attention during it), and with ``live`` the
    live tensor memory of one more step, untimed (``LiveTensors.summary``; the warm-up's would lack the
    optimizer's state in its forward and backward); the CUDA allocator's peak is reset before the timed steps."""
    cuda = ids.is_cuda
    pos = torch.arange(ids.shape[1], device=ids.device)[None]

    def step():
        if provider == "ropekit-train":
            loss = loss_of(model, ids, pos)  # bf16 autocast on CUDA, as the trainer
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with recorder.watching() if recorder else contextlib.nullcontext():
        loss = step()
    counted = None
    if live:
        with phases(LiveTensors(ids.device, model, opt, ids, pos), model, opt) as tracker:
            step()
        counted = tracker.summary()
        if list(counted["phase_start"]) != list(PHASES):  # a hook that did not fire: the split would be wrong
            raise RuntimeError(f"{label}: the live count saw the phases {list(counted['phase_start'])}; "
                               f"expected {list(PHASES)}")  # fmt: skip
    if not torch.isfinite(loss):
        raise ValueError(f"{label}: non-finite loss {float(loss)}")
    if cuda:
        torch.cuda.synchronize(ids.device)
        torch.cuda.reset_peak_memory_stats(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(ids.device)
    return (time.perf_counter() - t0) / steps, counted


def measure_train_step(name: str, T: int, provider: str, *, steps: int = 2, device: str = "cpu",
                       release_cpu_memory: bool = True) -> dict | None:  # fmt: skip
    """One model shape, length and provider: {"step_s", "params", "peak_gb", "baseline_gb", "sdpa_backends",
    "attention_mask_gb", "mmap_threshold", "release_cpu_memory", "live"} or None when out of memory
    (``mmap_threshold``: the process's fixed malloc mmap threshold in bytes from its environment, None for
    glibc's default; ``live``: the live tensor memory of one step, ``LiveTensors.summary``). CUDA: the
    allocator's peak over the timed steps (baseline 0); CPU: this process's resident high-water mark and its
    value before the model was built (run it in a fresh process: the mark never falls). ``release_cpu_memory``:
    ``ropekit-train`` on a CPU hands freed pages back between layers, as the trainer does (false: as the trainer
    with ``release_cpu_memory=false``)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if not cuda:  # the baseline after the libraries' lazy imports and first-call set-up: a micro step first
        micro = AutoModelForCausalLM.from_config(tiny_config("llama", **TRAIN_STEP_MODELS["micro"]))
        micro(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
        del micro
    baseline = 0.0 if cuda else _max_rss_gb()
    shape = TRAIN_STEP_MODELS[name]
    torch.manual_seed(0)
    config = tiny_config("llama", **shape, max_position_embeddings=T, attn_implementation="sdpa")
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False  # as the trainer
    model.train()
    if provider != "hf":
        patch(model, TRAIN_METHOD, max_position_embeddings=T)
    release = release_cpu_memory and provider == "ropekit-train" and not cuda  # as the trainer on a CPU
    parallelize(model, activation_checkpointing=True, release_cpu_memory=release)  # the trainer's order
    defaults = TrainConfig(model="tiny:llama")  # the trainer's optimizer settings
    opt = adamw(model, lr=1e-4, weight_decay=defaults.weight_decay, betas=(defaults.beta1, defaults.beta2))
    ids = torch.randint(0, shape["vocab_size"], (1, T), device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    recorder = _SDPARecorder()
    try:
        dt, live = _time_train_steps(model, opt, ids, provider, steps, f"{provider} @ {name}, T={T}", recorder,
                                     live=True)  # fmt: skip
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else _max_rss_gb()
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, opt
        if cuda:  # the next measurement in this process starts from an empty device
            gc.collect()
            torch.cuda.empty_cache()
    return {"step_s": dt, "params": n_params, "peak_gb": peak, "baseline_gb": baseline,
            "sdpa_backends": sorted(recorder.backends), "attention_mask_gb": recorder.mask_bytes / 1e9,
            "mmap_threshold": int(threshold) if (threshold := os.environ.get(MALLOC_MMAP_ENV)) else None,
            "release_cpu_memory": release, "live": live}  # fmt: skip


def _measure_in_child(name: str, T: int, provider: str, steps: int, mmap_mib: int | None = None,
                      release_cpu_memory: bool = True) -> dict | None:  # fmt: skip
    """``measure_train_step`` in a fresh Python process (CPU: its resident high-water mark is this step's), with
    glibc's mmap threshold fixed at ``mmap_mib`` MiB where given; None when the system killed it for memory."""
    call = (f"measure_train_step({name!r}, {T}, {provider!r}, steps={steps}, device='cpu', "
            f"release_cpu_memory={release_cpu_memory})")  # fmt: skip
    code = f"import json; from ropekit.studies.bench import measure_train_step; print('RESULT', json.dumps({call}))"
    env = dict(os.environ)
    if mmap_mib is not None:
        env[MALLOC_MMAP_ENV] = str(mmap_mib << 20)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode in (-9, 137):  # the kernel's out-of-memory killer
        return None
    if out.returncode != 0 or not lines:
        raise RuntimeError(
            f"train step {provider} @ {name}, T={T}: the measuring process failed:\n{out.stderr[-2000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def memory_split(shape: dict, T: int, params: int) -> dict[str, float]:
    """The parts of a training step's memory known in advance (GB, float32): parameters + gradients + AdamW's
    two moments (16 bytes a parameter), and the checkpointed layer inputs (layers x T x width x 4 bytes)."""
    return {"params_grads_adam_gb": 16 * params / 1e9,
            "checkpointed_inputs_gb": shape["num_hidden_layers"] * T * shape["hidden_size"] * 4 / 1e9}  # fmt: skip


GRADS_TOLD = "gradients at the peak: the storages alive then that become parameters' .grad"
LIVE_MEMORY = (
    "bytes of tensor storages alive on the device over one untimed step after the warm-up "
    f"(ropekit.live_memory): independent of the allocator, without kernels' own workspace; {GRADS_TOLD}"
)


def live_measures(live: dict, known_gb: float) -> dict[str, float]:
    """Result-row metrics (GB) of ``LiveTensors.summary``: the live peak and its ratio to the known parts
    (``memory_split``), what was alive at it (parameters with buffers, gradients, optimizer state, the rest),
    each phase's peak, the loss head's own memory and the largest tensor."""
    at = live["at_peak"]
    return {"live_peak_gb": live["peak"] / 1e9, "live_peak_over_static": live["peak"] / 1e9 / known_gb,
            **{f"at_peak_{part}_gb": at[part] / 1e9 for part in ("params", "grads", "optimizer", "rest")},
            **{f"live_{phase.replace(' ', '_')}_gb": v / 1e9 for phase, v in live["phase_peak"].items()},
            "loss_head_gb": live["loss_head"] / 1e9, "largest_tensor_gb": live["largest_tensor"] / 1e9}  # fmt: skip


def run_train_step(models: list[str], lengths: list[int], *, providers=TRAIN_STEP_PROVIDERS, steps: int = 2,
                   device: str | None = None, mmap_mib: int | None = None, release_cpu_memory: bool = True,
                   log=print) -> list[dict]:  # fmt: skip
    """Time ``steps`` optimizer steps (after one warm-up) of each model shape at each length for each provider;
    returns result rows: tokens/s, achieved TFLOP/s, MFU (where the device's peak is known), the peak memory
    (CUDA: the allocator's; CPU: the resident high-water mark of a fresh process per measurement, less its
    value before the model was built) and its split: parameters + gradients + AdamW state and checkpointed
    layer inputs (known in advance), and the rest (activations of the layer being recomputed, the loss head,
    attention's workspace), with ``peak_over_static`` = peak / (the two known parts). ``mmap_mib`` (CPU):
    glibc's mmap threshold in each measuring process (``MALLOC_MMAP_ENV``), recorded in the rows' config;
    ``release_cpu_memory`` false (CPU): ``ropekit-train`` keeps freed pages, as the trainer with
    ``release_cpu_memory=false`` (the config records which)."""
    check_train_step(models, lengths, providers, mmap_mib)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    cuda = dev.type == "cuda"
    if cuda and mmap_mib is not None:
        raise ValueError("an mmap threshold applies to CPU measurements; this one runs on CUDA")
    if cuda and not release_cpu_memory:
        raise ValueError("releasing freed pages between layers applies to CPU measurements; this one runs on CUDA")
    peak_flops = PEAK_BF16_TFLOPS.get(prov["device"]) if cuda else None
    rows = []
    for name in models:
        shape = TRAIN_STEP_MODELS[name]
        for T in lengths:
            for provider in providers:
                if cuda:
                    got = measure_train_step(name, T, provider, steps=steps, device=str(dev))
                else:
                    got = _measure_in_child(name, T, provider, steps, mmap_mib, release_cpu_memory)
                if got is None:
                    log(f"  {provider:14s} {name:13s} T={T:6d}: out of memory (no rows)")
                    continue
                dt = got["step_s"]
                tflops = model_flops_per_step(shape, T) / dt / 1e12
                measures = {"tokens_per_s": T / dt, "step_s": dt, "tflops": tflops}
                if peak_flops:
                    measures["mfu"] = tflops / peak_flops
                split = memory_split(shape, T, got["params"])
                used = got["peak_gb"] - got["baseline_gb"]
                known = sum(split.values())
                measures.update({"peak_mem_gb": used, **split, "rest_gb": used - known,
                                 "peak_over_static": used / known,
                                 "attention_mask_gb": got["attention_mask_gb"]})  # fmt: skip
                if not cuda:
                    measures["baseline_rss_gb"] = got["baseline_gb"]
                measures.update(live_measures(got["live"], known))
                cfg = {"model": name, "params": got["params"], "steps": steps, "batch": 1, "method": TRAIN_METHOD,
                       "dtype": "fp32 weights, bf16 autocast" if cuda else "float32", "checkpointing": True,
                       "attention": "sdpa", "sdpa_backends": got["sdpa_backends"], "peak_bf16_tflops": peak_flops,
                       "memory": "CUDA allocator peak" if cuda else "resident high-water mark of a fresh process, "
                                 "less its value before the model was built", "live_memory": LIVE_MEMORY,
                       "live_peak_phase": got["live"]["at_peak"]["phase"],
                       "largest_tensor_op": got["live"]["largest_tensor_op"]}  # fmt: skip
                if not cuda:
                    cfg["malloc_mmap_threshold"] = got["mmap_threshold"]  # None: glibc's default (dynamic)
                    cfg["release_cpu_memory"] = got["release_cpu_memory"]  # freed pages released between layers
                for metric, value in measures.items():
                    rows.append(make_row(experiment="train_step", variant=f"{provider} @ {name}", metric=metric,
                                         context_length=T, value=value, n=steps, seed=0, config=cfg,
                                         prov=prov))  # fmt: skip
                log(f"  {provider_label(provider, cfg):14s} {name:13s} T={T:6d}: {T / dt:10.0f} tok/s, "
                    f"{tflops:7.1f} TFLOP/s"
                    + (f", MFU {measures['mfu']:.3f}" if peak_flops else "")
                    + f", memory {used:.2f} GB = {known:.2f} known + {used - known:.2f} rest "
                    f"({used / known:.2f}x); live tensors {measures['live_peak_gb']:.2f} GB "
                    f"({measures['live_peak_over_static']:.2f}x) at the {cfg['live_peak_phase']}, loss head "
                    f"{measures['loss_head_gb']:.2f} GB, largest tensor {measures['largest_tensor_gb']:.3f} GB by "
                    f"{cfg['largest_tensor_op']}; attention: {', '.join(got['sdpa_backends'])}, largest mask "
                    f"{got['attention_mask_gb']:.3f} GB")  # fmt: skip
    return rows


def provider_label(provider: str, config: dict) -> str:
    """The provider of a train-step row, with what its CPU process did to malloc where it differs from the
    trainer: a fixed mmap threshold, and for ``ropekit-train`` no release of freed pages between layers."""
    notes = []
    if config.get("malloc_mmap_threshold"):
        notes.append(f"mmap >= {config['malloc_mmap_threshold'] / 2**20:g} MiB")
    cpu = str(config.get("memory", "")).startswith("resident")
    if provider == "ropekit-train" and cpu and not config.get("release_cpu_memory"):
        notes.append("no release per layer")
    elif provider == "ropekit-train" and cpu and config.get("release_slack"):  # tried at one commit
        notes.append(f"release past {config['release_slack']:.0%} growth")
    return f"{provider} ({', '.join(notes)})" if notes else provider


def labelled(r: dict) -> tuple[str, str]:
    """(provider label (``provider_label``), model) of a ``train_step`` row."""
    provider, model = r["variant"].split(" @ ")
    return provider_label(provider, json.loads(r["config"] or "{}")), model


def memory_growth(rows: list[dict], metric: str = "peak_mem_gb") -> list[str]:
    """Per provider and model measured at two or more lengths at one commit, how the peak memory (``metric``:
    the resident or allocator peak, or ``live_peak_gb``) grows with the length: the peaks, GB per 1,024 tokens
    from the shortest to the longest, the ratio of the peaks against the ratio of the lengths (at most
    linear, or faster), and the SDPA backends attention ran on (``_SDPARecorder``). The points come from one
    commit, the newest of those that measured the most lengths (its newest row at each length): a slope
    across commits would mix code, machines and sessions."""
    peaks: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    last: dict[str, str] = {}
    backends: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["experiment"] == "train_step" and r["metric"] == metric:
            key, sha = labelled(r), r["git_sha"]
            peaks[key][sha][int(r["context_length"])] = float(r["value"])  # newest row wins
            last[sha] = max(last.get(sha, ""), r["timestamp"])
            backends[(*key, sha)].update(json.loads(r["config"] or "{}").get("sdpa_backends", []))
    out = []
    for (provider, model), by_sha in sorted(peaks.items()):
        sha = max(by_sha, key=lambda c: (len(by_sha[c]), last[c]))
        if len(by_sha[sha]) < 2:
            continue
        pts = sorted(by_sha[sha].items())
        (t0, p0), (t1, p1) = pts[0], pts[-1]
        slope, ratio, lengths = (p1 - p0) / (t1 - t0) * 1024, p1 / p0, t1 / t0
        verdict = "at most linear" if ratio <= lengths else "**faster than linear**"
        seen = backends[(provider, model, sha)]
        seen = f"; attention on SDPA's {', '.join(sorted(seen))}" if seen else ""
        growth = ", ".join(f"{T:,}: {m:.2f} GB" for T, m in pts)
        out.append(f"- `{provider}` on `{model}` at {sha[:7]}: {growth}; {slope:.3f} GB per 1,024 tokens from {t0:,} "
                   f"to {t1:,} (peak x{ratio:.2f} for length x{lengths:.0f}: {verdict}){seen}")  # fmt: skip
    return out


def _cells(got: list[dict], key: str, fmt: str, which=(0, 1, 2)) -> str:
    return ", ".join(format(got[i][key], fmt) if key in got[i] else "–" for i in which)


def train_step_values(rows: list[dict]) -> dict[tuple[str, int, str], dict]:
    """{(model, T, provider label): {metric: value, "commit": the newest row's git commit}} of ``train_step``
    rows; the newest row wins."""
    data: dict[tuple[str, int, str], dict] = defaultdict(dict)
    for r in rows:
        if r["experiment"] == "train_step":
            provider, model = labelled(r)
            got = data[(model, int(r["context_length"]), provider)]
            got[r["metric"]], got["commit"] = float(r["value"]), r["git_sha"]
    return data


def allocator_table(rows: list[dict]) -> list[str]:
    """Markdown rows comparing each provider's CPU step under the ways of handling malloc that were measured
    (``provider_label``), where more than one was: tokens/s, peak and peak / known."""
    data = train_step_values(rows)
    groups: dict[tuple[str, int, str], list[str]] = defaultdict(list)
    for model, T, label in sorted(data):
        groups[(model, T, label.split(" (")[0])].append(label)
    out = ["| model | T | provider | malloc | tokens/s | peak GB | peak / known |", "|---|---|---|---|---|---|---|"]
    for (model, T, plain), labels in sorted(groups.items()):
        if len(labels) < 2:
            continue
        for label in labels:
            values = data[(model, T, label)]
            how = _malloc_way(label, plain)
            out.append(f"| {model} | {T:,} | {plain} | {how} | {values['tokens_per_s']:,.0f} | "
                       f"{values['peak_mem_gb']:.2f} | {values['peak_over_static']:.2f} |")  # fmt: skip
    return out if len(out) > 2 else []


def _malloc_way(label: str, plain: str) -> str:
    """How a provider's CPU step handled malloc, from its label (``provider_label``)."""
    if label != plain:
        return label[len(plain) + 2 : -1]
    if plain == "ropekit-train":
        return "glibc default, freed pages released at every layer (the trainer's)"
    return "glibc default"


def _runs(rows: list[dict]) -> dict[tuple[str, int, str], dict[str, dict[str, dict[str, float]]]]:
    """{(model, T, commit): {provider label: {timestamp: {"tokens_per_s", "peak_mem_gb"}}}} for the labels run
    two or more times at that commit (a run: one bench call, named by its timestamp; the providers one call
    ran share it)."""
    runs: dict[tuple, dict[str, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["experiment"] == "train_step" and r["metric"] in ("tokens_per_s", "peak_mem_gb"):
            label, model = labelled(r)
            run = runs[(model, int(r["context_length"]), r["git_sha"])][label].setdefault(r["timestamp"], {})
            run[r["metric"]] = float(r["value"])
    out = {}
    for key, by_label in runs.items():
        kept = {label: dict(sorted(each.items())) for label, each in by_label.items() if len(each) >= 2}
        if kept:
            out[key] = kept
    return out


def _pair_runs(ours: dict[str, dict], ref: dict[str, dict]) -> tuple[list[tuple[dict, dict]], str]:
    """([(our run, the reference's run)], how they were paired) for two labels' runs ({timestamp: values}):
    by call where one bench call ran both (a shared timestamp; a run of either without its partner is left
    out and said so), else in the order they ran where both ran equally often in calls of their own (the
    bench's commands alternate them); no pairs where the counts of separate calls differ, since pairing
    them in order would match runs the commands did not alternate."""
    shared = sorted(set(ours) & set(ref))
    if shared:
        alone = len(ours) + len(ref) - 2 * len(shared)
        how = "paired by call"
        if alone:
            how += f"; {alone} run{'s' * (alone != 1)} without a partner in its call left out"
        return [(ours[t], ref[t]) for t in shared], how
    if len(ours) == len(ref):
        return list(zip(ours.values(), ref.values(), strict=True)), "paired in the order they ran (separate calls)"
    return [], f"not paired: {len(ours)} and {len(ref)} runs in separate calls"


def _paired_against(label: str, labels) -> str | None:
    """What a label's repeated runs are paired against: the trainer's step (``ropekit-train``) against HF's,
    another way of handling malloc against its provider's default, else against no release at all; None for
    a reference (or a way with nothing to pair against)."""
    plain = label.split(" (")[0]
    if label == plain:
        return "hf" if plain != "hf" and "hf" in labels else None
    if plain in labels:
        return plain
    keep = f"{plain} (no release per layer)"
    return keep if keep in labels and keep != label else None


def repeated_runs(rows: list[dict]) -> list[str]:
    """Markdown rows for each model, length and commit where two or more providers or ways of handling malloc
    (``provider_label``) ran at least twice each: every run's tokens/s and peak in the order they ran; then
    each against its reference (``_paired_against``), paired run by run (``_pair_runs``: by call, else in
    order), with the mean difference, its paired bootstrap interval and whether it is resolved
    (``ropekit.stats.compare``); a pairing that is refused or leaves fewer than two pairs is said so."""
    out = ["| model | T | commit | provider | malloc | tokens/s, run by run | peak GB, run by run |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    pairs = []
    for (model, T, sha), ordered in sorted(_runs(rows).items()):
        refs = {label: ref for label in ordered if (ref := _paired_against(label, ordered))}
        if not refs:
            continue
        for label in sorted(ordered, key=lambda x: (x != "hf", " (" in x, x)):
            plain = label.split(" (")[0]
            speeds = ", ".join(format(v["tokens_per_s"], ",.0f") for v in ordered[label].values())
            peaks = ", ".join(format(v["peak_mem_gb"], ".2f") for v in ordered[label].values())
            out.append(f"| {model} | {T:,} | {sha[:7]} | {plain} | {_malloc_way(label, plain)} | {speeds} | {peaks} |")
        for label, ref in sorted(refs.items(), key=lambda kv: (" (" in kv[0], kv[0])):
            matched, how = _pair_runs(ordered[label], ordered[ref])
            head = f"- `{model}` at {T:,} (commit {sha[:7]}), `{label}` against `{ref}`"
            n = len(matched)
            if n < 2:
                pairs.append(f"{head}: {how}" + (" (one pair: no interval)." if n == 1 else "."))
                continue
            parts = []
            for metric, name, unit, fmt in (("tokens_per_s", "tokens/s", "tok/s", "+,.0f"),
                                            ("peak_mem_gb", "peak", "GB", "+.2f")):  # fmt: skip
                samples = {ref: {i: b[metric] for i, (_, b) in enumerate(matched)},
                           label: {i: a[metric] for i, (a, _) in enumerate(matched)}}  # fmt: skip
                got = compare(samples, ref)[label]
                ratios = ", ".join(f"{a[metric] / b[metric]:.2f}" for a, b in matched)
                verdict = "resolved" if got["resolved"] else "not resolved"
                if n < MIN_RESOLVED:
                    verdict += f" ({n} pairs; {MIN_RESOLVED} needed)"
                parts.append(f"{name} x{ratios}, mean difference {format(got['delta'], fmt)} {unit} "
                             f"(95% paired bootstrap {format(got['delta_low'], fmt)} to "
                             f"{format(got['delta_high'], fmt)}): {verdict}")  # fmt: skip
            pairs.append(f"{head}, {how}: " + "; ".join(parts) + ".")
    return [*out, "", *pairs] if pairs else []


def paired_speed_ratio(rows: list[dict], model: str, T: int) -> dict | None:
    """``ropekit-train``'s tokens/s over HF's, pair by pair (``_pair_runs``), at the newest commit (by its last
    run) where both ran two or more times at ``model`` and ``T`` and two or more pairs were made: {"commit",
    "ratios", "paired" (how), "mean", "low", "high" (its 95% bootstrap interval,
    ``ropekit.stats.mean_interval``)}; None where no commit has such pairs."""
    found = []
    for (m, t, sha), ordered in _runs(rows).items():
        if (m, t) == (model, T) and {"hf", "ropekit-train"} <= set(ordered):
            matched, how = _pair_runs(ordered["ropekit-train"], ordered["hf"])
            if len(matched) >= 2:
                ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in matched]
                last = max(r["timestamp"] for r in rows if r["git_sha"] == sha and r["experiment"] == "train_step")
                found.append((last, sha, ratios, how))
    if not found:
        return None
    _, sha, ratios, how = max(found)
    mean, low, high = mean_interval(ratios)
    return {"commit": sha, "ratios": ratios, "paired": how, "mean": mean, "low": low, "high": high}


# Commits whose live count could name a view of a tensor that was there before the step (the head's weight,
# transposed) as the step's largest tensor: their largest-tensor cells are not shown.
LARGEST_TENSOR_UNSHOWN = {"16fdda1198a6"}


def live_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the live tensor memory of each measured step (``live_measures``): the peak, its ratio
    to what is known in advance, the phase it fell in and what was alive then, each phase's peak, the loss
    head's own memory and the largest tensor (with the op and phase that made it); the newest row wins."""
    data, ops = train_step_values(rows), {}
    for r in rows:
        if r["experiment"] == "train_step" and r["metric"] == "live_peak_gb":
            config, (label, model) = json.loads(r["config"] or "{}"), labelled(r)
            told = GRADS_TOLD in config["live_memory"]
            ops[(model, int(r["context_length"]), label)] = (config["live_peak_phase"], config["largest_tensor_op"],
                                                             r["git_sha"], told)  # fmt: skip
    out = ["| model | T | provider | live peak GB | / known | at | params, grads, optimizer, rest GB | "
           "phase peaks GB (forward, loss head, backward, optimizer) | loss head GB | largest tensor |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, T, label), (phase, op, sha, grads_told) in sorted(ops.items()):
        v = data[(model, T, label)]
        largest = f"{v['largest_tensor_gb']:.3f} GB, {op}"
        if sha in LARGEST_TENSOR_UNSHOWN:
            largest = f"– (at {sha[:7]} a view could be named)"
        parts = ", ".join(f"{v[f'at_peak_{k}_gb']:.2f}" for k in ("params", "grads", "optimizer", "rest"))
        if not grads_told:  # measured before gradients autograd still held were told from the rest
            grads_rest = v["at_peak_grads_gb"] + v["at_peak_rest_gb"]
            parts = f"{v['at_peak_params_gb']:.2f}, – (in rest), {v['at_peak_optimizer_gb']:.2f}, {grads_rest:.2f}"
        peaks = ", ".join(f"{v[f'live_{k}_gb']:.2f}" for k in ("forward", "loss_head", "backward", "optimizer"))
        out.append(f"| {model} | {T:,} | {label} | {v['live_peak_gb']:.2f} | {v['live_peak_over_static']:.2f} | "
                   f"{phase} | {parts} | {peaks} | {v['loss_head_gb']:.2f} | {largest} |")  # fmt: skip
    return out if len(out) > 2 else []


def train_step_table(rows: list[dict]) -> list[str]:
    """Markdown rows of ``train_step`` result rows: per model and length, each provider's tokens/s, MFU where
    known, peak memory against the known parts, and the commit each provider's newest row came from (one
    name where they share it: cells from different commits are not a side-by-side measurement)."""
    data = train_step_values(rows)
    out = ["| model | T | tokens/s (hf, patched, ropekit loss) | MFU (hf, ropekit loss) | peak GB (hf, patched, "
           "ropekit loss) | known GB | ropekit loss peak / known | commit |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, T in sorted({(m, T) for m, T, p in data if p in TRAIN_STEP_PROVIDERS}):
        got = [data.get((model, T, p), {}) for p in TRAIN_STEP_PROVIDERS]
        known = next((g["params_grads_adam_gb"] + g["checkpointed_inputs_gb"] for g in got
                      if "params_grads_adam_gb" in g), None)  # fmt: skip
        ratio = f"{got[2]['peak_over_static']:.2f}" if "peak_over_static" in got[2] else "–"
        known_cell = "–" if known is None else f"{known:.2f}"
        shas = {p: g["commit"][:7] for p, g in zip(TRAIN_STEP_PROVIDERS, got, strict=True) if g}
        commit = next(iter(shas.values())) if len(set(shas.values())) == 1 else ", ".join(
            f"{sha} ({_TRAIN_STEP_NAMES[p]})" for p, sha in shas.items())  # fmt: skip
        out.append(f"| {model} | {T:,} | {_cells(got, 'tokens_per_s', ',.0f')} | {_cells(got, 'mfu', '.3f', (0, 2))} | "
                   f"{_cells(got, 'peak_mem_gb', '.2f')} | {known_cell} | {ratio} | {commit} |")  # fmt: skip
    return out


# The column names of TRAIN_STEP_PROVIDERS in train_step_table.
_TRAIN_STEP_NAMES = {"hf": "hf", "ropekit-patch": "patched", "ropekit-train": "ropekit loss"}


def run_static(out: str | None, *, stage: str, cases: str = "all", jobs: int = 1, liger_rope: str | None = None,
               flash_attn_rotary: str | None = None, log=print) -> list[dict]:  # fmt: skip
    """``ropekit bench --static``: compile every case for sm_80 and sm_90 on this machine (no GPU) and
    write registers, blocks/SM, access widths, instructions per 16 B and the roofline *model* as rows.

    Peers that read a cos/sin table are compiled too when their kernel file is given (``liger_rope``:
    ``liger_kernel/ops/rope.py`` from the ``liger-kernel`` wheel; ``flash_attn_rotary``:
    ``flash_attn/ops/triton/rotary.py`` from the flash-attn sdist); otherwise a line says why not.
    """
    reason = static.nvidia_backend_missing()
    if reason:
        log(f"static report skipped: {reason}")
        return []
    chosen = static.all_cases() if cases == "all" else static.ci_cases()
    results = static.analyse(chosen, jobs=jobs, log=log)
    peer_cases = [c for c in chosen if c in set(static.peer_cases())]
    for provider, path, flag in (("liger", liger_rope, "--liger-rope"),
                                 ("flash-attn-triton", flash_attn_rotary, "--flash-attn-rotary")):  # fmt: skip
        if not path:
            log(f"{provider}: skipped (pass its kernel file with {flag})")
            continue
        results += static.analyse(peer_cases, jobs=jobs, log=log, provider=provider, path=path)
    log(static.model_assumptions())
    rows = static.report_rows(results, stage)
    if out:
        append_rows(out, rows)
        log(f"{len(rows)} rows appended to {out}")
    return rows


def draw_bench(results: str | Path, png: str | Path, *, op: str = "fwd", measure: str = "gb_per_s",
               family: str | None = None, min_length: int = 1) -> Path:  # fmt: skip
    """``measure`` (GB/s, or pct_of_copy) against sequence length, one line per provider and shape family, from
    ``ropekit bench`` rows; ``family`` keeps one shape family (e.g. ``"B=1,Hq=32,Hk=8,D=128,bfloat16"``) and
    ``min_length`` drops shorter rows (2: leave out the decoding shapes, T = 1)."""
    plt = pyplot()
    rows = [r for r in read_rows(results)
            if r["experiment"] == "kernel_bench" and int(r["context_length"]) >= min_length]  # fmt: skip
    if family:
        rows = [r for r in rows if r["variant"].endswith(f" @ {family}")]
    lines = series(rows, f"{op} {measure}")
    if not lines:
        raise ValueError(f"no '{op} {measure}' kernel_bench rows in {results}" + (f" for {family}" if family else ""))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, pts in sorted(lines.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=variant)
    label = "% of device-to-device copy" if measure == "pct_of_copy" else "GB/s"
    ax.set(xscale="log", xlabel="sequence length T", ylabel=f"{label} ({op})")
    ax.set_title(", ".join(sorted({r["device"] for r in rows})), fontsize=8)
    ax.legend(fontsize=6)
    png = Path(png)
    save_png(fig, png)
    plt.close(fig)
    return png
