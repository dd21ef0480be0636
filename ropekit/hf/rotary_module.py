"""The rotary module ropekit puts in place of the model's (``RopekitRotary``), the context it hands to
attention instead of a cos/sin table (``RopeContext``), and the re-rotation of cached keys when a method's
frequencies change with the length (dynamic NTK, LongRoPE)."""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ropekit import methods as _methods
from ropekit.reference import RopeParams, rope_angles, rotate
from ropekit.rotary import apply_rope_params, rope_params


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
