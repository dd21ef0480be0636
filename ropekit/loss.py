"""Next-token cross-entropy from the final hidden states, without a (tokens x vocabulary) float32 tensor.

- ``LogitTransform`` / ``logit_transform(config)``: what a causal LM does to its head's output before the
  softmax (Gemma 2/3's final soft-capping, Granite's ``logits_scaling``, Cohere's ``logit_scale``); the one
  place ropekit reads it (training and evaluation both score from the head's input).
- ``linear_cross_entropy(hidden, weight, targets)``: per-token losses of ``transform(hidden @ weight.T)`` in
  chunks of rows; the backward recomputes each chunk's logits, so memory holds one (chunk x vocabulary)
  block at a time instead of the whole (T x V) logits, their float32 copy and their gradient.
- ``final_hidden(model, ...)``: the head's input, from the model's own forward with its output head set
  aside for the call (so wrappers such as FSDP2 see an ordinary forward of the root module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "LogitTransform",
    "logit_transform",
    "linear_cross_entropy",
    "head_of",
    "final_hidden",
    "CHUNK_BYTES",
]

CHUNK_BYTES = 2**26  # one float32 (rows x vocabulary) block: 64 MiB (341 rows of a 49,152-token vocabulary)


@dataclass(frozen=True)
class LogitTransform:
    """logits -> cap * tanh(scale * logits / cap) (no cap: scale * logits)."""

    scale: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.cap

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def logit_transform(config) -> LogitTransform:
    """The transform ``config``'s causal LM applies after its output head (identity for Llama-like models)."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) and getattr(config, "model_type", "").startswith("cohere"):
        scale *= float(config.logit_scale)  # Cohere multiplies
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, cap=float(cap) if cap else None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, scale, cap, dtype):
        compute = dtype or hidden.dtype
        h, w = hidden.to(compute), weight.to(compute)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = _transform((h[start:end] @ w.T).float(), scale, cap)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            target_logit[start:end] = logits.gather(1, targets[start:end, None])[:, 0]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.scale, ctx.cap, ctx.compute = chunk, scale, cap, compute
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        h, w = hidden.to(ctx.compute), weight.to(ctx.compute)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # accumulated over the chunks in float32
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            raw = (h[start:end] @ w.T).float()
            logits = _transform(raw, ctx.scale, ctx.cap)
            d = torch.exp(logits - lse[start:end, None])  # softmax
            d[torch.arange(end - start, device=d.device), targets[start:end]] -= 1.0
            d *= grad[start:end, None]
            if ctx.cap:  # d/dz cap * tanh(z / cap) = 1 - tanh^2
                d *= 1.0 - (logits / ctx.cap) ** 2
            if ctx.scale != 1.0:
                d *= ctx.scale
            d = d.to(ctx.compute)
            if grad_h is not None:
                grad_h[start:end] = (d @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (d.T @ h[start:end]).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def _transform(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    return LogitTransform(scale, cap)(logits)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    transform: LogitTransform | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-token ``-log softmax(transform(hidden @ weight.T))[target]`` in float32, shape (N,).

    Args:
        hidden: (N, d) the head's input; weight: (V, d) the head's weight (no bias).
        targets: (N,) token ids in [0, V).
        transform: what the model does to the logits before the softmax (``logit_transform(config)``).
        chunk: rows per block (default: as many as fit ``CHUNK_BYTES`` of float32 logits; the backward holds
            about three such blocks); the matmuls run in the autocast dtype when autocast is on (as the head
            would), the softmax in float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d) and weight (V, d) must agree on d; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({hidden.shape[0]},); got {tuple(targets.shape)}")
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}")
    transform = transform or LogitTransform()
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, transform.scale, transform.cap, dtype)


def head_of(model) -> torch.nn.Module | None:
    """The model's output head when ``linear_cross_entropy`` can stand for it (a bias-free linear layer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return head
    return None


@contextlib.contextmanager
def _head_set_aside(head: torch.nn.Module) -> Iterator[None]:
    """The head returns its input for the duration (its weight untouched: FSDP2 still gathers it)."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, d): the input of the model's output head; no logits are made.

    For a model whose logits are the head's output as they are (Llama and most families), the model's own
    forward runs with the head set aside for the call, so a wrapper of the root module (FSDP2 gathers the
    head's weight there) sees an ordinary forward. A model that transforms its logits after the head
    (``logit_transform``) runs its decoder instead, and the loss applies the transform."""
    head = head_of(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}'s output head is not a bias-free linear layer")
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    if logit_transform(model.config).identity:
        with _head_set_aside(head):
            return model(input_ids=input_ids, use_cache=False, **kwargs).logits
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model.model
    return decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
