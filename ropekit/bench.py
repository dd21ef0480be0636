"""Rotary-embedding benchmark: ropekit's Triton kernel against every peer on the same tensors.

    ropekit bench --out figures/bench_rope.csv                   # on a CUDA GPU: the training shapes
    ropekit bench --smoke --out /tmp/bench.csv                   # anywhere: tiny shapes, torch providers

Providers (each skipped with a note when it cannot run here):

- ``ropekit-triton``: ``apply_rope(backend="triton")`` (angles from positions, no table);
- ``hf-eager``: transformers' ``apply_rotary_pos_emb`` with the cos/sin of its rotary module, with the
  table built inside the timed call (``hf-eager+table``) and outside it (``hf-eager``);
- ``torch-compile``: ``torch.compile`` of the ropekit torch reference;
- ``liger``: Liger-Kernel's ``LigerRopeFunction`` (PyPI ``liger-kernel``);
- ``flash-attn-triton``: flash-attention's pure-Triton ``apply_rotary`` loaded from the file given with
  ``--flash-attn-rotary PATH`` (``flash_attn/ops/triton/rotary.py`` from the sdist).

Times are p20/p50/p80 from ``triton.testing.do_bench`` on CUDA (a perf_counter loop elsewhere).
GB/s counts the bytes that must move: q and k read and written once (plus any cos/sin table a
provider reads). ``copy`` is ``torch.Tensor.copy_`` of the same byte count in the same run: the
ratio to it is the fraction of achievable bandwidth. ``result_rows`` turns the measurements into
result rows (``ropekit.results``: device, library versions, git sha); ``ropekit.figures.draw_bench``
draws GB/s against sequence length per provider from that CSV.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Shape", "TRAINING_SHAPES", "SMOKE_SHAPES", "run_benchmark", "result_rows"]


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
SMOKE_SHAPES = [Shape(1, 64, 4, 2, 32, dtype="float32"), Shape(1, 128, 4, 2, 32, R=16, dtype="float32")]


def _timer(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return p20, p50, p80
    fn()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10)
    return q[1], statistics.median(times), q[7]


def _hf_tables(shape: Shape, positions: torch.Tensor, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

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
    from ropekit import apply_rope
    from ropekit.reference import RopeParams, apply_rope_reference

    dtype = getattr(torch, shape.dtype)
    rotary_dim = shape.R or shape.D
    positions = torch.arange(shape.T, device=device)
    method = "abf:base=500000"
    elem = torch.finfo(dtype).bits // 8
    table_bytes = 2 * shape.T * rotary_dim * elem  # cos + sin, (T, R) each, in the activation dtype
    out: dict[str, tuple] = {}

    if device.type == "cuda":
        out["ropekit-triton"] = (lambda q, k: apply_rope(q, k, positions, method, rotary_dim=rotary_dim,
                                                         backend="triton"), 0)  # fmt: skip
    else:
        out["ropekit-triton"] = "needs CUDA (the interpreter is not a speed)"

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary, x = _hf_tables(shape, positions, dtype, device)
    pos2d = positions[None]
    cos, sin = rotary(x, pos2d)

    def hf_with_table(q, k):
        c, s = rotary(x, pos2d)
        return _hf_apply(apply_rotary_pos_emb, q, k, c, s, rotary_dim)

    out["hf-eager+table"] = (hf_with_table, table_bytes)
    out["hf-eager"] = (lambda q, k: _hf_apply(apply_rotary_pos_emb, q, k, cos, sin, rotary_dim), table_bytes)

    params = RopeParams(__import__("ropekit").parse(method).inv_freq64(rotary_dim).to(device))
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
    from ropekit.results import provenance

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
                ms = _timer(call, dev)
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
    from ropekit.results import make_row

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


def e2e_training_step(seq_len: int, *, patched: bool, steps: int = 3, device: str = "cuda") -> dict:
    """Tokens/s and peak memory of a ~100M-parameter Llama training step (bf16 autocast, SDPA), with or
    without the ropekit patch (``abf:base=500000`` through the Triton kernel)."""
    import ropekit
    from ropekit.models import load_model

    model = load_model("tiny:llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=seq_len, device=device)  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if patched:
        ropekit.patch(model, "abf:base=500000", max_position_embeddings=seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (1, seq_len), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    return {"seq_len": seq_len, "patched": patched, "tokens_per_s": seq_len / dt,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}  # fmt: skip


def run_static(out: str | None, *, stage: str, cases: str = "all", jobs: int = 1, liger_rope: str | None = None,
               flash_attn_rotary: str | None = None, log=print) -> list[dict]:  # fmt: skip
    """``ropekit bench --static``: compile every case for sm_80 and sm_90 on this machine (no GPU) and
    write registers, blocks/SM, access widths, instructions per 16 B and the roofline *model* as rows.

    Peers that read a cos/sin table are compiled too when their kernel file is given (``liger_rope``:
    ``liger_kernel/ops/rope.py`` from the ``liger-kernel`` wheel; ``flash_attn_rotary``:
    ``flash_attn/ops/triton/rotary.py`` from the flash-attn sdist); otherwise a line says why not.
    """
    from ropekit.kernels import static

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
        from ropekit.results import append_rows

        append_rows(out, rows)
        log(f"{len(rows)} rows appended to {out}")
    return rows
