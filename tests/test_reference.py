"""The torch reference and ``apply_rope(backend="torch")``: equal to transformers, exact at long positions,
relative for every RoPE variant, decaying for xPos."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ropekit import apply_rope
from ropekit.methods import XPOS_MAX_EXPONENT, parse
from ropekit.reference import RopeParams, apply_rope_reference

from .conftest import fp32_rounding, rope_config_kwargs

EPS32 = torch.finfo(torch.float32).eps

HF_CASES = [
    ("rope:base=10000", {"rope_type": "default", "rope_theta": 10000.0}),
    ("abf:base=500000", {"rope_type": "default", "rope_theta": 500000.0}),
    ("pi:factor=8,base=10000", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0}),
    (
        "yarn:factor=8,original_max_position_embeddings=64,base=10000",
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64},
    ),
    (
        "llama3:factor=8,original_max_position_embeddings=64,base=500000",
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    (
        "dynamic:factor=4,base=10000,original_max_position_embeddings=64",
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    ),
]


@pytest.mark.parametrize("spec,params", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_apply_rope_equals_transformers(spec, params):
    torch.manual_seed(0)
    B, Hq, Hk, T, D = 2, 4, 2, 200, 32
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hk, T, D)
    positions = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [57]])  # a cache offset on row 1
    config = LlamaConfig(
        hidden_size=D * Hq, num_attention_heads=Hq, num_key_value_heads=Hk, max_position_embeddings=64,
        **rope_config_kwargs(params),
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(q, positions)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    oq, ok = apply_rope(q, k, positions, spec, backend="torch")
    # transformers forms angles as float32 products: error up to ~2 ulp of the largest angle.
    max_angle = positions.max().item() * parse(spec).inv_freq64(D, positions.max().item() + 1).max().item()
    atol = 4 * EPS32 * max_angle * max(q.abs().max(), k.abs().max()).item() + fp32_rounding(hq)
    torch.testing.assert_close(oq, hq, rtol=0, atol=atol)
    torch.testing.assert_close(ok, hk, rtol=0, atol=atol)


def test_interleaved_equals_half_under_the_channel_permutation():
    torch.manual_seed(1)
    D, T = 16, 33
    q, k = torch.randn(1, 3, T, D), torch.randn(1, 1, T, D)
    pos = torch.arange(T) * 7
    # half pair j = (j, j + D/2); interleaved pair j = (2j, 2j+1)
    perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], dim=-1).flatten()
    hq, hk = apply_rope(q, k, pos, "rope:base=10000", layout="half", backend="torch")
    iq, ik = apply_rope(q[..., perm], k[..., perm], pos, "rope:base=10000", layout="interleaved", backend="torch")
    assert torch.equal(iq, hq[..., perm]) and torch.equal(ik, hk[..., perm])


RELATIVE_SPECS = [
    "rope:base=10000",
    "abf:base=500000",
    "pi:factor=8,base=10000",
    "ntk:factor=8,base=10000",
    "yarn:factor=8,original_max_position_embeddings=4096,base=10000",
    "llama3:factor=8,base=500000",
]


@pytest.mark.parametrize("spec", RELATIVE_SPECS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_score_depends_only_on_the_distance(spec, layout):
    torch.manual_seed(2)
    D = 64
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)
    scores = []
    for m, n in [(10, 3), (1007, 1000), (30007, 30000)]:
        rq, _ = apply_rope(q, q, torch.tensor([m]), spec, layout=layout, backend="torch")
        _, rk = apply_rope(k, k, torch.tensor([n]), spec, layout=layout, backend="torch")
        scores.append((rq * rk).sum().item())
    # inputs are float64 but the rotation runs in float32: compare at float32 accuracy
    tol = 8 * EPS32 * (q.abs() * k.abs()).sum().item()
    assert scores[1] == pytest.approx(scores[0], abs=tol) and scores[2] == pytest.approx(scores[0], abs=tol)


def test_yarn_attention_factor_scales_q_and_k():
    q = torch.randn(1, 1, 4, 8)
    spec = "yarn:factor=8,original_max_position_embeddings=64,base=10000"
    oq, ok = apply_rope(q, q, torch.arange(4), spec, backend="torch")
    plain = parse(spec)
    rq, _ = apply_rope_reference(q, q, torch.arange(4), RopeParams(plain.inv_freq64(8)))
    factor = 0.1 * math.log(8) + 1
    torch.testing.assert_close(oq, rq * factor, rtol=2 * EPS32, atol=fp32_rounding(oq))


def test_xpos_score_carries_zeta_to_the_distance_over_scale_base():
    torch.manual_seed(3)
    D, B = 16, 512
    method = parse(f"xpos:base=10000,scale_base={B},center=1000")
    zeta = method.zeta(D)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    plain = "rope:base=10000"
    for m, n in [(300, 100), (2500, 100), (1900, 1800)]:
        xq, _ = apply_rope(q, q, torch.tensor([m]), method, backend="torch")
        _, xk = apply_rope(k, k, torch.tensor([n]), method, backend="torch")
        rq, _ = apply_rope(q, q, torch.tensor([m]), plain, backend="torch")
        _, rk = apply_rope(k, k, torch.tensor([n]), plain, backend="torch")
        per_pair_x = (xq * xk).reshape(2, D // 2).sum(0).double()  # half layout: pair j = channels j and j+D/2
        per_pair_r = (rq * rk).reshape(2, D // 2).sum(0).double()
        expected = per_pair_r * zeta ** ((m - n) / B)
        torch.testing.assert_close(per_pair_x, expected, rtol=1e-4, atol=1e-5)


def test_xpos_cannot_overflow_far_from_its_center():
    q = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    pos = torch.tensor([0, 200_000, 2**20])
    for dtype in (torch.float32, torch.bfloat16):
        oq, ok = apply_rope(q.to(dtype), q.to(dtype), pos, "xpos:base=500000,scale_base=512", backend="torch")
        assert torch.isfinite(oq).all() and torch.isfinite(ok).all()
        bound = math.exp(XPOS_MAX_EXPONENT) * q.float().abs().max().item() * 1.01
        assert ok.float().abs().max().item() <= bound


def test_angles_are_exact_at_position_2_pow_20():
    # rotate the unit vector (1, 0) of every pair: the output is (cos a, sin a) with a = m * theta_j
    D, m = 128, 2**20
    method = parse("rope:base=10000")
    x = torch.zeros(1, 1, 1, D)
    x[..., : D // 2] = 1.0
    out, _ = apply_rope(x, x, torch.tensor([m]), method, backend="torch")
    theta = [10000.0 ** (-2 * j / D) for j in range(D // 2)]
    exact_cos = torch.tensor([math.cos(m * t) for t in theta], dtype=torch.float64)  # m * t exact in float64
    exact_sin = torch.tensor([math.sin(m * t) for t in theta], dtype=torch.float64)
    got = torch.atan2(out[0, 0, 0, D // 2 :].double(), out[0, 0, 0, : D // 2].double())
    err = torch.remainder(got - torch.atan2(exact_sin, exact_cos) + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max().item() <= 1e-5
    # the float32 product transformers forms is far off at this position (what this guards against)
    f32 = (torch.tensor(float(m)) * method.inv_freq(D)).double()
    f32_err = torch.remainder(f32 - torch.atan2(exact_sin, exact_cos) + math.pi, 2 * math.pi) - math.pi
    assert f32_err.abs().max().item() > 1e-3


def test_partial_rotary_passes_the_tail_through_and_gqa_shapes_hold():
    q, k = torch.randn(2, 6, 5, 80), torch.randn(2, 2, 5, 80)
    oq, ok = apply_rope(q, k, torch.arange(5), "rope:base=10000", rotary_dim=48, backend="torch")
    assert oq.shape == q.shape and ok.shape == k.shape
    assert torch.equal(oq[..., 48:], q[..., 48:]) and torch.equal(ok[..., 48:], k[..., 48:])
    assert not torch.equal(oq[..., :48], q[..., :48])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_keeps_the_input_dtype_and_matches_float32_math(dtype):
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 9, 32), torch.randn(1, 1, 9, 32)
    oq, ok = apply_rope(q.to(dtype), k.to(dtype), torch.arange(9) + 1000, "abf:base=500000", backend="torch")
    assert oq.dtype == dtype and ok.dtype == dtype
    fq, _ = apply_rope(q.to(dtype).float(), k.to(dtype).float(), torch.arange(9) + 1000, "abf:base=500000")
    # one rounding of the float32 result to dtype
    torch.testing.assert_close(oq.float(), fq, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_backward_is_the_transposed_rotation():
    torch.manual_seed(5)
    q = torch.randn(2, 2, 7, 16, requires_grad=True)
    k = torch.randn(2, 1, 7, 16, requires_grad=True)
    pos = torch.randint(0, 5000, (2, 7))
    spec = "xpos:base=10000,scale_base=64,center=2500"
    oq, ok = apply_rope(q, k, pos, spec, backend="torch")
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    (oq * gq + 0).sum().backward(retain_graph=True)
    (ok * gk).sum().backward()
    m = parse(spec)
    params = RopeParams(m.inv_freq64(16), xpos_rate=m.xpos_rate(16), xpos_center=m.xpos_center)
    tq, tk = apply_rope_reference(gq, gk, pos, params, conjugate=True)
    torch.testing.assert_close(q.grad, tq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad, tk, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(q=torch.randn(2, 3, 4), k=torch.randn(2, 3, 4, 8)), "4-D"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 5, 8)), "agree"),
        (dict(positions=torch.arange(4.0)), "integer"),
        (dict(positions=torch.arange(5)), "shape"),
        (dict(layout="neox"), "layout"),
        (dict(rotary_dim=7), "rotary_dim"),
        (dict(rotary_dim=16), "rotary_dim"),
        (dict(rotary_dim=4.5), "rotary_dim"),
        (dict(rotary_dim="4"), "rotary_dim"),
        (dict(positions=["a", "b", "c", "d"]), "positions"),
        (dict(backend="cuda"), "backend"),
        (dict(method="pi:factor=x"), "expected a number"),
        (dict(positions=torch.tensor([0, 1, 2, 2**53])), "below 2\\^53"),  # float64 angles are off by ~1 rad there
    ],
)
def test_bad_inputs_are_refused(kwargs, word):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 1, 4, 8), positions=torch.arange(4), method="rope:base=1e4")
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        apply_rope(args.pop("q"), args.pop("k"), args.pop("positions"), args.pop("method"), **args)


def test_positions_as_lists_numpy_and_narrow_integers_give_the_int64_result():
    import numpy as np

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    want = apply_rope(q, k, torch.tensor([0, 3, 100, 127]), "rope:base=1e4")
    for positions in ([0, 3, 100, 127], np.array([0, 3, 100, 127]), torch.tensor([0, 3, 100, 127], dtype=torch.int8),
                      torch.tensor([0, 3, 100, 127], dtype=torch.uint8)):  # fmt: skip
        got = apply_rope(q, k, positions, "rope:base=1e4")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), type(positions)


def test_in_place_is_one_entry_point_and_refuses_tensors_that_need_gradients():
    from ropekit.rotary import apply_rope_

    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k = torch.randn(1, 1, 4, 8, requires_grad=True)
    for call in (lambda: apply_rope(q, k, torch.arange(4), "rope:base=1e4", inplace=True),
                 lambda: apply_rope_(q, k, torch.arange(4), "rope:base=1e4")):  # fmt: skip
        with pytest.raises(ValueError, match="inplace=True cannot give gradients"):
            call()
    with pytest.raises(ValueError, match="backend"):  # apply_rope_ checks its backend like apply_rope
        apply_rope_(q.detach(), k.detach(), torch.arange(4), "rope:base=1e4", backend="cuda")
    qd, kd = q.detach().clone(), k.detach().clone()
    want = apply_rope(qd, kd, torch.arange(4), "rope:base=1e4")
    with torch.no_grad():
        got = apply_rope(q, k, torch.arange(4), "rope:base=1e4", inplace=True)
    assert got[0] is q and torch.equal(q.detach(), want[0]) and torch.equal(k.detach(), want[1])


def test_triton_backend_on_cpu_without_the_interpreter_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        apply_rope(q, q, torch.arange(2), "rope:base=1e4", backend="triton")
