"""The trainer: typed overrides, loss going down, exact resume, atomic checkpoints, BPTT, DDP and FSDP2 under torchrun.

Run as a script by torchrun, this file is one DDP rank of ``test_ddp_matches_single_process``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import miras.train as train_module
from miras.data.base import IGNORE, Batches
from miras.models import create
from miras.runs import _keep_metrics_until, checkpoint_step, lock_run_folder, make_run_folder, tensor_digest
from miras.train import (
    ConfigError,
    DataSource,
    TrainConfig,
    checkpoints,
    config_from_args,
    load_run,
    lr_at,
    make_batches,
    param_groups,
    train,
)

SEQ_LEN, BATCH = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands for the process dying while it trains."""


class CopyBatches:
    """A tiny deterministic copy task: a random half row, then the same tokens again; only the copy is
    scored. The global batch of a step is a function of (seed, step); ranks get disjoint row slices."""

    def __init__(self, batch_size: int = BATCH, seq_len: int = SEQ_LEN, seed: int = 0, vocab: int = 16,
                 kill_at: int | None = None):
        self.batch_size, self.seq_len, self.seed, self.vocab, self.kill_at = batch_size, seq_len, seed, vocab, kill_at

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if step == self.kill_at:
            raise Killed(f"killed before step {step}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        half = (self.seq_len + 2) // 2
        prefix = torch.randint(2, self.vocab, (self.batch_size, half), generator=generator)
        rows = torch.cat([prefix, prefix], 1)[:, :self.seq_len + 1]
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        targets[:, :half - 1] = IGNORE
        size = self.batch_size // world
        return inputs[rank * size:(rank + 1) * size], targets[rank * size:(rank + 1) * size]


def tiny(out_dir: Path, model: str = "transformer-tiny", **values) -> TrainConfig:
    settings = {"seq_len": SEQ_LEN, "batch_size": BATCH, "max_steps": 20, "lr": 1e-2, "warmup_steps": 2,
                "log_every": 1, "save_every": 100, "progress": False, "precision": "fp32", **values}
    return TrainConfig(model=model, out_dir=str(out_dir), **settings)


def source(**values) -> DataSource:
    return DataSource(CopyBatches(**values))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


def validation(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["val_loss"] for line in lines if "val_loss" in line]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_copy_batches_follow_the_batches_contract():
    batches = CopyBatches(batch_size=8)
    assert isinstance(batches, Batches)
    inputs, targets = batches.batch(3)
    halves = [batches.batch(3, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), inputs) and torch.equal(torch.cat([h[1] for h in halves]),
                                                                                 targets)
    assert not torch.equal(batches.batch(4)[0], inputs)


# ------------------------------------------------------------------------------------------ config parsing


def test_overrides_are_parsed_as_their_field_types():
    config = config_from_args("titans-lmm-tiny", [
        "lr=3e-4", "max_steps=7", "compile=false", "progress=no", "bptt=16", "betas=[0.8, 0.9]", "grad_clip=0",
        'data_params={"needles": 2}', "data=task:passkey", "model.dim=32", "model.tie_embeddings=false"])
    assert (config.lr, config.max_steps, config.compile, config.progress, config.bptt) == (3e-4, 7, False, False, 16)
    assert config.betas == (0.8, 0.9) and config.grad_clip == 0.0 and isinstance(config.grad_clip, float)
    assert config.data_params == {"needles": 2} and config.data == "task:passkey"
    assert config.model_overrides == {"dim": 32, "tie_embeddings": False}
    assert config.out_dir == "runs/titans-lmm-tiny"
    assert config_from_args("titans-lmm-tiny", ["bptt=16", "bptt=none"]).bptt is None
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("pair, message", [
    ("lr=fast", "lr='fast': expected a number"),
    ("max_steps=1.5", "max_steps='1.5': expected an integer"),
    ("compile=maybe", "compile='maybe': expected a bool (true/false)"),
    ("bptt=x", "bptt='x': expected an integer or none"),
    ("data_params=[1]", "data_params must be a JSON object"),
    ("betas=[0.9]", "betas must be a JSON list like [0.9, 0.95], got [0.9]"),
    ("learning_rate=1", "unknown key 'learning_rate'; valid: batch_size, betas, bptt, compile,"),
    ("model.width=8", "unknown model field 'width'; valid: model."),
    ("model.dim=big", "model.dim='big': expected an integer"),
    ("model.dim=33", "model_overrides: dim 33 must be divisible by heads 2"),
    ("model=transformer-tiny", "the preset is the first argument"),
    ("lr", "override 'lr' is not key=value"),
    ("precision=fp16", "precision must be one of ['auto', 'fp32', 'bf16'], got 'fp16'"),
    ("batch_size=6", "batch_size 6 must be divisible by grad_accum 4"),
    ("data=corpus.txt", "data must be 'task:<name>' or 'text:<corpus>'"),
    ("lr=-1", "need a finite lr > 0"),
    ("lr=inf", "need a finite lr > 0"),
])
def test_bad_overrides_say_what_is_valid(pair, message):
    extra = ["grad_accum=4"] if pair.startswith("batch_size") else []
    with pytest.raises(ConfigError) as error:
        config_from_args("titans-lmm-tiny", [pair, *extra])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_preset_names_the_closest_and_how_names_are_made():
    expected = (r"unknown preset 'titans-mc-tiny' \(did you mean 'titans-mac-tiny' or .*\?\); "
                r"a preset is <family>-<size>, families: titans-lmm, .*; sizes: tiny")
    with pytest.raises(ConfigError, match=expected):
        TrainConfig(model="titans-mc-tiny")
    with pytest.raises(TypeError, match="lr must be a number, got '1'"):
        TrainConfig(model="transformer-tiny", lr="1")
    with pytest.raises(ConfigError, match=r"unknown train config key\(s\) \['width'\]"):
        TrainConfig.from_dict({"model": "transformer-tiny", "width": 3})


# ---------------------------------------------------------------------------------- optimizer and schedule


@pytest.mark.parametrize("preset, overrides", [("titans-mac-tiny", {}), ("gated-deltanet-tiny", {}),
                                               ("titans-lmm-tiny", {"gate_rank": 8})])
def test_weight_decay_only_on_linear_weight_matrices_other_than_the_gates(preset, overrides):
    model = create(preset, **overrides)
    decay, keep = param_groups(model, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    gates = {name for name in linear if name.endswith((".gate_proj.weight", ".gate_down.weight"))
             or (name.endswith(".gate_up.weight") and ".mlp." not in name)}
    assert len(gates) == (6 if overrides else 2) and "head.weight" in linear  # per layer; the head is tied
    assert {"blocks.0.mlp.gate_up.weight", "blocks.1.mlp.gate_up.weight"} <= decayed  # SwiGLU's is a feature map
    assert decayed == linear - gates - {"head.weight"} and (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    assert {name for name in decayed if name.endswith(".out_gate.weight")}  # output gates are feature maps
    kept = {names[id(p)] for p in keep["params"]}
    memory = "blocks.0.mixer.memory." if preset.startswith("titans-mac") else "blocks.0.mixer."
    assert {"embed.weight", "norm.weight", memory + "gate_proj.weight", memory + "gate_proj.bias",
            memory + "conv_weight"} <= kept
    if preset.startswith("titans"):
        assert memory + "initial_weights.0" in kept
    if preset.startswith("titans-mac"):
        assert "blocks.0.mixer.persistent" in kept
    if overrides:
        assert {memory + "gate_down.weight", memory + "gate_up.weight", memory + "gate_up.bias"} <= kept
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    config = TrainConfig(model="transformer-tiny", lr=1.0, warmup_steps=10, max_steps=111, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, config) == 1.0 and lr_at(60, config) == pytest.approx(0.55) and lr_at(110, config) == 0.1
    after = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # decay_steps: the same cosine, whatever max_steps is; at the floor after it
    fixed = dataclasses.replace(config, decay_steps=111, max_steps=300)
    assert [lr_at(s, fixed) for s in range(111)] == [lr_at(s, config) for s in range(111)]
    assert lr_at(200, fixed) == lr_at(299, fixed) == 0.1


def test_the_logged_learning_rate_is_the_one_each_step_applies(tmp_path, monkeypatch):
    """metrics.jsonl's lr of step s is lr_at(s - 1), and it is what the optimizer used: AdamW's first update moves
    each weight with a gradient well above its eps by exactly lr (weight decay off)."""
    initial = []

    class Recorded(train_module.LanguageModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            initial.append({name: value.clone() for name, value in self.state_dict().items()})

    monkeypatch.setattr(train_module, "LanguageModel", Recorded)
    config = tiny(tmp_path / "one", max_steps=1, warmup_steps=4, lr=1e-2, weight_decay=0.0, save_every=1)
    train(config, source())
    after = torch.load(checkpoints(tmp_path / "one")[-1], weights_only=True)["model"]
    moved = max(float((after[name] - value).abs().max()) for name, value in initial[0].items())
    assert moved == pytest.approx(lr_at(0, config), rel=1e-3) and lr_at(0, config) == 2.5e-3
    config = tiny(tmp_path / "many", max_steps=9, warmup_steps=3, lr=1e-2)
    lines = [json.loads(line) for line in (train(config, source()) / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines if "lr" in line] == pytest.approx([lr_at(s, config) for s in range(9)])


def test_extending_a_finished_run_says_how_the_learning_rate_moves_and_decay_steps_keeps_it(tmp_path, capsys):
    config = tiny(tmp_path / "run", max_steps=4)
    train(config, source())
    capsys.readouterr()
    train(dataclasses.replace(config, max_steps=8, resume=True, progress=True), source())
    assert ("note: max_steps 4 -> 8 changes the cosine schedule, which ends at max_steps; decay_steps=4 keeps it: the "
            f"learning rate at step 5 is {lr_at(4, dataclasses.replace(config, max_steps=8)):.3g} where the saved run "
            "would have had 0.001\n") in capsys.readouterr().out
    # resumed inside the warmup (the same lr there), the steps after it move: the first that does is named
    warm = tiny(tmp_path / "warm", max_steps=8, warmup_steps=2)
    train(dataclasses.replace(warm, max_steps=1), source())
    train(dataclasses.replace(warm, resume=True, progress=True), source())
    assert "note: max_steps 1 -> 8 changes the cosine schedule" in capsys.readouterr().out
    # decay_steps added when extending: accepted when every step trained so far keeps its lr (here: the old
    # max_steps), and then the run trains on at the floor; a decay_steps that rewrites the past is refused
    later = tiny(tmp_path / "later", max_steps=4)
    train(later, source())
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(decay_steps: None -> 6\)"):
        train(dataclasses.replace(later, max_steps=8, decay_steps=6, resume=True), source())
    train(dataclasses.replace(later, max_steps=8, decay_steps=4, resume=True, progress=True), source())
    assert "note: max_steps" not in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "later" / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines if "lr" in line][4:] == pytest.approx([1e-3] * 4)
    assert json.loads((tmp_path / "later" / "config.json").read_text())["train"]["decay_steps"] == 4
    fixed = tiny(tmp_path / "fixed", max_steps=4, decay_steps=4)
    train(fixed, source())
    train(dataclasses.replace(fixed, max_steps=8, resume=True, progress=True), source())
    assert "note: max_steps" not in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines if "lr" in line][4:] == pytest.approx([1e-3] * 4)  # the floor, lr x 0.1


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("model", ["transformer-tiny", "titans-lmm-tiny"])
def test_training_lowers_the_loss_and_logs_metrics(tmp_path, model):
    run_dir = train(tiny(tmp_path / "run", model), source())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed"}
    assert records[-1]["tokens_seen"] == 20 * BATCH * SEQ_LEN
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert first == pytest.approx(math.log(256), rel=0.05) and last < 0.7 * first
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["model"] == model and saved["model"]["dim"] == 64
    assert [p.name for p in checkpoints(run_dir)] == ["step_00000020.pt"]
    loaded, config, tokenizer = load_run(run_dir)
    assert config == tiny(tmp_path / "run", model) and tokenizer is None
    state = torch.load(checkpoints(run_dir)[0], weights_only=True)["model"]
    assert all(torch.equal(state[name], value) for name, value in loaded.state_dict().items())


@pytest.mark.parametrize("model", ["transformer-tiny", "titans-lmm-tiny"])
def test_compile_trains_as_eager_does(tmp_path, model):
    """compile=true (torch.compile of the whole model) gives the eager run's losses to float rounding, and its
    checkpoint holds the model's own parameter names (not the compiled wrapper's)."""
    eager = losses(train(tiny(tmp_path / "eager", model, max_steps=3), source()))
    compiled_dir = train(tiny(tmp_path / "compiled", model, max_steps=3, compile=True), source())
    assert [loss for _, loss in losses(compiled_dir)] == pytest.approx([loss for _, loss in eager], rel=1e-4)
    state = torch.load(checkpoints(compiled_dir)[-1], weights_only=True)["model"]
    assert set(state) == set(create(model).state_dict())


def test_resume_after_a_kill_gives_identical_losses(tmp_path):
    config = tiny(tmp_path / "whole", "titans-mac-tiny", max_steps=8, save_every=3, keep_checkpoints=2)
    train(config, source())
    assert [p.name for p in checkpoints(config.out_dir)] == ["step_00000006.pt", "step_00000008.pt"]
    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "interrupted"))
    with pytest.raises(Killed):
        train(interrupted, source(kill_at=7))
    assert [step for step, _ in losses(tmp_path / "interrupted")] == list(range(1, 8))  # 7 logged, saved at 6
    train(interrupted, source())
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "whole")  # exactly, steps 7 and 8 included
    before = snapshot(tmp_path / "interrupted")
    train(interrupted, source())  # finished: nothing to do
    assert snapshot(tmp_path / "interrupted") == before


def test_resume_restores_the_random_state_training_draws_from(tmp_path, monkeypatch):
    """No model here draws random numbers while training, but one with dropout would: the checkpoint's RNG state
    makes its resumed steps draw what the uninterrupted run drew (without it they draw the fresh process's)."""
    class DropoutModel(train_module.LanguageModel):
        def forward(self, *args, **kwargs):
            logits, state = super().forward(*args, **kwargs)
            return F.dropout(logits, 0.5, self.training), state

    monkeypatch.setattr(train_module, "LanguageModel", DropoutModel)
    config = tiny(tmp_path / "whole", max_steps=6, save_every=3)
    train(config, source())
    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "interrupted"))
    with pytest.raises(Killed):
        train(interrupted, source(kill_at=5))
    train(interrupted, source())
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "whole")
    unseeded = dataclasses.replace(config, out_dir=str(tmp_path / "unseeded"))
    with pytest.raises(Killed):
        train(unseeded, source(kill_at=5))
    monkeypatch.setattr(train_module, "set_rng_state", lambda rng: None)
    train(unseeded, source())
    assert losses(tmp_path / "unseeded")[:3] == losses(tmp_path / "whole")[:3]
    assert losses(tmp_path / "unseeded")[3][1] != losses(tmp_path / "whole")[3][1]


def test_run_files_get_the_permissions_of_a_plain_open(tmp_path):
    """atomic_write's temp file is private (0600); what it renames into place is not."""
    mask = os.umask(0o027)
    try:
        train(tiny(tmp_path / "run", max_steps=1), source())
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(mask)
    for path in (tmp_path / "run" / "config.json", checkpoints(tmp_path / "run")[-1]):
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640


def test_an_interrupt_right_after_the_rename_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C between atomic_write's rename and its return: the file is whole, and the KeyboardInterrupt (not a
    FileNotFoundError from removing a temp file that is gone) reaches the caller."""
    import miras.files

    real_replace = os.replace

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(miras.files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        miras.files.atomic_write_bytes(tmp_path / "file", b"whole")
    monkeypatch.undo()
    assert (tmp_path / "file").read_bytes() == b"whole" and os.listdir(tmp_path) == ["file"]


def test_a_resume_removes_the_temp_files_of_interrupted_saves_and_no_others(tmp_path):
    config = tiny(tmp_path / "run", max_steps=1)
    train(config, source())
    run = tmp_path / "run"
    ours = [run / "checkpoints" / ".step_00000002.pt.k2j4ab_x.tmp", run / ".config.json.a1b2.tmp",
            run / ".metrics.jsonl.zz9_q.tmp", run / ".tokenizer.json.q1w2.tmp"]
    theirs = [run / ".notes.txt.ab12.tmp", run / ".cache.tmp", run / ".step_00000002.pt.k2j4ab_x.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"partial")
    train(dataclasses.replace(config, max_steps=2, resume=True), source())
    assert [path.exists() for path in ours + theirs] == [False] * len(ours) + [True] * len(theirs)
    named = tmp_path / "checkpoints"  # a run folder named like its checkpoint folder: still only its own files
    train(tiny(named, max_steps=1), source())
    (named / ".notes.txt.ab12.tmp").write_bytes(b"theirs")
    train(tiny(named, max_steps=2, resume=True), source())
    assert (named / ".notes.txt.ab12.tmp").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path / "run", max_steps=2, save_every=1, keep_checkpoints=5)
    train(config, source())

    def dying_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    longer = dataclasses.replace(config, max_steps=3, resume=True)
    with pytest.raises(OSError, match="disk full"):
        train(longer, source())
    monkeypatch.undo()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    train(longer, source())
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3]


def test_a_run_is_its_model_not_the_overrides_that_asked_for_it(tmp_path):
    """Overrides that build the same model continue the run; when only model fields differ (e.g. a default that
    changed since the run began), the error also names the overrides that rebuild the saved model."""
    config = tiny(tmp_path / "run", max_steps=2, save_every=1)
    train(config, source())
    train(dataclasses.replace(config, max_steps=3, resume=True, model_overrides={"heads": 2}), source())  # the preset's
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3]
    changed = dataclasses.replace(config, max_steps=4, resume=True, model_overrides={"heads": 4})
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(model.heads: 2 -> 4\); use another "
                                          r"out_dir, or pass model.heads=2 to continue it$"):
        train(changed, source())
    with pytest.raises(ConfigError, match=r"\(lr: 0.01 -> 0.5; model.heads: 2 -> 4\); use another out_dir$"):
        train(dataclasses.replace(changed, lr=0.5), source())


def test_unusable_checkpoints_and_run_dirs_are_one_line_errors_that_write_nothing(tmp_path, monkeypatch):
    config = tiny(tmp_path / "run", max_steps=2, save_every=1)
    train(config, source())
    other = train(tiny(tmp_path / "other", max_steps=1, model_overrides={"dim": 32}), source())
    run_dir, latest = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    cases = [
        (dataclasses.replace(config, lr=0.5), "holds a run with a different config (lr: 0.01 -> 0.5)"),
        (dataclasses.replace(config, max_steps=4), "other settings (max_steps: 2 -> 4); pass resume=true"),
        (dataclasses.replace(config, model_overrides={"heads": 4}), "model.heads: 2 -> 4"),
    ]
    before = snapshot(run_dir)
    for bad, message in cases:
        with pytest.raises(ConfigError) as error:
            train(bad, source())
        assert message in str(error.value) and "\n" not in str(error.value)
        assert snapshot(run_dir) == before

    (run_dir / "checkpoints" / "step_00000003.pt").write_bytes(checkpoints(other)[-1].read_bytes())
    with pytest.raises(ConfigError, match=r"step_00000003.pt belongs to a different config \(.*model.dim: 32 -> 64\)"):
        train(dataclasses.replace(config, max_steps=4, resume=True), source())
    (run_dir / "checkpoints" / "step_00000003.pt").unlink()

    # torch's legacy unpickler reads what is not a zip archive, with reasons like "KeyError: 101" (b"hello\n")
    for content, reason in [(b"not a checkpoint", "not a torch checkpoint file"),
                            (b"hello\n", "not a torch checkpoint file"),
                            (b"\x80\x02}q", "not a torch checkpoint file"), (b"", "an empty file")]:
        latest.write_bytes(content)
        before = snapshot(run_dir)
        with pytest.raises(ConfigError, match=rf"step_00000002.pt is unreadable \({reason}\); the one "
                                              r"before it, step_00000001.pt, is readable: delete step_00000002.pt to "
                                              r"fall back to it$"):
            train(dataclasses.replace(config, max_steps=4, resume=True), source())
        assert snapshot(run_dir) == before
    latest.write_bytes(b"not a checkpoint")
    previous = run_dir / "checkpoints" / "step_00000001.pt"
    kept = previous.read_bytes()
    previous.write_bytes(kept[:len(kept) // 2])  # truncated
    with pytest.raises(ConfigError, match=r"step_00000002.pt is unreadable \(not a torch checkpoint file\); the one "
                                          r"before it, step_00000001.pt, is unusable too$"):
        load_run(run_dir)
    previous.write_bytes(kept)

    (run_dir / "file").write_text("")
    for out_dir in (run_dir / "file", run_dir / "file" / "run"):  # a file, a folder under a file
        with pytest.raises(ConfigError, match=r"cannot make or write the run folder there "
                                              r"\((File exists|Not a directory)\)"):
            train(tiny(out_dir, max_steps=1), source())
    assert (run_dir / "file").read_text() == ""

    # an existing run folder that cannot be written (root ignores permissions: the refusal is simulated)
    train(tiny(run_dir / "kept", max_steps=1), source())
    before = snapshot(run_dir / "kept")
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).name == ".miras-write-test" and Path(path).parent.name == "kept":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(ConfigError, match=r"cannot make or write the run folder "
                                                                         r"there \(Permission denied\)"):
        patch.setattr(os, "open", read_only)
        train(tiny(run_dir / "kept", max_steps=2, resume=True), source())
    assert snapshot(run_dir / "kept") == before

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match="tensorboard=true needs the tensorboard package"):
        train(tiny(tmp_path / "board", tensorboard=True), source())
    assert not (tmp_path / "board").exists()


def test_make_batches_builds_the_task_or_corpus_of_the_config(tmp_path, monkeypatch):
    data = make_batches(TrainConfig(model="transformer-tiny", data="task:mqar", data_params={"pairs": 4, "queries": 4},
                                    seq_len=31, batch_size=2))
    inputs, targets = data.train.batch(0)
    assert inputs.shape == targets.shape == (2, 31) and (targets != IGNORE).sum().item() == 2 * 4
    assert not torch.equal(data.validation.batch(0)[0], inputs) and data.vocab_size == 256
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("line one\n" * 50 + "line two\n" * 10)
    data = make_batches(TrainConfig(model="transformer-tiny", data=f"text:{tmp_path / 'corpus.txt'}", seq_len=8,
                                    batch_size=3))
    inputs, targets = data.train.batch(5, 1, 3)
    assert bytes(inputs[0].tolist()) in (b"line one\n" * 2) and torch.equal(inputs[0, 1:], targets[0, :-1])
    assert data.tokenizer.decode(data.validation.batch(0)[0][0].tolist()) in "line two\n" * 3
    # seq_len 120: the train split holds rows, the validation split (29 bytes) does not
    long_rows = {"model": "transformer-tiny", "data": f"text:{tmp_path / 'corpus.txt'}", "seq_len": 120}
    assert make_batches(TrainConfig(**long_rows, eval_every=0)).validation is None
    with pytest.raises(ConfigError, match=r"validation split: seq_len=120 needs at least 121 tokens .* the corpus "
                                          r"has 29: .*\(or eval_every=0: no validation\)"):
        make_batches(TrainConfig(**long_rows, eval_every=10))
    with pytest.raises(ConfigError, match="^data 'task:mqar': mqar: unknown parameter"):
        make_batches(TrainConfig(model="transformer-tiny", data="task:mqar", data_params={"keys": 4}))
    with pytest.raises(ConfigError, match="set seq_len, not data_params.context_length"):
        TrainConfig(model="transformer-tiny", data="task:mqar", data_params={"context_length": 4})


def test_a_bpe_wider_than_the_model_is_refused_before_it_is_trained_and_a_short_one_is_noted(tmp_path, monkeypatch,
                                                                                              capsys):
    """bpe:<N> above the model's vocab_size was refused only after the BPE was trained and the corpus tokenised
    (10 s on stdlib); a BPE that ran out of merges before N ids said nothing."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(30))
    config = TrainConfig(model="transformer-tiny", data=f"text:{corpus}", tokenizer="bpe:900", seq_len=16,
                         batch_size=2, max_steps=1, eval_every=0, out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match=r"^tokenizer=bpe:900 gives up to 900 token ids but the model's vocab_size "
                                          r"is 256; set model.vocab_size=900$"):
        train(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    train(dataclasses.replace(config, model_overrides={"vocab_size": 900}))
    learned = load_run(tmp_path / "run")[2].vocab_size
    assert learned < 900
    assert (f"note: the BPE learned {learned} token ids of the 900 asked for (the corpus ran out of pairs to merge)"
            in capsys.readouterr().out.splitlines())


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_lock_goes_with_the_run(tmp_path, monkeypatch):
    """Two runs started into one out_dir at once both trained and reported success, and one's checkpoints and
    metrics silently replaced the other's: the folder is locked while a run writes there."""
    run_dir = tmp_path / "run"
    make_run_folder(run_dir)
    lock = lock_run_folder(run_dir)  # another run, training there now
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=rf"^out_dir {run_dir} is in use: another `miras train` is writing there "
                                          r"now; wait for it to end, or use another out_dir$"):
        train(tiny(run_dir, max_steps=2), source())
    assert snapshot(run_dir) == before
    os.close(lock)
    calls = []

    def failing(*args):  # a run that fails after it took the lock still lets the next one in
        calls.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "write_run_dir", failing)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(run_dir, max_steps=2), source())
    monkeypatch.undo()
    assert calls and train(tiny(run_dir, max_steps=2), source()) == run_dir
    assert [step for step, _ in losses(run_dir)] == [1, 2]


def test_a_run_whose_tokenizer_files_were_swapped_for_a_larger_one_is_refused(tmp_path, monkeypatch):
    """A tokenizer with more ids than the model (another run's files copied in) ended eval and generate in a
    traceback from the model's id check."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(30))
    for name, vocab in (("small", 270), ("large", 300)):
        train(TrainConfig(model="transformer-tiny", data=f"text:{corpus}", tokenizer=f"bpe:{vocab}",
                          model_overrides={"vocab_size": vocab}, seq_len=16, batch_size=2, max_steps=1, eval_every=0,
                          out_dir=str(tmp_path / name), progress=False))
    assert load_run(tmp_path / "small")[2].vocab_size == 270
    larger = load_run(tmp_path / "large")[2].vocab_size
    assert larger > 270  # (the corpus has fewer merges than 300 asks for)
    (tmp_path / "small" / "tokenizer.json").write_bytes((tmp_path / "large" / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'small'}: the run's saved tokenizer has {larger} ids but its "
                                          r"model only 270: the tokenizer files are not the ones it was trained with"):
        load_run(tmp_path / "small")


def test_a_resumed_text_run_keeps_the_tokenizer_it_saved(tmp_path, monkeypatch, capsys):
    """Retrained on a corpus that changed meanwhile, a BPE would renumber the checkpoint's tokens. The changed
    corpus itself is refused unless resume=true, since the same command would not continue the same run."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(30))
    config = TrainConfig(model="transformer-tiny", data=f"text:{corpus}", tokenizer="bpe:300",
                         model_overrides={"vocab_size": 300}, seq_len=16, batch_size=2, max_steps=2, eval_every=0,
                         out_dir=str(tmp_path / "run"), progress=False)
    train(config)
    saved = (tmp_path / "run" / "tokenizer.json").read_bytes()
    corpus.write_text(corpus.read_text() + "zebra quokka xylophone jumps over the lazy fox\n" * 40)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'run'}: the training data \(text:{corpus}\) is not what the "
                                          r"checkpoint of step 2 trained on: the corpus or its tokenisation has "
                                          r"changed; pass "
                                          r"resume=true to continue on the new contents, or use another out_dir$"):
        train(config)
    assert snapshot(tmp_path / "run") == before
    capsys.readouterr()
    train(dataclasses.replace(config, max_steps=3, resume=True))
    assert "its tokenisation has changed; continuing on the new contents (resume=true)" in capsys.readouterr().out
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == saved
    assert losses(tmp_path / "run")[-1][0] == 3
    (tmp_path / "run" / "config.json").write_bytes(b"")  # a damaged config.json: the tokenizer is still found
    train(dataclasses.replace(config, max_steps=4, resume=True))
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == saved
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokenizer"] is True
    (tmp_path / "run" / "config.json").unlink()  # and a missing one
    train(dataclasses.replace(config, max_steps=5, resume=True))
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == saved
    _, _, tokenizer = load_run(tmp_path / "run")
    assert tokenizer is not None and tokenizer.kind == "bpe"


def test_bptt_streams_the_rows_and_still_learns(tmp_path):
    plain = losses(train(tiny(tmp_path / "plain", "titans-lmm-tiny", max_steps=12), source()))
    whole = losses(train(tiny(tmp_path / "whole", "titans-lmm-tiny", max_steps=12, bptt=SEQ_LEN), source()))
    assert whole == plain
    segmented = losses(train(tiny(tmp_path / "bptt", "titans-lmm-tiny", max_steps=12, bptt=8), source()))
    # Before the first update the segments with carried state compute exactly the loss of one pass.
    assert segmented[0][1] == pytest.approx(plain[0][1], rel=1e-5)
    assert segmented[1][1] != plain[1][1]  # the gradients were truncated
    assert sum(loss for _, loss in segmented[-3:]) / 3 < 0.7 * segmented[0][1]


def test_auto_precision(monkeypatch, tmp_path):
    """"auto" is bf16 on a CPU with AMX tiles and float32 on one without (and explicit values pass through)."""
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(train_module, "CPUINFO", cpuinfo)
    cpu = torch.device("cpu")
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert train_module.resolve_precision("auto", cpu) == "bf16"
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert train_module.resolve_precision("auto", cpu) == "fp32"
    assert train_module.resolve_precision("bf16", cpu) == "bf16"
    assert train_module.resolve_precision("fp32", cpu) == "fp32"
    assert TrainConfig(model="transformer-tiny").precision == "auto"


def test_bf16_autocast_trains(tmp_path):
    fp32 = losses(train(tiny(tmp_path / "fp32", max_steps=10), source()))
    bf16 = losses(train(tiny(tmp_path / "bf16", max_steps=10, precision="bf16"), source()))
    assert bf16[0][1] == pytest.approx(fp32[0][1], rel=2e-2) and bf16[0][1] != fp32[0][1]
    assert bf16[-1][1] < 0.7 * bf16[0][1]


def test_grad_accum_splits_the_same_global_batch(tmp_path):
    one = losses(train(tiny(tmp_path / "one", max_steps=4), source()))
    two = losses(train(tiny(tmp_path / "two", max_steps=4, grad_accum=2), source()))
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-5)


# ------------------------------------------------------------------------------------------------- DDP


def test_a_diverging_run_stops_before_its_update_and_keeps_only_finite_checkpoints(tmp_path):
    """Checked every step, not only on log steps: the step whose gradients are not finite is never applied,
    so no checkpoint holds diverged weights (before, they were saved and the good ones pruned)."""
    config = tiny(tmp_path / "run", lr=10.0, warmup_steps=0, save_every=1, log_every=10, keep_checkpoints=3)
    with pytest.raises(ConfigError, match=r"^training diverged at step 8 \(lr 7.31\): the loss is 8403 and the "
                                          r"gradient norm inf; the checkpoints up to step 7 are kept, none after it; "
                                          r"lower lr \(a new run: another out_dir\)"):
        train(config, source())
    kept = checkpoints(tmp_path / "run")
    assert [checkpoint_step(path) for path in kept] == [5, 6, 7]
    for path in kept:
        state = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(tensor).all() for tensor in state.values())


def _edit_checkpoint(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["digest"] = tensor_digest(payload)  # a consistent file: what another version of miras would write
    torch.save(payload, path)


@pytest.mark.parametrize("change, message", [
    ("missing", r"lacks blocks.0.mixer_norm.weight"),
    ("renamed", r"lacks blocks.0.mixer_norm.weight; has unknown blocks.0.renamed.weight"),
    ("resized", r"has resized embed.weight \(10, 64\) where the model has \(256, 64\)"),
])
def test_a_checkpoint_that_does_not_fit_its_model_is_one_line_in_train_and_load_run(tmp_path, change, message):
    """set_state_dict fills a missing tensor from the fresh model without a word: it must be refused first."""
    config = tiny(tmp_path / "run", max_steps=2, save_every=1)
    train(config, source())
    run_dir = tmp_path / "run"

    def edit(payload):
        state = payload["model"]
        if change in ("missing", "renamed"):
            weight = state.pop("blocks.0.mixer_norm.weight")
            if change == "renamed":
                state["blocks.0.renamed.weight"] = weight
        else:
            state["embed.weight"] = state["embed.weight"][:10]

    _edit_checkpoint(checkpoints(run_dir)[-1], edit)
    before = snapshot(run_dir)
    pattern = rf"^checkpoint .*step_00000002.pt does not fit its model \({message}\): made by another version"
    with pytest.raises(ConfigError, match=pattern):
        train(dataclasses.replace(config, max_steps=3, resume=True), source())
    with pytest.raises(ConfigError, match=pattern):
        load_run(run_dir)
    assert snapshot(run_dir) == before


def test_progress_without_a_terminal_prints_lines_and_a_closing_line_and_ctrl_c_says_what_is_kept(tmp_path,
                                                                                                 capsys):
    class CtrlC(CopyBatches):
        def batch(self, step, rank=0, world=1):
            if step == 3:
                raise KeyboardInterrupt
            return super().batch(step, rank, world)

    config = tiny(tmp_path / "run", max_steps=3, log_every=2, progress=True)
    train(config, source())
    out = capsys.readouterr().out  # captured: not a terminal, so lines rather than a bar
    assert "note: warmup_steps=2" not in out and "\nstep 2/3: loss " in out and "\nstep 3/3: loss " in out
    assert f"\ndone: step 3/3, loss {losses(tmp_path / 'run')[-1][1]:.4f}, " in out
    assert out.endswith(f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000003.pt'}\n")
    train(dataclasses.replace(config, progress=False), source())  # display only: no resume=true needed
    assert "is already at max_steps=3: nothing to train" in capsys.readouterr().out

    with pytest.raises(KeyboardInterrupt, match=r"^interrupted at step 3: the latest checkpoint is step 2; run the "
                                                r"same command again to continue from it$"):
        train(tiny(tmp_path / "ctrl-c", max_steps=5, save_every=2), DataSource(CtrlC()))
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted at step 3: nothing was saved \(the first checkpoint "
                                                r"comes at step 5, save_every\)$"):
        train(tiny(tmp_path / "ctrl-c-early", max_steps=5, warmup_steps=10), DataSource(CtrlC()))
    assert "note: warmup_steps=10 > max_steps=5: the learning rate never reaches lr=0.01" in capsys.readouterr().out


def test_a_model_too_large_for_the_machine_is_one_line_and_makes_no_folder(tmp_path, monkeypatch):
    def too_large(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory\nmore")

    monkeypatch.setattr(train_module, "LanguageModel", too_large)
    with pytest.raises(ConfigError, match=r"^cannot build transformer-tiny with model_overrides \{'dim': 96\} on cpu: "
                                          r"\[enforce fail .*can't allocate memory$"):
        train(tiny(tmp_path / "run", model_overrides={"dim": 96}), source())
    assert not (tmp_path / "run").exists()


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test: a suite started in the background inherits SIGINT ignored, and
    training then (rightly) leaves it alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_first_ctrl_c_saves_the_step_it_ends_and_a_rerun_continues_exactly_a_second_stops_at_once(
        tmp_path, capfd, default_sigint):
    class Signal(CopyBatches):  # a real SIGINT, as Ctrl-C sends it, while steps `at` load their batch
        def __init__(self, at=(), **values):
            super().__init__(**values)
            self.at = list(at)

        def batch(self, step, rank=0, world=1):
            while self.at and step == self.at[0]:
                self.at.pop(0)
                signal.raise_signal(signal.SIGINT)
            return super().batch(step, rank, world)

    whole = tiny(tmp_path / "whole", max_steps=6)
    train(whole, source())
    config = tiny(tmp_path / "run", max_steps=6, save_every=4)
    with pytest.raises(train_module.Interrupted, match=r"^interrupted at step 3: the latest checkpoint is step 3; run "
                                                      r"the same command again to continue from it$"):
        train(config, DataSource(Signal(at=[2])))  # during step 3 (batches count from 0): step 3 ends and is saved
    assert "Ctrl-C: stopping after this step, which is saved (Ctrl-C again to stop at once)" in capfd.readouterr().err
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step_00000003.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    train(config, source())
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")

    with pytest.raises(train_module.Interrupted, match=r"^interrupted at step 1: nothing was saved"):
        train(tiny(tmp_path / "twice", max_steps=6), DataSource(Signal(at=[1, 1])))  # twice in step 2: at once
    assert checkpoints(tmp_path / "twice") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # during the last step: the run is complete, not interrupted
    assert train(tiny(tmp_path / "last", max_steps=3), DataSource(Signal(at=[2]))) == tmp_path / "last"
    assert [p.name for p in checkpoints(tmp_path / "last")] == ["step_00000003.pt"]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # SIGINT ignored (a background job): left as it is
    train(tiny(tmp_path / "ignored", max_steps=2), source())
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_under_torchrun_a_second_ctrl_c_is_left_to_torchrun_and_only_rank_0_speaks(capfd, monkeypatch, default_sigint):
    """torchrun's agent sends each worker the terminal's Ctrl-C again: a rank that stopped at once would leave the
    others waiting in a collective (seen by hand: the agent then killed them after its 30 s grace)."""
    for main, world in ((True, 2), (False, 2), (True, 1)):  # (one worker under torchrun: forwarded all the same)
        if world == 1:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        stop = train_module._StopRequest(world=world, main=main)
        stop.install()
        try:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt
        finally:
            stop.uninstall()
        assert stop.asked
        assert capfd.readouterr().err == ("\nCtrl-C: stopping after this step, which is saved\n" if main else "")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_damaged_config_json_beside_checkpoints_is_passed_over_and_written_again(tmp_path, capsys):
    config = tiny(tmp_path / "run", max_steps=2, save_every=1)
    run_dir = train(config, source())
    whole = train(tiny(tmp_path / "whole", max_steps=4, save_every=1), source())
    for damage in (b'{"train": {"seq_len": 16, "batch', bytes(64)):  # torn, zeroed
        (run_dir / "config.json").write_bytes(damage)
        before = snapshot(run_dir)
        # the checkpoint holds the configs: they are what the run is checked against
        for bad, message in [(dataclasses.replace(config, max_steps=4), "other settings (max_steps: 2 -> 4); pass "
                                                                       "resume=true"),
                             (dataclasses.replace(config, lr=0.5, max_steps=4, resume=True),
                              "step_00000002.pt belongs to a different config (lr: 0.01 -> 0.5)")]:
            with pytest.raises(ConfigError) as error:
                train(bad, source())
            assert message in str(error.value) and "\n" not in str(error.value)
            assert snapshot(run_dir) == before
        model, saved_config, _ = load_run(run_dir)
        assert capsys.readouterr().err == (f"miras: {run_dir / 'config.json'} is not a miras run config; using the "
                                           "configs saved in step_00000002.pt\n") and saved_config == config
        expected = torch.load(checkpoints(run_dir)[-1], weights_only=True)["model"]
        assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    train(dataclasses.replace(config, max_steps=4, resume=True), source())
    assert "written again from this run's config" in capsys.readouterr().err
    assert (run_dir / "config.json.damaged").read_bytes() == damage
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 4
    assert losses(run_dir) == losses(whole)

    (run_dir / "config.json").unlink()  # a missing config.json beside checkpoints is read from them too
    model, saved_config, _ = load_run(run_dir)
    assert capsys.readouterr().err == (f"miras: {run_dir / 'config.json'} is missing; using the configs saved in "
                                       "step_00000004.pt\n") and saved_config.max_steps == 4

    # Without a checkpoint nothing says the folder is a run's: its config.json may be another program's.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"theirs/config.json is not a miras run config; use another out_dir$"):
        train(tiny(tmp_path / "theirs", max_steps=1), source())
    assert snapshot(tmp_path / "theirs") == {"config.json": b"[1, 2]"}
    with pytest.raises(ConfigError, match=r"theirs/config.json is not a miras run config$"):
        load_run(tmp_path / "theirs")


def test_a_checkpoint_damaged_inside_is_refused(tmp_path):
    """torch.load reads a zip without checking its CRCs: bytes flipped inside a tensor would load."""
    config = tiny(tmp_path / "run", max_steps=2, save_every=1)
    train(config, source())
    latest = checkpoints(tmp_path / "run")[-1]
    payload = torch.load(latest, weights_only=True)
    data = bytearray(latest.read_bytes())
    at = data.find(payload["model"]["embed.weight"][5].numpy().tobytes())  # the tensor's bytes in the file
    assert at > 0
    data[at:at + 64] = bytes(b ^ 0x55 for b in data[at:at + 64])
    latest.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"step_00000002.pt is damaged: its tensors do not match the checksum "
                                          r"saved with them; the one before it, step_00000001.pt, is readable: "
                                          r"delete step_00000002.pt to fall back to it$"):
        load_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"its tensors do not match the checksum"):
        train(dataclasses.replace(config, max_steps=3, resume=True), source())
    # a wrongly typed entry is named, not a traceback
    _edit_checkpoint(latest, lambda payload: payload.update(step="2"))
    with pytest.raises(ConfigError, match=r"step_00000002.pt is damaged: its step is '2', not a count of steps$"):
        load_run(tmp_path / "run")
    _edit_checkpoint(latest, lambda payload: payload.update(step=2, rng={"torch": None}))
    with pytest.raises(ConfigError, match=r"damaged: its random-generator states are not those a miras run saves$"):
        load_run(tmp_path / "run")


def test_a_run_saved_before_a_config_field_existed_resumes(tmp_path):
    """A field added to miras since the run was saved is compared at its default, not as None."""
    config = tiny(tmp_path / "run", model="titans-lmm-tiny", max_steps=2, save_every=1)
    train(config, source())
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["model"]["recompute"], saved["train"]["keep_checkpoints"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    _edit_checkpoint(checkpoints(run_dir)[-1], lambda payload: (payload["model_config"].pop("recompute"),
                                                                payload["train_config"].pop("keep_checkpoints")))
    train(dataclasses.replace(config, max_steps=3, resume=True), source())
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3]
    # a field the saved run has and this version does not know is still a difference
    saved["model"]["retired_field"] = 1
    (run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"different config \(model.retired_field: 1 -> None\)"):
        train(dataclasses.replace(config, max_steps=4, resume=True), source())


def test_a_checkpoint_saved_before_a_config_field_existed_loads_beside_a_config_json_written_since(tmp_path):
    """Rerunning a run's train command with a newer miras rewrites its config.json with every field, while its
    checkpoint keeps the older config that lacks one: eval, generate and export (load_run) must still load it, the
    missing field at its default (they refused it as "a different model ()", naming no difference)."""
    train(tiny(tmp_path / "run", model="titans-lmm-tiny", max_steps=1, save_every=1), source())
    run_dir = tmp_path / "run"
    _edit_checkpoint(checkpoints(run_dir)[-1], lambda payload: payload["model_config"].pop("recompute"))
    assert load_run(run_dir)[0].config.recompute == 0
    _edit_checkpoint(checkpoints(run_dir)[-1], lambda payload: payload["model_config"].update(dim=32))
    with pytest.raises(ConfigError, match=r"belongs to a different model \(model.dim: 32 -> 64\)$"):
        load_run(run_dir)


def test_a_run_saved_with_an_override_its_family_does_not_read_still_loads_and_resumes(tmp_path):
    """Before 802487f an override the family ignores (window for titans-lmm) was accepted and saved; a new
    config may not name it, but the saved run loads (evaluate, generate, export) and resumes: it is
    dropped on reading, since the model is the same without it."""
    with pytest.raises(ConfigError, match="titans-lmm does not use window"):
        TrainConfig(model="titans-lmm-tiny", model_overrides={"window": 16})
    assert TrainConfig.from_dict({"model": "titans-lmm-tiny", "model_overrides": {"window": 16, "dim": 32}}
                                 ).model_overrides == {"dim": 32}
    config = tiny(tmp_path / "run", model="titans-lmm-tiny", max_steps=2, save_every=1)
    train(config, source())
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "config.json").read_text())
    saved["train"]["model_overrides"] = {"window": 16}
    (run_dir / "config.json").write_text(json.dumps(saved))
    _edit_checkpoint(checkpoints(run_dir)[-1], lambda payload: payload["train_config"].update(
        model_overrides={"window": 16}))
    model, loaded, _ = load_run(run_dir)
    assert loaded.model_overrides == {} and model.config == create("titans-lmm-tiny").config
    train(dataclasses.replace(config, max_steps=3, resume=True), source())
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3]


def ddp_config(out_dir: Path, grad_accum: int = 1, model: str = "transformer-tiny") -> TrainConfig:
    """A real task (miras.data.tasks), so the ranks also exercise make_batches and the final evaluation."""
    return tiny(out_dir, model, data="task:mqar", max_steps=6, batch_size=8, grad_accum=grad_accum, eval_batches=2)


@pytest.mark.parametrize("model", ["transformer-tiny", "titans-mac-tiny"])
def test_ddp_matches_single_process(model, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path / "ddp"), "--model", model]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = [(tmp_path / "ddp" / f"parameters_rank{rank}.sha256").read_text() for rank in range(2)]
    assert hashes[0] == hashes[1]  # the replicas are identical
    ddp = losses(tmp_path / "ddp")
    # One process with the same global batch in two micro-batches runs the same slices through the same maths.
    accumulated = losses(train(ddp_config(tmp_path / "accumulated", grad_accum=2, model=model)))
    assert [step for step, _ in ddp] == list(range(1, 7))
    # bit for bit, as the README says: each gradient is the same sum of the same two halves
    assert [loss for _, loss in ddp] == [loss for _, loss in accumulated]
    assert validation(tmp_path / "ddp") == validation(tmp_path / "accumulated")
    # The whole global batch in one forward: the first loss differs only by the order of the sums.
    whole = losses(train(dataclasses.replace(ddp_config(tmp_path / "whole", model=model), max_steps=1)))
    assert whole[0][1] == pytest.approx(ddp[0][1], rel=1e-6)


def fsdp_config(out_dir: Path, **values) -> TrainConfig:
    """ddp_config with a memory model: its learned initial memory is read when the state is built."""
    return dataclasses.replace(ddp_config(out_dir), model="titans-lmm-tiny", **values)


def test_fsdp_in_one_process_says_it_trains_the_model_whole(tmp_path, capsys):
    """parallel=fsdp outside torchrun was ignored without a word."""
    train(tiny(tmp_path / "run", max_steps=1, parallel="fsdp"), source())
    assert ("note: parallel=fsdp shards the model over the processes of a torchrun; one process trains it whole"
            in capsys.readouterr().out.splitlines())


def test_fsdp_matches_single_process_and_one_process_continues_its_checkpoint(tmp_path):
    """parallel=fsdp (FSDP2, 2 ranks): the losses of one process with the same global batch, and a checkpoint
    gathered into the full format, which one process (DDP's default) continues as it continues its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path / "fsdp"), "--fsdp"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / "fsdp" / f"parameters_rank{rank}.txt").read_text() for rank in range(2)] == ["DTensor"] * 2
    sharded = losses(tmp_path / "fsdp")
    accumulated = losses(train(fsdp_config(tmp_path / "accumulated", grad_accum=2)))
    assert [step for step, _ in sharded] == list(range(1, 7))
    assert [loss for _, loss in sharded] == pytest.approx([loss for _, loss in accumulated], rel=1e-5)
    assert validation(tmp_path / "fsdp") == pytest.approx(validation(tmp_path / "accumulated"), rel=1e-5)
    # Both runs continue two steps in one process, from their last checkpoints.
    for name in ("fsdp", "accumulated"):
        train(fsdp_config(tmp_path / name, grad_accum=2, max_steps=8, resume=True))
    continued = [losses(tmp_path / name)[6:] for name in ("fsdp", "accumulated")]
    assert [step for step, _ in continued[0]] == [7, 8]
    assert [loss for _, loss in continued[0]] == pytest.approx([loss for _, loss in continued[1]], rel=1e-5)


def test_ddp_ranks_stop_together_when_the_run_folder_cannot_be_made(tmp_path):
    """Rank 0 makes the folder before any rank trains; the others stop with it (not in a collective it left)."""
    (tmp_path / "file").write_text("")
    out_dir = tmp_path / "file" / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(out_dir), "--expect-config-error", str(tmp_path)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"error_rank{rank}.txt").read_text() for rank in range(2)]
    assert lines == [f"rank 0: out_dir {out_dir}: cannot make or write the run folder there (Not a directory); pass a "
                     "folder path that can be written",
                     f"rank 1: out_dir {out_dir}: rank 0 could not make the run folder (its error says why)"]


def sentences(repeats: int) -> str:
    """A small text corpus for BPE runs: six sentences, ``repeats`` times over."""
    return "".join(f"the {w} sat on the {v}.\n" for w in ("cat", "dog", "owl") for v in ("mat", "log")) * repeats


def bpe_ddp_config(out_dir: Path, corpus: Path) -> TrainConfig:
    return tiny(out_dir, data=f"text:{corpus}", tokenizer="bpe:300", model_overrides={"vocab_size": 300},
                max_steps=2, batch_size=4, eval_every=0)


def test_ddp_on_a_text_corpus_trains_the_bpe_and_tokenises_the_corpus_once(tmp_path):
    """Every rank trained the BPE and tokenised the corpus itself (the same work, N times over); rank 0 now does
    it, and the others take its BPE and read the token cache, waiting for it past the training collectives'
    timeout (here 10 s against a 12 s load). If rank 0 cannot load the data, both ranks stop."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(40))
    (tmp_path / "empty").mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MIRAS_CACHE_DIR": str(tmp_path / "cache")}
    for name, data in (("run", corpus), ("failed", tmp_path / "empty")):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   str(tmp_path / name), "--bpe", str(data)]
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / "run" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [report["trained"] for report in reports] == [1, 0]  # BPETokenizer.train calls
    assert reports[0]["encoded"] > 0 and reports[1]["encoded"] == 0  # characters tokenised
    assert reports[0]["parameters"] == reports[1]["parameters"] and reports[0]["tokenizer"] == reports[1]["tokenizer"]
    assert load_run(tmp_path / "run")[2].identity == reports[0]["tokenizer"]
    errors = [(tmp_path / "failed" / f"error_rank{rank}.txt").read_text() for rank in range(2)]
    assert errors[0].startswith(f"rank 0: data 'text:{tmp_path / 'empty'}': ") and "no text" in errors[0]
    assert errors[1] == f"rank 1: data 'text:{tmp_path / 'empty'}': rank 0 could not load it (its error says why)"


def _bpe_rank(out_dir: str, corpus: str) -> None:
    """One rank of test_ddp_on_a_text_corpus_...: train on ``corpus`` with a BPE, counting this rank's BPE trainings
    and tokenised documents; write them with a hash of the replica (or the ConfigError, if there was one). The
    process group's timeout is 10 s, and rank 0 takes 12 s longer to load a corpus file."""
    import datetime
    import time
    from unittest import mock

    import torch.distributed as dist

    from miras.data.tokenizers import BPETokenizer

    rank, counts = os.environ["RANK"], {"trained": 0, "encoded": 0, "tokenizer": None}
    train_bpe, encode, make = BPETokenizer.train.__func__, BPETokenizer.encode_documents, train_module.make_batches

    def counted_train(cls, *args):
        counts["trained"] += 1
        return train_bpe(cls, *args)

    def counted_encode(self, texts):
        counts["encoded"] += sum(map(len, texts))  # characters (the cache key encodes an empty probe)
        return encode(self, texts)

    def recorded_make(*args):
        if rank == "0" and Path(corpus).is_file():
            time.sleep(12)
        data = make(*args)
        counts["tokenizer"] = data.tokenizer.identity
        return data

    with mock.patch.object(BPETokenizer, "train", classmethod(counted_train)), \
            mock.patch.object(BPETokenizer, "encode_documents", counted_encode), \
            mock.patch.object(train_module, "make_batches", recorded_make), \
            mock.patch.object(dist, "init_process_group", functools.partial(
                dist.init_process_group, timeout=datetime.timedelta(seconds=10))):
        try:
            model = _trained_model(bpe_ddp_config(Path(out_dir), Path(corpus)))
        except ConfigError as error:
            _report_error(Path(out_dir), error)
            return
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({**counts, "parameters": _digest(model)}))


def _trained_model(config: TrainConfig):
    """Train ``config`` in this rank and return the model the trainer built (before any wrapping)."""
    from miras.models import LanguageModel

    built = []

    class Recorded(LanguageModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    train_module.LanguageModel = Recorded
    train(config)
    return built[0]


def _digest(model: nn.Module) -> str:
    """A hash of the replica's parameters: equal on every rank when the replicas are identical."""
    import hashlib

    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def _ddp_rank(out_dir: str, model_name: str) -> None:
    """One rank of test_ddp_matches_single_process: train, then write a hash of this replica's parameters."""
    model = _trained_model(ddp_config(Path(out_dir), model=model_name))
    (Path(out_dir) / f"parameters_rank{os.environ['RANK']}.sha256").write_text(_digest(model))


def _fsdp_rank(out_dir: str) -> None:
    """One rank of test_fsdp_matches_single_process_...: train, then write what this rank's parameters are (FSDP2
    makes them DTensors, each rank holding a shard)."""
    kinds = {type(p).__name__ for p in _trained_model(fsdp_config(Path(out_dir), parallel="fsdp")).parameters()}
    (Path(out_dir) / f"parameters_rank{os.environ['RANK']}.txt").write_text(" ".join(sorted(kinds)))


def _ddp_rank_expecting_an_error(out_dir: str, report_dir: str) -> None:
    """One rank of test_ddp_ranks_stop_together_...: write this rank's ConfigError (exit 1 if there was none)."""
    try:
        train(ddp_config(Path(out_dir)))
    except ConfigError as error:
        _report_error(Path(report_dir), error)
        return
    sys.exit(1)


def _report_error(folder: Path, error: ConfigError) -> None:
    """Write this rank's error where its test reads it: ``folder/error_rank<r>.txt``, "rank <r>: <message>"."""
    rank = os.environ["RANK"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"error_rank{rank}.txt").write_text(f"rank {rank}: {error}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:3] == ["--expect-config-error"]:
        _ddp_rank_expecting_an_error(sys.argv[1], sys.argv[3])
    elif sys.argv[2:3] == ["--bpe"]:
        _bpe_rank(sys.argv[1], sys.argv[3])
    elif sys.argv[2:3] == ["--fsdp"]:
        _fsdp_rank(sys.argv[1])
    elif sys.argv[2:3] == ["--model"]:
        _ddp_rank(sys.argv[1], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR (--model PRESET | --fsdp | --bpe CORPUS | --expect-config-error DIR)")


def test_resume_keeps_only_the_metrics_records_up_to_its_step(tmp_path):
    """Lines that are not records (torn, damaged bytes, JSON of another shape) are dropped, as miras eval's
    read_metrics skips them, instead of stopping the resume with a traceback."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 5.5, "lr": 0.001}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 4.0}]
    lines = [json.dumps(records[0]), "[1]", '"note"', '{"step": null}', '{"step": true}', json.dumps(records[1]), "",
             json.dumps(records[2]), '{"step": 4, "loss": 3.9', '{"step": 5, "loss": 3.8}']
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe damaged\n")
    _keep_metrics_until(path, 3)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match=r"metrics.jsonl: cannot read it \(Is a directory\); move it away"):
        _keep_metrics_until(path, 3)


def test_validation_loss_is_the_mean_over_scored_tokens_of_eval_batches(tmp_path):
    """val_loss = Σ cross-entropy over the scored (non-IGNORE) targets of the first eval_batches batches / their
    count, by hand: dividing by every position, or reading one batch whatever eval_batches says, passed every
    test (DDP and FSDP compare val_loss with a single process's, both through this function)."""
    import torch.nn.functional as F

    from miras.data.tasks import TaskBatches, make_task
    from miras.train import evaluate

    torch.manual_seed(0)
    model = create("transformer-tiny")
    batches = TaskBatches(make_task("mqar", context_length=33, pairs=2, queries=2), batch_size=3, seed=5)
    config = tiny(tmp_path, eval_batches=2)
    total, scored = 0.0, 0
    for index in range(2):
        inputs, targets = batches.batch(index)
        assert 0 < int((targets != IGNORE).sum()) < targets.numel()  # some positions are not scored
        with torch.no_grad():
            logits = model(inputs)[0]
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"))
        scored += int((targets != IGNORE).sum())
    with torch.no_grad():
        assert evaluate(model, batches, config) == pytest.approx(total / scored, rel=1e-6)
        one = evaluate(model, batches, tiny(tmp_path, eval_batches=1))
    assert one != pytest.approx(total / scored, rel=1e-6)


def test_gradients_are_clipped_to_grad_clip_before_each_step(tmp_path, monkeypatch):
    """The optimizer steps on gradients of global norm <= grad_clip, and the logged grad_norm is the norm before
    clipping (switching clipping off was caught only through the divergence test's message)."""
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    run = train(tiny(tmp_path / "clipped", max_steps=4, grad_clip=0.05), source())
    logged = [r["grad_norm"] for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
              if "grad_norm" in r]
    assert len(seen) == 4 and len(logged) == 4
    assert all(norm > 0.05 for norm in logged)  # every step had more to clip
    assert seen == pytest.approx([0.05] * 4, rel=1e-4)
    seen.clear()
    train(tiny(tmp_path / "free", max_steps=4, grad_clip=0), source())
    assert seen[0] == pytest.approx(logged[0], rel=1e-4)  # the same first gradient, unclipped
