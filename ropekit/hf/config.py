"""A RoPE method to and from a Hugging Face config: transformers 5's ``rope_parameters`` (one dict, or one per
layer type) and 4.x's ``rope_scaling`` + ``rope_theta``; layered specs (``spec@layer_type;...``); the head and
rotary dimensions; the method a saved config names."""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers

from ropekit import methods as _methods

MIN_TRANSFORMERS = (4, 57)  # the oldest release CI tests (4.57.6); pyproject.toml says the same
LAYER_TYPE_ALIASES = {"full": "full_attention", "sliding": "sliding_attention"}

_TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
if _TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
    raise ImportError(
        f"ropekit needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, found {transformers.__version__}"
    )
_V5 = _TRANSFORMERS_VERSION >= (5, 0)


class _Missing:
    """Placeholder for a config attribute that does not exist (falsy, unlike a bare ``object()``)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


# ---------------------------------------------------------------------------------------------
# Config access: transformers 5 ``rope_parameters`` and 4.x ``rope_scaling`` + ``rope_theta``
# ---------------------------------------------------------------------------------------------
def _flat(params: dict[str, Any] | None, default_theta: float) -> dict[str, Any]:
    params = dict(params or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = default_theta
    return params


def get_layered_rope_parameters(config) -> dict[str | None, dict[str, Any]]:
    """The model's rope parameters per layer type ({None: params} when one RoPE serves every layer)."""
    if _V5:
        params = dict(getattr(config, "rope_parameters", None) or {})
        default_theta = getattr(config, "default_theta", 10_000.0)
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
        if nested:
            return {k: _flat(v, default_theta) for k, v in nested.items()}
        return {None: _flat(params, default_theta)}
    theta = getattr(config, "rope_theta", None)
    return {None: _flat(getattr(config, "rope_scaling", None), float(theta if theta is not None else 10_000.0))}


def get_rope_parameters(config) -> dict[str, Any]:
    """The model's rope parameters as one flat v5-style dict (rope_type, rope_theta, scaling keys)."""
    layered = get_layered_rope_parameters(config)
    if list(layered) != [None]:
        raise ValueError(
            f"this model has a RoPE per layer type ({', '.join(layered)}); use get_layered_rope_parameters"
        )
    return layered[None]


def set_rope_parameters(config, params: dict[str, Any], layer_type: str | None = None) -> None:
    params = dict(params)
    if _V5:
        if layer_type is None:
            config.rope_parameters = params
        else:
            config.rope_parameters = {**config.rope_parameters, layer_type: params}
        return
    if layer_type is not None:
        raise ValueError("per-layer-type rope parameters need transformers >= 5")
    config.rope_theta = params.pop("rope_theta")
    config.rope_scaling = None if params.get("rope_type") == "default" and len(params) == 1 else params


def _check_v4_reloadable(config, params: dict[str, Any], method) -> None:
    """transformers 4.x validates ``rope_scaling`` per family (OLMo 2 takes only linear and dynamic): refuse,
    before anything changes, a method whose saved config that family's ``from_pretrained`` would reject."""
    candidate = config.to_dict()
    candidate.pop("ropekit", None)
    candidate["rope_theta"] = params["rope_theta"]
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    candidate["rope_scaling"] = None if rest == {"rope_type": "default"} else rest
    try:
        type(config).from_dict(candidate)
    except (ValueError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{method} cannot be saved for model_type {config.model_type!r} on transformers "
            f"{transformers.__version__}: its config refuses it ({reason}); use transformers >= 5"
        ) from None


def _v4_rope_scaling(params: dict[str, Any]) -> dict[str, Any]:
    """4.x validates rope_scaling keys per type: keep only the ones it knows (the numbers stay the same)."""
    known = {
        "linear": {"factor"},
        "dynamic": {"factor"},
        "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow"},
        "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
        "longrope": {"short_factor", "long_factor", "factor", "original_max_position_embeddings", "attention_factor"},
    }.get(params.get("rope_type"))
    if known is None:
        return params
    if params.get("rope_type") in ("linear", "dynamic"):  # the 4.x form every family accepts (OLMo 2: exactly this)
        return {"type": params["rope_type"], "factor": params["factor"]}
    out = {"rope_type": params["rope_type"], **{k: v for k, v in params.items() if k in known}}
    if params.get("rope_type") == "yarn" and params.get("truncate") is False:
        raise ValueError("yarn with truncate=false has no transformers 4.x form; use transformers >= 5")
    return out


def head_and_rotary_dim(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = next(iter(get_layered_rope_parameters(config).values()))
    if params.get("rope_type") == "proportional":
        return head_dim, head_dim
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return head_dim, int(head_dim * (factor or 1.0))


def read_methods(config) -> dict[str | None, _methods.RopeMethod]:
    """The ropekit method of each layer type a config describes ({None: method} for one RoPE)."""
    saved = (getattr(config, "ropekit", None) or {}).get("method")
    layered = get_layered_rope_parameters(config)
    out = {lt: _methods.from_hf(params) for lt, params in layered.items()}
    if saved and saved != "native":
        for lt, m in parse_layered(saved).items():
            if m.name == "native":
                continue
            targets = list(out) if lt is None else [lt]
            for t in targets:
                out[t] = m
    return out


def read_method(config) -> _methods.RopeMethod:
    """The ropekit method a config describes (its ``ropekit`` entry, else its HF rope parameters).

    For a model with a RoPE per layer type, the one of its full-attention layers (or the first type)."""
    found = read_methods(config)
    if None in found:
        return found[None]
    return found.get("full_attention", next(iter(found.values())))


def saved_method_conflict(config) -> str | None:
    """Where ``config.ropekit``'s method and the config's own rope parameters give different frequencies (a
    hand edit of one), as one line saying which wins in which loader; None when they agree or nothing was
    saved. Compared by their numbers (float64 frequencies and attention factor), not key by key: a 4.x
    config stores fewer keys for the same method."""
    saved = (getattr(config, "ropekit", None) or {}).get("method")
    if not saved:
        return None
    methods, own = parse_layered(saved), get_layered_rope_parameters(config)
    rotary_dim = head_and_rotary_dim(config)[1]
    for lt, m in methods.items():
        if isinstance(m, _methods.Native) or m.hf_type is None or lt not in own:
            continue  # native: the rope parameters are the method; xPos: no rope parameters hold it
        have = own[lt]
        try:
            theirs = _methods.from_hf(have).resolve(  # dynamic NTK's original length is the config's
                base=float(have["rope_theta"]), max_position_embeddings=int(config.max_position_embeddings)
            )
            same = torch.allclose(m.inv_freq64(rotary_dim), theirs.inv_freq64(rotary_dim), rtol=1e-9, atol=0)
            same = same and math.isclose(m.attention_factor, theirs.attention_factor, rel_tol=1e-9)
        except (ValueError, KeyError, TypeError):
            same = False  # rope parameters ropekit cannot read are not the saved method either
        if not same:
            want = m.to_hf(rotary_dim)
            shown = [f"{k}={have.get(k)!r}" for k in want if have.get(k) != want[k]] or [repr(have)]
            where = "" if lt is None else f" (layer type {lt})"
            return (
                f"config.ropekit says {saved!r} but the config's rope parameters{where} give other frequencies "
                f"({', '.join(shown)}): ropekit.load_model applies config.ropekit, plain from_pretrained the rope "
                "parameters; delete config.ropekit from config.json to use the rope parameters"
            )
    return None


def parse_layered(spec) -> dict[str | None, _methods.RopeMethod]:
    """``"spec"`` -> {None: method}; ``"spec@full_attention;spec2@sliding"`` -> {layer type: method}.

    Also takes a ``RopeMethod`` or a dict {layer type or None: spec or method}.
    """
    if isinstance(spec, dict):
        return {_layer_type_name(k): _methods.parse(v) for k, v in spec.items()}
    if isinstance(spec, _methods.RopeMethod) or not isinstance(spec, str) or "@" not in spec:
        return {None: _methods.parse(spec)}
    out: dict[str | None, _methods.RopeMethod] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        method_spec, at, types = entry.rpartition("@")
        if not at or not method_spec.strip() or not types.strip():
            raise ValueError(
                f"malformed per-layer-type entry {entry!r} in {spec!r}; expected 'method_spec@layer_type' "
                "(e.g. 'yarn:factor=8,original_max_position_embeddings=8192@full_attention')"
            )
        method = _methods.parse(method_spec)
        for lt in types.split("+"):
            name = _layer_type_name(lt)
            if name in out:
                raise ValueError(f"layer type {name!r} given twice in {spec!r}")
            out[name] = method
    return out


def _layer_type_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()
    return LAYER_TYPE_ALIASES.get(name, name)


def format_layered(methods: dict[str | None, _methods.RopeMethod]) -> str:
    if list(methods) == [None]:
        return str(methods[None])
    return ";".join(f"{m}@{lt}" for lt, m in methods.items())
