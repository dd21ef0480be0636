"""``apply_rope``: the public rotary function, and its dispatch to the torch reference or the Triton kernel.

The Triton path goes through a registered torch custom op (``ropekit::rope``) with a fake
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it
without a graph break. Its backward is the same op with ``conjugate=True``: the transpose of a
rotation by theta (times a per-pair scale s) is a rotation by -theta times the same s.
"""

from __future__ import annotations

import torch

from ropekit import methods as _methods
from ropekit.reference import LAYOUTS, apply_rope_reference

__all__ = ["apply_rope", "rope_tables", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, layout: str, rotary_dim: int) -> None:
    """Shape/dtype contract of apply_rope; raises ValueError naming the bad input."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    (bq, _, tq, dq), (bk, _, tk, dk) = q.shape, k.shape
    if (bq, tq, dq) != (bk, tk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point; got {q.dtype}, {k.dtype}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor (int32/int64), got {positions.dtype}")
    if positions.shape not in ((tq,), (bq, tq)):
        raise ValueError(
            f"positions must have shape (T,) = ({tq},) or (B, T) = ({bq}, {tq}); got {tuple(positions.shape)}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > dq:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={dq}]; got {rotary_dim}")


def rope_tables(
    method: _methods.RopeMethod, rotary_dim: int, positions: torch.Tensor, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The method's float64 ``inv_freq`` (and xPos rate) for this call, on the positions' device.

    Dynamic NTK needs the current length: ``seq_len`` or, when not given, max(positions) + 1.
    """
    if method.needs_seq_len and seq_len is None:
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 0
    inv_freq = method.inv_freq64(rotary_dim, seq_len).to(positions.device)
    rate = method.xpos_rate(rotary_dim)
    return inv_freq, (rate.to(positions.device) if rate is not None else None)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    method: _methods.RopeMethod | str = "rope",
    *,
    layout: str = "half",
    rotary_dim: int | None = None,
    backend: str = "auto",
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by a RoPE method at arbitrary integer positions.

    Args:
        q: (B, Hq, T, D) queries, float32/float16/bfloat16.
        k: (B, Hk, T, D) keys; Hk may differ from Hq (GQA).
        positions: (T,) or (B, T) integer positions; need not be 0..T-1 (packing, KV-cache offsets).
        method: a ``RopeMethod`` or spec string (``"pi:factor=8,base=10000"``); it must know its base.
        layout: ``"half"`` (GPT-NeoX / Hugging Face) or ``"interleaved"`` (GPT-J / Meta).
        rotary_dim: rotate only the first ``rotary_dim`` channels (default D); the rest pass through.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        seq_len: current length for dynamic NTK (default max(positions) + 1).
    Returns:
        (q_out, k_out): new tensors with the shapes and dtypes of q and k; differentiable.
    """
    method = _methods.parse(method)
    rotary_dim = q.shape[-1] if rotary_dim is None else int(rotary_dim)
    check_inputs(q, k, positions, layout, rotary_dim)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    inv_freq, xpos_rate = rope_tables(method, rotary_dim, positions, seq_len)
    return apply_rope_tables(
        q,
        k,
        positions,
        inv_freq,
        layout=layout,
        attention_factor=method.attention_factor,
        xpos_rate=xpos_rate,
        xpos_center=method.xpos_center,
        backend=backend,
    )


def apply_rope_tables(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    layout: str = "half",
    attention_factor: float = 1.0,
    xpos_rate: torch.Tensor | None = None,
    xpos_center: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope with the frequencies already computed (the patched model calls this per layer)."""
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and _triton_available())
    if use_triton:
        from ropekit.kernels.op import rope_op

        return rope_op(
            q, k, positions, inv_freq, xpos_rate,
            layout=layout, attention_factor=attention_factor, xpos_center=xpos_center,
        )  # fmt: skip
    return apply_rope_reference(
        q,
        k,
        positions,
        inv_freq,
        layout=layout,
        attention_factor=attention_factor,
        xpos_rate=xpos_rate,
        xpos_center=xpos_center,
    )
