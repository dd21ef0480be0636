"""One identity test per decoder-only text family transformers ships with RoPE, and the support table.

The families are enumerated from transformers itself (causal-LM model types whose config carries RoPE
parameters, multimodal configs left out), so a new transformers release brings its new families here
without an edit. For each family a tiny random model is built from its config class (``tiny_family_config``)
and patched with ``native`` (the model's own method, run through ropekit). The patched model must give
the unpatched model's logits, and the same 8 greedy tokens with the KV cache (with the logits of every
step), within float32 tolerance. A family the patch refuses must be refused cleanly: a ``ValueError``
that names what the rotary contract lacks, raised before anything changes.

The run writes the support table (family -> exact / refused: reason) that the README links to,
``docs/support.md``; the last test fails when the committed table differs from what the run proved,
or when the README's count line (``transformers X: **N of M families exact**``) does not match it.
Update it with ``ROPEKIT_WRITE_SUPPORT=1 python -m pytest tests/test_families.py``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import ropekit
from ropekit import hf

SUPPORT_TABLE = Path(__file__).resolve().parent.parent / "docs" / "support.md"
README = SUPPORT_TABLE.parent.parent / "README.md"
EPS32 = torch.finfo(torch.float32).eps
# ropekit's angles are float64 products rounded once; transformers' are float32 products, off by up to
# ~T * eps32 rad at position T (T <= 20 here). Through two tiny layers that moves logits of size ~1 by
# well under 2^10 ulps; a wrong frequency, layout or scale moves them by 1e-2 or more.
LOGITS_ATOL = 2**10 * EPS32
PROMPT, NEW_TOKENS, VOCAB = 12, 8, 256


def rope_families() -> list[str]:
    """Causal-LM model types of the installed transformers whose text config has RoPE parameters."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config_class = CONFIG_MAPPING[model_type]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = config_class()
        except Exception:  # noqa: BLE001 - a config that cannot be built by default is not a family we can test
            continue
        subs = set(getattr(config_class, "sub_configs", None) or {})
        if any(word in s for s in subs for word in ("vision", "audio", "speech", "image")):
            continue  # multimodal: its text decoder is listed under its own model type
        if getattr(config, "is_encoder_decoder", False):
            continue
        has_rope = getattr(config, "rope_parameters", None) or getattr(config, "rotary_dim", None)
        if has_rope:
            out.append(model_type)
    return sorted(out)


# Config attribute names that size a model, and their tiny values (set only where the config has them).
TINY_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "n_inner": 128,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "n_positions": 512,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "moe_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "index_topk": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 64,
    "attention_chunk_size": 64,
    "rotary_dim": 8,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "zero_expert_num": 2,
    "n_layer": 2,
}


# Family-specific layout keys the generic sizes above cannot know, so that each family is built tiny
# with attention layers that use RoPE (e.g. the hybrid state-space families put attention in one layer).
_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)  # 8 x 16 = 2 x hidden
# fmt: off
FAMILY_SIZES = {
    "bamba": dict(attn_layer_indices=[1], **_MAMBA),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], position_embedding_type="rope",
                             shared_intermediate_size=32, **_MAMBA),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "dbrx": dict(attn_config={"kv_n_heads": 2, "rope_theta": 10_000.0, "clip_qkv": 8.0}),  # its attention reads both
    "dots3_note_text": dict(per_layer_config={}, head_dim=16),  # head_dim = qk_nope + qk_rope for its SWA layers
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "ergo": dict(first_dense_intermediate_size=32, shared_intermediate_size=32),
    "kolibri1_1": dict(index_num_heads=2, index_pool_size=64, index_compression=4, mlp_only_intermediate_size=32),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16,
                           indexer_compress_ratio=4, linear_key_head_dim=16, linear_value_head_dim=16,
                           linear_num_key_heads=2, linear_num_value_heads=4, hc_lowrank=16, ple_embed_dim=16,
                           ngram_vocab_size_base=256, split_ngram_parts=2),
}
# fmt: on


def _has(config, key: str) -> bool:
    try:
        getattr(config, key)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - e.g. a per-layer attribute that refuses a global read: it exists
        return True
    return True


def _settable(config, key: str) -> bool:
    return _has(config, key) and not isinstance(getattr(type(config), key, None), property)


def _tiny_kwargs(default) -> dict:
    kwargs = {k: v for k, v in TINY_SIZES.items() if _settable(default, k)}
    if "qk_rope_head_dim" in kwargs and "head_dim" in kwargs:
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # MLA: the rotary head is the rope slice
    if "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # MLA expands k to every head
    layer_types = getattr(default, "layer_types", None) if _settable(default, "layer_types") else None
    if layer_types:
        kinds = list(dict.fromkeys(layer_types))
        kwargs["layer_types"] = (kinds * 2)[:2] if len(kinds) < 2 else kinds[:2]
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(default, key, None) if _has(default, key) else None
        if isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1 - ("pad_token_id", "bos_token_id", "eos_token_id").index(key)
    for name in getattr(type(default), "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            for key, value in _tiny_kwargs(sub).items():
                setattr(sub, key, value)
            kwargs[name] = sub
    return kwargs


def tiny_family_config(model_type: str, full_depth: bool = False):
    """The family's default config at toy size: two layers (one of each layer type where there are two).

    A tiny value the family's own validation refuses is dropped (the family keeps its default) and the
    config built again."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {**_tiny_kwargs(config_class()), **FAMILY_SIZES.get(model_type, {})}
        if full_depth:  # hybrid models whose first layers have no attention: keep the family's own layers
            for key in ("num_hidden_layers", "n_layer", "layer_types"):
                kwargs.pop(key, None)
        for _ in range(4):
            try:
                return config_class(**kwargs)
            except Exception as err:  # noqa: BLE001 - retried without the values it names
                message = f"{err} {err.__cause__}"
                named = [k for k in kwargs if k in message] or (["layer_types"] if "layer" in message else [])
                if not named:
                    raise
                for key in named:
                    kwargs.pop(key, None)
        return config_class(**kwargs)


MAX_PARAMETERS = 4_000_000  # a config the generic shrinking cannot make tiny is not built (CI memory and time)


def build(model_type: str, full_depth: bool = False, settings: dict | None = None):
    """The family's tiny model, float32, in eval mode; ``settings``: config values set where the config (or
    its text config) has the key, before the model is built."""
    from transformers import AutoModelForCausalLM

    config = tiny_family_config(model_type, full_depth)
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        for key, value in (settings or {}).items():
            if _settable(part, key):
                setattr(part, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: building a full-size model would exhaust a CI machine
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size / 1e6:.0f}M parameters at the generic tiny sizes")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def greedy(model, prompt):
    """NEW_TOKENS greedy steps with the KV cache: (prompt + tokens, logits of each step (1, NEW_TOKENS, V))."""
    out = model(prompt, use_cache=True)
    if hf.kv_cache_of(out) is None:  # a model that keeps its cache inside (recurrent_gemma)
        run = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
        return run.sequences, torch.stack(run.logits, dim=1)
    cache, name, tokens, steps = hf.kv_cache_of(out), hf.cache_kwarg(model), prompt, []
    for _ in range(NEW_TOKENS):
        logits = out.logits[:, -1:]
        steps.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1)], dim=1)
        out = model(tokens[:, -1:], use_cache=True, **{name: cache})
        cache = hf.kv_cache_of(out)
    return tokens, torch.cat(steps, dim=1)


def _rotary(model):
    decoder = hf.decoder_of(model)
    return hf.rotary_of(decoder) if decoder is not None else None


def check_family(model_type: str) -> str:
    """'exact', or 'refused: <reason>'; raises AssertionError when the patched model differs."""
    prompt = torch.randint(3, VOCAB - 3, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    for full_depth in (False, True):  # two layers first; the family's own depth if those do not run
        try:
            model = build(model_type, full_depth)
            with torch.no_grad():
                want = model(prompt).logits
                want_tokens, want_steps = greedy(model, prompt)
            break
        except Exception as err:  # noqa: BLE001 - recorded in the table with its reason
            failure = f"not built tiny: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    else:
        return failure
    reason = hf.check_support(model)
    if reason is not None:
        config_before = model.config.to_dict()
        rotary_before = _rotary(model)
        with pytest.raises(ValueError, match="ropekit.patch cannot patch") as err:
            ropekit.patch(model, "native")
        assert reason in str(err.value)
        assert model.config.to_dict() == config_before  # refused before anything changed
        assert _rotary(model) is rotary_before
        return f"refused: {reason}"
    with torch.no_grad():
        handle = ropekit.patch(model, "native")
        assert isinstance(_rotary(model), hf.RopekitRotary)
        got = model(prompt).logits
        got_tokens, got_steps = greedy(model, prompt)
    handle.undo()
    scale = 1 + want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL * scale)
    torch.testing.assert_close(got_steps, want_steps, rtol=0, atol=LOGITS_ATOL * scale)
    assert torch.equal(got_tokens, want_tokens)
    return "exact"


FAMILIES = rope_families()
RESULTS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: one thread is ~4x faster than several on a shared 2-core CI machine (no spin-waiting).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_native_patch_is_exact_or_refused_cleanly(model_type):
    RESULTS[model_type] = "inexact"  # overwritten below unless an assertion fails
    RESULTS[model_type] = check_family(model_type)


# Config keys of the transforms families apply after their output head, at values no default has (a cap
# below the tiny models' logits, where tanh is far from linear), so that a family applying one shows it.
POST_HEAD = {"final_logit_softcapping": 0.02, "logits_scaling": 4.0, "logit_scale": 0.25}
# The families' dropout keys, on for the training-mode test (seeded: the model's own forward and the
# trainer's draw the same masks, as both run the same code up to the head).
DROPOUT = dict.fromkeys(("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                         "residual_dropout", "embedding_dropout"), 0.1)  # fmt: skip


def _own_cross_entropy(model_type: str, prompt: torch.Tensor, train: bool = False):
    """The family's tiny model with its post-head transforms on (in training mode its dropout at 0.1 too),
    and the per-token cross-entropy of its own logits (seed 1; differentiable when ``train``)."""
    try:
        try:
            model = build(model_type, settings={**POST_HEAD, **(DROPOUT if train else {})})
        except ValueError:  # a family that refuses dropout (DiffLlama) trains without it
            model = build(model_type, settings=POST_HEAD)
        model.train(train)
        torch.manual_seed(1)
        with torch.set_grad_enabled(train):
            logits = model(input_ids=prompt, position_ids=torch.arange(PROMPT)[None], use_cache=False).logits
    except Exception as err:  # noqa: BLE001 - the support table records why
        pytest.skip(f"{model_type} does not run tiny without a cache: {type(err).__name__}")
    return model, torch.nn.functional.cross_entropy(logits[0, :-1].float(), prompt[0, 1:], reduction="none")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_trainers_loss_and_evaluations_nll_equal_the_models_own_cross_entropy(model_type):
    """``loss_of`` (from the head's input in chunks where ``head_of`` allows, else the full logits) and
    ``token_nll`` against the cross-entropy of the model's own logits, with the family's post-head
    transforms switched on: ``head_input`` reads them from the model's own code, whichever key, config or
    direction the family uses (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies)."""
    from ropekit.eval.perplexity import token_nll
    from ropekit.train import loss_of

    prompt = torch.randint(3, VOCAB - 3, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    model, want = _own_cross_entropy(model_type, prompt)
    atol = 2**7 * EPS32 * float(want.abs().max())  # float32: the same logits, summed in another order
    with torch.no_grad():
        torch.testing.assert_close(token_nll(model, prompt), want, rtol=0, atol=atol)
        got = loss_of(model, prompt, torch.arange(PROMPT)[None], reduction="sum")
    torch.testing.assert_close(got, want.sum(), rtol=0, atol=atol * len(want))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_trainers_gradients_equal_those_of_the_models_own_cross_entropy_in_training(model_type):
    """A training step's loss and every parameter's gradient, ``loss_of`` against the model's own logits,
    in training mode with dropout on and the post-head transforms on: the trainer's backward (the gradient
    its forward forms per chunk, through a soft-cap's derivative) is the model's own. Leaving out the
    soft-cap's derivative fails 8 families here, while the losses still agree."""
    from ropekit.train import loss_of

    prompt = torch.randint(3, VOCAB - 3, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    model, want = _own_cross_entropy(model_type, prompt, train=True)
    want = want.sum()
    want.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    got = loss_of(model, prompt, torch.arange(PROMPT)[None], reduction="sum")
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=2**7 * EPS32 * want.item())
    assert {name for name, p in model.named_parameters() if p.grad is not None} == set(grads)
    # float32 sums in another order, on the scale of the largest gradient (a router's, ~0 by cancellation,
    # carries only that rounding)
    atol = 2**8 * EPS32 * max(float(g.abs().max()) for g in grads.values())
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def support_table(results: dict[str, str]) -> str:
    exact = sorted(f for f, r in results.items() if r == "exact")
    other = sorted(f for f, r in results.items() if r != "exact")
    lines = [
        "# Model families ropekit.patch supports",
        "",
        "Written by `tests/test_families.py` (do not edit by hand): every decoder-only text family of "
        f"transformers {transformers.__version__} with RoPE, built tiny from its config class, patched with "
        "`native`; *exact* means logits and 8 greedy KV-cache steps equal the unpatched model's within "
        "float32 tolerance. Update with `ROPEKIT_WRITE_SUPPORT=1 python -m pytest tests/test_families.py`.",
        "",
        f"**{len(exact)} of {len(results)} families exact** ({100 * len(exact) / max(len(results), 1):.0f}%).",
        "",
        "| family | result |",
        "|---|---|",
    ]
    lines += [f"| {f} | exact |" for f in exact]
    lines += [f"| {f} | {results[f].replace('|', '/')} |" for f in other]
    return "\n".join(lines) + "\n"


def test_support_table_is_what_the_run_proved():
    if set(RESULTS) != set(FAMILIES):
        pytest.skip("the support table is checked only when every family ran (run the whole file)")
    table = support_table(RESULTS)
    if os.environ.get("ROPEKIT_WRITE_SUPPORT"):
        SUPPORT_TABLE.parent.mkdir(parents=True, exist_ok=True)
        SUPPORT_TABLE.write_text(table)
    committed = SUPPORT_TABLE.read_text() if SUPPORT_TABLE.exists() else ""
    if f"transformers {transformers.__version__} " not in committed:
        pytest.skip(f"the committed table is for another transformers version than {transformers.__version__}")
    assert committed == table, (
        "docs/support.md differs from this run; run "
        "`ROPEKIT_WRITE_SUPPORT=1 python -m pytest tests/test_families.py` and commit it"
    )
    exact = sum(r == "exact" for r in RESULTS.values())
    summary = f"transformers {transformers.__version__}: **{exact} of {len(RESULTS)} families exact**"
    assert summary in README.read_text(), f"the README must state what the run proved: {summary!r}"
