"""Fused rotary-embedding kernel for every ropekit method: q and k in one launch, angles from positions.

No cos/sin table is read: each program loads one token's integer position and the method's float64
``inv_freq`` and computes its angles itself. Exactness without float64 sin/cos:

    angle = pos * inv_freq                (float64: ~1e-10 rad at pos 2^20)
    r     = angle - trunc(angle / 2pi)*2pi (float64 range reduction, |r| < 2pi)
    cos, sin of float32(r)                 (float32, on a small argument: ~1e-7)

xPos scales (q: exp(e), k: exp(-e), e = clamp((pos - center) * rate_j, +-80)) are computed the same
way: e in float64, then exp(e) = 2^k * exp(f) with integer k and |f| <= ln2/2, so the float32 exp only
sees a small argument and 2^k is built exactly from its exponent bits.

Layouts: pair j is (x[j], x[j + R/2]) for "half" (GPT-NeoX / HF) and (x[2j], x[2j+1]) for
"interleaved" (GPT-J / Meta); channels R..D-1 are copied through (or left alone in place).
Backward is the same kernel with CONJUGATE (rotation by -angle, same scales).

Grid: (token, head tile). A program rotates BLOCK_H query heads and BLOCK_H key heads of one token
(b, t); BLOCK_H covers all heads up to 4096 pairs, so the angles of a token are computed once and
reused across its heads.
All offsets are int64, so tensors past 2^31 elements are addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_launch", "launch_args", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TWO_PI = 6.283185307179586
_INV_TWO_PI = 0.15915494309189535
_LN2 = 0.6931471805599453
_LOG2E = 1.4426950408889634
_XPOS_MAX_EXPONENT = 80.0  # = ropekit.methods.XPOS_MAX_EXPONENT (kept literal: no imports in the kernel)


@triton.jit
def _rotate_heads(
    X,
    OUT,
    n_heads,
    h0,
    b,
    t,
    sx_b,
    sx_h,
    sx_t,
    sx_d,
    so_b,
    so_h,
    so_t,
    so_d,
    cos,
    sin,
    scale,
    HALF: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):
    # cos, sin, scale: (1, BLOCK_P) float32 for this token.
    pairs = tl.arange(0, BLOCK_P)
    pair_mask = pairs < HALF
    if INTERLEAVED:
        da = (2 * pairs).to(tl.int64)
        db = da + 1
    else:
        da = pairs.to(tl.int64)
        db = da + HALF
    x_base = X + b * sx_b + t * sx_t
    o_base = OUT + b * so_b + t * so_t
    heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    head_mask = heads[:, None] < n_heads
    mask = head_mask & pair_mask[None, :]
    xa = tl.load(x_base + heads[:, None] * sx_h + da[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_base + heads[:, None] * sx_h + db[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    ya = (xa * cos - xb * sin) * scale
    yb = (xb * cos + xa * sin) * scale
    tl.store(o_base + heads[:, None] * so_h + da[None, :] * so_d, ya.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + heads[:, None] * so_h + db[None, :] * so_d, yb.to(OUT.dtype.element_ty), mask=mask)
    if COPY_TAIL:
        tail = (2 * HALF + tl.arange(0, BLOCK_TAIL)).to(tl.int64)
        tmask = head_mask & (tail[None, :] < 2 * HALF + TAIL)
        xt = tl.load(x_base + heads[:, None] * sx_h + tail[None, :] * sx_d, mask=tmask, other=0.0)
        tl.store(o_base + heads[:, None] * so_h + tail[None, :] * so_d, xt.to(OUT.dtype.element_ty), mask=tmask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    POS,
    INV_FREQ,
    XPOS_RATE,
    T,
    HQ,
    HK,
    attention_factor,
    xpos_center,
    sq_b,
    sq_h,
    sq_t,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sqo_b,
    sqo_h,
    sqo_t,
    sqo_d,
    sko_b,
    sko_h,
    sko_t,
    sko_d,
    sp_b,
    sp_t,
    HALF: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    HAS_XPOS: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):
    # Q (B, HQ, T, D), K (B, HK, T, D), any strides; POS (B, T) or (T,) (sp_b = 0); INV_FREQ (HALF,) float64.
    pid = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H  # first head of this program's tile
    b = pid // T
    t = pid % T
    pos = tl.load(POS + b * sp_b + t * sp_t).to(tl.int64)

    pairs = tl.arange(0, BLOCK_P)
    pair_mask = pairs < HALF
    inv_freq = tl.load(INV_FREQ + pairs, mask=pair_mask, other=0.0)  # float64
    angle = pos.to(tl.float64) * inv_freq  # exact to ~1e-16 relative
    turns = (angle * 0.15915494309189535).to(tl.int64)  # trunc(angle / 2pi)
    reduced = (angle - turns.to(tl.float64) * 6.283185307179586).to(tl.float32)  # |reduced| < 2pi
    cos = tl.cos(reduced)
    sin = tl.sin(reduced)
    if CONJUGATE:
        sin = -sin

    q_scale = tl.full([BLOCK_P], 1.0, tl.float32) * attention_factor
    k_scale = q_scale
    if HAS_XPOS:
        rate = tl.load(XPOS_RATE + pairs, mask=pair_mask, other=0.0)  # float64: ln(zeta_j) / scale_base
        e = (pos - xpos_center).to(tl.float64) * rate
        e = tl.minimum(tl.maximum(e, -80.0), 80.0)
        # exp(e) = 2^n * exp(f), n = round(e / ln2), |f| <= ln2/2: exact 2^n from exponent bits
        n = tl.floor(e * 1.4426950408889634 + 0.5)
        f = (e - n * 0.6931471805599453).to(tl.float32)
        n32 = n.to(tl.int32)
        two_n = ((n32 + 127) << 23).to(tl.float32, bitcast=True)
        two_minus_n = ((127 - n32) << 23).to(tl.float32, bitcast=True)
        q_scale = q_scale * (tl.exp(f) * two_n)
        k_scale = k_scale * (tl.exp(-f) * two_minus_n)

    cos2 = cos[None, :]
    sin2 = sin[None, :]
    _rotate_heads(
        Q, QO, HQ, h0, b, t, sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d,
        cos2, sin2, q_scale[None, :],
        HALF, TAIL, BLOCK_P, BLOCK_TAIL, BLOCK_H, INTERLEAVED, COPY_TAIL,
    )  # fmt: skip
    _rotate_heads(
        K, KO, HK, h0, b, t, sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d,
        cos2, sin2, k_scale[None, :],
        HALF, TAIL, BLOCK_P, BLOCK_TAIL, BLOCK_H, INTERLEAVED, COPY_TAIL,
    )  # fmt: skip


def rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    xpos_rate: torch.Tensor | None = None,
    *,
    interleaved: bool = False,
    attention_factor: float = 1.0,
    xpos_center: int = 0,
    conjugate: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (and scale them) in one kernel launch.

    Args:
        q: (B, Hq, T, D), k: (B, Hk, T, D); same dtype (float32/float16/bfloat16) and device; any strides.
        positions: (T,) or (B, T), int32 or int64.
        inv_freq: (R/2,) float64 on the device; R <= D is the rotary dimension.
        xpos_rate: (R/2,) float64 ln(zeta_j)/scale_base, or None.
        interleaved: GPT-J pairs instead of half-split pairs.
        attention_factor: multiplies q and k (YaRN).
        xpos_center: position at which the xPos scales are 1.
        conjugate: rotate by -angle (the backward).
        inplace: write into q and k instead of new tensors.
    Returns:
        (q_out, k_out): new tensors with q's and k's strides, or q and k themselves when inplace.
    """
    assert q.dim() == 4 and k.dim() == 4, "q and k must be (B, H, T, D)"
    B, HQ, T, D = q.shape
    assert k.shape[0] == B and k.shape[2] == T and k.shape[3] == D, "q and k must agree on B, T, D"
    assert q.dtype == k.dtype and q.dtype in SUPPORTED_DTYPES, f"unsupported dtypes {q.dtype}, {k.dtype}"
    assert q.device == k.device == positions.device == inv_freq.device, "all inputs must be on one device"
    assert positions.dtype in (torch.int32, torch.int64), f"positions must be int32/int64, got {positions.dtype}"
    assert positions.shape in ((T,), (B, T)), f"positions must be (T,) or (B, T), got {tuple(positions.shape)}"
    assert inv_freq.dtype == torch.float64 and inv_freq.dim() == 1, "inv_freq must be a 1-D float64 tensor"
    half = inv_freq.numel()
    assert 1 <= half and 2 * half <= D, f"rotary_dim {2 * half} must be in [2, {D}]"
    if xpos_rate is not None:
        assert xpos_rate.dtype == torch.float64 and xpos_rate.shape == inv_freq.shape
        assert xpos_rate.device == q.device
    inv_freq = inv_freq.contiguous()  # (R/2,) float64: a few hundred bytes
    if inplace:
        q_out, k_out = q, k
    else:
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if B * T == 0:
        return q_out, k_out
    grid, args, meta = launch_args(q, k, q_out, k_out, positions, inv_freq, xpos_rate, interleaved=interleaved,
                                   attention_factor=attention_factor, xpos_center=xpos_center,
                                   conjugate=conjugate, inplace=inplace)  # fmt: skip
    _rope_kernel[grid](*args, **meta)
    return q_out, k_out


def launch_args(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    xpos_rate: torch.Tensor | None,
    *,
    interleaved: bool,
    attention_factor: float,
    xpos_center: int,
    conjugate: bool,
    inplace: bool,
) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, positional args, constexpr/launch options) of ``_rope_kernel`` for these tensors.

    ``rope_launch`` launches exactly this; ``ropekit.kernels.static`` binds it (on meta tensors) to
    compile the kernel ahead of time with the specialisation a real launch gets.
    """
    B, HQ, T, D = q.shape
    half = inv_freq.numel()
    tail = D - 2 * half
    sp_b, sp_t = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    block_p = triton.next_power_of_2(half)
    heads = max(HQ, k.shape[1])
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_p))  # a tile of <= 4096 pairs
    grid = (B * T, triton.cdiv(heads, block_h))
    args = (
        q, k, q_out, k_out, positions, inv_freq, xpos_rate if xpos_rate is not None else inv_freq,
        T, HQ, k.shape[1], float(attention_factor), int(xpos_center),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), sp_b, sp_t,
    )  # fmt: skip
    meta = dict(
        HALF=half, TAIL=tail, BLOCK_P=block_p, BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        BLOCK_H=block_h, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        HAS_XPOS=xpos_rate is not None, COPY_TAIL=(tail > 0 and not inplace),
    )  # fmt: skip
    return grid, args, meta
