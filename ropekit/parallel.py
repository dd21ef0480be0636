"""Parallelism, activation checkpointing and torch.compile, applied to a built (and patched) model.

The model files stay single-device; ``parallelize`` wraps what ``train.py`` built:

- activation checkpointing per decoder layer (transformers' gradient checkpointing, non-reentrant);
- ``torch.compile`` per decoder layer;
- on a CPU with glibc, freed tensor memory handed back to the system at every decoder layer's forward and
  backward (``trim_between_layers``): without it malloc keeps the holes a step leaves between long-lived
  tensors, and a step's resident peak doubles (measured in docs/training.md);
- FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer and at the root, when launched with
  ``torchrun`` (NCCL on GPUs, gloo on CPU). Gradients are averaged across ranks, so a run on R ranks
  with micro-batch m equals one rank with micro-batch R*m on the same global batch.

Memory plan, Llama 2 7B at 32,768 tokens on 8 x 80 GB (bf16 compute, fp32 master weights and AdamW
states, FSDP2 full sharding, activation checkpointing per layer, micro-batch 1):

- parameters + gradients + AdamW states: 6.74e9 x (4 + 4 + 8) bytes = 108 GB, / 8 ranks = 13.5 GB each;
- checkpointed activations: one bf16 hidden state per layer kept, 32 x 32,768 x 4,096 x 2 B = 8.6 GB;
- the layer being recomputed: ~ 34 x 32,768 x 4,096 x 2 B (MLP and attention intermediates with SDPA,
  no L x L matrix) = 9.1 GB, plus the fp32 logits of 32,768 x 32,000 = 4.2 GB (8.4 GB with their gradient);
- all-gathered layer weights in flight: 2 layers x 0.4 GB.

About 40 GB per GPU, which fits 80 GB with room for allocator fragmentation (the paper trained its 7B
at 32k on such nodes, 4M tokens per step by accumulation: 128 sequences / 8 ranks = 16 micro-steps).
Past one GPU's activation memory (e.g. 128k tokens: ~4x the activations, ~100 GB) the sequence itself
must be split: context parallelism (``torch.distributed.tensor.experimental.context_parallel``, ring
attention over SDPA) shards q, k, v and the positions along the sequence; ropekit's per-token positions
make the rotary step shard-local, so only attention communicates. Not wired into ``train.py`` yet.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch
import torch.distributed as dist

__all__ = [
    "rank_and_world",
    "init_distributed",
    "parallelize",
    "mean_across_ranks",
    "barrier",
    "full_state",
    "full_model_state",
    "load_optimizer_state",
]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> None:
    """Start the process group when launched by torchrun (NCCL with CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .{model.base_model_prefix}.layers")
    return list(layers)


# glibc's malloc_trim(0) hands every whole free page of the heap back to the system; elsewhere no call is made.
_MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim if platform.libc_ver()[0] == "glibc" else None


def release_freed_memory() -> None:
    """Hand the pages of freed CPU tensors held by glibc's malloc back to the system (no-op without glibc)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def trim_between_layers(model) -> list:
    """Call ``release_freed_memory`` before each decoder layer's forward and after its backward (a hook on the
    layer's input gradient); returns the hook handles. A step allocates and frees activation-sized tensors
    between long-lived ones (checkpointed inputs, gradients); malloc keeps the holes resident and the step's
    resident peak grows past what its tensors need (``ropekit bench --train-step`` measures both)."""

    def before_layer(module, args, kwargs):
        release_freed_memory()
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(_release_after_backward)

    return [layer.register_forward_pre_hook(before_layer, with_kwargs=True) for layer in _decoder_layers(model)]


def _release_after_backward(grad: torch.Tensor) -> None:
    release_freed_memory()


def parallelize(model, *, activation_checkpointing: bool = False, compile: bool = False, fsdp: bool = False,
                release_cpu_memory: bool = False):  # fmt: skip
    """Apply activation checkpointing, then compile, then FSDP2, in that order (as torchtitan does);
    ``release_cpu_memory``: ``trim_between_layers`` on a CPU model without compile (its hooks stay out of the
    compiled graphs)."""
    if release_cpu_memory and not compile and next(model.parameters()).device.type == "cpu":
        trim_between_layers(model)
    if activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it; 4.x has the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for layer in _decoder_layers(model):
            layer.compile()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        _, world = rank_and_world()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (world,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def mean_across_ranks(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model) -> dict:
    """Full (unsharded, CPU) model state dict; a collective under FSDP (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
