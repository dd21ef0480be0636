"""The chunked linear cross-entropy against the plain (T x V) loss, forward and backward; the trainer's loss on
every tiny family (with their post-head transforms) against the model's own logits; evaluation reads the same
transforms."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ropekit.loss import (
    _FLOAT32_OUT,
    LogitTransform,
    _add_product,
    default_chunk,
    head_input,
    head_of,
    linear_cross_entropy,
)
from ropekit.models import TINY, load_model
from ropekit.train import loss_of

EPS32 = torch.finfo(torch.float32).eps


def plain(hidden, weight, targets, transform):
    return F.cross_entropy(transform(hidden @ weight.T), targets, reduction="none")


def close(got, want, scale):
    """float32 agreement: a few ulps of the magnitudes that were summed (logits of a d-term dot product)."""
    torch.testing.assert_close(got, want, rtol=0, atol=64 * EPS32 * scale)


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.25), LogitTransform(cap=3.0),
                                       LogitTransform(scale=4.0, cap=5.0)])  # fmt: skip
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_forward_and_backward_equal_the_plain_loss(transform, chunk, reduction):
    torch.manual_seed(0)
    N, d, V = 37, 16, 101
    hidden = torch.randn(N, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    token_weights = torch.rand(N) * 8  # the retrieval examples' per-token weights
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    got = linear_cross_entropy(hidden, weight, targets, token_weights=token_weights, reduction=reduction,
                               transform=transform, chunk=chunk)  # fmt: skip
    want = plain(h2, w2, targets, transform) * token_weights
    scale = float((hidden.detach().abs() @ weight.detach().abs().T).max()) * max(transform.scale, 1.0)  # one logit
    wmax, wsum = float(token_weights.max()), float(token_weights.sum())
    if reduction == "sum":
        want = want.sum()
    close(got, want, scale * (wsum if reduction == "sum" else wmax))
    g = 3.0  # an incoming gradient other than 1, as the trainer's (ranks / global weight)
    (got.sum() * g).backward()
    (want.sum() * g).backward()
    close(hidden.grad, h2.grad, scale * g * wmax * float(weight.detach().abs().max()))
    close(weight.grad, w2.grad, scale * g * wsum * float(hidden.detach().abs().max()))


class _HeadMatmuls(TorchDispatchMode):
    """Counts the matrix products that touch the vocabulary dimension (any overload: out=, in place)."""

    def __init__(self, V):
        super().__init__()
        self.V, self.count = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += any(isinstance(a, torch.Tensor) and self.V in a.shape for a in args)
        return func(*args, **(kwargs or {}))


def test_the_summed_loss_costs_three_head_matmuls_as_the_plain_loss_and_the_per_token_loss_four():
    N, d, V = 64, 16, 256
    for reduction, chunks_times in [("sum", 3), ("none", 4)]:
        hidden, weight = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
        with _HeadMatmuls(V) as head:
            linear_cross_entropy(
                hidden, weight, torch.randint(0, V, (N,)), reduction=reduction, chunk=16
            ).sum().backward()
        assert head.count == chunks_times * (N // 16), reduction
    with _HeadMatmuls(V) as head:  # the control: the plain loss, one matmul each way
        plain(hidden, weight, torch.randint(0, V, (N,)), LogitTransform()).sum().backward()
    assert head.count == 3


def test_float16_scales_the_gradient_before_rounding_it():
    # fp16 weights whose summed gradient (about 1e5) fits float16 only once the incoming 1 / N scales it
    torch.manual_seed(0)
    N, d, V = 16384, 64, 32
    hidden = (torch.randn(N, d).abs() * 8).half().requires_grad_()
    weight = (torch.randn(V, d) * 1e-3).half().requires_grad_()
    targets = torch.zeros(N, dtype=torch.long)
    (linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk=4096) / N).backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    (plain(h32, w32, targets, LogitTransform()).sum() / N).backward()
    assert torch.isfinite(weight.grad).all()
    half = torch.finfo(torch.float16).eps
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=0, atol=8 * half * float(w32.grad.abs().max()))


def test_a_second_derivative_fails_loudly():
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    for reduction in ("sum", "none"):
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 9, (6,)), reduction=reduction).sum()
        (gh,) = torch.autograd.grad(loss, [hidden], create_graph=True)
        with pytest.raises(RuntimeError, match="twice|does not require grad"):  # never a silent zero
            gh.sum().backward()


def test_scoring_without_gradients_matches_and_makes_no_gradient():
    N, d, V = 40, 8, 64
    hidden, weight = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    targets, token_weights = torch.randint(0, V, (N,)), torch.rand(N)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, token_weights=token_weights, reduction="sum", chunk=9)
    assert got.grad_fn is None
    want = (plain(hidden, weight, targets, LogitTransform()) * token_weights).sum()
    close(
        got, want.detach(), float((hidden.detach().abs() @ weight.detach().abs().T).max()) * float(token_weights.sum())
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_under_bf16_autocast_both_reductions_agree_with_the_bf16_head(device):
    torch.manual_seed(0)
    N, d, V = 48, 32, 128
    hidden = torch.randn(N, d, device=device, requires_grad=True)
    weight = torch.randn(V, d, device=device, requires_grad=True)
    targets, token_weights = torch.randint(0, V, (N,), device=device), torch.rand(N, device=device) * 4
    with torch.autocast(device, dtype=torch.bfloat16):
        summed = linear_cross_entropy(hidden, weight, targets, token_weights=token_weights, reduction="sum", chunk=10)
    gh, gw = torch.autograd.grad(summed, [hidden, weight])
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):  # the head in bf16, the softmax in float32
        want = (F.cross_entropy((h2 @ w2.T).float(), targets, reduction="none") * token_weights).sum()
    want_h, want_w = torch.autograd.grad(want, [h2, w2])
    eps = torch.finfo(torch.bfloat16).eps  # each bf16 rounding of a logit or a gradient term
    logit = float((hidden.abs() @ weight.abs().T).max())
    torch.testing.assert_close(summed, want, rtol=0, atol=4 * eps * logit * float(token_weights.sum()))
    torch.testing.assert_close(gh, want_h, rtol=0, atol=4 * eps * float(token_weights.max() * weight.abs().max()) * d)
    torch.testing.assert_close(gw, want_w, rtol=0, atol=4 * eps * float(token_weights.sum() * hidden.abs().max()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_bf16_weight_gradient_is_summed_in_float32(device):
    """The head's weight gradient from bf16 blocks: each block's product added to a float32 sum. On CUDA,
    cuBLAS writes it in float32 (no bf16 product: float32 agreement); elsewhere the product is rounded to bf16
    first (one bf16 rounding of each block's terms)."""
    torch.manual_seed(0)
    a = torch.randn(64, 40, device=device).bfloat16()
    b = torch.randn(40, 48, device=device).bfloat16()
    acc = torch.randn(64, 48, device=device)
    want = acc.double() + a.double() @ b.double()
    _add_product(acc, a, b)
    _add_product(acc, a, b)  # the second call takes the path the first one learnt
    want = want + a.double() @ b.double()
    size = float((a.double().abs() @ b.double().abs()).max())  # one product's magnitude
    eps = torch.finfo(torch.float32 if device == "cuda" else torch.bfloat16).eps
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=2 * eps * (size + float(want.abs().max())))
    assert _FLOAT32_OUT[device] == (device == "cuda")  # CUDA: the float32 output from bf16 inputs was used
    _add_product(acc, a.double(), b.double())  # float64 blocks take the plain way, whatever was learnt
    torch.testing.assert_close(acc.double(), want + a.double() @ b.double(), rtol=0,
                               atol=2 * eps * (size + float(want.abs().max())) + 4 * EPS32 * size)  # fmt: skip
    assert _FLOAT32_OUT[device] == (device == "cuda")


def test_default_blocks_fit_the_devices_budget_and_fill_whole_tiles_on_cuda():
    assert default_chunk(49152, "cpu") == 341 and default_chunk(128256, "cpu") == 130  # 64 MiB of float32 logits
    assert default_chunk(128256, "cuda") == 1024  # 512 MiB holds 1,046 rows: eight whole 128-row tiles
    assert default_chunk(49152, "cuda") == 2688 and default_chunk(2**23, "cuda") == 16  # under a tile: as it fits
    assert default_chunk(2**40, "cpu") == 1 and default_chunk(49152, "mps") == 341  # other devices: the CPU's


def test_no_tokens_by_vocabulary_tensor_is_kept_for_backward():
    N, d, V = 512, 8, 1000
    hidden = torch.randn(N, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, torch.randint(0, V, (N,)), chunk=64)
    assert saved and max(saved) < N * V // 10  # hidden, weight, targets, one logsumexp per token
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        plain(hidden, weight, torch.randint(0, V, (N,)), LogitTransform())
    assert max(saved) >= N * V  # the plain loss keeps the logits (the hook sees what it would cost)


def test_bad_shapes_and_chunk_are_named():
    with pytest.raises(ValueError, match="must agree on d"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \(N,\) = \(3,\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_weights must be \(N,\) = \(3,\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                             token_weights=torch.ones(2))  # fmt: skip
    for bad in (-100, 5):  # HF's ignore index is not a token; nor is one past the vocabulary
        with pytest.raises(ValueError, match=rf"targets must be token ids in \[0, 5\); got {min(bad, 0)}\.\."):
            linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, bad, 1]), reduction="sum")
    with pytest.raises(ValueError, match="reduction must be 'none' or 'sum'; got 'mean'"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), reduction="mean")
    with pytest.raises(ValueError, match="chunk must be an integer >= 1; got 0"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="must share a dtype outside autocast; got torch.bfloat16 and torch.float32"):
        linear_cross_entropy(torch.randn(3, 4).bfloat16(), torch.randn(5, 4), torch.zeros(3, dtype=torch.long))


# The families' post-head transforms, switched on where the tiny config leaves them off (every family
# transformers ships, with each of these keys its config has, is checked in tests/test_families.py).
TRANSFORMS = {"granite": {"logits_scaling": 4.0}, "gemma3": {"final_logit_softcapping": 3.0}}


@pytest.mark.parametrize("family", list(TINY))
def test_trainer_loss_equals_the_models_own_logits_forward_and_backward(family):
    torch.manual_seed(0)
    model = load_model(f"tiny:{family}", **TRANSFORMS.get(family, {}))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    pos = torch.arange(24)[None].expand(2, -1)
    assert head_input(model, ids, pos).transform.identity == (family not in TRANSFORMS)
    weights = torch.rand(2, 24) * 8
    got = loss_of(model, ids, pos, weights, reduction="sum")
    got_grads = torch.autograd.grad(got, [p for p in model.parameters()], allow_unused=True)
    logits = model(input_ids=ids, position_ids=pos).logits  # the model's own head and transform
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    want = (ce * weights[:, :-1].reshape(-1)).sum()
    want_grads = torch.autograd.grad(want, [p for p in model.parameters()], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()) + 1e-7)


def test_head_input_is_the_heads_input_and_leaves_the_head_in_place():
    model = load_model("tiny:llama")
    ids = torch.randint(0, 512, (1, 10))
    hidden, transform, _ = head_input(model, ids)
    torch.testing.assert_close(model.lm_head(hidden), model(ids).logits)
    assert transform == LogitTransform()  # Llama's logits are its head's output
    assert "forward" not in vars(model.lm_head)  # the head's own forward is back


def test_head_input_reads_a_soft_cap_kept_in_the_text_config_of_a_multimodal_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=8, final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=128)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma4", text_config=text, vision_config=vision, audio_config=None)
    model = AutoModelForCausalLM.from_config(config)
    assert getattr(model.config, "final_logit_softcapping", None) is None  # the cap lives in text_config only
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(40.0)  # logits of a trained model's size, where the cap bites
    ids = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16)[None].expand(2, -1)
    assert head_input(model, ids, pos).transform == LogitTransform(cap=30.0)
    logits = model(input_ids=ids, position_ids=pos).logits
    assert float(logits.abs().max()) > 10  # far from linear: a cap left out moves the loss by more than 1
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_of(model, ids, pos, reduction="sum"), want, rtol=1e-5, atol=0)


class _PostHead(torch.nn.Module):
    """A causal LM whose logits are ``post`` of its head's output (the head called ``calls`` times)."""

    def __init__(self, post, calls: int = 1, vocab: int = 8):
        super().__init__()
        self.embed, self.lm_head = torch.nn.Embedding(vocab, 4), torch.nn.Linear(4, vocab, bias=False)
        self.post, self.calls, self.forwards = post, calls, 0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        self.forwards += 1
        hidden = self.embed(input_ids)
        logits = [self.lm_head(hidden) for _ in range(self.calls)][-1] if self.calls else hidden @ self.lm_head.weight.T
        return CausalLMOutput(logits=self.post(logits))


def test_a_model_whose_logits_are_not_a_scale_and_cap_of_its_heads_output_is_refused():
    ids = torch.randint(0, 8, (1, 6))
    with pytest.raises(ValueError, match=r"_PostHead transforms its logits other than by a scale and a final soft-cap"):
        loss_of(_PostHead(lambda x: x**2), ids, torch.arange(6)[None])
    with pytest.raises(ValueError, match=r"_PostHead transforms its logits other than"):
        head_input(_PostHead(lambda x: x.log_softmax(-1)), ids)
    with pytest.raises(ValueError, match=r"_PostHead turns its head's float32 output into torch.bfloat16"):
        head_input(_PostHead(lambda x: (x / 3).bfloat16()), ids)  # a scale read to bf16's 3 digits: refused
    with pytest.raises(ValueError, match=r"_PostHead's forward called its output head 2 times"):
        head_input(_PostHead(lambda x: x, calls=2), ids)
    with pytest.raises(ValueError, match=r"_PostHead's forward called its output head 0 times"):
        head_input(_PostHead(lambda x: x, calls=0), ids)
    with pytest.raises(ValueError, match=r"_PostHead's code after its output head fails on values in place of its "
                       r"logits \(IndexError: index 40 is out of bounds"):  # fmt: skip
        head_input(_PostHead(lambda x: x.index_fill(-1, torch.tensor([40]), -1e4), vocab=48), ids)  # as Chameleon
    with pytest.raises(torch.OutOfMemoryError):  # an error of the machine, not of the model: as it is
        head_input(_PostHead(_raise_oom), ids)
    # a scale then a cap (as muse_spark), negative scales, tiny and huge caps, a scale 2,500 times its cap
    # (tanh already curved at the smallest probe): read to float32's precision
    cases = [(lambda x: 30 * torch.tanh(x * 0.25 / 30), 0.25, 30.0), (lambda x: -x / 3, -1 / 3, None),
             (lambda x: 1e4 * torch.tanh(x / 1e4), 1.0, 1e4),
             (lambda x: 0.02 * torch.tanh(x / 0.02), 1.0, 0.02),
             (lambda x: 0.02 * torch.tanh(x * 50 / 0.02), 50.0, 0.02)]  # fmt: skip
    for post, scale, cap in cases:
        got = head_input(_PostHead(post), ids).transform
        assert got.scale == pytest.approx(scale, rel=2 * EPS32)
        assert got.cap == (None if cap is None else pytest.approx(cap, rel=2 * EPS32))


def test_a_head_padded_past_the_vocabulary_is_scored_on_the_logits_the_model_keeps():
    """Inkling keeps the first ``unpadded_vocab_size`` outputs of its head: the padded rows are not in its
    softmax, so they must not be in the loss, nor in the evaluation's scores."""
    inkling = pytest.importorskip("transformers.models.inkling.modeling_inkling")  # a recent family
    from ropekit.eval.perplexity import token_nll

    config = inkling.InklingTextConfig(vocab_size=256, unpadded_vocab_size=200, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               layer_types=["hybrid_sliding", "hybrid"])  # fmt: skip
    torch.manual_seed(0)
    model = inkling.InklingForCausalLM(config)
    ids = torch.randint(0, 200, (2, 16))
    pos = torch.arange(16)[None].expand(2, -1)
    assert head_input(model, ids, pos).transform == LogitTransform(vocab=200)
    model.config.unpadded_vocab_size = 240  # read again when the config changes
    assert head_input(model, ids, pos).transform == LogitTransform(vocab=240)
    model.config.unpadded_vocab_size = 200
    logits = model(input_ids=ids, position_ids=pos).logits
    assert logits.shape[-1] == 200
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 200), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(token_nll(model, ids[:1]), want[:15].detach(), rtol=2**4 * EPS32, atol=0)
    want = want.sum()
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    got = loss_of(model, ids, pos, reduction="sum")
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=2**4 * EPS32, atol=0)
    scale = max(float(w.abs().max()) for w in want_grads if w is not None)
    for g, w in zip(got_grads, want_grads, strict=True):  # the padded rows' gradient is zero in both
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=2**8 * EPS32 * scale)


def test_which_outputs_of_the_head_the_model_keeps_is_read_once_per_model_and_head():
    ids = torch.randint(0, 32, (1, 6))
    model = _PostHead(lambda x: x[..., :32], vocab=40)
    assert head_input(model, ids).transform.vocab == 32 and model.forwards == 2  # the probes, then the wide ones
    assert head_input(model, ids).transform.vocab == 32 and model.forwards == 3  # read once
    model.lm_head = torch.nn.Linear(4, 32, bias=False)  # a new head (resize_token_embeddings): read again
    assert head_input(model, ids).transform.vocab is None and model.forwards == 5
    with pytest.raises(ValueError, match=r"_PostHead's logits are not the first 39 of its head's 40 outputs as they "
                       r"are \(logit 20 is not output 20\)"):  # fmt: skip
        head_input(_PostHead(lambda x: torch.cat([x[..., :20], x[..., 21:]], -1), vocab=40), ids)  # drops id 20
    with pytest.raises(ValueError, match=r"_PostHead changes the width of its head's output after the head"):
        head_input(_PostHead(lambda x: x[..., 4:], vocab=40), ids)
    masked = _PostHead(lambda x: torch.where(torch.arange(x.shape[-1]) < 32, x, -torch.inf), vocab=40)
    with pytest.raises(ValueError, match=r"not the first 40 of its head's 40 outputs as they are \(logit 32 is not"):
        head_input(masked, ids)  # padded rows masked (not sliced): refused, not scored over all 40


def _raise_oom(x):
    raise torch.OutOfMemoryError("out of memory after the head")


def test_the_wide_forward_does_not_recompile_compiled_layers():
    from torch._dynamo.utils import counters

    from ropekit import parallel

    torch._dynamo.reset()
    counters.clear()
    model = load_model("tiny:llama")
    for layer in parallel._decoder_layers(model):
        layer.compile(backend="eager")  # as parallelize compiles them (eager backend: tracing only)
    ids, pos = torch.randint(0, 512, (1, 24)), torch.arange(24)[None]
    loss_of(model, ids, pos).backward()  # the probes at 24 tokens, then the wide ones at 8
    loss_of(model, ids, pos).backward()
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the layers' shared forward, at 24 tokens


class _ScaledHead(torch.nn.Linear):
    """A head that adds a learned per-token scale to ``nn.Linear``'s output (as transformers' Dory does)."""

    def forward(self, x):
        return super().forward(x) * torch.linspace(0.5, 4.0, self.out_features)


def test_a_linear_head_with_a_forward_of_its_own_is_scored_from_its_full_output():
    model = _PostHead(lambda x: x)
    model.lm_head = _ScaledHead(4, 8, bias=False)
    assert head_of(model) is None  # its weight alone would leave the per-token scale out
    ids = torch.randint(0, 8, (1, 6))
    logits = model(ids).logits[0, :-1]
    want = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    got = loss_of(model, ids, torch.arange(6)[None], reduction="sum")
    torch.testing.assert_close(got, want, rtol=2**4 * EPS32, atol=0)  # the same float32 logits, summed again


def test_head_input_puts_an_instance_level_forward_of_the_head_back():
    model = load_model("tiny:llama")
    calls = []

    def hooked(x):  # as accelerate's hooks wrap a module's forward on the instance
        calls.append(1)
        return torch.nn.Linear.forward(model.lm_head, x)

    model.lm_head.forward = hooked
    head_input(model, torch.randint(0, 512, (1, 8)))
    assert vars(model.lm_head)["forward"] is hooked and not calls  # set aside for the call, then back
    model(torch.randint(0, 512, (1, 8)))
    assert calls == [1]


def test_evaluation_applies_the_post_head_transform():
    from ropekit.eval.perplexity import token_nll

    model = load_model("tiny:granite", logits_scaling=4.0)
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    want = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # Granite's own logits, divided by 4
    torch.testing.assert_close(token_nll(model, ids, chunk=7), want, rtol=1e-5, atol=1e-5)


def test_training_page_is_generated_from_the_committed_rows():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "experiments/train_memory.py", "--check"], cwd=root, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert result.returncode == 0, result.stderr


FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from ropekit.models import load_model
from ropekit.parallel import parallelize
from ropekit.train import loss_of
dist.init_process_group("gloo")
torch.manual_seed(0)
ref, model = (load_model("tiny:granite", logits_scaling=4.0) for _ in range(2))
model.load_state_dict(ref.state_dict())
parallelize(model, fsdp=True)
ids = torch.randint(0, 512, (2, 16))
pos = torch.arange(16)[None].expand(2, -1)
want, got = loss_of(ref, ids, pos, reduction="sum"), loss_of(model, ids, pos, reduction="sum")
want.backward()
got.backward()
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
print(float((got - want) / want), max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max())
                             for n, p in ref.named_parameters()))
dist.destroy_process_group()
"""


def test_the_trainers_loss_under_fsdp2_on_a_model_that_scales_its_logits():
    """Under FSDP2 the head's weight lives with the root module: the loss runs the root's own forward."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loss_rel, grad_rel = map(float, run.stdout.split()[-2:])
    assert abs(loss_rel) <= 2**7 * EPS32 and grad_rel <= 2**7 * EPS32  # float32, one rank: the same sums
