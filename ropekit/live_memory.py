"""The live tensor memory of one training step, by phase: a measure that does not depend on the allocator.

A CPU step's resident high-water mark counts what malloc keeps besides tensors, and a CUDA step's allocator
peak what the caching allocator rounds and holds; both move with the allocator's state. ``LiveTensors`` is a
dispatch mode that counts the bytes of every tensor storage alive on the step's device, op by op: those the
step starts with (parameters, buffers, optimizer state, inputs) and each one an op creates, until it is freed.
It records the peak of each phase of the step, what was alive at the step's peak (parameters, gradients,
optimizer state, the rest: activations, temporaries, the loss head's tensors), the loss head's own memory
(its phase's peak less what was alive when it began) and the largest single tensor an op made or grew, with the op: a
(T x vocabulary) logits tensor or a (T x T) attention matrix shows there.

What it cannot see: memory a kernel allocates for itself without returning it as a tensor (a fused
attention kernel's workspace), and what the allocator holds beyond live tensors: compare with the resident
or allocator peak of the same step (``ropekit bench --train-step`` records both).

Gradients at the peak are the storages alive then that the step hands to the parameters as ``.grad``,
whether autograd had handed them over by then or still held them (a peak in the backward comes before
most are handed over): they are told apart when the optimizer phase begins, when every gradient is in
place. A partial gradient that autograd later sums into a new tensor (a tied head's and embedding's,
summed at the end of the backward) is not the one handed over: it counts in the rest.

Phases, in the order a step runs them (``phases`` sets them with hooks):

- ``forward``: the decoder stack's forward, from the input to the head's input;
- ``loss head``: from the head's input to its gradient: the head, the loss, and their backward;
- ``backward``: the decoder stack's backward (with activation checkpointing, each layer's recomputation);
- ``optimizer``: the optimizer step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ropekit.hf import decoder_of

__all__ = ["PHASES", "LiveTensors", "phases"]

PHASES = ("forward", "loss head", "backward", "optimizer")


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own (sparse, a subclass)
        return None


class LiveTensors(TorchDispatchMode):
    """Count the bytes of tensor storages alive on ``device`` while the mode is on (see the module's text).

    ``model``, ``optimizer`` and ``inputs`` are what the step starts with; every tensor an op returns counts
    from then until its storage is freed (views share their base's storage and count once)."""

    def __init__(self, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 *inputs: torch.Tensor):  # fmt: skip
        super().__init__()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors carry their index: cuda means cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.phase = PHASES[0]
        self._live = 0  # bytes alive now, less those in ``_freed``
        self._freed: list[int] = []  # bytes of storages freed since the last look (freed on any thread)
        self.phase_peak = dict.fromkeys(PHASES, 0)
        self.phase_start: dict[str, int] = {}
        self.peak = 0
        self.at_peak: dict[str, int | str] = {}
        self.largest: tuple[int, str, str] = (0, "", "")  # bytes, op, phase
        self._counted = 0  # storages counted so far
        self._born: dict[int, int] = {}  # id(storage) -> its place in that count
        self._peak_born: int | None = None  # the newest storage alive at the peak, until grads are told
        self._params = list(model.parameters()) + list(model.buffers())
        self._optimizer = optimizer
        self._refs: dict[int, weakref.ref] = {}  # id(storage) -> a weak reference that counts its bytes out
        self._bytes: dict[int, int] = {}
        for t in [*self._params, *self._optimizer_tensors(), *inputs]:
            self._count(t)
        self._params_bytes = self._bytes_of(self._params)
        self._optimizer_bytes = self._bytes_of(self._optimizer_tensors())
        self.start_phase(PHASES[0])

    @property
    def live(self) -> int:
        """Bytes alive now."""
        while self._freed:
            self._live -= self._freed.pop()
        return self._live

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return [v for state in self._optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]

    def _bytes_of(self, tensors) -> int:
        seen = {}
        for t in tensors:
            if t is not None and t.device == self.device and (st := _storage(t)) is not None:
                seen[id(st)] = st.nbytes()
        return sum(seen.values())

    def _count(self, t: torch.Tensor, op: str = "") -> None:
        """Count ``t``'s storage if it is new, or its growth if it was resized in place; the largest tensor is
        one an op made or grew (``op``), never a view of a tensor that was there before."""
        if t.device != self.device or (st := _storage(t)) is None:
            return
        key, size = id(st), st.nbytes()
        old = self._bytes.get(key)
        if old is not None and key in self._refs and self._refs[key]() is st:
            if size == old:
                return
            self._live += size - old
        else:
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._on_free(key))
            self._counted += 1
            self._born[key] = self._counted
            self._live += size
        self._bytes[key] = size
        if op and size > self.largest[0]:
            self.largest = (size, op, self.phase)

    def _on_free(self, key: int) -> None:  # a weakref callback: may run on another thread (CUDA's backward)
        self._freed.append(self._bytes.pop(key, 0))
        self._refs.pop(key, None)
        self._born.pop(key, None)

    def start_phase(self, phase: str) -> None:
        if phase == "optimizer":
            self._grads_at_peak()
        self.phase = phase
        self.phase_start.setdefault(phase, self.live)
        self._note_peak()

    def _grads_at_peak(self) -> None:
        """Every gradient is in place as the optimizer begins: those alive at the peak count as gradients."""
        if self._peak_born is None:
            return
        seen = {}
        for p in self._params:  # alive now and counted before the peak: alive at the peak
            g = p.grad
            if g is not None and g.device == self.device and (st := _storage(g)) is not None:
                key, ref = id(st), self._refs.get(id(st))
                if ref is not None and ref() is st and self._born[key] <= self._peak_born:
                    seen[key] = st.nbytes()
        self._peak_born = None
        at = self.at_peak
        at["grads"] = sum(seen.values())
        at["rest"] = self.peak - at["params"] - at["grads"] - at["optimizer"]

    def _note_peak(self) -> None:
        live = self.live
        if live > self.phase_peak[self.phase]:
            self.phase_peak[self.phase] = live
        if live > self.peak:
            self.peak = live
            if self.phase == "optimizer":  # its state changes only in its step (the first step makes it)
                self._optimizer_bytes = self._bytes_of(self._optimizer_tensors())
            params, optimizer = self._params_bytes, self._optimizer_bytes
            grads = self._bytes_of(p.grad for p in self._params)  # told again as the optimizer begins
            self._peak_born = self._counted if self.phase != "optimizer" else None
            self.at_peak = {"phase": self.phase, "params": params, "grads": grads, "optimizer": optimizer,
                            "rest": live - params - grads - optimizer}  # fmt: skip

    def __exit__(self, *args):
        """Leave the mode and let go of the model, the optimizer and the weak references (one use): a tracker
        kept for its numbers must not keep a model alive, nor count storages freed after the step."""
        try:
            return super().__exit__(*args)
        finally:
            self.live  # noqa: B018 (takes in what was freed before the references go)
            self._refs.clear()
            self._born.clear()
            self._params, self._optimizer = [], None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live  # noqa: B018 (takes in what was freed, before new storages count)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t, str(func.overloadpacket.__name__))
        self._note_peak()
        return out

    def summary(self) -> dict:
        """Bytes: the step's peak and its split, each phase's peak and what was alive as it began (in the
        order the phases began), the loss head's own memory (its phase's peak less what was alive when it
        began) and the largest tensor an op made or grew (with the op and phase)."""
        head = self.phase_peak["loss head"] - self.phase_start.get("loss head", self.phase_peak["loss head"])
        size, op, phase = self.largest
        return {"peak": self.peak, "at_peak": dict(self.at_peak), "phase_peak": dict(self.phase_peak),
                "phase_start": dict(self.phase_start), "loss_head": max(head, 0), "largest_tensor": size,
                "largest_tensor_op": f"{op} ({phase})"}  # fmt: skip


@contextlib.contextmanager
def phases(live: LiveTensors, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[LiveTensors]:
    """Move ``live`` through the step's phases: ``loss head`` when the decoder stack returns the head's input,
    ``backward`` when that input's gradient is made, ``optimizer`` when the optimizer steps."""

    def decoder_done(module, args, output):
        live.start_phase("loss head")
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: live.start_phase("backward"))

    handles = [decoder_of(model).register_forward_hook(decoder_done),
               optimizer.register_step_pre_hook(lambda *_: live.start_phase("optimizer"))]  # fmt: skip
    try:
        with live:
            yield live
    finally:
        for h in handles:
            h.remove()
