import contextlib
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


# ---------------------------------------------------------------------------------------------------
# transformers 4.x and 5.x alike: the suite runs on both (CI runs the HF-facing tests on 4.57.6)
# ---------------------------------------------------------------------------------------------------
def rope_config_kwargs(params: dict) -> dict:
    """Config keyword arguments for flat v5-style rope parameters: ``rope_parameters`` on transformers 5,
    ``rope_theta`` + ``rope_scaling`` on 4.x."""
    import transformers

    params = dict(params)
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": params}
    theta = params.pop("rope_theta")
    kwargs = {"rope_theta": theta, "rope_scaling": None if params == {"rope_type": "default"} else params}
    if params.get("rope_type") == "longrope" and "original_max_position_embeddings" in params:
        kwargs["original_max_position_embeddings"] = params["original_max_position_embeddings"]  # 4.x: top level
    return kwargs


def hf_rope_parameters(config, rope_type: str, seq_len: int | None = None):
    """transformers' own (inv_freq, attention_factor) for ``config`` (its init function for ``rope_type``)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:  # transformers 5: on the rotary class
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    kwargs = {"seq_len": seq_len} if seq_len is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)


@contextlib.contextmanager
def held_by_another_process(path, kind: str):
    """``ropekit.files.sole_writer(path, kind=kind)`` held by a child process until the block ends."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = Path(path)
    code = (
        "import time\nfrom ropekit.files import sole_writer\n"
        f"with sole_writer({str(path)!r}, kind={kind!r}):\n    print('held', flush=True)\n    time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait()
        time.sleep(0.05)
