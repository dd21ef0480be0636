"""Patch a loaded Hugging Face Llama-family model to rotate q and k with a ropekit method.

``patch(model, "pi:factor=8")`` does two things, both undone by ``handle.undo()``:

1. It swaps the model's rotary module (``model.model.rotary_emb``) for a ``RopekitRotary`` whose
   forward returns ``(position_ids, RopeContext)`` instead of ``(cos, sin)``: no cos/sin table is
   built, the angles are computed from the integer positions (in float64 on CPU, in the Triton
   kernel on CUDA).
2. It swaps ``apply_rotary_pos_emb`` in the family's modeling module for a dispatcher that rotates
   with ropekit when handed a ``RopeContext`` and calls the original otherwise, so unpatched models
   in the same process are untouched. Each attention layer makes one call for q and k.

The config is rewritten to the Hugging Face-native equivalent (``rope_parameters`` on
transformers 5, ``rope_scaling`` + ``rope_theta`` on 4.x) plus ``config.ropekit = {"method": spec}``,
so ``save_pretrained`` + plain ``from_pretrained`` reproduce every HF-native method, and
``ropekit.load_model`` re-applies the ones HF has no type for (xPos).

Dynamic NTK changes the frequencies with the length; the patch keeps a record of every KV cache's
key positions and re-rotates the cached keys when the frequencies change, so each cached key is
rotated as a full forward of the same prefix would rotate it (transformers' own dynamic type keeps
keys at the frequencies they were cached with). This is exact for the first layer; in deeper layers
a cached key also depends on attention outputs computed with the older frequencies, which no cache
can undo, so decoding stays close to, not equal to, a full forward (measured in tests/test_hf.py).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from ropekit import methods as _methods
from ropekit.reference import RopeParams, rope_angles, rotate
from ropekit.rotary import apply_rope_params, rope_params

__all__ = ["patch", "PatchHandle", "RopeContext", "RopekitRotary", "SUPPORTED_FAMILIES", "read_method"]

MIN_TRANSFORMERS = (4, 45)
# model_type values whose attention calls the module-level apply_rotary_pos_emb(q, k, cos, sin) with the
# (cos, sin) made by ``model.rotary_emb``; each is covered by tests/test_hf.py.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2")

_TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
if _TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
    raise ImportError(
        f"ropekit needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found {transformers.__version__}"
    )
_V5 = _TRANSFORMERS_VERSION >= (5, 0)


# ---------------------------------------------------------------------------------------------
# Config access: transformers 5 ``rope_parameters`` and 4.x ``rope_scaling`` + ``rope_theta``
# ---------------------------------------------------------------------------------------------
def get_rope_parameters(config) -> dict[str, Any]:
    """The model's rope parameters as one flat v5-style dict (rope_type, rope_theta, scaling keys)."""
    if _V5:
        params = dict(getattr(config, "rope_parameters", None) or {})
        nested = [v for v in params.values() if isinstance(v, dict)]
        if nested:
            raise ValueError("models with a different RoPE per layer type are not supported by ropekit.patch")
        params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", getattr(config, "default_theta", 10_000.0))
        return params
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = float(getattr(config, "rope_theta", 10_000.0))
    return params


def set_rope_parameters(config, params: dict[str, Any]) -> None:
    params = dict(params)
    if _V5:
        config.rope_parameters = params
        return
    config.rope_theta = params.pop("rope_theta")
    config.rope_scaling = None if params.get("rope_type") == "default" and len(params) == 1 else params


def head_and_rotary_dim(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = get_rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return head_dim, int(head_dim * (factor or 1.0))


def read_method(config) -> _methods.RopeMethod:
    """The ropekit method a config describes (its ``ropekit`` entry, else its HF rope parameters)."""
    saved = getattr(config, "ropekit", None)
    return _methods.from_hf(get_rope_parameters(config), (saved or {}).get("method"))


# ---------------------------------------------------------------------------------------------
# The rotary module put in place of the model's, and the context it hands to attention
# ---------------------------------------------------------------------------------------------
@dataclass
class RopeContext:
    """What the patched rotary module hands each attention layer in place of ``sin``."""

    params: RopeParams
    backend: str

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q (B, Hq, T, D), k (B, Hk, T, D), positions (1 or B, T)
        if positions.shape[0] == 1 and q.shape[0] != 1:
            positions = positions[0]
        return apply_rope_params(q, k, positions, self.params, backend=self.backend)


class RopekitRotary(nn.Module):
    """Replacement for ``<Family>RotaryEmbedding``: forward(x, position_ids) -> (position_ids, RopeContext).

    Holds no float buffers, so ``model.to(torch.bfloat16)`` cannot degrade the frequencies;
    the float64 tables are cached per device (and per length for dynamic NTK).
    """

    def __init__(self, method: _methods.RopeMethod, rotary_dim: int, original: nn.Module, backend: str = "auto"):
        super().__init__()
        self.method = method
        self.rotary_dim = rotary_dim
        self.backend = backend
        self._original = [original]  # a list so the HF module is not registered as a child (state_dict unchanged)
        self._params: dict[tuple, RopeParams] = {}
        self._cache = None  # the KV cache of the forward in flight (set by the model pre-hook)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache_records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def extra_repr(self) -> str:
        return f"method={self.method}, rotary_dim={self.rotary_dim}, backend={self.backend}"

    def params(self, positions: torch.Tensor, seq_len: int | None) -> RopeParams:
        key = (positions.device, seq_len)
        if key not in self._params:
            if len(self._params) >= 16:  # dynamic NTK makes one entry per length: keep the cache small
                self._params.clear()
            self._params[key] = rope_params(self.method, self.rotary_dim, positions, seq_len)
        return self._params[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        seq_len = None
        if self.method.needs_seq_len:
            seq_len = int(position_ids.max().item()) + 1
        params = self.params(position_ids, seq_len)
        if self.method.needs_seq_len:
            self._rerotate_cache(params.inv_freq)
            self._pending = (position_ids, params.inv_freq)
        return position_ids, RopeContext(params, self.backend)

    # -- dynamic NTK and the KV cache -----------------------------------------------------------
    def _rerotate_cache(self, inv_freq: torch.Tensor) -> None:
        """Rotate cached keys from the frequencies they were stored with to the current ones."""
        cache, record = self._cache, None
        if cache is not None:
            record = self._cache_records.get(cache)
        if record is None:
            return
        positions, old_inv_freq = record
        if torch.equal(old_inv_freq, inv_freq):
            return
        # Rotations of one pair compose by adding angles: R(m*new) = R(m*(new - old)) R(m*old).
        angles = rope_angles(positions, inv_freq - old_inv_freq)[:, None]  # (B, 1, T, R/2)
        cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
        for keys in _cached_keys(cache):
            t = keys.shape[-2]
            keys.copy_(rotate(keys, cos[..., :t, :], sin[..., :t, :], layout="half"))

    def commit_cache(self, cache) -> None:
        """After a forward: the cache now holds keys at the recorded positions, rotated with ``inv_freq``."""
        if self._pending is None or cache is None:
            return
        position_ids, inv_freq = self._pending
        self._pending = None
        record = self._cache_records.get(cache)
        positions = position_ids if record is None else torch.cat([record[0], position_ids], dim=-1)
        self._cache_records[cache] = (positions, inv_freq)


def _cached_keys(cache) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    return [k for k in getattr(cache, "key_cache", []) if k is not None and k.numel()]


# ---------------------------------------------------------------------------------------------
# Module-level apply_rotary_pos_emb dispatch (reference-counted per modeling module)
# ---------------------------------------------------------------------------------------------
_MODULE_PATCHES: dict[str, list] = {}  # module name -> [original function, number of live patches]


def _install_dispatch(module) -> None:
    name = module.__name__
    if name in _MODULE_PATCHES:
        _MODULE_PATCHES[name][1] += 1
        return
    original = module.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if isinstance(sin, RopeContext):
            return sin(q, k, cos)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    _MODULE_PATCHES[name] = [original, 1]


def _remove_dispatch(module) -> None:
    entry = _MODULE_PATCHES.get(module.__name__)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        module.apply_rotary_pos_emb = entry[0]
        del _MODULE_PATCHES[module.__name__]


# ---------------------------------------------------------------------------------------------
# patch / undo
# ---------------------------------------------------------------------------------------------
def _find_base_model(model: nn.Module) -> nn.Module:
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and isinstance(getattr(candidate, "rotary_emb", None), nn.Module):
            return candidate
    raise ValueError(
        f"{type(model).__name__} has no rotary_emb module; ropekit.patch supports: {', '.join(SUPPORTED_FAMILIES)}"
    )


class PatchHandle:
    """Returned by ``patch``; ``undo()`` restores the rotary module, the config and the dispatch."""

    def __init__(self, model, base_model, rotary, previous_rotary, module, config_snapshot, hooks, method):
        self.model, self.method = model, method
        self._base_model, self._rotary, self._previous = base_model, rotary, previous_rotary
        self._module, self._config_snapshot, self._hooks = module, config_snapshot, hooks
        self.active = True
        # a patched model that is dropped without undo() releases its hold on the module dispatch
        self._finalizer = weakref.finalize(model, _remove_dispatch, module)

    def undo(self) -> None:
        if not self.active:
            return
        if self._base_model.rotary_emb is not self._rotary:
            raise RuntimeError("this patch was patched over; undo the later patch first")
        for hook in self._hooks:
            hook.remove()
        self._finalizer.detach()
        self._base_model.rotary_emb = self._previous
        _restore_config(self.model.config, self._config_snapshot)
        _remove_dispatch(self._module)
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"PatchHandle(method='{self.method}', active={self.active})"


_MISSING = object()


def _snapshot_config(config) -> dict[str, Any]:
    fields = ("rope_parameters",) if _V5 else ("rope_scaling", "rope_theta")
    snap = {}
    for name in (*fields, "max_position_embeddings", "ropekit"):
        value = config.__dict__.get(name, _MISSING) if name == "ropekit" else getattr(config, name, _MISSING)
        snap[name] = dict(value) if isinstance(value, dict) else value
    return snap


def _params_of_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    if _V5:
        params = dict(snap["rope_parameters"] or {})
    else:
        params = {**(snap["rope_scaling"] or {}), "rope_theta": snap["rope_theta"]}
    params.setdefault("rope_theta", 10_000.0)
    return params


def _restore_config(config, snap: dict[str, Any]) -> None:
    for name, value in snap.items():
        if value is _MISSING:
            if name in config.__dict__:
                delattr(config, name)
        else:
            setattr(config, name, value)


def patch(
    model: nn.Module,
    method: _methods.RopeMethod | str,
    *,
    max_position_embeddings: int | None = None,
    backend: str = "auto",
) -> PatchHandle:
    """Make a loaded Llama-family model rotate q and k with ``method``.

    Args:
        model: a ``*ForCausalLM`` (or its base model) of a supported family.
        method: a ``RopeMethod`` or spec string. A method without ``base`` takes the model's rope_theta.
        max_position_embeddings: the new context length to record in the config (raised, never lowered);
            by default the method's own target (original x factor for pi, ntk, yarn, llama3).
        backend: "auto" (Triton on CUDA, torch reference on CPU), "torch" or "triton".
    Returns:
        a ``PatchHandle``; ``handle.undo()`` restores the model exactly. Patching a patched model replaces
        the method; undo the patches in reverse order.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"ropekit.patch does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of auto, torch, triton; got {backend!r}")
    base_model = _find_base_model(model)
    previous = base_model.rotary_emb
    original = previous._original[0] if isinstance(previous, RopekitRotary) else previous
    module = sys.modules[type(original).__module__]
    if not callable(getattr(module, "apply_rotary_pos_emb", None)):
        raise ValueError(f"{module.__name__} has no apply_rotary_pos_emb; cannot patch {model_type!r}")

    head_dim, rotary_dim = head_and_rotary_dim(config)
    snapshot = _snapshot_config(config)
    # Resolve against the model as it was before any ropekit patch (patching over a patch replaces it).
    first = base_model._ropekit_first_snapshot if isinstance(previous, RopekitRotary) else snapshot
    old_params, old_max = _params_of_snapshot(first), int(first["max_position_embeddings"])
    method = _methods.parse(method)
    target = max(int(max_position_embeddings or method.target_length(old_max) or old_max), old_max)
    # dynamic NTK's original length is the model's; xPos centers its scales on half the target
    method = method.resolve(
        base=float(old_params["rope_theta"]),
        max_position_embeddings=old_max if isinstance(method, _methods.DynamicNTK) else target,
    )
    inv = method.inv_freq(rotary_dim)  # validates head_dim and the method before anything changes
    if not torch.isfinite(inv).all():
        raise ValueError(f"{method} gives non-finite frequencies for rotary_dim={rotary_dim}")
    if not isinstance(previous, RopekitRotary):
        base_model._ropekit_first_snapshot = snapshot
    new_params = method.to_hf(rotary_dim)
    if "partial_rotary_factor" in old_params:
        new_params["partial_rotary_factor"] = old_params["partial_rotary_factor"]
    set_rope_parameters(config, new_params)
    config.ropekit = {"method": str(method)}
    if not isinstance(method, _methods.DynamicNTK):  # HF's dynamic reads max_position_embeddings as the original
        config.max_position_embeddings = target

    rotary = RopekitRotary(method, rotary_dim, original, backend=backend)
    hooks = []
    if method.needs_seq_len:

        def pre_hook(mod, args, kwargs):
            if mod.rotary_emb is rotary:
                rotary._cache = kwargs.get("past_key_values")

        def post_hook(mod, args, kwargs, output):
            if mod.rotary_emb is rotary:
                rotary.commit_cache(getattr(output, "past_key_values", None))
                rotary._cache = None

        hooks.append(base_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(base_model.register_forward_hook(post_hook, with_kwargs=True))
    base_model.rotary_emb = rotary
    _install_dispatch(module)
    return PatchHandle(model, base_model, rotary, previous, module, snapshot, hooks, method)


def describe(model: nn.Module) -> dict[str, Any]:
    """What the model's RoPE is now: method spec, rotary dim, effective inv_freq (float32) and scale."""
    base_model = _find_base_model(model)
    rotary = base_model.rotary_emb
    if isinstance(rotary, RopekitRotary):
        m = rotary.method
        return {
            "method": str(m),
            "rotary_dim": rotary.rotary_dim,
            "inv_freq": m.inv_freq(rotary.rotary_dim).tolist(),
            "attention_factor": m.attention_factor,
            "patched": True,
        }
    inv = getattr(rotary, "inv_freq", None)
    return {
        "method": str(read_method(model.config)),
        "rotary_dim": None if inv is None else 2 * inv.numel(),
        "inv_freq": None if inv is None else inv.float().tolist(),
        "attention_factor": float(getattr(rotary, "attention_scaling", 1.0)),
        "patched": False,
    }
