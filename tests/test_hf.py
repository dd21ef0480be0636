"""The Hugging Face patch: unchanged logits for rope, native logits for HF-native methods, KV-cache
decoding equal to a full forward, save/load round trips, undo, clear errors."""

import copy
import math
import sys
import types
import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import ropekit
from ropekit import hf
from ropekit.models import TINY, load_model

from .conftest import rope_config_kwargs

REQUIRES_V5 = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 5 form (per-layer-type rope parameters, proportional, LongRoPE keys)",
)
ATOL = 5e-5  # float32 logits of a 2-layer model; HF's float32 angles differ from ours by ~1e-6 rad here


def ids(batch=2, length=40, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def native_twin(model):
    """The model transformers builds from the (patched) config, with the same weights."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "ropekit"):
        del config.ropekit
    twin = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("family", list(TINY))
def test_patching_with_rope_leaves_logits_unchanged(family):
    model = load_model(f"tiny:{family}")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        handle = ropekit.patch(model, "rope")
        after = model(x).logits
    assert isinstance(model.model.rotary_emb, hf.RopekitRotary)
    torch.testing.assert_close(after, before, rtol=0, atol=ATOL)
    handle.undo()
    assert not isinstance(model.model.rotary_emb, hf.RopekitRotary)


NATIVE = [
    "abf:base=500000",
    "pi:factor=8",
    "ntk:factor=4",
    "dynamic:factor=4",
    "yarn:factor=8,original_max_position_embeddings=16",
    "llama3:factor=8,original_max_position_embeddings=16",
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", NATIVE)
def test_hf_native_methods_give_the_logits_of_the_native_model(spec, attn):
    model = load_model("tiny:llama", attn_implementation=attn, max_position_embeddings=32 if "dynamic" in spec else 256)
    ropekit.patch(model, spec)
    x = ids(length=48)  # longer than 32, so dynamic NTK is past its original length
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, native_twin(model)(x).logits, rtol=0, atol=ATOL)


def test_the_patched_path_runs():
    model = load_model("tiny:llama")
    ropekit.patch(model, "abf:base=500000")
    calls = []
    rope_ctx_call = hf.RopeContext.__call__

    def spy(self, q, k, *args):
        calls.append(q.shape)
        return rope_ctx_call(self, q, k, *args)

    hf.RopeContext.__call__ = spy
    try:
        with torch.no_grad():
            model(ids())
    finally:
        hf.RopeContext.__call__ = rope_ctx_call
    assert len(calls) == model.config.num_hidden_layers  # one q+k call per attention layer


def decode_errors(model, x, prefill=10):
    """Max |logits| difference between each cached decoding step and a full forward of the same prefix."""
    errors = []
    with torch.no_grad():
        out = model(x[:, :prefill], use_cache=True)
        errors.append((out.logits - model(x[:, :prefill]).logits).abs().max().item())
        cache, name = hf.kv_cache_of(out), hf.cache_kwarg(model)  # 'cache' since transformers 5.24
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t : t + 1], use_cache=True, **{name: cache})
            cache = hf.kv_cache_of(out)
            errors.append((out.logits - model(x[:, : t + 1]).logits[:, -1:]).abs().max().item())
    return errors


@pytest.mark.parametrize(
    "spec",
    [
        "rope",
        "pi:factor=4",
        "abf:base=500000",
        "yarn:factor=4,original_max_position_embeddings=16",
        "xpos:base=10000,scale_base=32",
        "dynamic:factor=4",
    ],
)
def test_kv_cache_decoding_equals_full_forward(spec):
    # Each decoding step must give the logits a full forward of the same prefix gives. Dynamic NTK's
    # frequencies grow with the prefix (original length 16 here), so the cached keys are re-rotated as it
    # grows. That is exact for one layer; deeper layers' cached keys also hold attention outputs computed
    # with the older frequencies, which no cache can undo (see the next test).
    layers = 1 if spec.startswith("dynamic") else 2
    model = load_model("tiny:llama", max_position_embeddings=16, num_hidden_layers=layers)
    ropekit.patch(model, spec)
    assert max(decode_errors(model, ids(batch=2, length=30, seed=3))) <= 2e-6


# interleaved pairs (GLM: partial rotary too); transformers 4.x's Cohere config refuses a dynamic rope_scaling
@pytest.mark.parametrize("model_type", [pytest.param("cohere", marks=REQUIRES_V5), "glm"])
def test_dynamic_ntk_re_rotates_cached_keys_in_the_models_own_pair_layout(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=16)  # fmt: skip
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert set(hf.support._contract(model).layouts.values()) == {"interleaved"}
    ropekit.patch(model, "dynamic:factor=4")
    assert max(decode_errors(model, ids(batch=2, length=30, seed=3))) <= 2e-6


def test_dynamic_ntk_cache_is_closer_to_full_forward_than_transformers_own():
    model = load_model("tiny:llama", max_position_embeddings=16)
    ropekit.patch(model, "dynamic:factor=4")
    x = ids(batch=2, length=30, seed=3)
    ours, theirs = max(decode_errors(model, x)), max(decode_errors(native_twin(model), x))
    assert ours < theirs / 3, (ours, theirs)


def test_generate_with_cache_matches_greedy_without_cache():
    model = load_model("tiny:llama")
    ropekit.patch(model, "xpos:base=10000")
    prompt = ids(batch=1, length=12)
    a = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    b = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "spec",
    [
        "pi:factor=4",
        "abf:base=500000",
        "yarn:factor=4,original_max_position_embeddings=64",
        "llama3:factor=8,original_max_position_embeddings=64",
        "ntk:factor=4",
    ],
)
def test_save_and_plain_from_pretrained_round_trip(tmp_path, spec):
    model = load_model("tiny:llama")
    ropekit.patch(model, spec)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want, rtol=0, atol=ATOL)
    again = load_model(str(tmp_path))
    assert isinstance(again.model.rotary_emb, hf.RopekitRotary)
    assert again.config.max_position_embeddings == model.config.max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=0, atol=ATOL)


def test_xpos_survives_save_and_load_model(tmp_path):
    model = load_model("tiny:llama")
    ropekit.patch(model, "xpos:base=500000,scale_base=8")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert str(loaded.model.rotary_emb.method) == str(model.model.rotary_emb.method)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=1e-6)
        # plain transformers cannot apply xPos: its logits differ (why load_model exists)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (plain(x).logits - want).abs().max() > 1e-3


def test_undo_restores_logits_config_and_function():
    import gc

    from transformers.models.llama import modeling_llama

    gc.collect()  # models patched by earlier tests release the module dispatch when collected
    original_fn = modeling_llama.apply_rotary_pos_emb
    model = load_model("tiny:llama")
    config_before = model.config.to_dict()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        handle = ropekit.patch(model, "pi:factor=8")
        assert modeling_llama.apply_rotary_pos_emb is not original_fn
        assert (model(x).logits - before).abs().max() > 1e-3
        handle.undo()
        assert torch.equal(model(x).logits, before)
    assert modeling_llama.apply_rotary_pos_emb is original_fn
    assert model.config.to_dict() == config_before


def test_patch_over_patch_replaces_and_undoes_in_reverse_order():
    model = load_model("tiny:llama")
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        h1 = ropekit.patch(model, "pi:factor=2")
        pi_logits = model(x).logits
        h2 = ropekit.patch(model, "abf:base=500000")
        assert str(model.model.rotary_emb.method) == "abf:base=500000"
        assert model.config.max_position_embeddings == 256  # resolved against the original model, not the PI one
        with pytest.raises(RuntimeError, match="undo the later patch"):
            h1.undo()
        h2.undo()
        assert torch.equal(model(x).logits, pi_logits)
        h1.undo()
        assert torch.equal(model(x).logits, base)


def test_patch_raises_max_position_embeddings_to_the_target():
    model = load_model("tiny:llama")  # 256
    ropekit.patch(model, "pi:factor=8")
    assert model.config.max_position_embeddings == 2048
    model = load_model("tiny:llama")
    ropekit.patch(model, "abf:base=500000", max_position_embeddings=4096)
    assert model.config.max_position_embeddings == 4096
    model = load_model("tiny:llama")
    ropekit.patch(model, "xpos:base=500000", max_position_embeddings=4096)
    assert model.model.rotary_emb.method.center == 2048  # xPos scales centred on the target window


def test_method_without_base_takes_the_models_rope_theta():
    model = load_model("tiny:llama", **rope_config_kwargs({"rope_type": "default", "rope_theta": 100000.0}))
    handle = ropekit.patch(model, "pi:factor=4")
    assert handle.method.base == 100000.0 and str(handle.method) == "pi:base=100000,factor=4"


def test_model_cast_to_bfloat16_keeps_exact_frequencies():
    model = load_model("tiny:llama")
    ropekit.patch(model, "abf:base=500000")
    model.to(torch.bfloat16)
    params = model.model.rotary_emb.params(torch.arange(3), None)
    assert params.inv_freq.dtype == torch.float64


def test_model_without_the_rotary_contract_is_refused_saying_what_is_missing():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError) as err:
        ropekit.patch(model, "rope")
    assert "gpt2" in str(err.value) and "no rotary_emb module" in str(err.value)
    assert hf.check_support(model).startswith("no rotary_emb module")


def test_bad_spec_is_refused_before_anything_changes():
    model = load_model("tiny:llama")
    with pytest.raises(ValueError, match="unknown RoPE method"):
        ropekit.patch(model, "alibi")
    assert not isinstance(model.model.rotary_emb, hf.RopekitRotary)
    assert not hasattr(model.config, "ropekit")


def test_describe_reports_the_effective_frequencies():
    model = load_model("tiny:llama")
    assert hf.describe(model)["patched"] is False
    ropekit.patch(model, "pi:factor=4")
    d = hf.describe(model)
    assert d["patched"] and d["method"] == "pi:base=10000,factor=4" and len(d["inv_freq"]) == 8


def test_rope_parameters_v4_form_is_written_and_read(monkeypatch):
    # transformers 4.x keeps rope_theta and rope_scaling as separate attributes
    monkeypatch.setattr(hf.config, "_V5", False)

    class Cfg:
        rope_theta = 10000.0
        rope_scaling = None

    cfg = Cfg()
    assert hf.get_rope_parameters(cfg) == {"rope_type": "default", "rope_theta": 10000.0}
    hf.set_rope_parameters(cfg, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert hf.read_method(cfg) == ropekit.parse("pi:factor=4,base=10000")
    hf.set_rope_parameters(cfg, {"rope_type": "default", "rope_theta": 500000.0})
    assert cfg.rope_scaling is None and cfg.rope_theta == 500000.0


# --- native, and 'rope' on a scaled model (issue 14.2) -----------------------------------------------
LLAMA31 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def test_native_keeps_the_models_scaled_rope_and_its_config():
    model = load_model("tiny:llama", **rope_config_kwargs(LLAMA31))
    x = ids(length=48)
    config_before = model.config.to_dict()
    with torch.no_grad():
        before = model(x).logits
        handle = ropekit.patch(model, "native")
        after = model(x).logits
    assert isinstance(model.model.rotary_emb, hf.RopekitRotary)
    assert str(handle.method).startswith("llama3:base=500000,factor=8")
    torch.testing.assert_close(after, before, rtol=0, atol=ATOL)
    after_config = model.config.to_dict()
    assert after_config.pop("ropekit") == {"method": "native"}
    assert after_config == config_before


def test_rope_on_a_scaled_model_warns_that_it_drops_the_scaling():
    model = load_model("tiny:llama", **rope_config_kwargs(LLAMA31))
    with pytest.warns(UserWarning, match="replaces the model's 'llama3' RoPE scaling.*'native'"):
        ropekit.patch(model, "rope")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ropekit.patch(load_model("tiny:llama"), "rope")  # plain model: nothing dropped, no warning


def test_native_round_trips_through_save_and_load_model(tmp_path):
    model = load_model("tiny:llama", **rope_config_kwargs(LLAMA31))
    ropekit.patch(model, "native")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert isinstance(again.model.rotary_emb, hf.RopekitRotary)
    assert again.model.rotary_emb.method == model.model.rotary_emb.method
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=0, atol=ATOL)


# --- meta device (14.8), base model not at .model (14.9), what HF code reads (14.11) -------------------
def test_patch_on_the_meta_device():
    from ropekit.models import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
        handle = ropekit.patch(model, "yarn:factor=4,original_max_position_embeddings=256")
    assert isinstance(model.model.rotary_emb, hf.RopekitRotary) and handle.method.base == 10000.0
    assert hf.get_rope_parameters(model.config)["rope_type"] == "yarn"


def test_model_whose_decoder_is_not_dot_model_is_patched():
    from transformers import LlamaForQuestionAnswering

    from ropekit.models import tiny_config

    torch.manual_seed(0)
    model = LlamaForQuestionAnswering(tiny_config("llama")).eval()
    x = ids()
    with torch.no_grad():
        before = model(x).start_logits
        ropekit.patch(model, "rope")
        assert isinstance(model.transformer.rotary_emb, hf.RopekitRotary)
        torch.testing.assert_close(model(x).start_logits, before, rtol=0, atol=ATOL)
        ropekit.patch(model, "pi:factor=4")
        assert (model(x).start_logits - before).abs().max() > 1e-4


def test_patched_rotary_exposes_what_transformers_reads():
    model = load_model("tiny:llama")
    hf_inv, hf_scaling = model.model.rotary_emb.inv_freq.clone(), model.model.rotary_emb.attention_scaling
    ropekit.patch(model, "native")
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, hf_inv, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == hf_scaling and rotary.rope_type == "default"
    assert rotary.config is model.config
    ropekit.patch(model, "yarn:factor=4,original_max_position_embeddings=256")
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert model.model.rotary_emb.rope_type == "yarn"


def test_plain_from_pretrained_with_default_hub_kernels_patches(tmp_path):
    # transformers >= 5.25 loads every model with use_kernels on; earlier releases have no such default.
    load_model("tiny:llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        handle = ropekit.patch(model, "native")
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=ATOL)
        handle.undo()
        ropekit.patch(model, "pi:factor=4")
        torch.testing.assert_close(model(x).logits, native_twin(model)(x).logits, rtol=0, atol=ATOL)
    assert max(decode_errors(model, x)) <= ATOL


def _kernel_copies(model) -> list:
    """Each attention layer's private copy of the hub-kernel wrapper of apply_rotary_pos_emb (transformers >=
    5.25 with ``kernels`` installed), the object ``kernelize`` gives a hub kernel's forward."""
    return [m._kernel_funcs["rotary_pos_emb"] for m in model.modules() if "_kernel_funcs" in m.__dict__]


def test_a_kernelized_rotary_function_is_taken_over_and_given_back():

    model = load_model("tiny:llama")
    copies = _kernel_copies(model)
    if not copies:
        pytest.skip(f"transformers {transformers.__version__} does not wrap apply_rotary_pos_emb for hub kernels")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    wrapper = module.apply_rotary_pos_emb
    plain = hf.support._plain(wrapper)
    calls = []

    def hub_kernel(self, q, k, cos, sin, unsqueeze_dim=1):  # stands for the hub's rotary kernel on CUDA
        calls.append(type(cos))
        return plain(q, k, cos, sin, unsqueeze_dim)

    for copy_ in copies:  # what kernelize does when a hub kernel is mapped for the device
        copy_.forward = types.MethodType(hub_kernel, copy_)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        assert calls and all(c is torch.Tensor for c in calls)  # the unpatched model runs the "hub kernel"
        calls.clear()
        handle = ropekit.patch(model, "native")
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=ATOL)
        assert not calls  # ropekit rotates; the kernel copy is never handed a RopeContext
        handle.undo()
        assert module.apply_rotary_pos_emb is wrapper
        model(x)
    assert calls  # given back: the unpatched model reaches its kernel again


def test_load_model_does_not_kernelize(tmp_path):
    load_model("tiny:llama").save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert not getattr(model, "use_kernels", False)


def test_context_is_never_a_tensor():
    # Code that would treat the context as (cos, sin) tensors fails loudly instead of computing garbage.
    model = load_model("tiny:llama")
    ropekit.patch(model, "pi:factor=4")
    cos, sin = model.model.rotary_emb(torch.zeros(1, 3, 64), torch.arange(3)[None])
    assert isinstance(cos, hf.RopeContext) and cos is sin
    with pytest.raises(TypeError):
        cos[..., :4]


# --- transformers 4.x config forms (14.10, the hf.py part) -------------------------------------------
def test_v4_config_without_rope_scaling_attribute_is_snapshotted(monkeypatch):
    # On 4.57 Mistral/Gemma configs have no rope_scaling attribute: the placeholder must read as "none".
    monkeypatch.setattr(hf.config, "_V5", False)

    class Cfg:
        rope_theta = 10000.0
        max_position_embeddings = 256

    snap = hf.patching._snapshot_config(Cfg())
    assert not snap["rope_scaling"]
    assert hf.patching._layered_of_snapshot(snap, Cfg()) == {None: {"rope_type": "default", "rope_theta": 10000.0}}


def test_v4_rope_scaling_keeps_only_the_keys_4x_validates():
    yarn = ropekit.parse("yarn:factor=4,original_max_position_embeddings=64,base=10000").to_hf(16)
    assert "truncate" in yarn
    v4 = hf.config._v4_rope_scaling(yarn)
    assert v4 == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    off = ropekit.parse("yarn:factor=4,original_max_position_embeddings=64,base=10000,truncate=false").to_hf(16)
    with pytest.raises(ValueError, match="truncate=false"):
        hf.config._v4_rope_scaling(off)


# --- longrope and proportional through the patch --------------------------------------------------------
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
    "original_max_position_embeddings": 16,
}


@REQUIRES_V5  # 4.x keeps LongRoPE's original length at the config's top level; ropekit reads the 5.x form
@pytest.mark.parametrize("length", [12, 40])  # both sides of the switch at the original length
def test_native_longrope_gives_the_models_logits(length):
    model = load_model("tiny:llama", **rope_config_kwargs(LONGROPE), max_position_embeddings=64)
    x = ids(length=length)
    with torch.no_grad():
        before = model(x).logits
        ropekit.patch(model, "native")
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "spec",
    [
        "longrope:short_factor=1/1/1.1/1.2/1.5/2/3/4,long_factor=1/1.5/2/3/4/6/8/12,original_max_position_embeddings=16",
        pytest.param("proportional:partial_rotary_factor=0.5,factor=2", marks=REQUIRES_V5),
    ],
)
def test_longrope_and_proportional_specs_equal_the_native_model_and_round_trip(tmp_path, spec):
    model = load_model("tiny:llama", max_position_embeddings=16)
    ropekit.patch(model, spec)
    x = ids(length=40)
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(native_twin(model)(x).logits, want, rtol=0, atol=ATOL)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = load_model(str(tmp_path))
    assert again.model.rotary_emb.method == model.model.rotary_emb.method
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want, rtol=0, atol=ATOL)
        torch.testing.assert_close(again(x).logits, want, rtol=0, atol=ATOL)


# --- per-layer-type methods (Gemma 3: sliding and full layers) ------------------------------------------
def tiny_gemma3():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@REQUIRES_V5
@pytest.mark.parametrize(
    "how",
    [
        ("yarn:factor=4,original_max_position_embeddings=256@full_attention", None),
        ("yarn:factor=4,original_max_position_embeddings=256", ["full"]),
    ],
)
def test_method_for_the_full_layers_only(how):
    spec, layer_types = how
    model = tiny_gemma3()
    sliding_before = dict(model.config.rope_parameters["sliding_attention"])
    x = ids(length=40)
    handle = ropekit.patch(model, spec, layer_types=layer_types)
    rotary = model.model.rotary_emb
    assert rotary.methods["sliding_attention"] is None  # the model's own module serves the sliding layers
    assert rotary.methods["full_attention"].base == 1_000_000.0  # resolved against the full layers' theta
    assert model.config.rope_parameters["sliding_attention"] == sliding_before
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert model.config.ropekit["method"].endswith("@full_attention")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, native_twin(model)(x).logits, rtol=0, atol=ATOL)
    handle.undo()
    assert not isinstance(model.model.rotary_emb, hf.RopekitRotary)


@REQUIRES_V5
def test_per_layer_type_patch_round_trips(tmp_path):
    model = tiny_gemma3()
    ropekit.patch(model, "abf:base=100000@sliding;pi:factor=2@full")
    x = ids(length=40)
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert {lt: str(m) for lt, m in again.model.rotary_emb.methods.items()} == {
        "sliding_attention": "abf:base=100000",
        "full_attention": "pi:base=1000000,factor=2",
    }
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=0, atol=ATOL)


@REQUIRES_V5
@pytest.mark.parametrize(
    "spec,word",
    [
        ("pi:factor=2@global", "unknown layer type"),
        ("pi:factor=2@full;abf@full_attention", "given twice"),
        ("@full", "malformed"),
    ],
)
def test_bad_per_layer_type_specs_are_refused(spec, word):
    model = tiny_gemma3()
    with pytest.raises(ValueError, match=word):
        ropekit.patch(model, spec)
    assert not isinstance(model.model.rotary_emb, hf.RopekitRotary)


def test_per_layer_type_spec_on_a_model_with_one_rope_is_refused():
    with pytest.raises(ValueError, match="one RoPE for all its layers"):
        ropekit.patch(load_model("tiny:llama"), "pi:factor=2@full_attention")


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5, reason="transformers 4.x config validation")
def test_transformers_4_saves_only_what_the_family_reloads(tmp_path):
    """4.x's OLMo 2 config takes only {type, factor}: pi round-trips through plain from_pretrained; yarn,
    which it would refuse to load, is refused at patch time with the config unchanged."""
    model = load_model("tiny:olmo2")
    ropekit.patch(model, "pi:factor=4")
    model.save_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits, model(x).logits,
                                   rtol=0, atol=ATOL)  # fmt: skip
    fresh = load_model("tiny:olmo2")
    before = fresh.config.to_dict()
    with pytest.raises(ValueError, match="cannot be saved for model_type 'olmo2'"):
        ropekit.patch(fresh, "yarn:factor=4,original_max_position_embeddings=256")
    assert fresh.config.to_dict() == before and not isinstance(fresh.model.rotary_emb, hf.RopekitRotary)


@pytest.mark.parametrize("spec", NATIVE)
def test_a_saved_method_agrees_with_the_rope_parameters_it_wrote(tmp_path, spec):
    model = load_model("tiny:llama")
    ropekit.patch(model, spec)
    model.save_pretrained(tmp_path)  # 4.x keeps fewer keys (no YaRN truncate): compared by the numbers
    assert hf.saved_method_conflict(AutoConfig.from_pretrained(tmp_path)) is None


def test_a_hand_edit_that_contradicts_the_saved_method_is_named_on_load(tmp_path):
    import json

    model = load_model("tiny:llama")
    ropekit.patch(model, "pi:factor=4")
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as saved: the two agree, nothing to say
        load_model(str(tmp_path))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    if "rope_parameters" in config:  # transformers 5
        config["rope_parameters"]["rope_theta"] = 500000.0
    else:
        config["rope_theta"] = 500000.0
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"other frequencies \(rope_theta=500000.0\): ropekit.load_model applies"):
        reloaded = load_model(str(tmp_path))
    assert str(reloaded.model.rotary_emb.method) == "pi:base=10000,factor=4"  # the saved method won, as it says


def test_a_config_whose_rope_theta_is_not_positive_is_named():
    model = load_model("tiny:llama")
    params = hf.get_rope_parameters(model.config)
    hf.set_rope_parameters(model.config, {**params, "rope_theta": -5.0})
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.fill_(float("nan"))  # what HF's rotary module computes from base -5
    with pytest.raises(ValueError, match=r"its rope_theta is -5.0; RoPE needs a base > 0"):
        ropekit.patch(model, "pi:factor=2")
