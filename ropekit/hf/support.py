"""Which models the patch fits, decided by mechanism: the decoder's rotary module, the modeling module's
module-level ``apply_rotary_pos_emb*`` functions, the channel layout each pairs (read from its source and
confirmed by calling it), and that attention uses ``cos, sin`` for nothing else. ``check_support`` returns
what is missing, or None."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ropekit.hf.rotary_module import RopeContext, RopekitRotary
from ropekit.reference import RopeParams


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
# the dispatchers ``patch`` installed: module name -> {"originals": {name: fn}, "count": n}
_MODULE_PATCHES: dict[str, dict[str, Any]] = {}


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


def decoder_of(model: nn.Module) -> nn.Module | None:
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
    base_model = decoder_of(model)
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
