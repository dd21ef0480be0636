"""Patch a loaded Hugging Face model to rotate q and k with a ropekit method.

Which models: decided by mechanism, not by a list (``check_support``). A model is patchable when its
modeling module follows transformers' standard rotary contract:

- its decoder (``model.base_model``) owns a ``rotary_emb`` module (or a ``*RotaryEmbedding`` child under
  another name, LFM2-MoE's ``pos_emb``) holding ``inv_freq`` buffers (one, or
  one per layer type: ``<layer_type>_inv_freq``) whose forward returns ``(cos, sin)``;
- attention rotates q and k by calling a module-level ``apply_rotary_pos_emb(q, k, cos, sin, ...)``
  (or another module-level ``apply_rotary_pos_emb*`` function of that signature) with the
  ``cos, sin`` it unpacked from ``position_embeddings``, and uses them for nothing else;
- each such function pairs channels in a recognised layout: halves (``rotate_half`` on ``x[:D/2]``,
  ``x[D/2:]``: Llama, Mistral, ...), interleaved pairs (``x[0::2]``, ``x[1::2]``: Cohere, GLM), or
  interleaved in and halves out (DeepSeek's MLA ``apply_rotary_pos_emb_interleave``). A partial rotary
  dimension (Phi, StableLM, GLM, ...; and MLA's rope slice of q/k) is read from the module's ``inv_freq``.

Anything else is refused with a message that says which part of the contract is missing.

``patch(model, "pi:factor=8")`` then does two things, both undone by ``handle.undo()``:

1. It swaps the decoder's ``rotary_emb`` for a ``RopekitRotary`` whose forward returns
   ``(ctx, ctx)``, a ``RopeContext`` in place of both ``cos`` and ``sin``: no cos/sin table is built,
   the angles are computed from the integer positions (in float64 on CPU, in the Triton kernel on
   CUDA). Any code that would use the context as a tensor fails loudly instead of computing garbage.
2. It swaps each ``apply_rotary_pos_emb*`` function of the modeling module for a dispatcher that
   rotates with ropekit when handed a ``RopeContext`` and calls the original otherwise, so unpatched
   models in the same process are untouched. Each attention layer makes one call for q and k.

Methods: a spec string or ``RopeMethod``; ``native`` is the model's own configured method (per layer
type), run through ropekit, with the config left as it is. Models with a RoPE per layer type (Gemma
2/3/4's sliding and full layers, OLMo 3, ...) take a method for the layer types one names:
``"yarn:factor=8,original_max_position_embeddings=8192@full_attention"`` (``@full``/``@sliding`` for
short; several entries joined by ``;``), or ``patch(model, spec, layer_types=["full_attention"])``.
The other layer types keep the model's own rotary module, untouched.

The config is rewritten to the Hugging Face-native equivalent (``rope_parameters`` on
transformers 5, ``rope_scaling`` + ``rope_theta`` on 4.x) plus ``config.ropekit = {"method": spec}``,
so ``save_pretrained`` + plain ``from_pretrained`` reproduce every HF-native method, and
``ropekit.load_model`` re-applies the ones HF has no type for (xPos).

Dynamic NTK and LongRoPE change the frequencies with the length; the patch keeps a record of every KV
cache's key positions and re-rotates the cached keys when the frequencies change, so each cached key is
rotated as a full forward of the same prefix would rotate it (transformers keeps keys at the
frequencies they were cached with). This is exact for the first layer; in deeper layers a cached key
also depends on attention outputs computed with the older frequencies, which no cache can undo, so
decoding stays close to, not equal to, a full forward (measured in tests/test_hf.py).

Hub kernels (transformers >= 5.25 loads every model with ``use_kernels`` on): the modeling module's
``apply_rotary_pos_emb`` is then a ``kernels`` wrapper module, and each attention layer holds a private copy
of it whose forward ``kernelize`` swaps for the hub's ``rotary`` kernel on CUDA (on CPU nothing is swapped).
Attention still calls the function by its module-level name, so the dispatcher ``patch`` installs there
stands in front of every copy: a patched model rotates with ropekit whatever was kernelized (and whenever
``model.train()`` re-kernelizes), an unpatched model in the same process reaches its hub kernel through
the dispatcher, and undo puts the wrapper back. ropekit does not register itself in the ``kernels``
mapping for ``rotary_pos_emb``: that mapping is process-wide, applies only when a model is kernelized,
exists only on transformers >= 5.25 with ``kernels`` installed, and would still leave the frequencies to
the rotary module; the module-level name is what attention calls in every release ropekit supports. Should a
release call a kernel copy directly, that copy receives a ``RopeContext`` and fails loudly.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import sys
import textwrap
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from ropekit import methods as _methods
from ropekit.reference import RopeParams, rope_angles, rotate
from ropekit.rotary import apply_rope_params, rope_params

__all__ = [
    "patch",
    "check_support",
    "PatchHandle",
    "RopeContext",
    "RopekitRotary",
    "Unsupported",
    "parse_layered",
    "read_method",
    "read_methods",
]

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


# ---------------------------------------------------------------------------------------------
# The rotary contract: detection by mechanism
# ---------------------------------------------------------------------------------------------
class Unsupported(ValueError):
    """The model does not follow the rotary contract; the message says what is missing."""


@dataclass
class _Contract:
    base_model: nn.Module
    original: nn.Module  # the model's own rotary module
    modules: list  # modeling modules whose apply functions are dispatched
    layouts: dict[tuple[str, str], str]  # (module name, function name) -> layout
    rotary_dims: dict[str | None, int]  # layer type -> rotary dimension (2 x inv_freq pairs)


_APPLY_PREFIX = "apply_rotary_pos_emb"


def _source(obj) -> str | None:
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return None


def _unwrap(fn):
    fn = _plain(fn) or fn
    while hasattr(fn, "__wrapped__"):
        fn = _plain(fn.__wrapped__) or fn.__wrapped__
    return fn


def _plain(fn):
    """The Python function a module attribute stands for, or None when it hides it.

    transformers >= 5.25 decorates ``apply_rotary_pos_emb`` with ``kernels``' ``use_kernel_forward_from_hub``,
    which turns the function into an ``nn.Module`` instance (class attribute ``kernel_layer_name``) that calls
    the function from its ``forward``; each attention layer holds a private copy of that module, whose forward
    ``kernelize`` may swap for a hub kernel. The function itself is the one function in that forward's
    closure. Anything else callable is returned as it is."""
    if not (isinstance(fn, nn.Module) and hasattr(type(fn), "kernel_layer_name")):
        return fn
    inner = []
    for cell in getattr(type(fn).forward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if inspect.isfunction(value):
            inner.append(value)
    return inner[0] if len(inner) == 1 else None


def _apply_functions(module) -> dict[str, Any]:
    """Module-level ``apply_rotary_pos_emb*(q, k, cos, sin, ...)`` functions (originals, if dispatched).

    A ``*_vision`` one rotates a vision tower's patches with that tower's own cos/sin, never the text
    decoder's, so it is neither dispatched nor required to have a standard layout."""
    found = {}
    for name, fn in vars(module).items():
        if not name.startswith(_APPLY_PREFIX) or name.endswith("_vision") or not callable(fn):
            continue
        fn = _MODULE_PATCHES.get(module.__name__, {}).get("originals", {}).get(name, fn)
        plain = _plain(fn)
        if plain is None:
            continue
        try:
            params = list(inspect.signature(plain).parameters)[:4]
        except (TypeError, ValueError):
            continue
        if params == ["q", "k", "cos", "sin"] or params[:3] == ["x", "cos", "sin"]:
            found[name] = fn
    return found


def _is_single(fn) -> bool:
    """The one-tensor form ``apply_rotary_pos_emb(x, cos, sin, ...)`` (Gemma 4) rather than (q, k, cos, sin)."""
    return list(inspect.signature(_plain(fn)).parameters)[:1] == ["x"]


def _layout(fn, module) -> str | None:
    """The channel pairing an apply function uses: "half", "interleaved", "deinterleave" or None."""
    src = _source(_unwrap(fn)) or ""
    body = re.sub(r'"""[\s\S]*?"""', "", src)
    if re.search(r"\bq\[\.\.\., *0?::2\]", body) and "torch.cat" in body:
        return "deinterleave"  # pairs (x[2j], x[2j+1]) in, halves out (DeepSeek MLA)
    rotate_half = getattr(module, "rotate_half", None)
    if "rotate_half(" not in body or rotate_half is None:
        return None
    rsrc = re.sub(r'"""[\s\S]*?"""', "", _source(rotate_half) or "")
    sign = "-" if re.search(r"torch\.(cat|stack)\(\(?\[?x2, *-x1", rsrc) else ""  # rotation by -angle
    if re.search(r"x\[\.\.\., *0?::2\]", rsrc) and re.search(r"x\[\.\.\., *1::2\]", rsrc):
        return "interleaved" + sign
    if re.search(r"x\.shape\[-1\] *// *2", rsrc):
        return "half" + sign
    return None


_LAYOUTS = ("half", "interleaved", "deinterleave", "half-", "interleaved-", "deinterleave-")


def _probe_layout(fn, original: nn.Module, layer_type: str | None, buffer: torch.Tensor) -> str | None:
    """The layout under which ropekit's rotation reproduces ``fn`` on the model's own (cos, sin), or None.

    Runs the model's rotary module and ``fn`` once on 7 positions and random q, k of the rotary width,
    and compares with ropekit's rotation under each layout (and each sign of the angle)."""
    positions = torch.arange(7, device=buffer.device)[None]
    x = torch.zeros(1, 7, 1, device=buffer.device)
    with torch.no_grad():
        cos, sin = original(x, positions) if layer_type is None else original(x, positions, layer_type)
        # a dynamic rotary module (dynamic NTK, LongRoPE) swaps its inv_freq for the length it is called at:
        # compare with the frequencies that made this (cos, sin), not those of the model's last forward
        buffer = _inv_freq_buffers(original).get(layer_type, buffer)
        width = 2 * buffer.numel()
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 7, width, generator=gen).to(buffer.device)
        k = torch.randn(1, 1, 7, width, generator=gen).to(buffer.device)
        try:
            want_q, want_k = (fn(q, cos, sin), fn(k, cos, sin)) if _is_single(fn) else fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - a function that cannot take the standard call is not standard
            return None
        if want_q.shape != q.shape or want_k.shape != k.shape:
            return None
        scale = getattr(original, "attention_scaling", None)
        if layer_type is not None:
            scale = getattr(original, f"{layer_type}_attention_scaling", scale)
        inv = buffer.double()
        tol = 64 * torch.finfo(torch.float32).eps * (1 + want_q.abs().max().item())
        for layout in _LAYOUTS:
            ctx = RopeContext(positions, RopeParams(inv, attention_factor=float(scale or 1.0)), "torch")
            got_q, got_k = ctx(q, k, layout)  # a trailing "-" rotates by -angle
            if (got_q - want_q).abs().max() <= tol and (got_k - want_k).abs().max() <= tol:
                return layout
    return None


def _cos_sin_misuse(module, apply_names: set[str], used_classes: set[str] | None = None) -> str | None:
    """A line of the module that uses ``cos``/``sin`` other than unpacking ``position_embeddings`` and
    passing them to an apply function (outside the apply functions and the rotary module), or None."""
    src = _source(module)
    if src is None:
        return "its source cannot be read"
    tree = ast.parse(src)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and (node.name.startswith(_APPLY_PREFIX) or node.name == "rotate_half"):
            skip.add(node)
        if isinstance(node, ast.ClassDef) and node.name.endswith("RotaryEmbedding"):
            skip.add(node)
        if isinstance(node, ast.ClassDef) and used_classes is not None and node.name not in used_classes:
            skip.add(node)  # a class this model does not instantiate (e.g. the vision tower's attention)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id in ("cos", "sin")):
            continue
        chain, p = [], node
        while p in parents:
            p = parents[p]
            chain.append(p)
        if any(c in skip for c in chain):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.Assign):
            value = parents[parent].value
            if isinstance(value, ast.Name) and value.id == "position_embeddings":
                continue
            if isinstance(value, ast.Subscript) and ast.unparse(value.value) == "position_embeddings":
                continue  # cos, sin = position_embeddings[layer_type]
            if isinstance(value, ast.Tuple) and all(
                isinstance(v, ast.Constant) and v.value is None for v in value.elts
            ):
                continue  # `cos, sin = None, None` (layers without RoPE)
        if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.Tuple):
            loop = parents.get(parents[parent])
            if isinstance(loop, ast.comprehension) and "position_embeddings" in ast.unparse(loop.iter):
                continue  # for k, (cos, sin) in position_embeddings.items()
        if isinstance(parent, ast.Subscript) and parent.value is node and _selects_positions(parent.slice):
            continue  # cos[:, t, :] selects positions, which the context supports
        if isinstance(parent, ast.Dict) and any(
            isinstance(t, ast.Name) and t.id == "cache_kwargs" for t in getattr(parents.get(parent), "targets", [])
        ):
            continue  # transformers 4.x: cache_kwargs = {"sin": sin, ...}, read only by the SinkCache 4.x removed
        if isinstance(parent, ast.Call) and node in parent.args:
            func = parent.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in apply_names:
                continue
        func = next((c for c in chain if isinstance(c, ast.FunctionDef)), None)
        if func is not None and "position_embeddings" not in ast.unparse(func):
            continue  # a helper unrelated to the rotary contract (its own cos/sin)
        return src.splitlines()[node.lineno - 1].strip()
    return None


def _selects_positions(index: ast.AST) -> bool:
    def full(e):
        return isinstance(e, ast.Slice) and e.lower is None and e.upper is None and e.step is None

    return isinstance(index, ast.Tuple) and len(index.elts) == 3 and full(index.elts[0]) and full(index.elts[2])


def _inv_freq_buffers(rotary: nn.Module) -> dict[str | None, torch.Tensor]:
    inv = getattr(rotary, "inv_freq", None)
    if isinstance(inv, torch.Tensor):
        return {None: inv}
    out = {}
    for lt in getattr(rotary, "layer_types", None) or []:
        t = getattr(rotary, f"{lt}_inv_freq", None)
        if isinstance(t, torch.Tensor):
            out[lt] = t
    return out


def _rope_dicts(config) -> list:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return [params, *(v for v in params.values() if isinstance(v, dict))] if isinstance(params, dict) else []


def _rotary_name(decoder: nn.Module) -> str | None:
    """The attribute of ``decoder`` that holds its rotary module: ``rotary_emb``, else a direct child named
    otherwise whose class is a ``*RotaryEmbedding`` (or a ropekit patch of one)."""
    if isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
        return "rotary_emb"
    for name, child in decoder.named_children():
        kind = type(child).__name__
        if isinstance(child, RopekitRotary) or (
            kind.endswith("RotaryEmbedding") and not any(w in kind for w in ("Vision", "Audio"))
        ):
            return name
    return None


def rotary_of(decoder: nn.Module) -> nn.Module:
    """The decoder's rotary module (``_rotary_name``)."""
    return getattr(decoder, _rotary_name(decoder))


def _set_rotary(decoder: nn.Module, rotary: nn.Module) -> None:
    setattr(decoder, _rotary_name(decoder), rotary)


def _decoder(model: nn.Module) -> nn.Module | None:
    candidates = [getattr(model, "base_model", None), getattr(model, "model", None), model]
    for c in list(candidates):
        if c is not None:
            candidates.append(getattr(c, "language_model", None))
    candidates = [c for c in candidates if isinstance(c, nn.Module)]
    # a text decoder's own rotary_emb first: a multimodal wrapper may hold another rotary under another name
    for candidate in candidates:
        if isinstance(getattr(candidate, "rotary_emb", None), nn.Module):
            return candidate
    for candidate in candidates:
        if _rotary_name(candidate) is not None:
            return candidate
    return None


def _contract(model: nn.Module) -> _Contract:
    config = getattr(model, "config", None)
    if config is None:
        raise Unsupported(f"{type(model).__name__} has no config (not a transformers model)")
    base_model = _decoder(model)
    if base_model is None:
        raise Unsupported(
            "no rotary_emb module on its decoder (RoPE, if any, is computed inside the attention layers or absent)"
        )
    rotary = rotary_of(base_model)
    original = rotary._original[0] if isinstance(rotary, RopekitRotary) else rotary
    buffers = _inv_freq_buffers(original)
    if not buffers:
        raise Unsupported(f"its rotary module {type(original).__name__} holds no inv_freq buffer (not standard RoPE)")
    modules = []
    for cls in (type(base_model), type(original)):
        module = sys.modules[cls.__module__]
        if module not in modules:
            modules.append(module)
    if getattr(original, "mrope_section", None) or any(
        isinstance(p, dict) and p.get("mrope_section") for p in _rope_dicts(config)
    ):
        raise Unsupported("its RoPE is multimodal (mrope_section: 3-D positions), not the standard 1-D rotary")
    layouts: dict[tuple[str, str], str] = {}
    probe_type, probe_buffer = next(iter(buffers.items()))
    for module in modules:
        functions = _apply_functions(module)
        for name, fn in functions.items():
            if probe_buffer.is_meta:  # nothing to run on: read the layout from the source
                layout = _layout(fn, module)
            else:
                layout = _probe_layout(fn, original, probe_type, probe_buffer)
            if layout is None:
                raise Unsupported(
                    f"{module.__name__}.{name} does not rotate (cos, sin) like any standard pair layout "
                    "(halves, interleaved pairs, DeepSeek's interleaved-in/halves-out)"
                )
            layouts[(module.__name__, name)] = layout
        if functions:
            misuse = _cos_sin_misuse(module, set(functions), {type(m).__name__ for m in model.modules()})
            if misuse:
                raise Unsupported(f"its attention uses cos/sin beyond apply_rotary_pos_emb: `{misuse}`")
    if not layouts:
        raise Unsupported(
            "no module-level apply_rotary_pos_emb(q, k, cos, sin) in "
            f"{', '.join(m.__name__ for m in modules)} (attention rotates q and k with its own code)"
        )
    rotary_dims = {lt: 2 * t.numel() for lt, t in buffers.items()}
    return _Contract(base_model, original, modules, layouts, rotary_dims)


def check_support(model: nn.Module) -> str | None:
    """None when ``patch`` can patch ``model``, else the reason it cannot (what the contract lacks)."""
    try:
        _contract(model)
    except Unsupported as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------------------
# The rotary module put in place of the model's, and the context it hands to attention
# ---------------------------------------------------------------------------------------------
@dataclass
class RopeContext:
    """What the patched rotary module hands each attention layer in place of ``cos`` and ``sin``."""

    positions: torch.Tensor  # (1 or B, T) integer position ids
    params: RopeParams  # the method's numbers for these positions
    backend: str

    def __getitem__(self, index):
        """``ctx[:, t, :]``: the context of some positions (as ``cos[:, t, :]`` selects them); nothing else."""
        if (
            isinstance(index, tuple)
            and len(index) == 3
            and index[0] == slice(None)
            and index[2] == slice(None)
            and self.positions.dim() == 2
        ):
            return dataclasses.replace(self, positions=self.positions[:, index[1]])
        raise TypeError(f"a RopeContext stands for (cos, sin); only ctx[:, positions, :] is defined, not {index!r}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, layout: str = "half", unsqueeze_dim: int = 1):
        """q (B, Hq, T, D), k (B, Hk, T, D) (or (B, T, H, D) with unsqueeze_dim=2) -> rotated (q, k)."""
        if unsqueeze_dim == 2:
            qo, ko = self(q.transpose(1, 2), k.transpose(1, 2), layout)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        params = self.params
        if layout.endswith("-"):  # the module rotates by -angle (e.g. NanoChat's rotate_half)
            layout, params = layout[:-1], dataclasses.replace(params, inv_freq=-params.inv_freq)
        positions = self.positions
        if positions.dim() == 2 and positions.shape[0] == 1 and q.shape[0] != 1:
            positions = positions[0]
        rotary_dim = params.rotary_dim
        qo, ko = apply_rope_params(
            q, k, positions, params, layout="interleaved" if layout == "deinterleave" else layout, backend=self.backend
        )
        if layout == "deinterleave":  # interleaved pairs in, halves out (DeepSeek MLA)
            qo, ko = (
                torch.cat((x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2], x[..., rotary_dim:]), -1) for x in (qo, ko)
            )
        return qo, ko


class RopekitRotary(nn.Module):
    """Replacement for ``<Family>RotaryEmbedding``: forward(x, position_ids[, layer_type]) -> (ctx, ctx).

    ``methods`` maps a layer type (None: every layer) to its ropekit method; a layer type mapped to None
    is handed to the model's own rotary module. Holds no float buffers, so ``model.to(torch.bfloat16)``
    cannot degrade the frequencies; the float64 tables are cached per device (and per length for
    dynamic NTK and LongRoPE). ``inv_freq``, ``attention_scaling``, ``rope_type`` and ``config`` read like
    transformers' own module (for code that inspects it).

    It is not built from a ``config`` and its forward never returns ``(cos, sin)`` tables, on purpose: code
    that would rotate with tables (a caller of ``rotary_emb``, a hub kernel behind the ``(q, k, cos, sin)``
    signature) gets a context that fails loudly rather than float32 tables that bypass ropekit's angles,
    and xPos (q scaled by zeta^m, k by zeta^-m) has no single table at all. transformers'
    ``test_model_rope_scaling_frequencies``, which builds the rotary class from a config and reads its
    tables, therefore skips on a patched model; it tests transformers' own module, which ``native``
    reproduces (tests/test_hf.py, tests/test_families.py).
    """

    def __init__(
        self,
        methods: dict[str | None, _methods.RopeMethod | None],
        rotary_dims: dict[str | None, int],
        original: nn.Module,
        backend: str = "auto",
        layer_of_cache: list[str] | None = None,
        cache_layout: str = "half",
    ):
        super().__init__()
        self.methods = dict(methods)
        self.rotary_dims = dict(rotary_dims)
        self.backend = backend
        self.config = getattr(original, "config", None)
        self._original = [original]  # a list so the HF module is not registered as a child (state_dict unchanged)
        self._layer_of_cache = layer_of_cache  # layer type of each cache layer (per-layer-type models)
        self._cache_layout = cache_layout  # the pair layout of the cached keys ("-": rotated by -angle)
        self._params: dict[tuple, RopeParams] = {}
        self._cache = None  # the KV cache of the forward in flight (set by the model pre-hook)
        self._pending: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- what transformers' own rotary module exposes ------------------------------------------------
    @property
    def method(self) -> _methods.RopeMethod:
        """The method (of the full-attention layers when there is one per layer type)."""
        found = {lt: m for lt, m in self.methods.items() if m is not None}
        if None in found:
            return found[None]
        return found.get("full_attention", next(iter(found.values())))

    @property
    def rotary_dim(self) -> int:
        lt = next((lt for lt, m in self.methods.items() if m is self.method), None)
        return self.rotary_dims[lt]

    @property
    def inv_freq(self) -> torch.Tensor:
        """float32 (R/2,) frequencies at the original length, like transformers' ``inv_freq`` buffer."""
        return self.method.inv_freq(self.rotary_dim)

    @property
    def attention_scaling(self) -> float:
        return self.method.attention_factor

    @property
    def rope_type(self):
        if list(self.methods) == [None]:
            return self.method.hf_type or "default"
        return {lt: (m.hf_type if m is not None else self._original[0].rope_type[lt]) for lt, m in self.methods.items()}

    @property
    def layer_types(self):
        return getattr(self._original[0], "layer_types", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            methods = self.__dict__.get("methods", {})
            for suffix, attr in (("_inv_freq", "inv_freq"), ("_attention_scaling", "attention_factor")):
                lt = name[: -len(suffix)] if name.endswith(suffix) else None
                if lt is not None and lt in methods:
                    if methods[lt] is None:
                        return getattr(self._original[0], name)
                    m = methods[lt]
                    return m.inv_freq(self.rotary_dims[lt]) if attr == "inv_freq" else m.attention_factor
            raise

    def extra_repr(self) -> str:
        methods = {lt: str(m) if m is not None else "model's own" for lt, m in self.methods.items()}
        shown = methods[None] if list(methods) == [None] else methods
        return f"method={shown}, rotary_dims={self.rotary_dims}, backend={self.backend}"

    def params(self, positions: torch.Tensor, seq_len: int | None, layer_type: str | None = None) -> RopeParams:
        key = (positions.device, seq_len, layer_type)
        if key not in self._params:
            if len(self._params) >= 16:  # dynamic NTK makes one entry per length: keep the cache small
                self._params.clear()
            self._params[key] = rope_params(self.methods[layer_type], self.rotary_dims[layer_type], positions, seq_len)
        return self._params[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, layer_type=None, *args, **kwargs):
        if layer_type not in self.methods or self.methods[layer_type] is None:
            if layer_type is None:
                return self._original[0](x, position_ids, *args, **kwargs)
            return self._original[0](x, position_ids, layer_type, *args, **kwargs)
        method = self.methods[layer_type]
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        seq_len = None
        if method.needs_seq_len:
            seq_len = int(position_ids.max().item()) + 1
        params = self.params(position_ids, seq_len, layer_type)
        if method.needs_seq_len:
            self._rerotate_cache(params.inv_freq, layer_type)
            self._pending[layer_type] = (position_ids, params.inv_freq)
        ctx = RopeContext(position_ids, params, self.backend)
        return ctx, ctx

    # -- length-dependent frequencies and the KV cache ------------------------------------------------
    def _rerotate_cache(self, inv_freq: torch.Tensor, layer_type: str | None) -> None:
        """Rotate cached keys from the frequencies they were stored with to the current ones."""
        cache, record = self._cache, None
        if cache is not None:
            record = self._cache_records.get(cache, {}).get(layer_type)
        if record is None:
            return
        positions, old_inv_freq = record
        if torch.equal(old_inv_freq, inv_freq):
            return
        # Rotations of one pair compose by adding angles: R(m*new) = R(m*(new - old)) R(m*old).
        angles = rope_angles(positions, inv_freq - old_inv_freq)[:, None]  # (B, 1, T, R/2)
        layout, negated = self._cache_layout.rstrip("-"), self._cache_layout.endswith("-")
        cos, sin = torch.cos(angles).float(), torch.sin(-angles if negated else angles).float()
        for keys in _cached_keys(cache, layer_type, self._layer_of_cache):
            t = keys.shape[-2]
            keys.copy_(rotate(keys, cos[..., :t, :], sin[..., :t, :], layout=layout))

    def commit_cache(self, cache) -> None:
        """After a forward: the cache now holds keys at the recorded positions, rotated with ``inv_freq``."""
        pending, self._pending = self._pending, {}
        if not pending or cache is None:
            return
        records = self._cache_records.setdefault(cache, {})
        for layer_type, (position_ids, inv_freq) in pending.items():
            record = records.get(layer_type)
            positions = position_ids if record is None else torch.cat([record[0], position_ids], dim=-1)
            records[layer_type] = (positions, inv_freq)


def cache_kwarg(module) -> str:
    """The keyword a model's (or decoder's) forward takes its KV cache by: ``cache`` since transformers
    5.24 (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def kv_cache_of(output):
    """The KV cache in a forward's output, under either name."""
    return _kv_cache(lambda name: getattr(output, name, None))


def _kv_cache(get):
    """The KV cache a forward's keyword arguments or output hold: ``cache`` since transformers 5.24,
    ``past_key_values`` before (``get``: a name -> value lookup). The old name is read only when the new
    one is absent: transformers warns on reading it."""
    return next((c for c in map(get, ("cache", "past_key_values")) if c is not None), None)


def _cached_keys(cache, layer_type: str | None = None, layer_of_cache: list[str] | None = None) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        layers = list(cache.layers)
    else:
        layers = [type("L", (), {"keys": k})() for k in getattr(cache, "key_cache", [])]
    out = []
    for i, layer in enumerate(layers):
        if layer_type is not None and layer_of_cache is not None and layer_of_cache[i] != layer_type:
            continue
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            out.append(keys)
    return out


# ---------------------------------------------------------------------------------------------
# Module-level apply_rotary_pos_emb* dispatch (reference-counted per modeling module)
# ---------------------------------------------------------------------------------------------
_MODULE_PATCHES: dict[str, dict[str, Any]] = {}  # module name -> {"originals": {name: fn}, "count": n}


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
    fields = ("rope_parameters",) if _V5 else ("rope_scaling", "rope_theta")
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
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        contract = _contract(model)
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
    base_model, original = contract.base_model, contract.original
    previous = rotary_of(base_model)

    requested = parse_layered(method)
    if layer_types is not None:
        if list(requested) != [None]:
            raise ValueError("give the layer types either in the spec ('...@full_attention') or as layer_types=")
        requested = {_layer_type_name(lt): requested[None] for lt in layer_types}

    snapshot = _snapshot_config(config)
    # Resolve against the model as it was before any ropekit patch (patching over a patch replaces it).
    first = base_model._ropekit_first_snapshot if isinstance(previous, RopekitRotary) else snapshot
    own = _layered_of_snapshot(first, config)
    if list(own) != [None]:  # rope parameters of a layer type no layer of this model has are not in use
        own = {lt: p for lt, p in own.items() if lt in contract.rotary_dims}
    if set(own) != set(contract.rotary_dims):
        raise Unsupported(
            f"ropekit.patch cannot patch model_type {model_type!r}: its rope parameters name layer types "
            f"{sorted(map(str, own))} but its rotary module holds {sorted(map(str, contract.rotary_dims))}"
        )
    old_max = int(first["max_position_embeddings"])
    resolved, target = _resolve_methods(requested, own, old_max, max_position_embeddings)
    # validate every method before anything changes, on CPU in float64 (also under a meta default device)
    with torch.device("cpu"):
        for lt, m in resolved.items():
            if m is None:
                continue
            inv = m.inv_freq64(contract.rotary_dims[lt])
            if not torch.isfinite(inv).all():
                raise ValueError(f"{m} gives non-finite frequencies for rotary_dim={contract.rotary_dims[lt]}")

    if not isinstance(previous, RopekitRotary):
        base_model._ropekit_first_snapshot = snapshot
    is_native = all(isinstance(m, _methods.Native) for m in requested.values())
    if not is_native:
        for lt, m in resolved.items():
            if m is None or (isinstance(requested.get(lt, requested.get(None)), _methods.Native)):
                continue
            old_params = own[lt]
            new_params = m.to_hf(contract.rotary_dims[lt])
            if "partial_rotary_factor" in old_params and old_params.get("rope_type") != "proportional":
                new_params.setdefault("partial_rotary_factor", old_params["partial_rotary_factor"])
            if not _V5:
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

    layer_of_cache = getattr(config, "layer_types", None) if list(resolved) != [None] else None
    # Keys enter the cache after apply_rotary_pos_emb: in its output layout (DeepSeek's MLA puts out halves).
    cache_layouts = {lay.replace("deinterleave", "half") for lay in contract.layouts.values()}
    if any(m is not None and m.needs_seq_len for m in resolved.values()) and len(cache_layouts) > 1:
        raise Unsupported(f"ropekit.patch cannot patch model_type {model_type!r} with a length-dependent method: "
                          f"its cached keys come in several layouts {sorted(cache_layouts)}")  # fmt: skip
    rotary = RopekitRotary(resolved, contract.rotary_dims, original, backend=backend, layer_of_cache=layer_of_cache,
                           cache_layout=next(iter(cache_layouts)))  # fmt: skip
    hooks = []
    if any(m is not None and m.needs_seq_len for m in resolved.values()):

        def pre_hook(mod, args, kwargs):
            if rotary_of(mod) is rotary:
                rotary._cache = _kv_cache(kwargs.get)

        def post_hook(mod, args, kwargs, output):
            if rotary_of(mod) is rotary:
                rotary.commit_cache(kv_cache_of(output))
                rotary._cache = None

        hooks.append(base_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(base_model.register_forward_hook(post_hook, with_kwargs=True))
    _set_rotary(base_model, rotary)
    _install_all(contract.modules, contract.layouts)
    shown = resolved[None] if list(resolved) == [None] else format_layered({k: v for k, v in resolved.items() if v})
    return PatchHandle(model, base_model, rotary, previous, contract.modules, snapshot, hooks, shown)


def _layered_of_snapshot(snap: dict[str, Any], config) -> dict[str | None, dict[str, Any]]:
    """Per-layer-type rope parameters as they were in a config snapshot."""
    if _V5:
        fake = type("Snap", (), {})()
        fake.rope_parameters = snap["rope_parameters"] or None
        fake.default_theta = getattr(config, "default_theta", 10_000.0)
        return get_layered_rope_parameters(fake)
    scaling = snap["rope_scaling"] or None
    theta = snap["rope_theta"] or None
    return {None: _flat(scaling, float(theta if theta is not None else 10_000.0))}


def describe(model: nn.Module) -> dict[str, Any]:
    """What the model's RoPE is now: method spec, rotary dim, effective inv_freq (float32) and scale."""
    base_model = _decoder(model)
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
