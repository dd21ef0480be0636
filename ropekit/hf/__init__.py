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

The package's rooms: ``config`` (a method to and from a config), ``support`` (which models, by mechanism),
``rotary_module`` (the rotary module and cache re-rotation), ``patching`` (``patch`` in named steps, undo).
"""

from ropekit.hf.config import (
    LAYER_TYPE_ALIASES,
    MIN_TRANSFORMERS,
    format_layered,
    get_layered_rope_parameters,
    get_rope_parameters,
    head_and_rotary_dim,
    parse_layered,
    read_method,
    read_methods,
    saved_method_conflict,
    set_rope_parameters,
)
from ropekit.hf.patching import PatchHandle, describe, patch
from ropekit.hf.rotary_module import RopeContext, RopekitRotary, cache_kwarg, kv_cache_of
from ropekit.hf.support import Unsupported, check_support, decoder_of, rotary_of

__all__ = [
    "patch",
    "PatchHandle",
    "describe",
    "check_support",
    "Unsupported",
    "decoder_of",
    "rotary_of",
    "RopeContext",
    "RopekitRotary",
    "cache_kwarg",
    "kv_cache_of",
    "parse_layered",
    "format_layered",
    "read_method",
    "read_methods",
    "saved_method_conflict",
    "get_rope_parameters",
    "get_layered_rope_parameters",
    "set_rope_parameters",
    "head_and_rotary_dim",
    "MIN_TRANSFORMERS",
    "LAYER_TYPE_ALIASES",
]
