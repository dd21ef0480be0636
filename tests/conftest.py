import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be set before
# any @triton.jit function is defined, so here, before ropekit.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, small, CPU-friendly defaults for every test.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def fp32_rounding(x: torch.Tensor) -> float:
    """The float32 rounding step at the magnitude of x (flash-attention's ``(x + 0.3 - 0.3) - x`` idea)."""
    x = x.detach().float()
    return ((x + 0.3 - 0.3) - x).abs().max().item() + torch.finfo(torch.float32).eps * x.abs().max().item()
