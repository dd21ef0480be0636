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
"interleaved" (GPT-J / Meta); channels R..D-1 are copied through (or left alone in place). An
interleaved row is loaded as one contiguous run and split into its pairs in registers (tl.split), so
both layouts move q and k with 128-bit accesses.
Backward is the same kernel with CONJUGATE (rotation by -angle, same scales).

Grid: (token, head tile). A program rotates BLOCK_HQ query heads and BLOCK_HK key heads of one token
(b, t): the k tile is sized to Hk, not to Hq, so GQA leaves no idle k lanes in it. It issues every
load (position, q, k, tail) before the angle prologue, then stores, so q and k are in flight
together. The launcher picks the warps so that the k tile (every k head) gives each thread 16 bytes
per access, then splits the q heads over more programs where a thread would hold too many q elements
(those programs rotate q only); fewer warps also mean fewer threads recomputing the same column's
angle. `ropekit bench --static` (ropekit/studies/kernel_static.py) compiles every specialisation for
sm_80/sm_90 and reports the effect.
All offsets are int64, so tensors past 2^31 elements are addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ropekit.methods import XPOS_MAX_EXPONENT

__all__ = ["rope_launch", "launch_args", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MAX_PAIRS = 4096  # rotary pairs of q per program: one head tile up to 64 heads x 128 dims


@triton.jit
def _load_pairs(
    X, b, t, heads, n_heads, sx_b, sx_h, sx_t, sx_d,
    HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    # -> (xa, xb): (BLOCK_H, BLOCK_P) float32, the two members of every rotary pair of these heads
    row = X + b * sx_b + t * sx_t + heads[:, None] * sx_h
    head_mask = heads[:, None] < n_heads
    if INTERLEAVED:
        # (x0, x1, x2, x3, ...) is one contiguous run: one wide load, then a register split into pairs
        cols = tl.arange(0, 2 * BLOCK_P).to(tl.int64)
        x = tl.load(row + cols[None, :] * sx_d, mask=head_mask & (cols[None, :] < 2 * HALF), other=0.0)
        xa, xb = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_P, 2)))
    else:
        pairs = tl.arange(0, BLOCK_P).to(tl.int64)
        mask = head_mask & (pairs[None, :] < HALF)
        xa = tl.load(row + pairs[None, :] * sx_d, mask=mask, other=0.0)
        xb = tl.load(row + (pairs[None, :] + HALF) * sx_d, mask=mask, other=0.0)
    return xa.to(tl.float32), xb.to(tl.float32)


@triton.jit
def _store_pairs(
    OUT, b, t, heads, n_heads, so_b, so_h, so_t, so_d, ya, yb,
    HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    row = OUT + b * so_b + t * so_t + heads[:, None] * so_h
    head_mask = heads[:, None] < n_heads
    ya = ya.to(OUT.dtype.element_ty)
    yb = yb.to(OUT.dtype.element_ty)
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_P).to(tl.int64)
        y = tl.reshape(tl.join(ya, yb), (BLOCK_H, 2 * BLOCK_P))
        tl.store(row + cols[None, :] * so_d, y, mask=head_mask & (cols[None, :] < 2 * HALF))
    else:
        pairs = tl.arange(0, BLOCK_P).to(tl.int64)
        mask = head_mask & (pairs[None, :] < HALF)
        tl.store(row + pairs[None, :] * so_d, ya, mask=mask)
        tl.store(row + (pairs[None, :] + HALF) * so_d, yb, mask=mask)


@triton.jit
def _load_tail(X, b, t, heads, n_heads, sx_b, sx_h, sx_t, sx_d, START: tl.constexpr, TAIL: tl.constexpr,
               BLOCK_TAIL: tl.constexpr):  # fmt: skip
    cols = (START + tl.arange(0, BLOCK_TAIL)).to(tl.int64)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < START + TAIL)
    return tl.load(X + b * sx_b + t * sx_t + heads[:, None] * sx_h + cols[None, :] * sx_d, mask=mask, other=0.0)


@triton.jit
def _store_tail(OUT, b, t, heads, n_heads, so_b, so_h, so_t, so_d, x, START: tl.constexpr, TAIL: tl.constexpr,
                BLOCK_TAIL: tl.constexpr):  # fmt: skip
    cols = (START + tl.arange(0, BLOCK_TAIL)).to(tl.int64)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < START + TAIL)
    tl.store(OUT + b * so_b + t * so_t + heads[:, None] * so_h + cols[None, :] * so_d, x.to(OUT.dtype.element_ty),
             mask=mask)  # fmt: skip


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
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    HAS_XPOS: tl.constexpr,
    XPOS_MAX: tl.constexpr,  # xPos exponents are clamped to +-XPOS_MAX (ropekit.methods.XPOS_MAX_EXPONENT)
    COPY_TAIL: tl.constexpr,
):
    # Q (B, HQ, T, D), K (B, HK, T, D), any strides; POS (B, T) or (T,) (sp_b = 0); INV_FREQ (HALF,) float64.
    # A program: token (b, t), q heads [j*BLOCK_HQ, ...) and k heads [j*BLOCK_HK, ...), j = program_id(1).
    pid = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = pid // T
    t = pid % T
    qh = (j * BLOCK_HQ + tl.arange(0, BLOCK_HQ)).to(tl.int64)
    kh = (j * BLOCK_HK + tl.arange(0, BLOCK_HK)).to(tl.int64)

    # Every load first: a program reads and writes only its own token's rows, so no store of it can
    # change what it loads (in place included), and q, k and the position travel in one memory trip.
    pos = tl.load(POS + b * sp_b + t * sp_t).to(tl.int64)
    qa, qb = _load_pairs(Q, b, t, qh, HQ, sq_b, sq_h, sq_t, sq_d, HALF, BLOCK_P, BLOCK_HQ, INTERLEAVED)
    ka, kb = _load_pairs(K, b, t, kh, HK, sk_b, sk_h, sk_t, sk_d, HALF, BLOCK_P, BLOCK_HK, INTERLEAVED)
    if COPY_TAIL:
        q_tail = _load_tail(Q, b, t, qh, HQ, sq_b, sq_h, sq_t, sq_d, 2 * HALF, TAIL, BLOCK_TAIL)
        k_tail = _load_tail(K, b, t, kh, HK, sk_b, sk_h, sk_t, sk_d, 2 * HALF, TAIL, BLOCK_TAIL)

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
        e = tl.minimum(tl.maximum(e, -XPOS_MAX), XPOS_MAX)
        # exp(e) = 2^n * exp(f), n = round(e / ln2), |f| <= ln2/2: exact 2^n from exponent bits
        n = tl.floor(e * 1.4426950408889634 + 0.5)
        f = (e - n * 0.6931471805599453).to(tl.float32)
        n32 = n.to(tl.int32)
        two_n = ((n32 + 127) << 23).to(tl.float32, bitcast=True)
        two_minus_n = ((127 - n32) << 23).to(tl.float32, bitcast=True)
        q_scale = q_scale * (tl.exp(f) * two_n)
        k_scale = k_scale * (tl.exp(-f) * two_minus_n)

    # (ya, yb) = s * (xa cos - xb sin, xb cos + xa sin): the scale folded into cos and sin once per column
    qc = (cos * q_scale)[None, :]
    qs = (sin * q_scale)[None, :]
    kc = (cos * k_scale)[None, :]
    ks = (sin * k_scale)[None, :]
    _store_pairs(QO, b, t, qh, HQ, sqo_b, sqo_h, sqo_t, sqo_d, qa * qc - qb * qs, qb * qc + qa * qs,
                 HALF, BLOCK_P, BLOCK_HQ, INTERLEAVED)  # fmt: skip
    _store_pairs(KO, b, t, kh, HK, sko_b, sko_h, sko_t, sko_d, ka * kc - kb * ks, kb * kc + ka * ks,
                 HALF, BLOCK_P, BLOCK_HK, INTERLEAVED)  # fmt: skip
    if COPY_TAIL:
        _store_tail(QO, b, t, qh, HQ, sqo_b, sqo_h, sqo_t, sqo_d, q_tail, 2 * HALF, TAIL, BLOCK_TAIL)
        _store_tail(KO, b, t, kh, HK, sko_b, sko_h, sko_t, sko_d, k_tail, 2 * HALF, TAIL, BLOCK_TAIL)


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

    ``rope_launch`` launches exactly this; ``ropekit.studies.kernel_static`` binds it (on meta tensors) to
    compile the kernel ahead of time with the specialisation a real launch gets.
    """
    B, HQ, T, D = q.shape
    half = inv_freq.numel()
    tail = D - 2 * half
    sp_b, sp_t = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    block_p = triton.next_power_of_2(half)
    HK = k.shape[1]
    max_heads = max(1, _MAX_PAIRS // block_p)
    # The k tile holds every k head (up to max_heads): its accesses set the warps, as many as keep each
    # thread's k access 16 bytes wide. Programs past the k tiles rotate q only (their k lanes are masked).
    block_hk = min(triton.next_power_of_2(HK), max_heads)
    vec = 16 // q.element_size()
    k_elems = block_hk * (2 * block_p if interleaved else block_p)  # elements of one k access
    num_warps = max(1, min(4, _prev_power_of_2(k_elems // (32 * vec))))
    # The q tile is then split over programs (never more warps, which would narrow the k accesses) until
    # a thread holds <= 64 q elements from its loads to its stores, or <= 32 for half rows past 2^31
    # elements (64-bit row addresses) or with a tail to copy; more keeps > 128 registers or spills
    # (ropekit bench --static).
    tail_block = triton.next_power_of_2(tail) if tail and not inplace else 0
    per_thread = 64 if (interleaved or q.numel() < 2**31) and not tail_block else 32
    block_hq = min(triton.next_power_of_2(HQ), max_heads)
    while block_hq > 1 and block_hq * (2 * block_p + tail_block) > per_thread * 32 * num_warps:
        block_hq //= 2
    tiles = max(triton.cdiv(HQ, block_hq), triton.cdiv(HK, block_hk))
    grid = (B * T, tiles)
    args = (
        q, k, q_out, k_out, positions, inv_freq, xpos_rate if xpos_rate is not None else inv_freq,
        T, HQ, HK, float(attention_factor), int(xpos_center),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), sp_b, sp_t,
    )  # fmt: skip
    meta = dict(
        HALF=half, TAIL=tail, BLOCK_P=block_p, BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        HAS_XPOS=xpos_rate is not None, XPOS_MAX=XPOS_MAX_EXPONENT, COPY_TAIL=(tail > 0 and not inplace),
        num_warps=num_warps,
    )  # fmt: skip
    return grid, args, meta


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)
