"""Next-token cross-entropy from the final hidden states, without a (tokens x vocabulary) float32 tensor.

- ``head_input(model, input_ids)``: the input of the model's output head and ``LogitTransform``, what the
  model does to the head's output before the softmax (Gemma's final soft-capping, Granite's and Cohere's
  logit scales, ...), from one forward of the model's own with the head set aside: the transform is read
  by passing known values through the model's own code after the head, not from its config, so it holds
  wherever a family keeps it; one that is not a scale and an optional soft-cap is refused. Which of the
  head's outputs are the logits (the first ones, for a head padded past the vocabulary) is read the same
  way, again whenever the head or the model's config changes. Training and evaluation both score from here.
- ``linear_cross_entropy(hidden, weight, targets)``: losses of ``transform(hidden @ weight.T)`` in chunks of
  rows, so memory holds one (chunk x vocabulary) block at a time instead of the whole (T x V) logits, their
  float32 copy and their gradient. Per token (``reduction="none"``), the backward recomputes each chunk's
  logits; as a weighted sum (``reduction="sum"``, the trainer's), the forward turns each chunk's logits into
  the gradients while they exist, so the head costs three matmuls as in the plain loss, not four.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = [
    "LogitTransform",
    "head_input",
    "HeadInput",
    "linear_cross_entropy",
    "head_of",
    "check_head",
    "CHUNK_BYTES",
    "default_chunk",
]

# One float32 (rows x vocabulary) block per device type. CPU: 64 MiB (341 rows of a 49,152-token vocabulary).
# CUDA: 512 MiB, in whole 128-row tiles. Each block adds its product to the float32 (V x d) weight gradient,
# which reads and writes that whole sum: for a 128,256 x 2,048 head at 32,768 tokens, 64 MiB blocks (130
# rows, the second 128-row tile nearly empty) would move about 0.5 TB, some 0.1 s at an H200's 4.8 TB/s;
# 1,024-row blocks about 67 GB (a static estimate, not a timing: `ropekit bench --train-step` times it).
CHUNK_BYTES = {"cpu": 2**26, "cuda": 2**29}
CUDA_TILE_ROWS = 128


@dataclass(frozen=True)
class LogitTransform:
    """logits -> cap * tanh(scale * logits / cap) (no cap: scale * logits), of the first ``vocab`` outputs
    of the head (a head padded past the vocabulary; None: all of them)."""

    scale: float = 1.0
    cap: float | None = None
    vocab: int | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.cap and self.vocab is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def _softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, cap: float | None):
    """In place over one chunk's (transformed, float32) ``logits``: (logsumexp, target logit, and
    ``row_scale * d loss / d z``) for z the logits before the transform, where row_scale already carries the
    transform's own scale. Five passes over the block: max, subtract, exp, sum, scale."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logit = logits[rows, targets]
    dcap = 1.0 - (logits / cap) ** 2 if cap else None  # d/dz cap * tanh(z / cap) = 1 - tanh^2
    top = logits.amax(dim=1, keepdim=True)
    p = logits.sub_(top).exp_()
    total = p.sum(dim=1, keepdim=True)
    p.mul_(row_scale[:, None] / total)  # softmax, times each row's scale
    p[rows, targets] -= row_scale
    if dcap is not None:
        p.mul_(dcap)
    return (top + total.log())[:, 0], target_logit, p


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token losses; the backward recomputes each chunk's logits (any per-token gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, scale, cap, dtype):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.scale, ctx.cap, ctx.compute = chunk, scale, cap, dtype or hidden.dtype
        return _losses(hidden, weight, targets, chunk, scale, cap, ctx.compute)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        _, grad_h, grad_w = _head_grads(hidden, weight, targets, grad.float(), ctx.chunk, ctx.scale, ctx.cap,
                                        ctx.compute, ctx.needs_input_grad[:2])  # fmt: skip
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None)  # fmt: skip


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i weights_i * loss_i; the forward makes each chunk's logits once and turns them into the
    gradients there and then (the backward only scales them by the incoming scalar): three matmuls per
    chunk in all, as the plain loss, against four when the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk, scale, cap, dtype, needs):
        total, grad_h, grad_w = _head_grads(hidden, weight, targets, token_weights, chunk, scale, cap,
                                            dtype or hidden.dtype, needs)  # fmt: skip
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # scaled in float32, then rounded to the inputs' dtypes
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else (grad_h * grad).to(ctx.dtypes[0]),
                None if grad_w is None else (grad_w * grad).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)  # fmt: skip


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _losses(hidden, weight, targets, chunk, scale, cap, compute) -> torch.Tensor:
    """(N,) float32 per-token losses, chunk by chunk (no gradient)."""
    h, w = hidden.to(compute), weight.to(compute)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start, end in _chunks(hidden.shape[0], chunk):
        logits = _transform((h[start:end] @ w.T).float(), scale, cap)
        losses[start:end] = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[start:end, None])[:, 0]
    return losses


def _head_grads(hidden, weight, targets, row_weights, chunk, scale, cap, compute, needs):
    """(sum_i row_weights_i * loss_i, its gradient to hidden, to weight), chunk by chunk; a gradient is
    None where ``needs`` (hidden, weight) says so. Both gradients come back in float32 (the weight's is
    accumulated in it), for the caller to scale before rounding them to the inputs' dtypes."""
    h, w = hidden.to(compute), weight.to(compute)
    grad_h = torch.empty(hidden.shape, dtype=compute, device=hidden.device) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    row_scale = row_weights.float() * scale
    block = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=compute, device=hidden.device)
    for start, end in _chunks(hidden.shape[0], chunk):  # float32: one block reused, no fresh pages per chunk
        logits = _transform(torch.mm(h[start:end], w.T, out=block[: end - start]).float(), scale, cap)
        lse, target_logit, d = _softmax_minus_onehot(logits, targets[start:end], row_scale[start:end], cap)
        total += ((lse - target_logit) * row_weights[start:end]).sum()
        d = d.to(compute)
        if grad_h is not None:
            torch.mm(d, w, out=grad_h[start:end])
        if grad_w is not None:
            _add_product(grad_w, d.T, h[start:end])
    return total, None if grad_h is None else grad_h.float(), grad_w


_FLOAT32_OUT: dict[str, bool] = {}  # device type -> whether addmm's float32 output from bf16/fp16 inputs works


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``: in place when ``a`` and ``b`` are float32; from bf16/fp16 on a
    device whose addmm writes a float32 result from them (cuBLAS, ``out_dtype``: no product in the low dtype,
    no float32 copy of it), else through the product converted to float32. Whether the device has it is
    learnt from its first call and kept."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    device = acc.device.type
    if a.dtype in (torch.bfloat16, torch.float16) and _FLOAT32_OUT.get(device, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _FLOAT32_OUT[device] = True
            return
        except torch.OutOfMemoryError:  # says nothing of the kernel
            raise
        except (RuntimeError, NotImplementedError, TypeError):  # the CPU has no such kernel; older builds no overload
            if _FLOAT32_OUT.get(device):  # it worked here before: a real failure
                raise
            _FLOAT32_OUT[device] = False
    acc += (a @ b).float()


def default_chunk(vocab_size: int, device_type: str) -> int:
    """Rows per block: as many as fit the device's ``CHUNK_BYTES`` of float32 logits (other devices: the
    CPU's), on CUDA rounded down to whole ``CUDA_TILE_ROWS`` tiles where there is room for one."""
    rows = max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // (4 * vocab_size))
    if device_type == "cuda" and rows >= CUDA_TILE_ROWS:
        rows -= rows % CUDA_TILE_ROWS
    return rows


def _transform(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    return LogitTransform(scale, cap)(logits)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    reduction: str = "none",
    transform: LogitTransform | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-token ``-log softmax(transform(hidden @ weight.T))[target]`` in float32, or their weighted sum.

    Args:
        hidden: (N, d) the head's input; weight: (V, d) the head's weight (no bias).
        targets: (N,) token ids in [0, V).
        token_weights: (N,) each token's weight (default 1); a constant, not differentiated.
        reduction: ``"none"``: the (N,) weighted losses, whose backward recomputes each chunk's logits;
            ``"sum"``: their sum, whose gradient the forward computes while each chunk's logits exist (the
            backward only scales it): one head matmul fewer, the trainer's path (in float16, where a loss
            scale must come first, the recomputing backward). Neither backward is differentiable again.
        transform: what the model does to the logits before the softmax (the one ``head_input`` reads),
            its ``vocab``: how many of the weight's first rows are the logits.
        chunk: rows per block (default: ``default_chunk``, as many as fit ``CHUNK_BYTES`` of float32 logits
            for the device; a step holds
            about two such blocks); the matmuls run in the autocast dtype when autocast is on (as the head
            would), the softmax in float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d) and weight (V, d) must agree on d; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    transform = transform or LogitTransform()
    if transform.vocab is not None:  # the logits are the head's first rows (a padded head)
        weight = weight[: transform.vocab]
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({hidden.shape[0]},); got {tuple(targets.shape)}")
    lo, hi = torch.stack(torch.aminmax(targets)).tolist() if targets.numel() else (0, 0)
    if lo < 0 or hi >= weight.shape[0]:  # an index past the block would wrap, not fail
        raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}); got {lo}..{hi} (for positions "
                         "to ignore, give them token_weights 0)")  # fmt: skip
    if token_weights is not None and token_weights.shape != hidden.shape[:1]:
        raise ValueError(f"token_weights must be (N,) = ({hidden.shape[0]},); got {tuple(token_weights.shape)}")
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum'; got {reduction!r}")
    if chunk is None:
        chunk = default_chunk(weight.shape[0], hidden.device.type)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is None and hidden.dtype != weight.dtype:  # as the head's matmul would refuse them
        raise ValueError(f"hidden and weight must share a dtype outside autocast; got {hidden.dtype} and "
                         f"{weight.dtype}")  # fmt: skip
    needs = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    compute = dtype or hidden.dtype
    with torch.autocast(device, enabled=False):
        if reduction == "none" or compute == torch.float16:  # float16: no gradient rounded before the loss scale
            losses = _LinearCrossEntropy.apply(hidden, weight, targets, chunk, transform.scale, transform.cap, dtype)
            if token_weights is not None:
                losses = losses * token_weights.detach().float()
            return losses if reduction == "none" else losses.sum()
        if token_weights is None:
            token_weights = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        token_weights = token_weights.detach().float()
        if not any(needs):  # scoring only (validation): no softmax gradient to form
            losses = _losses(hidden, weight, targets, chunk, transform.scale, transform.cap, compute)
            return (losses * token_weights).sum()
        return _LinearCrossEntropySum.apply(hidden, weight, targets, token_weights, chunk, transform.scale,
                                            transform.cap, dtype, needs)  # fmt: skip


def head_of(model) -> torch.nn.Module | None:
    """The model's output head when ``linear_cross_entropy`` can stand for it: a bias-free linear layer
    with ``nn.Linear``'s own forward (a subclass that adds to it, such as a learned per-token logit scale,
    is scored from its full output)."""
    head = _output_head(model)
    if isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward and head.bias is None:
        return head
    return None


def _output_head(model) -> torch.nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


# Values the model's code after its head receives in place of logits (``head_input``): tiny ones, where a
# soft-cap is linear and only the scale shows, huge ones, where any cap has saturated, and some between.
_PROBES = (0.0, 2.0**-20, -(2.0**-20), 2.0**-4, 1.0, -1.0, 3.0, -3.0, 10.0, -10.0, 40.0, -40.0, 200.0, 2.0**20,
           -(2.0**20))  # fmt: skip


class HeadInput(NamedTuple):
    """What ``head_input`` returns: ``transform(head(hidden))`` are the model's logits."""

    hidden: torch.Tensor  # (B, T, d): the input of the model's output head
    transform: LogitTransform  # what the model does to the head's output before the softmax
    output: Any  # the model's own output (its KV cache, ...); its logits are the probes', not logits


def head_input(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, **kwargs) -> HeadInput:
    """The input of the model's output head and what the model does to the head's output before the
    softmax, from one forward of the model's own (``kwargs`` go to it; ``use_cache`` is off unless given).
    No logits are made.

    The model's own forward runs with the head set aside for the call: the head keeps its input and hands
    the rest of the forward a few known values (``_PROBES``, at every position) in place of the logits;
    what comes out is the model's own transform of them, read as a scale and an optional soft-cap
    (``LogitTransform``) and checked against every probe. A model that transforms its logits otherwise
    (element by element), rounds them below float32, or calls its head other than once, is refused with a
    ``ValueError``. Whether the model keeps every output of its head is read from a forward of a few tokens
    whose probes are as wide as the head, again whenever the head or the model's config changes: a model
    that keeps only the first ones (a head padded past the vocabulary, as Inkling's with
    ``unpadded_vocab_size``) gets them as the transform's ``vocab``. Wrappers of the root module (FSDP2
    gathers the head's weight there) see an ordinary forward."""
    head = _output_head(model)
    name = type(model).__name__
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{name} has no output head module (get_output_embeddings)")
    probes = torch.tensor(_PROBES, dtype=torch.float32, device=input_ids.device)
    kwargs = {"use_cache": False, **kwargs, **({"position_ids": position_ids} if position_ids is not None else {})}
    kept, out = _forward_set_aside(model, head, lambda x: probes.expand(*x.shape[:-1], len(_PROBES)), input_ids,
                                   kwargs)  # fmt: skip
    transform = _read_transform(out.logits, name)
    vocab = _kept_vocab(model, head, kept, transform, input_ids, position_ids)
    return HeadInput(kept, LogitTransform(transform.scale, transform.cap, vocab), out)


def _forward_set_aside(model, head: torch.nn.Module, probes, input_ids: torch.Tensor, kwargs: dict):
    """(the head's input, the model's output) of the model's forward with ``probes(head input)`` in place of
    the head's output; the head's own forward (an instance-level one too: accelerate's hooks) goes back."""
    kept: list[torch.Tensor] = []

    def set_aside(x: torch.Tensor) -> torch.Tensor:
        kept.append(x)
        return probes(x).contiguous()

    own = vars(head).get("forward")
    head.forward = set_aside
    try:
        out = model(input_ids=input_ids, **kwargs)
    except (IndexError, RuntimeError) as err:
        if not kept or type(err) not in (IndexError, RuntimeError):  # before the head, out of memory, ...
            raise
        raise ValueError(f"{type(model).__name__}'s code after its output head fails on values in place of its "
                         f"logits ({type(err).__name__}: {str(err).splitlines()[0][:200]}); ropekit cannot score "
                         "it from the head's input") from err  # fmt: skip
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    if len(kept) != 1:
        raise ValueError(f"{type(model).__name__}'s forward called its output head {len(kept)} times; ropekit "
                         "scores from the head's input only where it is called once")  # fmt: skip
    return kept[0], out


# {model: ((the head, its width, the model's config), how many of the head's outputs the model keeps:
# None for all)}, read again when any of the three changes
_KEPT_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WIDE_TOKENS = 8  # the tokens of the wide forward: a few, as its probes are as wide as the head
_WIDE_SPAN = 60  # its probes run from reach down to reach * 2^-60: neighbours differ by about 42 / width


def _kept_vocab(model, head, hidden, transform: LogitTransform, input_ids, position_ids) -> int | None:
    """How many of the head's outputs the model keeps as logits, where that is fewer than all (None: all),
    from a forward of the first few tokens with probes as wide as the head, each column's value its own
    (geometric, in the transform's near-linear range, so that each comes back distinct at float32's
    precision): the columns the model keeps must be the first ones, as they are."""
    width = getattr(head, "out_features", None)  # a quantized head's weight is packed: not its shape
    if not isinstance(width, int):
        with torch.no_grad():
            width = head(hidden[:1, :1]).shape[-1]
    config = getattr(model, "config", None)
    key = (id(head), width, config.to_dict() if hasattr(config, "to_dict") else None)
    if model in _KEPT_VOCAB and _KEPT_VOCAB[model][0] == key:
        return _KEPT_VOCAB[model][1]
    ids = input_ids[:1, :_WIDE_TOKENS]
    kwargs = {"use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids[:1, : ids.shape[1]]
    reach = 0.1 * transform.cap / abs(transform.scale) if transform.cap else 1.0
    steps = torch.arange(width, dtype=torch.float64, device=input_ids.device)
    z = (reach * torch.exp2(-_WIDE_SPAN * steps / width)).float()
    with _aside(model, input_ids.device):
        _, out = _forward_set_aside(model, head, lambda x: z.expand(*x.shape[:-1], width), ids, kwargs)
    got = out.logits.detach().double()
    vocab = min(got.shape[-1], width)
    want = transform(z[:vocab].double())
    off = ((got[..., :vocab] - want).abs() > 64 * torch.finfo(torch.float32).eps * want.abs()).reshape(-1, vocab)
    if got.shape[-1] > width or off.any():
        column = int(off.any(dim=0).nonzero()[0]) if off.any() else width
        raise ValueError(f"{type(model).__name__}'s logits are not the first {got.shape[-1]} of its head's {width} "
                         f"outputs as they are (logit {column} is not output {column}); ropekit cannot score it "
                         "from the head's input")  # fmt: skip
    _KEPT_VOCAB[model] = (key, None if vocab == width else vocab)
    return _KEPT_VOCAB[model][1]


@contextlib.contextmanager
def _aside(model, device: torch.device):
    """A forward beside the run's own: no gradient, the random generators as they were after it (the CPU's
    and those of the CUDA devices the model and its input are on, as a model may be split over several;
    only those, so that a torchrun rank touches no other GPU: dropout masks stay the run's), compiled
    layers run eagerly (torch >= 2.6: no recompile for its shape)."""
    devices = {p.device for p in model.parameters()} | {device}
    cuda = sorted({torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"})
    eager = getattr(torch.compiler, "set_stance", None)
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else device.type),
        eager("force_eager") if eager else contextlib.nullcontext(),
    ):
        yield


def check_head(model, device: torch.device | str) -> None:
    """``head_input`` on a few tokens, beside the run (``_aside``): a model whose logits it refuses is
    refused here, before any work (the trainer calls it before preparing its data)."""
    device = torch.device(device)
    ids = torch.zeros(1, _WIDE_TOKENS, dtype=torch.long, device=device)
    with _aside(model, device):
        head_input(model, ids, torch.arange(_WIDE_TOKENS, device=device)[None])
    reshard = getattr(model, "reshard", None)  # FSDP2 leaves the root's parameters gathered after a forward
    if callable(reshard):  # without a backward: shard them again, as an optimizer must find them
        reshard()


def _read_transform(out: torch.Tensor, name: str) -> LogitTransform:
    """The ``LogitTransform`` that turned ``_PROBES`` into ``out`` (every row), or a ``ValueError``."""
    if out.shape[-1] != len(_PROBES):
        raise ValueError(f"{name} changes the width of its head's output after the head; ropekit cannot score "
                         "it from the head's input")  # fmt: skip
    if out.dtype not in (torch.float32, torch.float64):  # the probes are float32: the model rounded them
        raise ValueError(f"{name} turns its head's float32 output into {out.dtype}; ropekit cannot read its "
                         "logit transform exactly")  # fmt: skip
    rows = out.detach().reshape(-1, len(_PROBES))
    spread = (rows - rows[:1]).abs().amax(dim=0)  # on the device: one copy of 2 x 15 values, one sync
    row, spread = torch.stack([rows[0], spread]).double().cpu()
    z = torch.tensor(_PROBES, dtype=torch.float64)
    scale = _sig(float(row[1] / z[1]))  # at 2^-20 a soft-cap is nearly linear
    huge = float(row[-2])
    cap = None if math.isclose(huge, scale * float(z[-2]), rel_tol=1e-4) else _sig(abs(huge))
    if cap and abs(float(row[1])) < cap:  # and exactly: the scale under the cap's tanh
        scale = _sig(cap * math.atanh(float(row[1]) / cap) / float(z[1]))
    transform = LogitTransform(scale=scale, cap=cap)
    want = transform(z)
    tol = 8 * torch.finfo(out.dtype).eps * (want.abs() + (cap or 1.0))
    off = torch.maximum((row - want).abs(), spread) > tol  # each probe, at every position
    if off.any():
        i = int(off.nonzero()[0])
        raise ValueError(f"{name} transforms its logits other than by a scale and a final soft-cap ({_PROBES[i]:g} "
                         f"became {float(row[i]):g}, {transform} gives {float(want[i]):g}); ropekit cannot score "
                         "it from the head's input")  # fmt: skip
    return transform


def _sig(x: float) -> float:
    """``x`` to 7 significant digits (float32's): the probes' rounding, not a scale's or a cap's, beyond."""
    return float(f"{x:.7g}")
