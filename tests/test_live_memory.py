"""The live tensor count of a training step: exact bytes, each storage once, and it sees the two memory walls of
a long-context step (full logits, a (T x T) attention matrix) where they are and not where they are not."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ropekit.live_memory import PHASES, LiveTensors
from ropekit.loss import linear_cross_entropy
from ropekit.models import tiny_config
from ropekit.parallel import parallelize
from ropekit.studies.bench import TRAIN_STEP_MODELS, _time_train_steps, live_measures
from ropekit.train import adamw


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_each_storage_counts_once_from_the_op_that_made_it_until_it_is_freed():
    model = torch.nn.Linear(16, 16, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static = _nbytes(model.parameters())
    live = LiveTensors("cpu", model, opt)
    with live:
        weight_view = model.weight.t()  # a view of a tensor that was there before: no bytes, never "made"
        a = torch.empty(1000)  # 4,000 bytes
        views = (a[:10], a.view(10, 100), a[::2])  # no bytes of their own
        b = torch.zeros(500)  # 2,000 bytes
        assert live.live == static + 6000
        del a, views
        assert live.live == static + 2000  # the last reference went: freed
        b.resize_(1500)  # grown in place: 6,000 bytes now
        c = b + 1  # a new 6,000-byte tensor
    assert live.live == static + 12000 and live.peak == static + 12000
    assert live.largest == (6000, "resize_", "forward")  # the step's largest tensor, by op and phase
    del c, weight_view


def test_a_tracker_lets_go_of_the_model_when_the_step_ends():
    import weakref

    model = torch.nn.Linear(16, 16, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    live = LiveTensors("cpu", model, opt)
    with live:
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
    weight = weakref.ref(model.weight)
    del model, opt
    assert weight() is None  # no cycle through the tracker keeps it (a CUDA bench measures many in one process)
    assert live.summary()["peak"] > 0  # the numbers stay


def test_a_gradient_alive_at_a_backward_peak_counts_as_a_gradient_before_autograd_hands_it_over():
    """The weight's gradient makes the step's peak in the backward, before autograd sets ``.grad``: it counts
    as gradients, not as the rest (activations), once the optimizer phase shows where it went."""
    model = torch.nn.Linear(512, 512, bias=False)  # 1 MiB of weight, and of its gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 512)
    live = LiveTensors("cpu", model, opt, x)
    with live:
        loss = model(x).square().sum()
        live.start_phase("backward")
        loss.backward()
        live.start_phase("optimizer")
        opt.step()
    at, weight = live.at_peak, _nbytes(model.parameters())
    assert at["phase"] == "backward" and at["params"] == weight and at["grads"] == weight
    assert at["params"] + at["grads"] + at["optimizer"] + at["rest"] == live.peak
    assert 0 <= at["rest"] < weight / 8  # the activations and their gradients: a few (4 x 512) tensors


def test_the_chunked_loss_makes_no_tensor_the_size_of_the_logits_and_the_full_loss_does():
    T, d, V = 1024, 32, 512
    logits_bytes = T * V * 4
    hidden = torch.randn(T, d, requires_grad=True)
    head = torch.nn.Linear(d, V, bias=False)
    targets = torch.randint(0, V, (T,))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    full, chunked = LiveTensors("cpu", head, opt, hidden), LiveTensors("cpu", head, opt, hidden)
    with full:
        F.cross_entropy(head(hidden), targets).backward()
    hidden.grad = head.weight.grad = None
    with chunked:
        linear_cross_entropy(hidden, head.weight, targets, chunk=64).mean().backward()
    assert full.largest[0] >= logits_bytes  # the negative control: the wall is seen where it is
    assert chunked.largest[0] < logits_bytes / 4 and chunked.largest[0] <= max(T, V) * d * 4
    assert chunked.peak - chunked.phase_start["forward"] < (full.peak - full.phase_start["forward"]) / 2


def _step_summary(attn: str, T: int = 512, provider: str = "hf") -> tuple[dict, int]:
    torch.manual_seed(0)
    shape = TRAIN_STEP_MODELS["micro"]
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **shape, attn_implementation=attn))
    model.config.use_cache = False
    if provider == "ropekit-train":  # as the bench sets the trainer's step up: checkpointing per layer
        parallelize(model, activation_checkpointing=True)
    opt = adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    ids = torch.randint(0, shape["vocab_size"], (1, T))
    _, live = _time_train_steps(model, opt, ids, provider, 1, "test", live=True)
    return live, _nbytes(model.parameters()) + _nbytes(model.buffers())


@pytest.mark.parametrize("provider", ["hf", "ropekit-train"])
def test_a_steps_live_memory_moves_through_its_phases_and_splits_its_peak(provider):
    live, params = _step_summary("sdpa", provider=provider)  # params: with the buffers
    assert list(live["phase_start"]) == list(PHASES)  # every hook fired, in the step's order
    assert live["at_peak"]["params"] == params  # parameters and buffers (the rotary table)
    assert live["at_peak"]["rest"] >= 0
    assert live["phase_peak"]["forward"] >= 3 * params  # after the warm-up AdamW's two moments exist all step
    assert live["phase_peak"]["optimizer"] >= 4 * params  # and the gradients at the optimizer's step
    assert live["loss_head"] > 0 and live_measures(live, 1.0)["live_peak_gb"] == live["peak"] / 1e9


def test_a_quadratic_attention_shows_as_the_steps_largest_tensor():
    T, heads = 512, TRAIN_STEP_MODELS["micro"]["num_attention_heads"]
    scores = heads * T * T * 4
    eager, _ = _step_summary("eager", T)  # the positive control: attention keeps (heads x T x T) scores
    sdpa, _ = _step_summary("sdpa", T)
    logits = T * TRAIN_STEP_MODELS["micro"]["vocab_size"] * 4
    assert eager["largest_tensor"] >= scores and "loss head" not in eager["largest_tensor_op"]
    assert sdpa["largest_tensor"] <= logits < scores and "loss head" in sdpa["largest_tensor_op"]  # HF's logits
