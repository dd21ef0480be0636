"""``apply_rope``: the public rotary function, and its dispatch to the torch reference or the Triton kernel.

The Triton path goes through a registered torch custom op (``ropekit::rope``) with a fake
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it
without a graph break. Its backward is the same op with ``conjugate=True``: the transpose of a
rotation by theta (times a per-pair scale s) is a rotation by -theta times the same s.
"""

from __future__ import annotations

import operator
import os

import torch

from ropekit import methods as _methods
from ropekit.reference import LAYOUTS, RopeParams, apply_rope_reference

__all__ = ["apply_rope", "apply_rope_", "apply_rope_params", "rope_params", "RopeParams", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(backend: str, q: torch.Tensor, k: torch.Tensor) -> bool:
    """ "auto": the kernel for CUDA tensors it takes, else the reference; "triton": the kernel or a ValueError."""
    if backend == "auto":
        return q.is_cuda and q.dtype in _KERNEL_DTYPES and q.dtype == k.dtype and _triton_available()
    if backend != "triton":
        return False
    if q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton backend takes float32, float16 or bfloat16; got {q.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"the Triton backend needs q and k of one dtype; got {q.dtype} and {k.dtype}")
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (got {q.device}); use backend='auto' or 'torch', "
            "or set TRITON_INTERPRET=1 before importing ropekit to run the kernel in Triton's CPU interpreter"
        )
    return True


def _as_positions(positions, q: torch.Tensor) -> torch.Tensor:
    """Positions as an integer tensor on q's device: lists and numpy arrays are converted, and
    int8/uint8/int16 widened to int64 (their range is too small for positions, not their values)."""
    if not isinstance(positions, torch.Tensor):
        try:
            positions = torch.as_tensor(positions, device=q.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"positions must be integers, (T,) or (B, T); got {type(positions).__name__}") from None
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor (int32/int64), got {positions.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        positions = positions.to(torch.int64)
    if positions.device != q.device:
        raise ValueError(f"positions are on {positions.device} but q is on {q.device}")
    if positions.dtype == torch.int64 and positions.numel() and not torch.compiler.is_compiling():
        # float64 holds every integer below 2^53, and the angles are exact only there (one sync per call)
        top = int(positions.abs().max())
        if top >= MAX_POSITION:
            raise ValueError(f"positions must lie below 2^53 = {MAX_POSITION} (float64 angles); got {top}")
    return positions


MAX_POSITION = 2**53


def _rotary_dim(rotary_dim, head_dim: int) -> int:
    if rotary_dim is None:
        return head_dim
    try:
        if isinstance(rotary_dim, bool):
            raise TypeError
        return operator.index(rotary_dim)  # ints and integer scalars; no floats, no strings
    except TypeError:
        accepted = f"an even integer in [2, head_dim={head_dim}]"
        raise ValueError(f"rotary_dim must be {accepted}; got {rotary_dim!r}") from None


def check_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, layout: str, rotary_dim: int) -> None:
    """Shape/dtype contract of apply_rope; raises ValueError naming the bad input."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError(f"q and k must be tensors; got {type(q).__name__}, {type(k).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    (bq, _, tq, dq), (bk, _, tk, dk) = q.shape, k.shape
    if (bq, tq, dq) != (bk, tk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point; got {q.dtype}, {k.dtype}")
    if positions.shape not in ((tq,), (bq, tq)):
        raise ValueError(
            f"positions must have shape (T,) = ({tq},) or (B, T) = ({bq}, {tq}); got {tuple(positions.shape)}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > dq:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={dq}]; got {rotary_dim}")


def rope_params(
    method: _methods.RopeMethod, rotary_dim: int, positions: torch.Tensor, seq_len: int | None = None
) -> RopeParams:
    """The method's numbers for this call (float64 ``inv_freq`` and xPos rate on the positions' device).

    Dynamic NTK needs the current length: ``seq_len`` or, when not given, max(positions) + 1.
    """
    if method.needs_seq_len and seq_len is None:
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 0
    rate = method.xpos_rate(rotary_dim)
    return RopeParams(
        inv_freq=method.inv_freq64(rotary_dim, seq_len).to(positions.device),
        xpos_rate=None if rate is None else rate.to(positions.device),
        attention_factor=float(method.attention_factor),
        xpos_center=int(method.xpos_center),
    )


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
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by a RoPE method at arbitrary integer positions.

    Args:
        q: (B, Hq, T, D) queries, float32/float16/bfloat16.
        k: (B, Hk, T, D) keys; Hk may differ from Hq (GQA).
        positions: (T,) or (B, T) integer positions; need not be 0..T-1 (packing, KV-cache offsets).
            A list or numpy array is converted; int8/uint8/int16 are widened to int64.
        method: a ``RopeMethod`` or spec string (``"pi:factor=8,base=10000"``); it must know its base.
        layout: ``"half"`` (GPT-NeoX / Hugging Face) or ``"interleaved"`` (GPT-J / Meta).
        rotary_dim: rotate only the first ``rotary_dim`` channels (default D); the rest pass through.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        seq_len: current length for dynamic NTK (default max(positions) + 1).
        inplace: overwrite q and k (inference, KV-cache writes). Not differentiable: refused for tensors
            that require grad while autograd is recording.
    Returns:
        (q_out, k_out): tensors with the shapes and dtypes of q and k (q and k themselves when ``inplace``);
        differentiable when not in place.
    """
    method = _methods.parse(method)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    positions = _as_positions(positions, q)
    rotary_dim = _rotary_dim(rotary_dim, q.shape[-1])
    check_inputs(q, k, positions, layout, rotary_dim)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError(
            "inplace=True cannot give gradients (q or k requires grad); use inplace=False, or torch.no_grad()"
        )
    params = rope_params(method, rotary_dim, positions, seq_len)
    return apply_rope_params(q, k, positions, params, layout=layout, backend=backend, inplace=inplace)


def apply_rope_params(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "half",
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope with the method's numbers already made (the patched model calls this per layer)."""
    if _use_triton(backend, q, k):
        flat = (params.inv_freq.to(torch.float64), None if params.xpos_rate is None else params.xpos_rate.double(),
                float(params.attention_factor), int(params.xpos_center), layout == "interleaved")  # fmt: skip
        if inplace:  # no autograd: straight to the launcher
            from ropekit.kernels.rope import rope_launch

            inv_freq, xpos_rate, factor, center, interleaved = flat
            with torch.no_grad():
                return rope_launch(q, k, positions, inv_freq, xpos_rate, interleaved=interleaved,
                                   attention_factor=factor, xpos_center=center, inplace=True)  # fmt: skip
        return torch.ops.ropekit.rope(q, k, positions, *flat, False)
    out = apply_rope_reference(q, k, positions, params, layout=layout)
    if not inplace:
        return out
    with torch.no_grad():
        q.copy_(out[0])
        k.copy_(out[1])
    return q, k


# ---------------------------------------------------------------------------------------------
# The custom op: Triton on CUDA (or under TRITON_INTERPRET=1), the reference otherwise.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("ropekit::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    xpos_rate: torch.Tensor | None,
    attention_factor: float,
    xpos_center: int,
    interleaved: bool,
    conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel as one op: q (B, Hq, T, D), k (B, Hk, T, D), positions (T,) or (B, T),
    inv_freq/xpos_rate (R/2,) float64. Flat arguments: the torch.library boundary takes no objects."""
    from ropekit.kernels.rope import rope_launch

    return rope_launch(
        q, k, positions, inv_freq, xpos_rate,
        interleaved=interleaved, attention_factor=attention_factor, xpos_center=xpos_center, conjugate=conjugate,
    )  # fmt: skip


@_rope_op.register_fake
def _(q, k, positions, inv_freq, xpos_rate, attention_factor, xpos_center, interleaved, conjugate):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, positions, inv_freq, xpos_rate, attention_factor, xpos_center, interleaved, conjugate = inputs
    ctx.save_for_backward(positions, inv_freq, xpos_rate)
    ctx.args = (attention_factor, xpos_center, interleaved, conjugate)


def _backward(ctx, grad_q, grad_k):
    # d(s * R(theta) x) / dx applied to g is s * R(-theta) g: the same op, conjugated.
    positions, inv_freq, xpos_rate = ctx.saved_tensors
    attention_factor, xpos_center, interleaved, conjugate = ctx.args
    grad_q = torch.zeros_like(grad_q) if grad_q is None else grad_q  # an output may not be used
    grad_k = torch.zeros_like(grad_k) if grad_k is None else grad_k
    dq, dk = torch.ops.ropekit.rope(
        grad_q, grad_k, positions, inv_freq, xpos_rate, attention_factor, xpos_center, interleaved, not conjugate
    )
    return dq, dk, None, None, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, method="rope", **kwargs):
    """``apply_rope(..., inplace=True)``: q and k are overwritten and returned (no autograd)."""
    return apply_rope(q, k, positions, method, inplace=True, **kwargs)
