"""``patch(model, method)`` in named steps, and ``PatchHandle.undo``: resolve the methods per layer type,
install the module-level dispatchers in the modeling modules, swap in the rotary module, rewrite the config
to its Hugging Face-native form; ``describe`` reports what a model runs."""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ropekit import methods as _methods
from ropekit.hf import config as hf_config
from ropekit.hf.config import (
    _MISSING,
    _check_v4_reloadable,
    _flat,
    _layer_type_name,
    _v4_rope_scaling,
    format_layered,
    get_layered_rope_parameters,
    parse_layered,
    read_method,
    set_rope_parameters,
)
from ropekit.hf.rotary_module import RopeContext, RopekitRotary, _kv_cache, kv_cache_of
from ropekit.hf.support import (
    _MODULE_PATCHES,
    Unsupported,
    _contract,
    _inv_freq_buffers,
    _is_single,
    _plain,
    _set_rotary,
    decoder_of,
    rotary_of,
)


def _dispatcher(original, layout: str, name: str):
    """``original`` (a function, or transformers' hub-kernel module standing for one) behind a function that
    rotates with ropekit when handed a ``RopeContext`` and calls ``original`` otherwise."""
    signature = inspect.signature(_plain(original))

    def unsqueeze_dim_of(*args, **kwargs) -> int:
        return signature.bind(*args, **kwargs).arguments.get("unsqueeze_dim", 1)

    if _is_single(original):

        def apply_rotary_pos_emb_one(x, cos, sin, *args, **kwargs):
            if isinstance(sin, RopeContext):
                # rotate x as q, with a one-head k that is dropped
                unsqueeze_dim = unsqueeze_dim_of(x, cos, sin, *args, **kwargs)
                dummy = x[:, :, :1] if unsqueeze_dim == 2 else x[:, :1]
                return sin(x, dummy, layout, unsqueeze_dim)[0]
            return original(x, cos, sin, *args, **kwargs)

        dispatch = apply_rotary_pos_emb_one
    else:

        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            if isinstance(sin, RopeContext):
                unsqueeze_dim = unsqueeze_dim_of(q, k, cos, sin, *args, **kwargs) if args or kwargs else 1
                return sin(q, k, layout, unsqueeze_dim)
            return original(q, k, cos, sin, *args, **kwargs)

        dispatch = apply_rotary_pos_emb
    dispatch.__wrapped__ = original
    dispatch.__name__ = name
    return dispatch


def _install_dispatch(module, layouts: dict[str, str]) -> None:
    entry = _MODULE_PATCHES.get(module.__name__)
    if entry is not None:
        entry["count"] += 1
        return
    originals = {}
    for name, layout in layouts.items():
        originals[name] = getattr(module, name)
        setattr(module, name, _dispatcher(originals[name], layout, name))
    _MODULE_PATCHES[module.__name__] = {"originals": originals, "count": 1}


def _remove_dispatch(module) -> None:
    entry = _MODULE_PATCHES.get(module.__name__)
    if entry is None:
        return
    entry["count"] -= 1
    if entry["count"] == 0:
        for name, fn in entry["originals"].items():
            setattr(module, name, fn)
        del _MODULE_PATCHES[module.__name__]


def _install_all(modules, layouts) -> None:
    for module in modules:
        _install_dispatch(module, {n: lay for (m, n), lay in layouts.items() if m == module.__name__})


def _remove_all(modules) -> None:
    for module in modules:
        _remove_dispatch(module)


# ---------------------------------------------------------------------------------------------
# patch / undo
# ---------------------------------------------------------------------------------------------
class PatchHandle:
    """Returned by ``patch``; ``undo()`` restores the rotary module, the config and the dispatch."""

    def __init__(self, model, base_model, rotary, previous_rotary, modules, config_snapshot, hooks, method):
        self.model, self.method = model, method
        self._base_model, self._rotary, self._previous = base_model, rotary, previous_rotary
        self._modules, self._config_snapshot, self._hooks = modules, config_snapshot, hooks
        self.active = True
        # a patched model that is dropped without undo() releases its hold on the module dispatch
        self._finalizer = weakref.finalize(model, _remove_all, modules)

    def undo(self) -> None:
        if not self.active:
            return
        if rotary_of(self._base_model) is not self._rotary:
            raise RuntimeError("this patch was patched over; undo the later patch first")
        for hook in self._hooks:
            hook.remove()
        self._finalizer.detach()
        _set_rotary(self._base_model, self._previous)
        _restore_config(self.model.config, self._config_snapshot)
        _remove_all(self._modules)
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"PatchHandle(method='{self.method}', active={self.active})"


def _snapshot_config(config) -> dict[str, Any]:
    fields = ("rope_parameters",) if hf_config._V5 else ("rope_scaling", "rope_theta")
    snap = {}
    for name in (*fields, "max_position_embeddings", "ropekit"):
        value = config.__dict__.get(name, _MISSING) if name == "ropekit" else getattr(config, name, _MISSING)
        snap[name] = dict(value) if isinstance(value, dict) else value
    return snap


def _restore_config(config, snap: dict[str, Any]) -> None:
    for name, value in snap.items():
        if value is _MISSING:
            if name in config.__dict__:
                delattr(config, name)
        else:
            setattr(config, name, value)


def _resolve_methods(
    requested: dict[str | None, _methods.RopeMethod],
    own: dict[str | None, dict[str, Any]],
    old_max: int,
    max_position_embeddings: int | None,
) -> tuple[dict[str | None, _methods.RopeMethod | None], int]:
    """Each layer type's method resolved against the model's own parameters, and the new context length."""
    if list(own) == [None] and list(requested) != [None]:
        raise ValueError(
            f"this model has one RoPE for all its layers; a per-layer-type method ({', '.join(map(str, requested))}) "
            "needs per-layer-type rope parameters (Gemma 2/3/4, OLMo 3, ...). Patch without '@layer_type'"
        )
    unknown = [lt for lt in requested if lt is not None and lt not in own]
    if unknown:
        raise ValueError(f"unknown layer type(s) {unknown}; this model's: {', '.join(map(str, own))}")
    chosen: dict[str | None, _methods.RopeMethod | None] = {}
    for lt in own:
        chosen[lt] = requested.get(lt, requested.get(None))
    resolved: dict[str | None, _methods.RopeMethod | None] = {}
    targets = [old_max]
    for lt, method in chosen.items():
        if method is None:
            resolved[lt] = None
            continue
        params = own[lt]
        if isinstance(method, _methods.Native):
            method = _methods.from_hf(params)
            target = old_max
        else:
            if method.name == "rope" and params.get("rope_type", "default") != "default":
                where = "" if lt is None else f" of its {lt} layers"
                warnings.warn(
                    f"ropekit.patch: 'rope' replaces the model's {params['rope_type']!r} RoPE scaling{where} with "
                    "plain RoPE; use 'native' to keep the model's own method",
                    stacklevel=3,
                )
            target = int(max_position_embeddings or method.target_length(old_max) or old_max)
        targets.append(target)
        # dynamic NTK's original length is the model's; xPos centers its scales on half the target
        length = old_max if isinstance(method, _methods.DynamicNTK) else target
        resolved[lt] = method.resolve(base=float(params["rope_theta"]), max_position_embeddings=length)
    return resolved, max(targets)


def patch(
    model: nn.Module,
    method: _methods.RopeMethod | str | dict,
    *,
    layer_types: list[str] | None = None,
    max_position_embeddings: int | None = None,
    backend: str = "auto",
) -> PatchHandle:
    """Make a loaded model that follows the rotary contract rotate q and k with ``method``.

    Args:
        model: a ``*ForCausalLM`` (or any model whose ``base_model`` is the decoder) of a family that
            follows the rotary contract (see the module docstring; ``check_support(model)`` says why not).
        method: a ``RopeMethod``, a spec string (``"native"`` = the model's own method through ropekit),
            a per-layer-type spec (``"spec@full_attention"``, entries joined by ``;``) or a dict
            {layer type: spec}. A method without ``base`` takes the model's rope_theta (of that layer type).
        layer_types: apply ``method`` only to these layer types (e.g. ``["full_attention"]``); the others
            keep the model's own rotary module.
        max_position_embeddings: the new context length to record in the config (raised, never lowered);
            by default the method's own target (original x factor for pi, ntk, yarn, llama3, longrope).
        backend: "auto" (Triton on CUDA, torch reference on CPU), "torch" or "triton".
    Returns:
        a ``PatchHandle``; ``handle.undo()`` restores the model exactly. Patching a patched model replaces
        the method; undo the patches in reverse order.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of auto, torch, triton; got {backend!r}")
    # 1. check: everything that can refuse does so before the model changes
    contract = _contract_or_refusal(model)
    config, base_model = model.config, contract.base_model
    previous = rotary_of(base_model)
    requested = _requested_methods(method, layer_types)
    snapshot = _snapshot_config(config)
    # resolve against the model as it was before any ropekit patch (patching over a patch replaces it)
    first = base_model._ropekit_first_snapshot if isinstance(previous, RopekitRotary) else snapshot
    own = _own_parameters(contract, first, config)
    resolved, target = _resolve_methods(requested, own, int(first["max_position_embeddings"]), max_position_embeddings)
    _check_frequencies(resolved, contract.rotary_dims)
    cache_layout = _cache_layout(contract, resolved, config.model_type)
    # 2. change: the config, the rotary module, the dispatchers
    if not isinstance(previous, RopekitRotary):
        base_model._ropekit_first_snapshot = snapshot
    _rewrite_config(config, requested, resolved, own, contract.rotary_dims, target)
    layer_of_cache = getattr(config, "layer_types", None) if list(resolved) != [None] else None
    rotary = RopekitRotary(resolved, contract.rotary_dims, contract.original, backend=backend,
                           layer_of_cache=layer_of_cache, cache_layout=cache_layout)  # fmt: skip
    hooks = (
        _cache_hooks(base_model, rotary) if any(m is not None and m.needs_seq_len for m in resolved.values()) else []
    )
    _set_rotary(base_model, rotary)
    _install_all(contract.modules, contract.layouts)
    shown = resolved[None] if list(resolved) == [None] else format_layered({k: v for k, v in resolved.items() if v})
    return PatchHandle(model, base_model, rotary, previous, contract.modules, snapshot, hooks, shown)


def _contract_or_refusal(model: nn.Module):
    """The model's rotary contract, or ``Unsupported`` saying what it lacks (a base <= 0 named as such)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        return _contract(model)
    except Unsupported as err:
        own = get_layered_rope_parameters(config) if config is not None else {}
        for lt, params in own.items():  # a base <= 0 breaks the probe; say that, not what the probe saw
            theta = params.get("rope_theta")
            if isinstance(theta, (int, float)) and not theta > 0:
                where = "" if lt is None else f" ({lt})"
                raise ValueError(
                    f"ropekit.patch cannot patch model_type {model_type!r}: its rope_theta{where} is {theta!r}; "
                    "RoPE needs a base > 0 (see the model's config.json)"
                ) from None
        raise Unsupported(f"ropekit.patch cannot patch model_type {model_type!r}: {err}") from None


def _requested_methods(method, layer_types: list[str] | None) -> dict[str | None, _methods.RopeMethod]:
    """{layer type or None: method} from the spec (``spec@layer_type;...``) or from ``layer_types=``."""
    requested = parse_layered(method)
    if layer_types is None:
        return requested
    if list(requested) != [None]:
        raise ValueError("give the layer types either in the spec ('...@full_attention') or as layer_types=")
    return {_layer_type_name(lt): requested[None] for lt in layer_types}


def _own_parameters(contract, first: dict[str, Any], config) -> dict[str | None, dict[str, Any]]:
    """The model's own rope parameters per layer type in use, as they were before any ropekit patch."""
    own = _layered_of_snapshot(first, config)
    if list(own) != [None]:  # rope parameters of a layer type no layer of this model has are not in use
        own = {lt: p for lt, p in own.items() if lt in contract.rotary_dims}
    if set(own) != set(contract.rotary_dims):
        raise Unsupported(
            f"ropekit.patch cannot patch model_type {config.model_type!r}: its rope parameters name layer types "
            f"{sorted(map(str, own))} but its rotary module holds {sorted(map(str, contract.rotary_dims))}"
        )
    return own


def _check_frequencies(resolved, rotary_dims) -> None:
    """Every method's frequencies are finite, computed on CPU in float64 (also under a meta default device)."""
    with torch.device("cpu"):
        for lt, m in resolved.items():
            if m is not None and not torch.isfinite(m.inv_freq64(rotary_dims[lt])).all():
                raise ValueError(f"{m} gives non-finite frequencies for rotary_dim={rotary_dims[lt]}")


def _cache_layout(contract, resolved, model_type: str) -> str:
    """The channel layout of the cached keys (they enter the cache after ``apply_rotary_pos_emb``, in its output
    layout: DeepSeek's MLA puts out halves); a length-dependent method re-rotates them, so it needs one layout."""
    layouts = {lay.replace("deinterleave", "half") for lay in contract.layouts.values()}
    if any(m is not None and m.needs_seq_len for m in resolved.values()) and len(layouts) > 1:
        raise Unsupported(f"ropekit.patch cannot patch model_type {model_type!r} with a length-dependent method: "
                          f"its cached keys come in several layouts {sorted(layouts)}")  # fmt: skip
    return next(iter(layouts))


def _rewrite_config(config, requested, resolved, own, rotary_dims, target: int) -> None:
    """The config in its Hugging Face-native form for the new methods (so ``from_pretrained`` reloads them),
    the new context length, and ``config.ropekit = {"method": spec}``; ``native`` leaves the rope parameters."""
    is_native = all(isinstance(m, _methods.Native) for m in requested.values())
    if not is_native:
        for lt, m in resolved.items():
            if m is None or (isinstance(requested.get(lt, requested.get(None)), _methods.Native)):
                continue
            old_params = own[lt]
            new_params = m.to_hf(rotary_dims[lt])
            if "partial_rotary_factor" in old_params and old_params.get("rope_type") != "proportional":
                new_params.setdefault("partial_rotary_factor", old_params["partial_rotary_factor"])
            if not hf_config._V5:
                new_params = {"rope_theta": new_params.pop("rope_theta"), **_v4_rope_scaling(new_params)}
                _check_v4_reloadable(config, new_params, m)
            set_rope_parameters(config, new_params, lt)
        if not any(isinstance(m, _methods.DynamicNTK) for m in resolved.values()):
            config.max_position_embeddings = target  # HF's dynamic reads max_position_embeddings as the original
    if is_native:
        saved = format_layered(requested)
    else:  # resolved (bases taken from the model), so a reload does not resolve against the rewritten config
        saved = format_layered(
            {
                lt: _methods.Native() if isinstance(requested.get(lt, requested.get(None)), _methods.Native) else m
                for lt, m in resolved.items()
                if m is not None
            }
        )
    config.ropekit = {"method": saved}


def _cache_hooks(base_model: nn.Module, rotary: RopekitRotary) -> list:
    """Forward hooks that hand the rotary module the KV cache of each forward (a length-dependent method
    re-rotates the cached keys when its frequencies change) and record the cache's positions after it."""

    def pre_hook(mod, args, kwargs):
        if rotary_of(mod) is rotary:
            rotary._cache = _kv_cache(kwargs.get)

    def post_hook(mod, args, kwargs, output):
        if rotary_of(mod) is rotary:
            rotary.commit_cache(kv_cache_of(output))
            rotary._cache = None

    return [base_model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            base_model.register_forward_hook(post_hook, with_kwargs=True)]  # fmt: skip


def _layered_of_snapshot(snap: dict[str, Any], config) -> dict[str | None, dict[str, Any]]:
    """Per-layer-type rope parameters as they were in a config snapshot."""
    if hf_config._V5:
        fake = type("Snap", (), {})()
        fake.rope_parameters = snap["rope_parameters"] or None
        fake.default_theta = getattr(config, "default_theta", 10_000.0)
        return get_layered_rope_parameters(fake)
    scaling = snap["rope_scaling"] or None
    theta = snap["rope_theta"] or None
    return {None: _flat(scaling, float(theta if theta is not None else 10_000.0))}


def describe(model: nn.Module) -> dict[str, Any]:
    """What the model's RoPE is now: method spec, rotary dim, effective inv_freq (float32) and scale."""
    base_model = decoder_of(model)
    if base_model is None:
        raise Unsupported(f"{type(model).__name__} has no rotary_emb module")
    rotary = rotary_of(base_model)
    if isinstance(rotary, RopekitRotary):
        m = rotary.method
        return {
            "method": str(m),
            "rotary_dim": rotary.rotary_dim,
            "inv_freq": m.inv_freq(rotary.rotary_dim).tolist(),
            "attention_factor": m.attention_factor,
            "patched": True,
        }
    inv = next(iter(_inv_freq_buffers(rotary).values()), None)
    return {
        "method": str(read_method(model.config)),
        "rotary_dim": None if inv is None else 2 * inv.numel(),
        "inv_freq": None if inv is None else inv.float().tolist(),
        "attention_factor": float(getattr(rotary, "attention_scaling", 1.0)),
        "patched": False,
    }
