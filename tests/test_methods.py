"""RoPE methods: frequencies equal transformers' own, specs round-trip, bad input is refused clearly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ropekit import methods
from ropekit.methods import parse

from .conftest import hf_rope_parameters, rope_config_kwargs

EPS32 = torch.finfo(torch.float32).eps

# (ropekit spec, HF rope_parameters, head_dim, max_position_embeddings)
HF_EQUIVALENTS = [
    ("rope:base=10000", {"rope_type": "default", "rope_theta": 10000.0}, 128, 4096),
    ("abf:base=500000", {"rope_type": "default", "rope_theta": 500000.0}, 128, 4096),
    ("pi:factor=8,base=10000", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0}, 128, 4096),
    ("pi:factor=4,base=100000", {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0}, 64, 8192),
    (
        "yarn:factor=8,original_max_position_embeddings=4096,base=10000",
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4096},
        128,
        32768,
    ),
    (
        "yarn:factor=2,original_max_position_embeddings=8192,base=100000",
        {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 2.0, "original_max_position_embeddings": 8192},
        64,
        16384,
    ),
    (
        "llama3:factor=8,base=500000",
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        128,
        131072,
    ),
]


def hf_parameters(params, head_dim, max_pos, seq_len=None):
    """transformers' own (inv_freq, attention_factor) for flat rope parameters (4.x and 5.x)."""
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos, **rope_config_kwargs(params)
    )
    return hf_rope_parameters(config, params["rope_type"], seq_len)


def rtol_for(base: float) -> float:
    # transformers evaluates base ** (2j/d) in float32: relative error ~ eps * (1 + |ln base|).
    return 4 * EPS32 * (1 + math.log(base))


@pytest.mark.parametrize("spec,params,head_dim,max_pos", HF_EQUIVALENTS, ids=[c[0] for c in HF_EQUIVALENTS])
def test_inv_freq_and_attention_factor_equal_transformers(spec, params, head_dim, max_pos):
    method = parse(spec)
    hf_inv, hf_factor = hf_parameters(params, head_dim, max_pos)
    ours = method.inv_freq(head_dim)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, hf_inv.float(), rtol=rtol_for(params["rope_theta"]), atol=0)
    assert method.attention_factor == pytest.approx(hf_factor, rel=1e-12)


@pytest.mark.parametrize("seq_len", [1024, 4096, 4097, 9000, 32768])
def test_dynamic_ntk_equals_transformers_at_every_length(seq_len):
    method = parse("dynamic:factor=4,base=10000,original_max_position_embeddings=4096")
    hf_inv, _ = hf_parameters({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, 128, 4096, seq_len)
    # the dynamic base itself grows with length, so allow for the float32 pow at the larger base
    base = method.base_at(128, seq_len)
    torch.testing.assert_close(method.inv_freq(128, seq_len), hf_inv.float(), rtol=rtol_for(base), atol=0)


def test_ntk_is_default_rope_at_the_scaled_base():
    method = parse("ntk:factor=8,base=10000")
    theta = 10000 * 8 ** (128 / 126)
    assert method.to_hf(128) == {"rope_type": "default", "rope_theta": pytest.approx(theta)}
    hf_inv, _ = hf_parameters({"rope_type": "default", "rope_theta": theta}, 128, 4096)
    torch.testing.assert_close(method.inv_freq(128), hf_inv.float(), rtol=rtol_for(theta), atol=0)


def test_inv_freq_is_computed_in_float64():
    # base^(-2j/d) for the last pair of d=128 at base 5e5: float32 pow would be off by ~1e-6 relative.
    m = parse("abf:base=500000")
    exact = torch.tensor([500000.0 ** (-j / 64) for j in range(64)], dtype=torch.float64)
    assert torch.equal(m.inv_freq64(128), exact) or torch.allclose(m.inv_freq64(128), exact, rtol=1e-15, atol=0)
    assert torch.equal(m.inv_freq(128), exact.float())


def test_partial_rotary_dim_gives_rotary_dim_half_pairs():
    assert parse("rope:base=10000").inv_freq(48).shape == (24,)


def test_xpos_zeta_matches_the_paper_and_torchscale():
    m = parse("xpos:base=500000")
    zeta = m.zeta(128)
    expected = (torch.arange(0, 128, 2, dtype=torch.float64) + 0.4 * 128) / (1.4 * 128)
    torch.testing.assert_close(zeta, expected, rtol=1e-15, atol=0)
    assert (zeta < 1).all() and zeta[0] == pytest.approx(0.4 / 1.4)
    assert m.scale_base == 512 and m.gamma == 0.4


SPECS = [
    "rope",
    "rope:base=10000",
    "abf:base=500000",
    "pi:factor=8",
    "pi:factor=2.5,base=100000",
    "ntk:factor=8",
    "dynamic:factor=8",
    "dynamic:factor=4,original_max_position_embeddings=4096",
    "yarn:factor=8,original_max_position_embeddings=4096",
    "yarn:factor=16,original_max_position_embeddings=4096,beta_fast=16,beta_slow=2,mscale=1.5,truncate=false",
    "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=8192",
    "xpos:base=500000,scale_base=512",
    "xpos:base=500000,scale_base=256,gamma=0.5,center=16384",
    "longrope:short_factor=1/1.5/2.25,long_factor=4/8/16,original_max_position_embeddings=4096",
    "longrope:base=10000,short_factor=1/1,long_factor=2/3,original_max_position_embeddings=64,factor=8,mscale=1.2",
    "proportional:base=1000000,factor=8,partial_rotary_factor=0.25",
    "native",
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips(spec):
    m = parse(spec)
    assert parse(str(m)) == m
    assert str(parse(str(m))) == str(m)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["pi", "ntk", "dynamic"]),
    factor=st.floats(1, 64, allow_nan=False),
    base=st.floats(1.0, 1e9, allow_nan=False),
)
def test_spec_round_trip_property(name, factor, base):
    extra = {"original_max_position_embeddings": 4096} if name == "dynamic" else {}
    m = methods.METHODS[name](factor=factor, base=base, **extra)
    back = parse(str(m))
    assert back == m and back.inv_freq(64).tolist() == m.inv_freq(64).tolist()


def test_paper_specs_print_their_defining_numbers():
    assert str(parse("abf")) == "abf:base=500000"
    assert str(parse("xpos:base=500000")) == "xpos:base=500000,scale_base=512"
    assert str(parse("pi:factor=8")) == "pi:factor=8"


BAD = [
    ("foo", "unknown RoPE method"),
    ("pi:fctor=8", "unknown key"),
    ("pi:factor=abc", "expected a number"),
    ("pi:factor", "malformed"),
    ("rope:base=0", "base"),
    ("abf:base=-5", "base"),
    ("pi:factor=0.5", "factor"),
    ("ntk:factor=0.9", "factor"),
    ("xpos:scale_base=0", "scale_base"),
    ("xpos:scale_base=-1", "scale_base"),
    ("yarn:factor=8", "original_max_position_embeddings"),
    ("yarn:factor=8,original_max_position_embeddings=4096.5", "integer"),
    ("yarn:factor=8,original_max_position_embeddings=4096,truncate=maybe", "true or false"),
    ("pi:factor=2,factor=3", "twice"),
    ("", "non-empty"),
    ("pi:factor=nan", "finite"),
]


@pytest.mark.parametrize("spec,word", BAD)
def test_bad_specs_raise_value_error_naming_the_problem(spec, word):
    with pytest.raises(ValueError, match=word):
        parse(spec)


def test_unknown_method_lists_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        parse("alibi")
    for name in ("rope", "abf", "pi", "ntk", "dynamic", "yarn", "llama3", "xpos", "longrope", "proportional", "native"):
        assert name in str(err.value)


def test_unknown_key_lists_the_accepted_keys():
    with pytest.raises(ValueError, match="accepted keys: base, factor"):
        parse("pi:scale=8")


def test_ntk_family_needs_more_than_one_pair():
    for spec in ("ntk:factor=2,base=1e4", "dynamic:factor=2,base=1e4,original_max_position_embeddings=64"):
        with pytest.raises(ValueError, match="d/\\(d-2\\)"):
            parse(spec).inv_freq(2, 128)


@pytest.mark.parametrize("head_dim", [7, 0, -2, 127])
def test_odd_or_bad_head_dim_is_refused(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        parse("rope:base=10000").inv_freq(head_dim)


def test_method_without_base_says_where_the_base_comes_from():
    with pytest.raises(ValueError, match="patch a model"):
        parse("pi:factor=8").inv_freq(64)
    resolved = parse("pi:factor=8").resolve(base=10000.0)
    assert resolved.base == 10000.0 and str(resolved) == "pi:base=10000,factor=8"


def test_abf_keeps_its_own_base_when_resolved():
    assert parse("abf:base=500000").resolve(base=10000.0).base == 500000.0


@pytest.mark.parametrize("spec", [s for s, *_ in HF_EQUIVALENTS] + ["dynamic:factor=4,base=10000"])
def test_hf_mapping_round_trips(spec):
    m = parse(spec)
    assert methods.from_hf(m.to_hf(128)) == m or methods.from_hf(m.to_hf(128)).inv_freq(128).equal(m.inv_freq(128))


def test_hf_mapping_names():
    assert parse("rope:base=1e4").to_hf(64)["rope_type"] == "default"
    assert parse("abf:base=5e5").to_hf(64) == {"rope_type": "default", "rope_theta": 5e5}
    assert parse("pi:factor=8,base=1e4").to_hf(64)["rope_type"] == "linear"
    assert parse("dynamic:factor=8,base=1e4").to_hf(64)["rope_type"] == "dynamic"
    assert parse("xpos:base=5e5").to_hf(64) == {"rope_type": "default", "rope_theta": 5e5}
    # a saved ropekit spec wins over the HF-native description (keeps xPos)
    assert isinstance(methods.from_hf({"rope_type": "default"}, "xpos:base=500000"), methods.XPos)


def test_v4_rope_scaling_with_legacy_type_key_is_read():
    m = methods.from_hf({"type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert m == parse("pi:factor=4,base=10000")


def test_unsupported_hf_type_is_refused():
    with pytest.raises(ValueError, match="accepted: default, linear"):
        methods.from_hf({"rope_type": "alibi", "rope_theta": 1e4})


def test_every_transformers_rope_type_has_a_ropekit_method():
    assert set(ROPE_INIT_FUNCTIONS) | {"default"} <= set(methods.HF_TYPES)
    for rope_type, cls in methods.HF_TYPES.items():
        assert cls.hf_type == rope_type and methods.METHODS[cls.name] is cls


def _hf_longrope(params, head_dim, max_pos, seq_len=None):
    return hf_parameters(params, head_dim, max_pos, seq_len)


@settings(max_examples=40, deadline=None)
@given(
    head_dim=st.sampled_from([8, 16, 64, 96]),
    base=st.floats(100.0, 1e7),
    original=st.sampled_from([256, 4096, 8192]),
    ratio=st.sampled_from([None, 1.0, 2.0, 32.0]),
    with_factor=st.booleans(),
    attention_factor=st.sampled_from([None, 1.25]),
    seq_len=st.sampled_from([None, 1, 255, 256, 257, 4096, 4097, 100_000]),
    data=st.data(),
)
def test_longrope_equals_transformers(head_dim, base, original, ratio, with_factor, attention_factor, seq_len, data):
    pairs = head_dim // 2
    factors = st.lists(st.floats(1.0, 64.0), min_size=pairs, max_size=pairs)
    short, long = data.draw(factors), data.draw(factors)
    max_pos = int(original * (ratio or 1.0))
    params = {
        "rope_type": "longrope",
        "rope_theta": base,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": original,
    }
    if with_factor and ratio is not None:
        params["factor"] = ratio
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    hf_inv, hf_factor = _hf_longrope(params, head_dim, max_pos, seq_len)
    method = methods.from_hf(params).resolve(base=base, max_position_embeddings=max_pos)
    ours = method.inv_freq(head_dim, seq_len)
    # transformers divides by a float32 factor and a float32 power: a few float32 roundings
    torch.testing.assert_close(ours, hf_inv.float(), rtol=rtol_for(base) + 2 * EPS32, atol=0)
    assert method.attention_factor == pytest.approx(hf_factor, rel=1e-12)
    assert parse(str(method)) == method  # list values survive the spec string


def test_longrope_switches_at_the_original_length_only():
    m = parse("longrope:base=10000,short_factor=1/1,long_factor=2/4,original_max_position_embeddings=64,factor=8")
    torch.testing.assert_close(m.inv_freq64(4, 64), parse("rope:base=10000").inv_freq64(4))
    torch.testing.assert_close(m.inv_freq64(4, 65), parse("rope:base=10000").inv_freq64(4) / torch.tensor([2.0, 4.0]))
    assert m.attention_factor == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))
    assert m.target_length(64) == 512


@pytest.mark.skipif("proportional" not in ROPE_INIT_FUNCTIONS, reason="this transformers has no 'proportional'")
@settings(max_examples=40, deadline=None)
@given(
    head_dim=st.sampled_from([8, 16, 64, 256, 512]),
    base=st.floats(100.0, 1e7),
    proportion=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]),
    factor=st.sampled_from([None, 1.0, 4.0, 8.0]),
)
def test_proportional_equals_transformers(head_dim, base, proportion, factor):
    params = {"rope_type": "proportional", "rope_theta": base, "partial_rotary_factor": proportion}
    if factor is not None:
        params["factor"] = factor
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, **rope_config_kwargs(params)
    )
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["proportional"](config, None)
    method = methods.from_hf(params)
    ours = method.inv_freq(head_dim)
    assert ours.shape == hf_inv.shape == (head_dim // 2,)
    assert torch.equal(ours == 0, hf_inv == 0)  # the same pairs are left unrotated
    torch.testing.assert_close(ours, hf_inv.float(), rtol=rtol_for(base) + 2 * EPS32, atol=0)
    assert method.attention_factor == hf_factor == 1.0
    assert methods.from_hf(method.to_hf(head_dim)) == method


def test_deepseek_yarn_attention_factor_equals_transformers():
    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    hf_inv, hf_factor = hf_parameters(params, 64, 163840)
    method = methods.from_hf(params)
    assert method.attention_factor == pytest.approx(hf_factor, rel=1e-12)
    torch.testing.assert_close(method.inv_freq(64), hf_inv.float(), rtol=rtol_for(1e4), atol=0)


@pytest.mark.parametrize(
    "spec,word",
    [
        ("longrope:short_factor=1/1,original_max_position_embeddings=64", "required"),
        ("longrope:short_factor=1/x,long_factor=1/1,original_max_position_embeddings=64", "joined by '/'"),
        ("longrope:short_factor=1/1,long_factor=1,original_max_position_embeddings=64", "one item per rotary pair"),
        ("longrope:short_factor=1/0,long_factor=1/1,original_max_position_embeddings=64", "> 0"),
        ("proportional:partial_rotary_factor=1.5", "partial_rotary_factor"),
        ("native:base=10000", "takes no keys"),
    ],
)
def test_new_methods_refuse_bad_specs(spec, word):
    with pytest.raises(ValueError, match=word):
        parse(spec)


def test_longrope_needs_one_factor_per_pair_of_the_rotary_dim():
    m = parse("longrope:base=1e4,short_factor=1/1,long_factor=1/1,original_max_position_embeddings=64")
    with pytest.raises(ValueError, match="4 pairs needed"):
        m.inv_freq(8)


def test_native_is_known_only_against_a_model():
    assert str(parse("native")) == "native" and parse("native") == methods.Native()
    with pytest.raises(ValueError, match="ropekit.patch"):
        parse("native").inv_freq(64)
