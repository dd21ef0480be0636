"""ropekit: compare ways of extending a RoPE model's context window (Xiong et al. 2023, "Effective
Long-Context Scaling of Foundation Models"), through exact rotary kernels and a drop-in patch for
Hugging Face Llama-family models.

    import ropekit
    model = ropekit.load_model("smollm2-135m")
    handle = ropekit.patch(model, "abf:base=500000")   # handle.undo() restores the model
"""

from ropekit.hf import patch
from ropekit.methods import RopeMethod, parse
from ropekit.models import load_model
from ropekit.rotary import apply_rope
from ropekit.version import __version__

__all__ = ["RopeMethod", "apply_rope", "load_model", "parse", "patch", "__version__"]
