"""Run folders, checkpoints, atomic writes and config checks: behaviour that a mutation review found unguarded
(miras.runs, miras.files, miras.train_config)."""

from __future__ import annotations

import dataclasses
import os
import random
import stat

import pytest
import torch

import miras.files
from miras.data.tokenizers import BPETokenizer
from miras.runs import checkpoints, set_rng_state, tensor_digest
from miras.train import ConfigError, TrainConfig, config_from_args, load_run, train
from tests.test_train import source, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(miras.files.os, "fsync", fsync)
    monkeypatch.setattr(miras.files.os, "replace", replace)
    miras.files.atomic_write_bytes(tmp_path / "file", b"whole")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "file").read_bytes() == b"whole" and os.listdir(tmp_path) == ["file"]


def test_atomic_write_interrupted_while_writing_leaves_no_temp_file(tmp_path):
    def interrupted(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    (tmp_path / "file").write_bytes(b"before")
    with pytest.raises(KeyboardInterrupt):
        miras.files.atomic_write(tmp_path / "file", interrupted)
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_bytes() == b"before"


# ------------------------------------------------------------------------------------------ checkpoints


def test_only_files_named_step_and_digits_are_checkpoints_oldest_first(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_00000010.pt", "step_00000002.pt", "step_final.pt", "step_3.pt.bak", "step_.pt",
                 ".step_00000004.pt.ab12.tmp"):
        (folder / name).write_bytes(b"")
    assert [path.name for path in checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000010.pt"]


@pytest.mark.parametrize("edit, message", [
    (lambda payload: payload.update(format="other/1"), r"step_00000001.pt is not a miras checkpoint "
                                                        r"\(format 'miras.checkpoint/1'\)$"),
    (lambda payload: payload.pop("optimizer"), r"step_00000001.pt is damaged: it lacks 'optimizer'$"),
    (lambda payload: [payload.pop("rng"), payload.pop("elapsed")], r"step_00000001.pt is damaged: it lacks "
                                                                   r"'elapsed', 'rng'$"),
    (lambda payload: payload.update(step=-1), r"step_00000001.pt is damaged: its step is -1, not a count of steps$"),
])
def test_a_checkpoint_of_another_format_or_lacking_entries_is_a_one_line_error(tmp_path, edit, message):
    train(tiny(tmp_path / "run", max_steps=1), source())
    (latest,) = checkpoints(tmp_path / "run")
    payload = torch.load(latest, weights_only=True)
    edit(payload)
    if "model" in payload and "optimizer" in payload:
        payload["digest"] = tensor_digest(payload)  # a consistent file: what another version of miras could write
    else:
        payload.pop("digest")  # (a checkpoint without one loads unchecked)
    torch.save(payload, latest)
    with pytest.raises(ConfigError, match=message):
        load_run(tmp_path / "run")


def test_the_checksum_covers_the_optimizer_state(tmp_path):
    """Bytes damaged in the optimizer's moments would resume a run with them: the digest covers them too."""
    train(tiny(tmp_path / "run", max_steps=2, save_every=1), source())
    latest = checkpoints(tmp_path / "run")[-1]
    payload = torch.load(latest, weights_only=True)
    moments = next(iter(payload["optimizer"]["state"].values()))
    moments["exp_avg"] += 1.0  # the digest is the one saved, not recomputed
    torch.save(payload, latest)
    with pytest.raises(ConfigError, match=r"step_00000002.pt is damaged: its tensors do not match the checksum saved "
                                          r"with them; the one before it, step_00000001.pt, is readable"):
        load_run(tmp_path / "run")


def test_the_checksum_covers_each_tensors_shape_and_dtype_not_only_its_bytes():
    def digest(tensor):
        return tensor_digest({"model": {"w": tensor}, "optimizer": {"state": {}, "param_groups": []}})

    values = torch.arange(6, dtype=torch.float32)
    digests = {digest(values.reshape(2, 3)), digest(values.reshape(3, 2)), digest(values.view(torch.int32)),
               digest(values)}
    assert len(digests) == 4
    assert digest(values.reshape(2, 3)) == digest(values.clone().reshape(2, 3))  # a function of the tensors only


def test_set_rng_state_restores_python_random_as_well_as_torch():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": []}
    drawn = (random.random(), torch.rand(3))
    random.random(), torch.rand(3)  # moved on
    set_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert again[0] == drawn[0] and torch.equal(again[1], drawn[1])


def test_resuming_with_max_steps_one_below_the_saved_step_is_refused(tmp_path):
    config = tiny(tmp_path / "run", max_steps=3, save_every=1)
    train(config, source())
    with pytest.raises(ConfigError, match=r"is already at step 3, past max_steps=2: pass max_steps >= 3 to "
                                          r"continue it, or another out_dir$"):
        train(dataclasses.replace(config, max_steps=2, resume=True), source())
    train(dataclasses.replace(config, resume=True), source())  # at max_steps itself: nothing to do, no error


def test_a_saved_tokenizer_one_id_wider_than_the_model_is_refused(tmp_path, monkeypatch):
    """The check is ids > the model's vocabulary: one id over is already an id the model cannot embed."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat.\n" * 40)
    run = tmp_path / "run"
    train(TrainConfig(model="transformer-tiny", data=f"text:{tmp_path / 'corpus.txt'}", tokenizer="byte",
                      model_overrides={"vocab_size": 256}, seq_len=16, batch_size=2, max_steps=1, eval_every=0,
                      out_dir=str(run), progress=False))
    assert load_run(run)[2].vocab_size == 256
    BPETokenizer.train(["the cat sat on the mat.\n"] * 5, 257).save(run)  # 257 ids: the bytes and the end marker
    with pytest.raises(ConfigError, match=rf"^{run}: the run's saved tokenizer has 257 ids but its model only 256"):
        load_run(run)


# ------------------------------------------------------------------------------------------ config


def test_a_bool_is_not_taken_for_an_integer_field():
    with pytest.raises(TypeError, match=r"^seq_len must be an integer, got True$"):
        TrainConfig(model="transformer-tiny", seq_len=True)
    with pytest.raises(TypeError, match=r"^seed must be an integer, got False$"):
        TrainConfig.from_dict({"model": "transformer-tiny", "seed": False})


@pytest.mark.parametrize("pair, message", [
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1, got 0"),
    ("decay_steps=0", "decay_steps must be >= 1 or none (none: max_steps), got 0"),
])
def test_counts_that_must_be_positive_are_refused_at_zero(pair, message):
    with pytest.raises(ConfigError) as error:
        config_from_args("transformer-tiny", [pair])
    assert str(error.value) == message


def test_model_fields_given_one_by_one_add_to_model_overrides_given_as_json():
    config = config_from_args("transformer-tiny", ['model_overrides={"dim": 32}', "model.heads=4"])
    assert config.model_overrides == {"dim": 32, "heads": 4}
    later = config_from_args("transformer-tiny", ["model.dim=32", 'model_overrides={"dim": 64, "heads": 4}'])
    assert later.model_overrides == {"dim": 32, "heads": 4}  # a model.<field> wins over the JSON's
