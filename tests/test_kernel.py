"""The Triton kernel (``backend="triton"``) equals the torch reference, forward and backward.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), so shapes
are kept small; the ``gpu`` tests repeat the properties at real sizes on CUDA.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ropekit
from ropekit import apply_rope
from ropekit.methods import XPOS_MAX_EXPONENT, parse
from ropekit.models import load_model
from ropekit.rotary import apply_rope_, rope_params

pytest.importorskip("triton")

EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

METHODS = [
    "rope:base=10000",
    "abf:base=500000",
    "pi:factor=8,base=10000",
    "ntk:factor=8,base=10000",
    "dynamic:factor=4,base=10000,original_max_position_embeddings=64",
    "yarn:factor=8,original_max_position_embeddings=64,base=10000",
    "llama3:factor=8,original_max_position_embeddings=64,base=500000",
    "xpos:base=10000,scale_base=64,center=50000",
    "xpos:base=500000,scale_base=512",
]


def tolerance(out: torch.Tensor) -> float:
    """Kernel and reference both compute in float32; they differ by a few float32 ulps of the output
    (sin/cos and exp evaluated differently), plus one rounding step of the output dtype."""
    vals = out.detach().float()
    vals = vals[torch.isfinite(vals)]  # xPos in float16 may overflow far from its center: inf must match inf
    mag = vals.abs().max().item() if vals.numel() else 0.0
    extra = 0.0 if out.dtype == torch.float32 else torch.finfo(out.dtype).eps
    return mag * (16 * EPS32 + extra) + 1e-30


def saturated(x: torch.Tensor) -> torch.Tensor:
    """A half-precision output with its overflow clamped to the largest finite value: a float32 result a few
    ulps either side of the overflow threshold rounds to inf in one implementation and to the largest
    finite value in the other, which is the same result; an inf where the other side is far from the
    threshold still differs by at least the distance to it."""
    if x.dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(x.dtype).max
        return x.detach().float().clamp(-big, big)
    return x


def xpos_amplification(method: str, positions: torch.Tensor, rotary_dim: int) -> torch.Tensor | None:
    """The largest xPos scale exp(|(t - center) rate|) x attention factor at each position, shaped to broadcast
    over (B, H, T, D); None for a method without xPos."""
    params = rope_params(parse(method), rotary_dim, positions)
    if params.xpos_rate is None:
        return None
    rel = positions.double()[..., None] - params.xpos_center
    exponent = (rel * params.xpos_rate.double()).abs().clamp(max=XPOS_MAX_EXPONENT).amax(-1, keepdim=True)
    amp = torch.exp(exponent) * params.attention_factor  # (T, 1) or (B, T, 1)
    return amp[:, None] if amp.dim() == 3 else amp


def assert_kernel_matches(oq, ok, rq, rk, inputs=None, amplification=None):
    """Kernel against reference. With xPos (``amplification``, from ``xpos_amplification``), a float32 rounding
    of the rotation happens before the position's scale multiplies it, so the bound at each element is
    16 float32 ulps of the inputs' magnitude (``inputs``: what was rotated) times that scale, plus one
    rounding of the output dtype; far from the center in float16 that bound passes anything, as the values
    themselves overflow."""
    if amplification is None:
        torch.testing.assert_close(saturated(oq), saturated(rq), rtol=0, atol=tolerance(rq))
        torch.testing.assert_close(saturated(ok), saturated(rk), rtol=0, atol=tolerance(rk))
        return
    for out, ref, x in zip((oq, ok), (rq, rk), inputs, strict=True):
        x_max = x.detach().float().abs().max().item()
        extra = 0.0 if ref.dtype == torch.float32 else torch.finfo(ref.dtype).eps
        bound = 16 * EPS32 * 2 * x_max * amplification.float() + extra * saturated(ref).abs() + 1e-30
        diff = (saturated(out) - saturated(ref)).abs()
        assert not torch.isnan(diff).any(), "NaN in the kernel's or the reference's output"
        worst = (diff - bound).argmax()
        assert (diff <= bound).all(), (
            f"{(diff > bound).sum().item()} elements beyond the bound; worst at flat index "
            f"{worst.item()}: {saturated(out).flatten()[worst].item()} vs {saturated(ref).flatten()[worst].item()}"
        )


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hq = draw(st.integers(1, 4))
    Hk = draw(st.sampled_from([h for h in (1, 2, Hq) if Hq % h == 0]))
    T = draw(st.integers(1, 5))
    D = draw(st.sampled_from([2, 4, 8, 16, 24, 80]))
    rotary_dims = {r for r in (2, D // 2 - (D // 2) % 2, D - 2, D, 48) if 2 <= r <= D and r % 2 == 0}
    R = draw(st.sampled_from(sorted(rotary_dims)))
    return dict(
        B=B, Hq=Hq, Hk=Hk, T=T, D=D, R=R,
        layout=draw(st.sampled_from(["half", "interleaved"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        method=draw(st.sampled_from(METHODS)),
        per_batch=draw(st.booleans()),
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        max_pos=draw(st.sampled_from([8, 4096, 200_000])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def make_inputs(c, requires_grad=False):
    g = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hk, T, D = c["B"], c["Hq"], c["Hk"], c["T"], c["D"]
    if c["strided"]:  # as attention makes them: (B, T, H, D) projections viewed as (B, H, T, D)
        q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, generator=g).transpose(1, 2)
    else:
        q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    q = q.to(device=DEVICE, dtype=c["dtype"]).requires_grad_(requires_grad)
    k = k.to(device=DEVICE, dtype=c["dtype"]).requires_grad_(requires_grad)
    shape = (B, T) if c["per_batch"] else (T,)
    pos = torch.randint(0, c["max_pos"], shape, generator=g).to(device=DEVICE, dtype=c["pos_dtype"])
    return q, k, pos


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_forward_and_backward_equal_the_reference(c):
    assume(c["R"] > 2 or not c["method"].startswith(("ntk", "dynamic")))  # d/(d-2) needs d > 2
    q, k, pos = make_inputs(c, requires_grad=True)
    kw = dict(layout=c["layout"], rotary_dim=c["R"])
    oq, ok = apply_rope(q, k, pos, c["method"], backend="triton", **kw)
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = apply_rope(q2, k2, pos, c["method"], backend="torch", **kw)
    assert oq.dtype == q.dtype and oq.shape == q.shape and ok.shape == k.shape
    assert_kernel_matches(oq, ok, rq, rk)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    torch.autograd.backward((oq, ok), (gq, gk))
    torch.autograd.backward((rq, rk), (gq, gk))
    assert_kernel_matches(q.grad, k.grad, q2.grad, k2.grad)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_angles_are_exact_at_long_positions(layout):
    # rotate unit vectors: the output of pair j is (cos a, sin a), a = m * theta_j, checked against float64
    D = 128
    m = torch.tensor([2**20, 2**20 - 1, 1_000_003, 65_537], device=DEVICE)
    for spec in ["rope:base=10000", "abf:base=500000", "pi:factor=8,base=10000"]:
        method = parse(spec)
        x = torch.zeros(1, 1, len(m), D, device=DEVICE)
        a_idx = torch.arange(D // 2) * 2 if layout == "interleaved" else torch.arange(D // 2)
        b_idx = a_idx + 1 if layout == "interleaved" else a_idx + D // 2
        x[..., a_idx] = 1.0
        out, _ = apply_rope(x, x, m, method, layout=layout, backend="triton")
        got = torch.atan2(out[0, 0][:, b_idx].double().cpu(), out[0, 0][:, a_idx].double().cpu())
        theta = method.inv_freq64(D)
        exact = torch.tensor(
            [[math.atan2(math.sin(p * t), math.cos(p * t)) for t in theta.tolist()] for p in m.tolist()]
        )  # noqa: E501
        err = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
        assert err.abs().max().item() <= 1e-5, spec


def test_in_place_overwrites_q_and_k_with_the_out_of_place_result():
    q, k = torch.randn(2, 4, 6, 80, device=DEVICE), torch.randn(2, 2, 6, 80, device=DEVICE)
    pos = torch.randint(0, 10_000, (2, 6), device=DEVICE)
    spec = "xpos:base=500000,scale_base=512,center=5000"
    want_q, want_k = apply_rope(q, k, pos, spec, rotary_dim=48, backend="triton")
    q_ptr = q.data_ptr()
    got_q, got_k = apply_rope_(q, k, pos, spec, rotary_dim=48, backend="triton")
    assert got_q is q and got_k is k and q.data_ptr() == q_ptr
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_partial_rotary_tail_untouched_for_non_power_of_two_dims():
    q, k = torch.randn(1, 3, 4, 80, device=DEVICE), torch.randn(1, 1, 4, 80, device=DEVICE)
    oq, ok = apply_rope(q, k, torch.arange(4, device=DEVICE) * 999, "rope:base=10000", rotary_dim=48, backend="triton")
    assert torch.equal(oq[..., 48:], q[..., 48:]) and torch.equal(ok[..., 48:], k[..., 48:])


def test_q_heads_split_over_programs_with_k_in_the_first_only():
    # GQA 32/8 with a tail to copy: the launcher splits the q heads over programs and keeps every k head
    # in the first tile (programs past it have masked k lanes); each must still write only its own rows
    from ropekit.kernels import rope as kernel
    from ropekit.rotary import rope_params

    q = torch.randn(1, 2, 32, 80, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 8, 80, device=DEVICE).transpose(1, 2).requires_grad_()
    pos = torch.tensor([3, 70_000], device=DEVICE)
    spec = "xpos:base=500000,scale_base=512,center=5000"
    params = rope_params(parse(spec), 48, pos)
    grid, _, meta = kernel.launch_args(q, k, torch.empty_like(q), torch.empty_like(k), pos, params.inv_freq,
                                       params.xpos_rate, interleaved=False, attention_factor=1.0,
                                       xpos_center=5000, conjugate=False, inplace=False)  # fmt: skip
    assert grid[1] > 1 and meta["BLOCK_HK"] == 8 and meta["BLOCK_HQ"] * grid[1] >= 32
    oq, ok = apply_rope(q, k, pos, spec, rotary_dim=48, backend="triton")
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = apply_rope(q2, k2, pos, spec, rotary_dim=48, backend="torch")
    assert_kernel_matches(oq, ok, rq, rk)
    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    torch.autograd.backward((oq, ok), (gq, gk))
    torch.autograd.backward((rq, rk), (gq, gk))
    assert_kernel_matches(q.grad, k.grad, q2.grad, k2.grad)


def test_float64_is_refused_by_the_kernel_with_a_clear_error():
    q = torch.randn(1, 1, 2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        apply_rope(q, q, torch.arange(2, device=DEVICE), "rope:base=10000", backend="triton")


def test_gqa_with_one_key_head():
    # a peer once left k untouched when num_kv_heads == 1
    q, k = torch.randn(1, 8, 3, 16, device=DEVICE), torch.randn(1, 1, 3, 16, device=DEVICE)
    pos = torch.tensor([5, 6, 7], device=DEVICE)
    oq, ok = apply_rope(q, k, pos, "rope:base=10000", backend="triton")
    rq, rk = apply_rope(q, k, pos, "rope:base=10000", backend="torch")
    assert_kernel_matches(oq, ok, rq, rk)
    assert not torch.equal(ok, k)


def test_custom_op_compiles_fullgraph_forward_and_backward():
    # torch.compile must see one op, not a graph break; on CPU the op runs the kernel in Triton's
    # interpreter; the gpu test below repeats it compiled by inductor on CUDA.
    torch._dynamo.reset()
    method = parse("yarn:factor=4,original_max_position_embeddings=16,base=10000")
    inv = method.inv_freq64(16)

    def f(q, k, pos):
        oq, ok = torch.ops.ropekit.rope(q, k, pos, inv, None, method.attention_factor, 0, False, False)
        return (oq * ok.mean(1, keepdim=True)).sum()

    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = torch.randn(2, 2, 8, 16, requires_grad=True)
    pos = torch.arange(8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, pos)
    out.backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    want = f(q, k, pos)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gk, k.grad)


def test_hf_patch_with_the_triton_backend_gives_the_reference_logits():
    model = load_model("tiny:llama").to(DEVICE)
    x = torch.randint(0, 512, (2, 12), device=DEVICE)
    with torch.no_grad():
        handle = ropekit.patch(model, "xpos:base=10000,scale_base=64", backend="torch")
        want = model(x).logits
        handle.undo()
        ropekit.patch(model, "xpos:base=10000,scale_base=64", backend="triton")
        got = model(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU: the same properties at real sizes (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gpu_real_sizes_forward_backward(dtype, method, layout):
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 2, 4096, 32, 8, 128
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    pos = (torch.arange(T, device="cuda") + torch.tensor([[0], [30_000]], device="cuda")).to(torch.int32)
    oq, ok = apply_rope(q, k, pos, method, layout=layout, backend="triton")
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = apply_rope(q2, k2, pos, method, layout=layout, backend="torch")
    amp = xpos_amplification(method, pos, D)  # None but for xPos
    assert_kernel_matches(oq, ok, rq, rk, inputs=(q, k), amplification=amp)
    g = (torch.randn_like(rq), torch.randn_like(rk))
    torch.autograd.backward((oq, ok), g)
    torch.autograd.backward((rq, rk), g)
    assert_kernel_matches(q.grad, k.grad, q2.grad, k2.grad, inputs=g, amplification=amp)


@pytest.mark.gpu
def test_gpu_more_than_2_pow_31_elements():
    # 1 x 32 heads x 2^19 tokens x 128 dims = 2^31 elements in q alone: offsets must be 64-bit
    T, H, D = 2**19 + 8, 32, 128
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * T * H * D * 2:
        pytest.skip("not enough GPU memory")
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda")
    oq, ok = apply_rope(q, k, pos, "abf:base=500000", backend="triton")
    assert q.numel() > 2**31
    for t in (0, 2**18, T - 1):  # spot-check tokens at the far end against the reference
        sl = slice(t, t + 1)
        rq, rk = apply_rope(q[:, :, sl], k[:, :, sl], pos[sl], "abf:base=500000", backend="torch")
        assert_kernel_matches(oq[:, :, sl], ok[:, :, sl], rq, rk)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_through_the_kernel():
    torch._dynamo.reset()
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(256, device="cuda")

    def f(q, k):
        oq, ok = apply_rope(q, k, pos, "pi:factor=4,base=10000", backend="triton")
        return oq.float().sum() + ok.float().pow(2).sum()

    out = torch.compile(f, fullgraph=True)(q, k)
    out.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.gpu
def test_gpu_patch_routes_through_the_kernel():
    from ropekit import hf

    model = load_model("tiny:llama", device="cuda")
    ropekit.patch(model, "abf:base=500000")
    calls = []
    launch = __import__("ropekit.kernels.rope", fromlist=["rope_launch"])
    original = launch.rope_launch

    def spy(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    launch.rope_launch = spy
    try:
        with torch.no_grad():
            model(torch.randint(0, 512, (1, 16), device="cuda"))
    finally:
        launch.rope_launch = original
    assert len(calls) == model.config.num_hidden_layers and isinstance(model.model.rotary_emb, hf.RopekitRotary)


def test_xpos_bound_passes_overflow_and_catches_an_error_where_values_are_finite():
    # float16 xPos: far from the center the values overflow (any result passes), near it the bound is tight
    method, D = "xpos:base=10000,scale_base=8", 16
    pos = torch.tensor([0, 1, 2, 400])  # 400 / 8 = 50 scale lengths from the center: beyond float16's range
    q = torch.randn(1, 2, 4, D, dtype=torch.float16)
    k = torch.randn(1, 1, 4, D, dtype=torch.float16)
    rq, rk = apply_rope(q, k, pos, method, backend="torch")
    amp = xpos_amplification(method, pos, D)
    assert torch.isinf(rk[:, :, 3]).any() and torch.isfinite(rk[:, :, :3]).all()  # k's scale grows away from it
    far_q, far_k = rq.clone(), rk.clone()
    far_q[:, :, 3], far_k[:, :, 3] = 0, 0  # overflowed (k) or vanished (q): no meaningful value to compare
    assert_kernel_matches(far_q, far_k, rq, rk, inputs=(q, k), amplification=amp)
    near = rq.clone()
    near[0, 0, 1, 0] += 0.25  # a finite position: an error of a quarter is far beyond 16 float32 ulps
    with pytest.raises(AssertionError, match="1 elements beyond the bound"):
        assert_kernel_matches(near, rk, rq, rk, inputs=(q, k), amplification=amp)
