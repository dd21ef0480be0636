"""ropekit: compare ways of extending a RoPE model's context window (Xiong et al. 2023, "Effective
Long-Context Scaling of Foundation Models"), through exact rotary kernels and a drop-in patch for
Hugging Face Llama-family models.

    import ropekit
    model = ropekit.load_model("smollm2-135m")
    handle = ropekit.patch(model, "abf:base=500000")   # handle.undo() restores the model
"""

from ropekit.methods import RopeMethod, parse
from ropekit.rotary import apply_rope

__version__ = "0.1.0"

__all__ = ["RopeMethod", "apply_rope", "load_model", "parse", "patch", "__version__"]


def patch(model, method, **kwargs):
    """Patch a loaded Llama-family model with a RoPE method; see ``ropekit.hf.patch``."""
    from ropekit.hf import patch as _patch

    return _patch(model, method, **kwargs)


def load_model(spec, **kwargs):
    """Load a model by spec (``tiny:llama``, ``smollm2-135m``, a .gguf, a folder, a hub id); see ``ropekit.models``."""
    from ropekit.models import load_model as _load_model

    return _load_model(spec, **kwargs)
