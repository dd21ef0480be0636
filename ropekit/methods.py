"""RoPE variants as frozen dataclasses: the numbers each method is made of.

A method maps plain numbers (head_dim, base, factor, original length) to the per-pair
inverse frequencies ``inv_freq`` (the angle of pair ``j`` at position ``m`` is ``m * inv_freq[j]``),
an attention factor that multiplies both q and k (YaRN), and for xPos a per-pair decay rate.
It never sees a model config: the Hugging Face mapping works on plain ``rope_parameters`` dicts
(``to_hf`` / ``from_hf``) and ``ropekit.hf`` applies them to config objects.

Formulas (Xiong et al. 2023 and the methods after it; see the method table in docs/choosing.md):

- RoPE (Su et al. 2021):       theta_j = b^(-2j/d)
- ABF (Xiong et al. 2023):     RoPE with a larger base b' (paper: 10,000 -> 500,000)
- PI (Chen et al. 2023):       theta_j / s
- NTK-aware (bloc97):          base b * s^(d/(d-2))
- dynamic NTK (emozilla):      base b * (s*l/L - (s-1))^(d/(d-2)) at current length l > L
- YaRN (Peng et al. 2023):     ramp between theta_j/s and theta_j over r = L / lambda_j in [beta_slow, beta_fast],
                               attention factor 0.1 ln s + 1 applied to q and k
- Llama 3 (Meta 2024):         wavelength bands: keep / divide by s / smooth blend
- xPos (Sun et al. 2022):      RoPE, q scaled by zeta_j^(n/B), k by zeta_j^(-n/B), zeta_j = (2j/d + gamma)/(1 + gamma)
- LongRoPE (Ding et al. 2024): theta_j / f_j with per-pair factors f (``short_factor`` up to the original
                               length L, ``long_factor`` beyond it), attention factor sqrt(1 + ln s / ln L)
- proportional (Gemma 4):      RoPE on the first p*d/2 pairs (exponent over the whole head), zero frequency
                               (no rotation) on the rest, all divided by ``factor``

Spec strings name a method everywhere (CLI, configs, result rows): ``name:key=value,key=value``,
e.g. ``pi:factor=8`` or ``yarn:factor=8,original_max_position_embeddings=4096``; list values (LongRoPE's
per-pair factors) join their items with ``/``: ``longrope:short_factor=1/1/1.5/2,long_factor=...``.
``native`` names the model's own configured method (resolved by ``ropekit.hf.patch``).
``parse(spec)`` returns the method; ``str(method)`` gives the spec back.

Each class names its Hugging Face ``rope_type`` (``hf_type``) and maps both ways (``to_hf`` /
``from_hf``); ``HF_TYPES`` is the reverse registry, so a new method is one class and one registry entry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ropekit.typed import parse_typed

__all__ = [
    "ABF",
    "PI",
    "NTK",
    "XPOS_MAX_EXPONENT",
    "DynamicNTK",
    "Llama3",
    "LongRoPE",
    "Native",
    "Proportional",
    "RopeMethod",
    "Rope",
    "XPos",
    "YaRN",
    "METHODS",
    "HF_TYPES",
    "from_hf",
    "parse",
]

# xPos exponents (n - center) * ln(zeta_j) / B are clamped to this magnitude, so that the q and k
# scales e^(+-80) ~ 5.5e34 stay well inside float32/bfloat16 range (3.4e38) with room for the
# activations they multiply. Positions within 80 * B / |ln zeta_0| of the center are exact
# (about 32,700 tokens either side for gamma = 0.4, B = 512).
XPOS_MAX_EXPONENT = 80.0


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer (rotary pairs), got {head_dim!r}")


def _rope_inv_freq64(base: float, head_dim: int) -> torch.Tensor:
    """theta_j = base^(-2j/d) for j = 0 .. d/2-1, in float64.  -> (d/2,)"""
    _check_head_dim(head_dim)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return base ** (-exponent)


MAX_HEAD_DIM = 1024  # the largest rotary dimension ropekit accepts on its command line (models use <= 512)


def _finite_frequencies(inv_freq64):
    """``inv_freq64`` that raises a one-line ValueError where the numbers overflow or come out non-finite
    (e.g. ``ntk:factor=1e300``), rather than an OverflowError or ZeroDivisionError from deep inside."""

    @functools.wraps(inv_freq64)
    def checked(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        try:
            out = inv_freq64(self, head_dim, seq_len)
        except (OverflowError, ZeroDivisionError) as err:
            raise ValueError(f"{self} gives no finite frequencies at rotary dim {head_dim}: {err}") from None
        if not torch.compiler.is_compiling() and not torch.isfinite(out).all():  # no data-dependent branch in a graph
            raise ValueError(f"{self} gives non-finite frequencies for rotary_dim={head_dim}")
        return out

    return checked


@dataclass(frozen=True)
class RopeMethod:
    """Base class: plain RoPE frequencies at ``base``; subclasses change the frequencies or the scales.

    ``base`` is the model's original rope_theta; ``None`` means "take it from the model when patched"
    (``resolve``). ABF's ``base`` is the new, larger one.
    """

    name: ClassVar[str] = ""
    hf_type: ClassVar[str | None] = None  # Hugging Face ``rope_type``; None = no native type
    needs_seq_len: ClassVar[bool] = False  # frequencies depend on the current length (dynamic NTK)
    always_shown: ClassVar[tuple[str, ...]] = ("base", "factor", "scale_base")  # printed even at default

    base: float | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "inv_freq64" in cls.__dict__:  # every method's frequencies are checked where they are made
            cls.inv_freq64 = _finite_frequencies(cls.__dict__["inv_freq64"])

    # -- validation -------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{self.name}: '{f.name}' must be true or false, got {value!r}")
                continue
            if "tuple" in f.type:
                if not isinstance(value, tuple) or not value:
                    raise ValueError(f"{self.name}: '{f.name}' must be a non-empty list of numbers, got {value!r}")
                for item in value:
                    if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                        raise ValueError(f"{self.name}: '{f.name}' items must be finite numbers, got {item!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name}: '{f.name}' must be a finite number, got {value!r}")
            if "int" in f.type and "float" not in f.type and not float(value).is_integer():
                raise ValueError(f"{self.name}: '{f.name}' must be an integer, got {value!r}")
        if self.base is not None and self.base <= 0:
            raise ValueError(f"{self.name}: 'base' must be > 0, got {self.base!r}")
        self._validate()

    def _validate(self) -> None:
        """Per-method checks; raise ValueError naming the key and the accepted range."""

    def _require_factor(self, factor: float) -> None:
        if factor < 1:
            raise ValueError(f"{self.name}: 'factor' must be >= 1 (the context extension ratio), got {factor!r}")

    # -- spec strings -----------------------------------------------------------------------
    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (value == f.default and f.name not in self.always_shown):
                continue
            parts.append(f"{f.name}={_format_value(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def keys(cls) -> list[str]:
        return list(_field_types(cls))

    # -- resolution against a model ----------------------------------------------------------
    def resolve(self, *, base: float, max_position_embeddings: int | None = None) -> RopeMethod:
        """Fill what was left to the model: the original ``base`` (rope_theta), and method-specific lengths."""
        if self.base is None:
            return dataclasses.replace(self, base=float(base))
        return self

    def _base(self) -> float:
        if self.base is None:
            raise ValueError(
                f"{self.name}: no 'base' given and none taken from a model yet; pass base=... "
                f"(e.g. '{self.name}:base=10000') or patch a model, which supplies its rope_theta"
            )
        return float(self.base)

    # -- the numbers -------------------------------------------------------------------------
    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        """Per-pair inverse frequencies in float64.  -> (head_dim/2,)

        ``head_dim`` is the rotary dimension (``rotary_dim`` when only part of the head rotates).
        ``seq_len`` is the current length; only dynamic NTK uses it.
        """
        return _rope_inv_freq64(self._base(), head_dim)

    def inv_freq(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        """Per-pair inverse frequencies, computed in float64 and returned as float32.  -> (head_dim/2,)"""
        return self.inv_freq64(head_dim, seq_len).to(torch.float32)

    @property
    def attention_factor(self) -> float:
        """Multiplies both q and k after rotation (so q.k by its square); 1.0 except YaRN."""
        return 1.0

    def xpos_rate(self, head_dim: int) -> torch.Tensor | None:
        """xPos only: ln(zeta_j) / scale_base per pair, float64.  -> (head_dim/2,) or None"""
        return None

    @property
    def xpos_center(self) -> int:
        return 0

    def target_length(self, original: int) -> int | None:
        """The context length this method is meant for, given the original one (None: not implied)."""
        return None

    # -- Hugging Face rope_parameters (plain dicts) --------------------------------------------
    def to_hf(self, head_dim: int) -> dict[str, Any]:
        """A Hugging Face ``rope_parameters`` dict giving the same frequencies (v5 form)."""
        return {"rope_type": "default", "rope_theta": self._base()}

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeMethod:
        """The method of a Hugging Face ``rope_parameters`` dict of this class's ``hf_type``.

        The default reads ``rope_theta`` and every dataclass field present in ``params`` (HF key = field name).
        """
        kwargs: dict[str, Any] = {"base": _theta(params)}
        for f in dataclasses.fields(cls):
            if f.name != "base" and params.get(f.name) is not None:
                kwargs[f.name] = _from_hf_value(cls, f.name, params[f.name])
        return cls(**kwargs)


RopeMethod.inv_freq64 = _finite_frequencies(RopeMethod.inv_freq64)


@dataclass(frozen=True)
class Rope(RopeMethod):
    """Plain RoPE at the model's base (Su et al. 2021). Patching with it changes nothing."""

    name: ClassVar[str] = "rope"
    hf_type: ClassVar[str | None] = "default"


@dataclass(frozen=True)
class ABF(RopeMethod):
    """Adjusted base frequency (Xiong et al. 2023): RoPE with a larger base, by default 500,000."""

    name: ClassVar[str] = "abf"
    hf_type: ClassVar[str | None] = "default"

    base: float | None = 500_000.0

    def resolve(self, *, base: float, max_position_embeddings: int | None = None) -> RopeMethod:
        return self  # ABF's base is the new base, never the model's

    def _validate(self) -> None:
        if self.base is None:
            raise ValueError("abf: 'base' (the new rope_theta) is required, e.g. 'abf:base=500000'")


@dataclass(frozen=True)
class PI(RopeMethod):
    """Position interpolation (Chen et al. 2023): positions scaled by 1/factor, i.e. theta_j / factor."""

    name: ClassVar[str] = "pi"
    hf_type: ClassVar[str | None] = "linear"

    factor: float = 1.0

    def _validate(self) -> None:
        self._require_factor(self.factor)

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        return _rope_inv_freq64(self._base(), head_dim) / self.factor

    def target_length(self, original: int) -> int | None:
        return int(round(original * self.factor))

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        return {"rope_type": "linear", "rope_theta": self._base(), "factor": float(self.factor)}


@dataclass(frozen=True)
class NTK(RopeMethod):
    """NTK-aware scaling (bloc97): the base grows to base * factor^(d/(d-2)); positions unchanged."""

    name: ClassVar[str] = "ntk"
    hf_type: ClassVar[str | None] = "default"

    factor: float = 1.0

    def _validate(self) -> None:
        self._require_factor(self.factor)

    def scaled_base(self, head_dim: int) -> float:
        _check_head_dim(head_dim)
        if head_dim <= 2:
            raise ValueError(f"ntk: head_dim must be > 2 for d/(d-2), got {head_dim}")
        return self._base() * self.factor ** (head_dim / (head_dim - 2))

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        return _rope_inv_freq64(self.scaled_base(head_dim), head_dim)

    def target_length(self, original: int) -> int | None:
        return int(round(original * self.factor))

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.scaled_base(head_dim)}


@dataclass(frozen=True)
class DynamicNTK(RopeMethod):
    """Dynamic NTK (emozilla): at current length l > L, base * (factor*l/L - (factor-1))^(d/(d-2)).

    ``original_max_position_embeddings`` (L) defaults to the model's max_position_embeddings at patch time.
    Frequencies change with the length, so a KV cache must be re-rotated when they do (``ropekit.hf`` does).
    """

    name: ClassVar[str] = "dynamic"
    hf_type: ClassVar[str | None] = "dynamic"
    needs_seq_len: ClassVar[bool] = True

    factor: float = 1.0
    original_max_position_embeddings: int | None = None

    def _validate(self) -> None:
        self._require_factor(self.factor)
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings <= 0:
            value = self.original_max_position_embeddings
            raise ValueError(f"dynamic: 'original_max_position_embeddings' must be > 0, got {value!r}")

    def resolve(self, *, base: float, max_position_embeddings: int | None = None) -> RopeMethod:
        m = super().resolve(base=base)
        if m.original_max_position_embeddings is None and max_position_embeddings is not None:
            m = dataclasses.replace(m, original_max_position_embeddings=int(max_position_embeddings))
        return m

    def base_at(self, head_dim: int, seq_len: int | None) -> float:
        original = self.original_max_position_embeddings
        if original is None:
            raise ValueError(
                "dynamic: 'original_max_position_embeddings' is unknown; pass it in the spec or patch a model"
            )
        _check_head_dim(head_dim)
        if head_dim <= 2:
            raise ValueError(f"dynamic: head_dim must be > 2 for d/(d-2), got {head_dim}")
        length = max(int(seq_len if seq_len is not None else original), original)
        return self._base() * (self.factor * length / original - (self.factor - 1)) ** (head_dim / (head_dim - 2))

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        return _rope_inv_freq64(self.base_at(head_dim, seq_len), head_dim)

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        return {"rope_type": "dynamic", "rope_theta": self._base(), "factor": float(self.factor)}

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeMethod:
        # HF's dynamic type takes its original length from max_position_embeddings (resolved at patch time)
        return cls(base=_theta(params), factor=float(params["factor"]))


@dataclass(frozen=True)
class YaRN(RopeMethod):
    """YaRN (Peng et al. 2023): per-pair blend of interpolation and extrapolation, plus attention temperature.

    Pair j has r_j = L / lambda_j rotations over the original length L. Pairs with r below
    ``beta_slow`` are interpolated (theta_j / factor), pairs above ``beta_fast`` kept, a linear ramp
    between (computed in dimension space, as Hugging Face does; ``truncate`` floors/ceils the bounds).
    q and k are both multiplied by ``attention_factor`` (default 0.1 ln(factor) + 1).
    """

    name: ClassVar[str] = "yarn"
    hf_type: ClassVar[str | None] = "yarn"

    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # attention_factor override: if set, used as is
    truncate: bool = True

    def _validate(self) -> None:
        self._require_factor(self.factor)
        if self.original_max_position_embeddings is None:
            raise ValueError(
                "yarn: 'original_max_position_embeddings' is required (the pretraining length), "
                "e.g. 'yarn:factor=8,original_max_position_embeddings=4096'"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"yarn: 'original_max_position_embeddings' must be > 0, got {self.original_max_position_embeddings!r}"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"yarn: need beta_fast > beta_slow > 0, got beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}"
            )
        if self.mscale is not None and self.mscale <= 0:
            raise ValueError(f"yarn: 'mscale' (attention factor) must be > 0, got {self.mscale!r}")

    def ramp(self, head_dim: int) -> torch.Tensor:
        """Extrapolation weight per pair in [0, 1] (1 = keep theta_j, 0 = theta_j / factor), float64."""
        _check_head_dim(head_dim)
        base, original = self._base(), self.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # avoid 0/0, as Hugging Face does
        linear = (torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)
        return 1.0 - linear.clamp(0.0, 1.0)

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        theta = _rope_inv_freq64(self._base(), head_dim)
        keep = self.ramp(head_dim)
        return theta / self.factor * (1 - keep) + theta * keep

    @property
    def attention_factor(self) -> float:
        if self.mscale is not None:
            return float(self.mscale)
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def target_length(self, original: int) -> int | None:
        return int(round(self.original_max_position_embeddings * self.factor))

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        out = {
            "rope_type": "yarn",
            "rope_theta": self._base(),
            "factor": float(self.factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
            "beta_fast": float(self.beta_fast),
            "beta_slow": float(self.beta_slow),
            "truncate": bool(self.truncate),
        }
        if self.mscale is not None:
            out["attention_factor"] = float(self.mscale)
        return out

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeMethod:
        factor = float(params["factor"])
        kw: dict[str, Any] = {
            "base": _theta(params),
            "factor": factor,
            "original_max_position_embeddings": int(params["original_max_position_embeddings"]),
        }
        for key in ("beta_fast", "beta_slow"):
            if params.get(key):  # HF: `get(key) or default`
                kw[key] = float(params[key])
        if params.get("truncate") is not None:
            kw["truncate"] = bool(params["truncate"])
        if params.get("attention_factor") is not None:
            kw["mscale"] = float(params["attention_factor"])
        elif params.get("mscale") and params.get("mscale_all_dim"):
            # DeepSeek form: the attention factor is a ratio of two YaRN mscales (as transformers computes it)
            def get_mscale(scale: float, m: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            kw["mscale"] = get_mscale(factor, float(params["mscale"])) / get_mscale(
                factor, float(params["mscale_all_dim"])
            )
        return cls(**kw)


@dataclass(frozen=True)
class Llama3(RopeMethod):
    """Llama 3.1 scaling: pairs with wavelength < L/high_freq_factor kept, > L/low_freq_factor divided
    by ``factor``, smooth blend between. Defaults are Meta's (8, 1, 4, 8192)."""

    name: ClassVar[str] = "llama3"
    hf_type: ClassVar[str | None] = "llama3"

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def _validate(self) -> None:
        self._require_factor(self.factor)
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "llama3: need high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor!r}, low_freq_factor={self.low_freq_factor!r}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"llama3: 'original_max_position_embeddings' must be > 0, got {self.original_max_position_embeddings!r}"
            )

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        theta = _rope_inv_freq64(self._base(), head_dim)
        original = self.original_max_position_embeddings
        wavelen = 2 * math.pi / theta
        low_wavelen = original / self.low_freq_factor  # longer than this: fully interpolated
        high_wavelen = original / self.high_freq_factor  # shorter than this: kept
        smooth = (original / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * theta / self.factor + smooth * theta
        out = torch.where(wavelen > low_wavelen, theta / self.factor, theta)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, out)

    def target_length(self, original: int) -> int | None:
        return int(round(self.original_max_position_embeddings * self.factor))

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        return {
            "rope_type": "llama3",
            "rope_theta": self._base(),
            "factor": float(self.factor),
            "low_freq_factor": float(self.low_freq_factor),
            "high_freq_factor": float(self.high_freq_factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
        }


@dataclass(frozen=True)
class XPos(RopeMethod):
    """xPos (Sun et al. 2022): RoPE rotation, q scaled by zeta_j^((n-c)/B), k by zeta_j^(-(n-c)/B).

    zeta_j = (2j/d + gamma) / (1 + gamma) < 1, so the score of pair j carries zeta_j^((n-m)/B): decay
    with distance. The center c cancels in q.k; it only sets where the scales are 1. The exponents are
    clamped to +-XPOS_MAX_EXPONENT (no overflow at any position); results are exact while every
    position lies within 80*B/|ln zeta_0| of c. ``center`` defaults to half the target length when a
    model is patched (0 otherwise). No Hugging Face rope type exists: configs carry it under ``ropekit``.
    The paper's "xPos ABF" is ``xpos:base=500000``.
    """

    name: ClassVar[str] = "xpos"
    hf_type: ClassVar[str | None] = None

    scale_base: float = 512.0
    gamma: float = 0.4
    center: int | None = None

    def _validate(self) -> None:
        if self.scale_base <= 0:
            raise ValueError(f"xpos: 'scale_base' must be > 0, got {self.scale_base!r}")
        if self.gamma <= 0:
            raise ValueError(f"xpos: 'gamma' must be > 0, got {self.gamma!r}")
        if self.center is not None and self.center < 0:
            raise ValueError(f"xpos: 'center' must be >= 0, got {self.center!r}")

    def resolve(self, *, base: float, max_position_embeddings: int | None = None) -> RopeMethod:
        m = super().resolve(base=base)
        if m.center is None and max_position_embeddings is not None:
            m = dataclasses.replace(m, center=int(max_position_embeddings) // 2)
        return m

    def zeta(self, head_dim: int) -> torch.Tensor:
        """zeta_j = (2j/d + gamma) / (1 + gamma), float64.  -> (head_dim/2,)"""
        _check_head_dim(head_dim)
        return (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim + self.gamma) / (1 + self.gamma)

    def xpos_rate(self, head_dim: int) -> torch.Tensor | None:
        return torch.log(self.zeta(head_dim)) / self.scale_base

    @property
    def xpos_center(self) -> int:
        return int(self.center or 0)

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        # Hugging Face can hold only the rotation; ropekit.load_model re-applies the scaling.
        return {"rope_type": "default", "rope_theta": self._base()}


@dataclass(frozen=True)
class LongRoPE(RopeMethod):
    """LongRoPE (Ding et al. 2024; Phi-3): theta_j / f_j with searched per-pair factors f.

    ``short_factor`` applies while the sequence is at most ``original_max_position_embeddings`` (L) long,
    ``long_factor`` beyond it (switched for the whole sequence by its largest position, as transformers
    does). q and k are multiplied by ``attention_factor``, by default sqrt(1 + ln(factor) / ln(L)) where
    ``factor`` defaults to max_position_embeddings / L at patch time. Spec lists join items with ``/``.
    """

    name: ClassVar[str] = "longrope"
    hf_type: ClassVar[str | None] = "longrope"
    needs_seq_len: ClassVar[bool] = True

    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None
    factor: float | None = None
    mscale: float | None = None  # attention_factor override (HF "attention_factor"): if set, used as is

    def _validate(self) -> None:
        if self.short_factor is None or self.long_factor is None or self.original_max_position_embeddings is None:
            raise ValueError(
                "longrope: 'short_factor', 'long_factor' (one factor per rotary pair, joined by '/') and "
                "'original_max_position_embeddings' are required, e.g. "
                "'longrope:short_factor=1/1/1/1,long_factor=1/2/4/8,original_max_position_embeddings=4096'"
            )
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                f"longrope: 'short_factor' ({len(self.short_factor)} items) and 'long_factor' "
                f"({len(self.long_factor)} items) must have one item per rotary pair each"
            )
        if min(self.short_factor) <= 0 or min(self.long_factor) <= 0:
            raise ValueError("longrope: 'short_factor' and 'long_factor' items must be > 0")
        if self.original_max_position_embeddings <= 0:
            value = self.original_max_position_embeddings
            raise ValueError(f"longrope: 'original_max_position_embeddings' must be > 0, got {value!r}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"longrope: 'factor' must be > 0, got {self.factor!r}")
        if self.mscale is not None and self.mscale <= 0:
            raise ValueError(f"longrope: 'mscale' must be > 0, got {self.mscale!r}")

    def resolve(self, *, base: float, max_position_embeddings: int | None = None) -> RopeMethod:
        m = super().resolve(base=base)
        if m.factor is None and max_position_embeddings is not None:
            m = dataclasses.replace(m, factor=max_position_embeddings / m.original_max_position_embeddings)
        return m

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        _check_head_dim(head_dim)
        long = seq_len is not None and seq_len > self.original_max_position_embeddings
        factors = self.long_factor if long else self.short_factor
        if len(factors) != head_dim // 2:
            raise ValueError(
                f"longrope: {len(factors)} factors given for rotary dim {head_dim} ({head_dim // 2} pairs needed)"
            )
        return _rope_inv_freq64(self._base(), head_dim) / torch.tensor(factors, dtype=torch.float64)

    @property
    def attention_factor(self) -> float:
        if self.mscale is not None:
            return float(self.mscale)
        factor = self.factor if self.factor is not None else 1.0
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    def target_length(self, original: int) -> int | None:
        if self.factor is None:
            return None
        return int(round(self.original_max_position_embeddings * self.factor))

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rope_type": "longrope",
            "rope_theta": self._base(),
            "short_factor": [float(f) for f in self.short_factor],
            "long_factor": [float(f) for f in self.long_factor],
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
        }
        if self.factor is not None:
            out["factor"] = float(self.factor)
        if self.mscale is not None:
            out["attention_factor"] = float(self.mscale)
        return out

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeMethod:
        return cls(
            base=_theta(params),
            short_factor=tuple(float(f) for f in params["short_factor"]),
            long_factor=tuple(float(f) for f in params["long_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            factor=None if params.get("factor") is None else float(params["factor"]),
            mscale=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        )


@dataclass(frozen=True)
class Proportional(RopeMethod):
    """Proportional RoPE (Gemma 4 full-attention layers): RoPE on the first int(p * d / 2) pairs with the
    exponent taken over the whole head (base^(-2j/d)), zero frequency (no rotation) on the other pairs,
    every frequency divided by ``factor``. ``partial_rotary_factor`` is p; the head is not truncated."""

    name: ClassVar[str] = "proportional"
    hf_type: ClassVar[str | None] = "proportional"

    factor: float = 1.0
    partial_rotary_factor: float = 1.0

    def _validate(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"proportional: 'factor' must be > 0, got {self.factor!r}")
        if not 0 <= self.partial_rotary_factor <= 1:
            raise ValueError(
                f"proportional: 'partial_rotary_factor' must be in [0, 1], got {self.partial_rotary_factor!r}"
            )

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        theta = _rope_inv_freq64(self._base(), head_dim)
        rotated = int(self.partial_rotary_factor * head_dim // 2)
        theta[rotated:] = 0.0
        return theta / self.factor

    def target_length(self, original: int) -> int | None:
        return int(round(original * self.factor)) if self.factor > 1 else None

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        return {
            "rope_type": "proportional",
            "rope_theta": self._base(),
            "factor": float(self.factor),
            "partial_rotary_factor": float(self.partial_rotary_factor),
        }


@dataclass(frozen=True)
class Native(RopeMethod):
    """The model's own configured method (per layer type where it has several), run through ropekit.

    A placeholder: ``ropekit.hf.patch`` replaces it with the method the model's config describes and
    leaves that config as it is. It has no numbers of its own.
    """

    name: ClassVar[str] = "native"
    always_shown: ClassVar[tuple[str, ...]] = ()

    def _validate(self) -> None:
        if self.base is not None:
            raise ValueError("native: takes no keys (it is the model's own method); name a method to change it")

    def inv_freq64(self, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
        raise ValueError("native: the model's own method is known only when a model is patched (ropekit.patch)")

    def to_hf(self, head_dim: int) -> dict[str, Any]:
        raise ValueError("native: the model's own method is known only when a model is patched (ropekit.patch)")


METHODS: dict[str, type[RopeMethod]] = {
    cls.name: cls for cls in (Rope, ABF, PI, NTK, DynamicNTK, YaRN, Llama3, XPos, LongRoPE, Proportional, Native)
}
# Each method's fields and their types, read once here: ``parse`` runs inside ``torch.compile``d code
# (``apply_rope(q, k, pos, "pi:factor=4")``), and TorchDynamo 2.11 cannot trace ``dataclasses.fields`` of a class.
_FIELD_TYPES: dict[str, dict[str, str]] = {
    name: {f.name: str(f.type) for f in dataclasses.fields(cls)} for name, cls in METHODS.items()
}


def _field_types(cls: type[RopeMethod]) -> dict[str, str]:
    """{field name: type annotation} of a method class (a registered one from the table above)."""
    known = _FIELD_TYPES.get(cls.name)
    return known if known is not None else {f.name: str(f.type) for f in dataclasses.fields(cls)}


# Hugging Face rope_type -> the method that reads it (ABF, NTK and xPos write "default" but are read back as
# plain RoPE unless the saved ropekit spec names them).
HF_TYPES: dict[str, type[RopeMethod]] = {
    cls.hf_type: cls for cls in (Rope, PI, DynamicNTK, YaRN, Llama3, LongRoPE, Proportional)
}


def _theta(params: dict[str, Any]) -> float | None:
    theta = params.get("rope_theta")
    return float(theta) if theta is not None else None


def _from_hf_value(method: type[RopeMethod], key: str, value: Any) -> Any:
    ftype = str({f.name: f.type for f in dataclasses.fields(method)}[key])
    if "tuple" in ftype:
        return tuple(float(v) for v in value)
    if "bool" in ftype:
        return bool(value)
    if "int" in ftype and "float" not in ftype:
        return int(value)
    return float(value)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(_format_value(float(v)) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _coerce(method: type[RopeMethod], key: str, text: str) -> Any:
    ftype = _field_types(method)[key]
    try:
        return parse_typed(text, str(ftype))
    except ValueError as err:
        raise ValueError(f"{method.name}: value {text!r} for '{key}': {err}") from None


def parse(spec: str | RopeMethod) -> RopeMethod:
    """Parse a spec string like ``'yarn:factor=8,original_max_position_embeddings=4096'``.

    Raises ValueError naming the bad part (method, key or value) and what is accepted.
    """
    if isinstance(spec, RopeMethod):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a RoPE method spec must be a non-empty string like 'pi:factor=8', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown RoPE method {name!r} in {spec!r}; accepted: {', '.join(METHODS)}")
    cls = METHODS[name]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{name}: malformed item {item!r} in {spec!r}; expected key=value")
        if key not in cls.keys():
            raise ValueError(f"{name}: unknown key {key!r} in {spec!r}; accepted keys: {', '.join(cls.keys())}")
        if key in kwargs:
            raise ValueError(f"{name}: key {key!r} given twice in {spec!r}")
        kwargs[key] = _coerce(cls, key, value.strip())
    return cls(**kwargs)


def from_hf(rope_parameters: dict[str, Any], ropekit_spec: str | None = None) -> RopeMethod:
    """The method a Hugging Face ``rope_parameters`` dict (v5, or a v4 ``rope_scaling`` merged with
    ``rope_theta``) describes. A ``ropekit_spec`` saved beside it wins (it keeps xPos, ABF and NTK names)."""
    if ropekit_spec and ropekit_spec != "native":
        return parse(ropekit_spec)
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in HF_TYPES:
        raise ValueError(f"Hugging Face rope_type {rope_type!r} has no ropekit method; accepted: {', '.join(HF_TYPES)}")
    try:
        return HF_TYPES[rope_type].from_hf(params)
    except KeyError as err:
        raise ValueError(f"Hugging Face rope_type {rope_type!r} parameters lack {err.args[0]!r}: {params}") from None
