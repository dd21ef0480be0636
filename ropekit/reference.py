"""Pure-torch rotary embedding: the oracle every fast path is tested against, and the CPU path.

Written for clarity, not speed. Precision rules (the most reported RoPE bug in peers is a
reduced-precision angle):

- angles are ``position * inv_freq`` in float64 from the integer positions, so the angle at
  position 2^20 is exact to ~1e-10 rad (a float32 product, as in transformers, is off by up to
  ~0.06 rad there); cos/sin are taken in float64 and rounded once to float32;
- the rotation itself runs in float32 whatever the input dtype; the result is cast once, at the end.

Layouts (pair j of a head with rotary dimension R):

- ``"half"`` (GPT-NeoX / Hugging Face): pair j = (x[j], x[j + R/2])
- ``"interleaved"`` (GPT-J / Meta): pair j = (x[2j], x[2j + 1])

Channels R..D-1 (partial rotary) pass through unchanged.

xPos scales pair j of q at position n by zeta_j^((n-c)/B) = exp(rate_j * (n - c)) and of k by the
inverse, with rate_j = ln(zeta_j) / B. Both exponents are clamped to +-XPOS_MAX_EXPONENT so the
scales cannot overflow float32/bfloat16 at any position; q.k keeps zeta_j^((n-m)/B) exactly while
all positions are within XPOS_MAX_EXPONENT / |rate_0| of the center c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropekit.methods import XPOS_MAX_EXPONENT

__all__ = ["RopeParams", "rope_angles", "rotate", "apply_rope_reference"]


@dataclass(frozen=True)
class RopeParams:
    """What a rotation needs besides q, k and positions: one bundle from the method down to the kernel.

    ``ropekit.rotary.rope_params(method, rotary_dim, positions)`` makes it; the reference, the custom op
    (flattened only at the torch.library boundary) and the patched model's attention all take it.
    """

    inv_freq: torch.Tensor  # (R/2,) float64: the angle of pair j at position m is m * inv_freq[j]
    xpos_rate: torch.Tensor | None = None  # (R/2,) float64 ln(zeta_j) / scale_base, xPos only
    attention_factor: float = 1.0  # multiplies q and k (YaRN)
    xpos_center: int = 0  # position where the xPos scales are 1

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


LAYOUTS = ("half", "interleaved")


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Exact angles in float64.

    Args:
        positions: integer positions, (T,) or (B, T).
        inv_freq: per-pair inverse frequencies, (R/2,); any float dtype (used as float64).
    Returns:
        (..., T, R/2) float64 angles ``positions[..., None] * inv_freq``.
    """
    return positions.to(torch.float64)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float64)


def _split_pairs(x: torch.Tensor, rotary_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "half":
        return x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def _join_pairs(a: torch.Tensor, b: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "half":
        return torch.cat((a, b), dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)  # (..., R/2, 2) -> (..., R) as a0 b0 a1 b1 ...


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: str = "half",
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Rotate the first R channels of x pair by pair, then multiply them by ``scale``.

    Args:
        x: (B, H, T, D) in any float dtype.
        cos, sin: float32, broadcastable to (B, 1, T, R/2).
        layout: "half" or "interleaved".
        scale: per-pair scale broadcastable to (B, 1, T, R/2), or a float.
    Returns:
        (B, H, T, D) in x.dtype; channels R..D-1 unchanged.
    """
    rotary_dim = 2 * cos.shape[-1]
    a, b = _split_pairs(x.float(), rotary_dim, layout)  # (B, H, T, R/2) each
    out = _join_pairs((a * cos - b * sin) * scale, (b * cos + a * sin) * scale, layout)
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:].float()), dim=-1)
    return out.to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "half",
    conjugate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k at integer positions with the given frequencies.

    Args:
        q: (B, Hq, T, D).
        k: (B, Hk, T, D); Hk may differ from Hq (GQA).
        positions: (T,) or (B, T) integer positions (any values: packed documents, cache offsets).
        params: the method's numbers (``RopeParams``); R = params.rotary_dim <= D.
        layout: "half" or "interleaved".
        conjugate: rotate by -angle (the backward of the rotation: same scales, transposed rotation).
    Returns:
        (q_out, k_out), same shapes and dtypes as q, k.
    """
    angles = rope_angles(positions, params.inv_freq)  # (T, R/2) or (B, T, R/2), float64
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, R/2): broadcast over heads
    cos = torch.cos(angles).to(torch.float32)
    sin = torch.sin(angles).to(torch.float32)
    if conjugate:
        sin = -sin
    factor = float(params.attention_factor)
    q_scale = k_scale = torch.tensor(factor, dtype=torch.float32, device=q.device)
    if params.xpos_rate is not None:
        rel = positions.to(torch.float64)[..., None] - float(params.xpos_center)  # (.., T, 1)
        rate = params.xpos_rate.to(device=positions.device, dtype=torch.float64)
        exponent = (rel * rate).clamp(-XPOS_MAX_EXPONENT, XPOS_MAX_EXPONENT)
        if exponent.dim() == 3:
            exponent = exponent[:, None]
        q_scale = (torch.exp(exponent) * factor).to(torch.float32)
        k_scale = (torch.exp(-exponent) * factor).to(torch.float32)
    return rotate(q, cos, sin, layout=layout, scale=q_scale), rotate(k, cos, sin, layout=layout, scale=k_scale)
