"""The Hugging Face patch: unchanged logits for rope, native logits for HF-native methods, KV-cache
decoding equal to a full forward, save/load round trips, undo, clear errors."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ropekit
from ropekit import hf
from ropekit.models import TINY, load_model

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

    def spy(self, q, k, positions):
        calls.append(q.shape)
        return rope_ctx_call(self, q, k, positions)

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
        cache = out.past_key_values
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
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
    model = load_model("tiny:llama", rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    handle = ropekit.patch(model, "pi:factor=4")
    assert handle.method.base == 100000.0 and str(handle.method) == "pi:base=100000,factor=4"


def test_model_cast_to_bfloat16_keeps_exact_frequencies():
    model = load_model("tiny:llama")
    ropekit.patch(model, "abf:base=500000")
    model.to(torch.bfloat16)
    params = model.model.rotary_emb.params(torch.arange(3), None)
    assert params.inv_freq.dtype == torch.float64


def test_unsupported_model_is_refused_with_the_supported_list():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError) as err:
        ropekit.patch(model, "rope")
    assert "gpt2" in str(err.value) and "llama" in str(err.value) and "mistral" in str(err.value)


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
    monkeypatch.setattr(hf, "_V5", False)

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
