"""Training: loss goes down, exact resume, refused resumes, FSDP2 on two gloo processes, config overrides."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ropekit import train as train_mod
from ropekit.models import load_model
from ropekit.train import PRESETS, TrainConfig, apply_overrides, get_lr, train

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def micro_config(**kw) -> TrainConfig:
    base = dict(model_overrides=MICRO, vocab_size=512, seq_len=64, steps=6, tokens_per_step=256, micro_batch=2,
                lr=3e-3, warmup_steps=2, eval_every=3, save_every=3, eval_batches=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_on_a_tiny_model(tmp_path):
    r = train(micro_config(steps=40, lr=1e-2, warmup_steps=4, eval_every=20, save_every=40), tmp_path)
    first, last = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert r["val"][-1][1] < r["val"][0][1] + 0.1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    model = load_model(r["final"])  # the final model reloads with its method re-applied
    assert model.config.ropekit["method"] == "rope:base=10000"


def crash_at_step_5(cfg, out, monkeypatch):
    """Run ``cfg`` into ``out`` until an injected crash at step 5 (after the step-3 checkpoint)."""
    real_get_lr = train_mod.get_lr

    def get_lr(step, c):
        if step == 5:
            raise RuntimeError("injected crash")
        return real_get_lr(step, c)

    monkeypatch.setattr(train_mod, "get_lr", get_lr)
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg, out)
    monkeypatch.setattr(train_mod, "get_lr", real_get_lr)


def test_resume_after_a_crash_gives_the_uninterrupted_losses(tmp_path, monkeypatch):
    cfg = micro_config(steps=7, save_every=3)
    whole = train(cfg, tmp_path / "a")["losses"]
    crash_at_step_5(cfg, tmp_path / "b", monkeypatch)
    resumed = train(cfg, tmp_path / "b", resume=True)  # from the step-3 checkpoint
    state = json.loads((tmp_path / "b" / "checkpoint-0000007" / "trainer_state.json").read_text())
    assert state["losses"] == resumed["losses"]
    assert resumed["losses"] == pytest.approx(whole, rel=0, abs=1e-6)


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    cfg = micro_config(steps=3)
    train(cfg, tmp_path)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path)


def test_resume_with_a_different_config_is_refused_naming_the_difference(tmp_path):
    train(micro_config(steps=3), tmp_path, stop_after=3)
    with pytest.raises(ValueError, match="lr: 0.003 -> 0.001"):
        train(micro_config(steps=6, lr=1e-3), tmp_path, resume=True)
    # steps sets the cosine schedule's length: a resumed run with other steps would change its learning rates
    with pytest.raises(ValueError, match="steps: 3 -> 6"):
        train(micro_config(steps=6), tmp_path, resume=True)


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    train(micro_config(steps=3), tmp_path)
    ckpt = tmp_path / (tmp_path / "latest").read_text()
    with open(ckpt / "optimizer.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ValueError, match="corrupt: optimizer.pt"):
        train(micro_config(steps=6), tmp_path, resume=True)


def test_continued_training_at_8x_length_with_a_method(tmp_path):
    base = train(micro_config(steps=3), tmp_path / "base")
    cfg = micro_config(init_from=base["final"], method="xpos:base=500000", seq_len=512, tokens_per_step=512,
                       micro_batch=1, steps=2, save_every=2, eval_every=2,
                       model_overrides={**MICRO, "hidden_size": 64})  # fmt: skip
    r = train(cfg, tmp_path / "ext")
    model = load_model(r["final"])
    assert model.config.ropekit["method"] == "xpos:base=500000,scale_base=512,center=256"
    assert model.config.max_position_embeddings == 512
    # config.json says which model was trained: init_from's sizes, not the preset's (ignored with init_from)
    written = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert written["model_architecture"]["hidden_size"] == 32 == model.config.hidden_size


def test_a_model_whose_loss_cannot_be_scored_is_refused_before_the_data_are_prepared(tmp_path, monkeypatch):
    model = load_model("tiny:llama")
    forward = model.forward

    def squared(*args, **kwargs):  # logits that are not a scale and soft-cap of the head's output
        out = forward(*args, **kwargs)
        out.logits = out.logits**2
        return out

    model.forward = squared
    monkeypatch.setattr(train_mod, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(train_mod, "prepare_data", lambda *args: pytest.fail("the data were prepared first"))
    with pytest.raises(ValueError, match="LlamaForCausalLM transforms its logits other than by a scale"):
        train(micro_config(init_from="someone/a-model"), tmp_path / "run")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lrate'"):
        apply_overrides(micro_config(), ["lrate=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(micro_config(), ["steps=ten"])
    with pytest.raises(ValueError, match="unknown text source"):
        train(micro_config(data=str(tmp_path / "nothing")), tmp_path / "o1")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("A few words.\n")
    (tmp_path / "tiny" / "b.txt").write_text("Some more words here.\n")
    with pytest.raises(ValueError, match="longer than the whole corpus"):
        train(micro_config(data=str(tmp_path / "tiny"), vocab_size=300, seq_len=4096, tokens_per_step=4096,
                           micro_batch=1), tmp_path / "o2")  # fmt: skip
    with pytest.raises(ValueError, match="not a multiple"):
        micro_config(tokens_per_step=100).accumulation()


def test_overrides_are_typed():
    cfg = apply_overrides(PRESETS["tiny-base"](), ["steps=7", "lr=1e-4", "reset_positions=true", "tokenizer=none",
                                                   'model_overrides={"hidden_size": 64}'])  # fmt: skip
    assert cfg.steps == 7 and cfg.lr == 1e-4 and cfg.reset_positions is True and cfg.tokenizer is None
    assert cfg.model_overrides == {"hidden_size": 64}


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = micro_config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert get_lr(0, cfg) == pytest.approx(0.1) and get_lr(9, cfg) == pytest.approx(1.0)
    assert get_lr(99, cfg) == pytest.approx(0.1, abs=1e-3) and get_lr(55, cfg) < get_lr(20, cfg)


def test_paper_preset_has_the_papers_hyper_parameters():
    cfg = PRESETS["paper"]()
    assert (cfg.lr, cfg.warmup_steps, cfg.seq_len, cfg.tokens_per_step) == (2e-5, 2000, 32768, 4_194_304)
    assert cfg.steps * cfg.tokens_per_step == pytest.approx(80e9, rel=0.05)  # the ablation's 80B tokens


def test_fsdp2_on_two_gloo_processes_matches_one_process(tmp_path):
    args = ["--preset", "tiny-base", "--set", "steps=3", "--set", "seq_len=64", "--set", "vocab_size=512",
            "--set", "tokens_per_step=256", "--set", f"model_overrides={json.dumps(MICRO)}", "--set", "save_every=3",
            "--set", "eval_every=3", "--set", "warmup_steps=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ropekit.cli", "train"]
    subprocess.run([*run, *args, "--set", "fsdp=true", "--set", "micro_batch=1", "--out", str(tmp_path / "fsdp")],
                   check=True, env=env, capture_output=True)  # fmt: skip
    single = [
        sys.executable,
        "-m",
        "ropekit.cli",
        "train",
        *args,
        "--set",
        "micro_batch=2",
        "--out",
        str(tmp_path / "one"),
    ]
    subprocess.run(single, check=True, env=env, capture_output=True)

    def losses(folder: Path):
        return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=0, abs=1e-5)
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").is_file()


def test_resume_without_a_usable_latest_pointer_scans_for_the_newest_checkpoint(tmp_path, monkeypatch):
    cfg = micro_config(steps=7, save_every=3)
    whole = train(cfg, tmp_path / "a")["losses"]
    for pointer in (None, "garbage\n"):  # the pointer deleted, or overwritten with garbage
        out = tmp_path / f"b-{pointer is None}"
        crash_at_step_5(cfg, out, monkeypatch)
        if pointer is None:
            (out / "latest").unlink()
        else:
            (out / "latest").write_text(pointer)
        resumed = train(cfg, out, resume=True)  # from checkpoint-0000003, found by scanning
        assert resumed["losses"] == pytest.approx(whole, rel=0, abs=1e-6)
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 8))  # steps 4 and 5 ran twice; the file holds each step once


def test_a_run_without_resume_never_overwrites_checkpoints(tmp_path):
    train(micro_config(steps=3), tmp_path, stop_after=3)
    (tmp_path / "latest").unlink()  # even without the pointer, the folder holds a run
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="--resume"):
        train(micro_config(steps=3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_refuses_pickled_code_in_a_checkpoint(tmp_path):
    train(micro_config(steps=6), tmp_path, stop_after=3)
    ckpt = tmp_path / "checkpoint-0000003"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create a file when unpickled

    import torch

    torch.save({"state": Payload()}, ckpt / "rng.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["rng.pt"] = train_mod._sha256(ckpt / "rng.pt")  # a consistent manifest: integrity is not origin
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="refusing to load"):
        train(micro_config(steps=6), tmp_path, resume=True)
    assert not marker.exists()


def test_a_garbage_manifest_is_a_clear_error(tmp_path):
    train(micro_config(steps=3), tmp_path, stop_after=3)
    (tmp_path / "checkpoint-0000003" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt: manifest.json"):
        train(micro_config(steps=6), tmp_path, resume=True)


@pytest.mark.parametrize(
    "override,word",
    [("steps=-3", "steps=-3"), ("seq_len=0", "seq_len=0"), ("micro_batch=0", "micro_batch=0"),
     ("lr=0", "lr=0"), ("lr=inf", "lr=inf"), ("lr=1e30", "lr=1e+30"), ("grad_clip=nan", "grad_clip=nan"),
     ("method=pi:fctor=2", "unknown key"), ("device=tpu", "device='tpu'")],
)  # fmt: skip
def test_invalid_values_exit_2_with_one_line_before_any_work(override, word, tmp_path, capsys):
    from ropekit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny-base", "--set", override, "--out", str(out), "--print-config"]) == 2
    assert main(["train", "--preset", "tiny-base", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(word in line for line in err), err
    assert not out.exists()  # nothing written, no untrained final/


def test_a_missing_init_from_and_an_unwritable_out_fail_up_front(tmp_path):
    with pytest.raises(ValueError, match="init_from 'runs/nowhere/final' not found"):
        train(micro_config(init_from="runs/nowhere/final"), tmp_path / "o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is a file"):
        train(micro_config(), tmp_path / "file")


def _one_step(cfg: TrainConfig, **kw) -> TrainConfig:
    """A preset at micro size: the same code path, one optimizer step, on the built-in text."""
    sizes = {**MICRO, "max_position_embeddings": 64}
    return dataclasses.replace(cfg, model="tiny:llama", init_from=None, model_overrides=sizes, data="shakespeare",
                               vocab_size=512, seq_len=64, tokens_per_step=64, micro_batch=1, steps=1, warmup_steps=0,
                               eval_batches=1, device="cpu", fsdp=False, compile=False, **kw)  # fmt: skip


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_training_preset_runs_one_step_on_cpu(name, tmp_path):
    r = train(_one_step(PRESETS[name]()), tmp_path)
    assert r["step"] == 1 and (tmp_path / "final" / "model.safetensors").is_file()


def test_presets_default_to_data_a_user_has():
    from ropekit.studies.ablation import PRESETS as DEMO

    for cfg in [p() for p in PRESETS.values()] + [c for p in DEMO.values() for c in (p().base, p().extend)]:
        assert cfg.data == "shakespeare" or cfg.data.startswith("hf:"), cfg.data  # never a developer's folder


def test_resume_takes_a_key_an_older_checkpoint_lacks_at_its_default():
    import dataclasses

    from ropekit.train import TrainConfig, _check_resume, _config_dict

    saved = _config_dict(TrainConfig())
    del saved["retrieval_weight"], saved["retrieval_copy"]  # written before these keys existed
    _check_resume(saved, TrainConfig())  # the same run: resumes
    with pytest.raises(ValueError, match=r"retrieval_weight: \(not set\) -> 2.0"):
        _check_resume(saved, dataclasses.replace(TrainConfig(), retrieval_weight=2.0))


def test_a_non_finite_loss_stops_the_run_and_saves_nothing_of_it(tmp_path, monkeypatch):
    real_step = train_mod.train_step

    def step_3_diverges(run, model, optimizer, stream, step):
        loss, norm = real_step(run, model, optimizer, stream, step)
        return (float("nan"), norm) if step == 2 else (loss, norm)

    monkeypatch.setattr(train_mod, "train_step", step_3_diverges)
    with pytest.raises(ValueError, match=r"stopped at step 3: loss nan.*last checkpoint \(checkpoint-0000002\) is as"):
        train(micro_config(steps=6, save_every=2), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000002"]
    assert not (tmp_path / "final").exists()


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    from .conftest import held_by_another_process

    with held_by_another_process(tmp_path, "folder") as pid:  # another ropekit process holds the folder
        with pytest.raises(ValueError, match=rf"being written by another ropekit process \(pid {pid} on "):
            train(micro_config(), tmp_path)
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "metrics.jsonl").exists()
    train(micro_config(steps=1), tmp_path)  # released: the folder can be written again


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    train(micro_config(steps=1), tmp_path / "new", resume=True)
    assert "nothing to resume in" in capsys.readouterr().err


def test_a_corrupt_newest_checkpoint_names_the_intact_one_before_it(tmp_path):
    train(micro_config(steps=4, save_every=2), tmp_path)
    (tmp_path / "checkpoint-0000004" / "rng.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"corrupt: rng.pt.*checkpoint-0000002 before it is intact"):
        train(micro_config(steps=6, save_every=2), tmp_path, resume=True)


def test_a_failed_save_names_the_intact_checkpoint_and_a_killed_one_is_cleaned_up(tmp_path, monkeypatch):
    import stat

    real_save, calls = train_mod.torch.save, []

    def disk_full_at_the_second_checkpoint(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # optimizer.pt and rng.pt of the first checkpoint went through
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "save", disk_full_at_the_second_checkpoint)
    with pytest.raises(ValueError, match=r"cannot write checkpoint-0000004 .*No space.*checkpoint-0000002, is intact"):
        train(micro_config(steps=4, save_every=2), tmp_path)
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-0000002"]
    assert stat.S_IMODE((tmp_path / "checkpoint-0000002").stat().st_mode) != 0o700  # as readable as other folders
    (tmp_path / ".tmp-checkpoint-0000004-killed").mkdir()  # what a SIGKILL during a save leaves
    train(micro_config(steps=4, save_every=2), tmp_path, resume=True)
    assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "final").is_dir()


def test_a_method_for_some_layer_types_is_a_valid_training_method():
    cfg = apply_overrides(micro_config(), ["method=yarn:factor=4,original_max_position_embeddings=64@full_attention"])
    assert cfg.method.endswith("@full_attention")
    with pytest.raises(ValueError, match="expected a number"):
        apply_overrides(micro_config(), ["method=pi:factor=abc@full_attention"])


def test_freed_cpu_memory_is_released_at_every_layer_without_changing_the_gradients(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from ropekit import parallel
    from ropekit.models import tiny_config

    calls = []
    monkeypatch.setattr(parallel, "release_freed_memory", lambda: calls.append(1))
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))

    def gradients(release: bool, compile: bool = False) -> list:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        parallel.parallelize(model, activation_checkpointing=True, release_cpu_memory=release, compile=compile)
        if compile:  # no hooks in compiled layers: nothing to run here
            return [len(layer._forward_pre_hooks) for layer in parallel._decoder_layers(model)]
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters()]

    plain, plain_calls = gradients(False), len(calls)
    released = gradients(True)
    # each of the 3 layers: before its forward and after its backward
    assert plain_calls == 0 and len(calls) == 2 * 3
    assert all(torch.equal(a, b) for a, b in zip(plain, released, strict=True))  # memory only, never the numbers
    assert gradients(True, compile=True) == [0, 0, 0]
    assert TrainConfig().release_cpu_memory and "release_cpu_memory" in train_mod._RESUME_FREE
    monkeypatch.undo()
    parallel.release_freed_memory()
