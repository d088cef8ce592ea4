"""The `miras` command: help with examples, one-line errors with exit code 2, presets, generate from a run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras.cli import COMMANDS, main
from miras.models import FAMILIES, PRESETS, SIZES, LanguageModel, create
from miras.train import DataSource, TrainConfig, load_run, train

TEXT = b"hello world!\n"


pytestmark = pytest.mark.usefixtures("one_thread")


class RepeatedText:
    """Rows cut from ``TEXT`` repeated, at a random offset per row and step (bytes are the tokens)."""

    batch_size, seq_len = 8, 24

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        stream = torch.tensor(list(TEXT * 4))
        offsets = torch.randint(0, len(TEXT), (self.batch_size,), generator=torch.Generator().manual_seed(step))
        rows = torch.stack([stream[o:o + self.seq_len + 1] for o in offsets.tolist()])
        size = self.batch_size // world
        rows = rows[rank * size:(rank + 1) * size]
        return rows[:, :-1], rows[:, 1:]


def test_the_subcommands_are_frozen():
    assert list(COMMANDS) == ["train", "generate", "eval", "export", "bench", "presets", "cache", "demo"]


@pytest.mark.parametrize("argv", [[], ["train"], ["generate"], ["eval"], ["export"], ["bench"], ["presets"],
                                  ["cache"], ["demo"]])
def test_help_shows_examples(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  miras " in out
    if argv == ["train"]:  # every key with its default and what it does; the task names
        assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))
        assert "  seq_len            256            tokens per training row\n" in out
        assert "model.<field>" in out and "chunk_size" in out and "tasks (data=task:<name>): fact_qa, mqar, " in out


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "miras"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "miras train titans-lmm-tiny" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "titans-tiny"], "miras train: error: unknown preset 'titans-tiny' (did you mean 'titans-"),
    (["train", "transformer-tiny", "steps=3"], "miras train: error: unknown key 'steps'; valid: batch_size, "),
    (["train", "transformer-tiny", "lr=big"], "miras train: error: lr='big': expected a number"),
    (["train", "transformer-tiny", "lr=inf"], "miras train: error: need a finite lr > 0"),
    (["train", "titans-lmm-tiny", "model.impl=fast"], "miras train: error: model_overrides: impl must be one of "
                                                       "['chunked', 'compiled', 'recurrent', 'delta'], got 'fast'"),
    (["train", "transformer-tiny", "device=tpu:0"], "miras train: error: unknown device 'tpu:0'"),
    (["train", "transformer-tiny", "weight_decay=inf"], "miras train: error: weight_decay must be a finite number"),
    (["train", "transformer-tiny", "betas=0.9"], "miras train: error: betas must be a JSON list like [0.9, 0.95], "
                                                 "got 0.9"),
    (["train", "transformer-tiny", "seed=99999999999999999999999"], "miras train: error: seed must be an integer "
                                                                     "in [0, 2**63)"),
    (["train", "transformer-tiny", "data_params={\"pairs\": 2}"], "miras train: error: data_params are a task's"),
    # the model's checks of what its layers take, before anything is written: the delta path is for online linear rules
    (["train", "titans-lmm-tiny", "model.impl=delta"], "miras train: error: model_overrides: impl=delta (the exact "
                                                        "online rule, chunk_size 1) takes a matrix memory"),
    (["train", "transformer-tiny", "model.gate_rank=4"], "miras train: error: model_overrides: gate_rank sets the "
                                                          "memory's gates, and transformer has no memory"),
    (["train", "titans-lmm-tiny", "model.family=transformer"], "miras train: error: model_overrides: "
                                                                "family='transformer' contradicts preset"),
])
def test_bad_train_arguments_exit_2_with_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    assert main([*argv, f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    if "unknown preset" in message:  # every preset is one of the families at one of the sizes
        assert all(f" {family}," in err or f" {family};" in err for family in FAMILIES)
        assert all(f" {size}," in err or f" {size}\n" in err for size in SIZES)
    assert not (tmp_path / "run").exists()


def test_under_torchrun_a_bad_command_line_is_reported_by_rank_0_alone(tmp_path, capsys, monkeypatch):
    """Every rank gets the same command line, so every rank finds the same error in it: one line, from rank 0;
    every rank exits 2 (as torchrun's ranks would, without a process group: the error comes first)."""
    for world, rank, lines in (("2", "0", 1), ("2", "1", 0), ("1", "1", 1)):  # (a stray RANK alone: not torchrun)
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "transformer-tiny", "steps=3", f"out_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == lines and err.startswith("miras train: error: unknown key 'steps'" if lines else "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("corpus, message", [
    ("missing", "no such file or folder; expected 'stdlib', 'hf:<name>[:<split>]', "),
    ("empty", "no text found; expected 'stdlib', "),
    ("blank.txt", "no text found; expected 'stdlib', "),
])
def test_a_missing_or_empty_corpus_is_one_line_and_writes_nothing(corpus, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("")
    assert main(["train", "transformer-tiny", f"data=text:{tmp_path / corpus}", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"miras train: error: data 'text:{tmp_path / corpus}': corpus '{tmp_path / corpus}': "
                          f"{message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "run", "--lengths", "0"], "miras eval: error: argument --lengths: '0': expected context lengths >= 2"),
    (["train"], "miras train: error: the following arguments are required: PRESET"),
    (["nope"], "miras: error: argument COMMAND: invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1 and "--help)" in err


def test_cache_lists_and_clears_the_token_cache(tmp_path, monkeypatch, capsys):
    from miras.data.text import cached_tokens, from_path
    from miras.data.tokenizers import ByteTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(cache))
    assert main(["cache"]) == 0
    assert capsys.readouterr().out == (f"nothing cached: {cache} does not exist (a text run makes it when it first "
                                       "tokenises a corpus)\n")
    for split in ("train", "validation"):
        cached_tokens(from_path(corpus), ByteTokenizer(), split)
    (cache / "mine.txt").write_text("kept")
    assert main(["cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1].startswith(f"2 cache file(s), 0.0 MiB, in {cache}")
    assert all(".uint16  " in line and " MiB  20" in line for line in lines[:2])
    described = sorted(line.split(".uint16  ")[1] for line in lines[:2])  # what each file holds
    assert [about.split(", ")[:2] for about in described] == [[str(corpus), "train split"],
                                                               [str(corpus), "validation split"]]
    assert all(about.endswith((" documents, byte", " 1 document, byte")) for about in described)
    assert main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out == f"deleted 2 cache file(s), 0.0 MiB, from {cache}\n"
    assert [path.name for path in cache.iterdir()] == ["mine.txt"]
    assert main(["cache"]) == 0
    assert capsys.readouterr().out == f"0 cache file(s), 0.0 MiB, in {cache}\n"
    assert main(["cache", "--dir", str(cache / "mine.txt")]) == 2
    assert capsys.readouterr().err == f"miras cache: error: --dir {cache / 'mine.txt'}: not a folder\n"
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(cache / "mine.txt"))
    assert main(["cache", "--clear"]) == 2
    assert capsys.readouterr().err == f"miras cache: error: MIRAS_CACHE_DIR={cache / 'mine.txt'}: not a folder\n"


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == sorted(PRESETS)
    assert lines[1 + sorted(PRESETS).index("titans-mac-small")].split()[1:] == [
        "256", "4", "4", "256", f"{create('titans-mac-small').num_parameters():,}"]


def test_train_then_generate_prints_the_continuation_the_run_learned(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(TEXT * 400)
    run_dir = tmp_path / "run"
    assert main(["train", "transformer-tiny", f"data=text:{tmp_path / 'corpus.txt'}", f"out_dir={run_dir}",
                 "seq_len=24", "batch_size=8", "max_steps=40", "lr=1e-2", "warmup_steps=5", "log_every=20",
                 "eval_every=20", "eval_batches=2", "progress=false"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in records] == [(20, False), (20, True), (40, False), (40, True)]
    assert records[-1]["val_loss"] < 0.5
    assert main(["generate", str(run_dir), "--prompt", "hello wor", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed == "ld!\nhello wo\n"
    model, _, tokenizer = load_run(run_dir)
    tokens, _ = model.generate(torch.tensor([list(b"hello wor")]), 12, temperature=0)
    assert tokenizer.decode(tokens[0].tolist()) == printed[:-1]
    # Sampling among the single likeliest token is greedy decoding.
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hello wor", "--max-new-tokens", "12", "--top-k",
                 "1", "--temperature", "1.5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == printed


def test_generate_without_a_saved_tokenizer_uses_bytes(tmp_path, capsys):
    config = TrainConfig(model="transformer-tiny", out_dir=str(tmp_path / "run"), seq_len=24, batch_size=8,
                         max_steps=1, progress=False)
    train(config, DataSource(RepeatedText()))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "4", "--temperature",
                 "0"]) == 0
    model, _, tokenizer = load_run(tmp_path / "run")
    tokens, _ = model.generate(torch.tensor([list(b"hi")]), 4, temperature=0)
    assert tokenizer is None
    assert capsys.readouterr().out == bytes(tokens[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_generate_escapes_control_characters_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    """A byte model may sample an escape sequence: on a terminal it is shown, not obeyed; piped, the text
    is printed as decoded."""
    from miras.cli import escape_controls

    assert escape_controls("a\x1b[31mb\x07\n\tc\x85\u00e9\x7f") == "a\\x1b[31mb\\x07\n\tc\\x85\u00e9\\x7f"
    config = TrainConfig(model="transformer-tiny", out_dir=str(tmp_path / "run"), seq_len=24, batch_size=8,
                         max_steps=1, progress=False)
    train(config, DataSource(RepeatedText()))
    model, _, _ = load_run(tmp_path / "run")
    escape = torch.zeros(256)
    escape[0x1B] = 1e4  # the likeliest next byte is ESC, whatever came before
    model.head.register_forward_hook(lambda module, inputs, logits: logits + escape)
    monkeypatch.setattr("miras.train.load_run", lambda *args, **kwargs: (model, None, None))
    flags = ["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"]
    capsys.readouterr()
    assert main(flags) == 0
    assert capsys.readouterr().out == "\x1b\x1b\x1b\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(flags) == 0
    assert capsys.readouterr().out == "\\x1b\\x1b\\x1b\n"


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 0, got -5"),
    (["--device", "nowhere"], "unknown device 'nowhere'; e.g. auto, cpu, cuda, cuda:1"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63) (the sampling generator's seed), got -1"),
    (["--seed", str(2**63)], f"--seed must be an integer in [0, 2**63) (the sampling generator's seed), got {2**63}"),
])
def test_bad_generate_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    """Checked before the run is read: the run folder need not exist."""
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", *flags]) == 2
    assert capsys.readouterr().err == f"miras generate: error: {message}\n"


def test_train_and_eval_name_the_files_of_a_folder_corpus_they_skip(tmp_path, capsys, monkeypatch):
    """A folder's files that are not text were dropped without a word: a folder of latin-1 files trained on
    whatever UTF-8 file was among them."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(TEXT * 400)
    (corpus / "b.txt").write_bytes("caf\xe9\n".encode("latin-1") * 400)
    note = (f"note: corpus {str(corpus)!r}: 1 file skipped (b.txt: it is not UTF-8 text (byte 3)); reading the 1 "
            "other file")
    assert main(["train", "transformer-tiny", f"data=text:{corpus}", f"out_dir={tmp_path / 'run'}", "seq_len=24",
                 "batch_size=8", "max_steps=1", "eval_every=0", "progress=false"]) == 0
    assert note in capsys.readouterr().out.splitlines()
    assert main(["eval", str(tmp_path / "run"), "--perplexity", str(corpus)]) == 0
    assert f"miras eval: {note}" in capsys.readouterr().err.splitlines()


def test_generate_stops_at_the_end_of_document_token(tmp_path, capsys, monkeypatch):
    """A BPE run's sampled <|endoftext|> ends the printed text (--ignore-eos: it goes on); it printed past it."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(TEXT * 400)
    assert main(["train", "transformer-tiny", f"data=text:{tmp_path / 'corpus.txt'}", f"out_dir={tmp_path / 'run'}",
                 "seq_len=24", "batch_size=8", "max_steps=1", "eval_every=0", "tokenizer=bpe:300",
                 "model.vocab_size=300", "progress=false"]) == 0
    _, _, tokenizer = load_run(tmp_path / "run")
    sampled = [*tokenizer.encode("the cat"), tokenizer.eos_id, *tokenizer.encode(" sat")]

    def generate(self, prompt, max_new_tokens, **options):
        return torch.tensor([sampled[:max_new_tokens]]), None

    monkeypatch.setattr(LanguageModel, "generate", generate)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == "the cat\n"
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "20", "--ignore-eos"]) == 0
    assert capsys.readouterr().out == "the cat<|endoftext|> sat\n"


def test_generate_draws_only_ids_the_tokenizer_has(tmp_path, capsys, monkeypatch):
    """A model with more ids than its tokenizer (model.vocab_size above the data's) never emits the others."""
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(TEXT * 400)
    assert main(["train", "transformer-tiny", f"data=text:{tmp_path / 'corpus.txt'}", f"out_dir={tmp_path / 'run'}",
                 "seq_len=24", "batch_size=8", "max_steps=1", "eval_every=0", "model.vocab_size=512",
                 "progress=false"]) == 0
    model, _, _ = load_run(tmp_path / "run")
    with torch.no_grad():  # make the ids past the bytes the likeliest: a head that favours them
        model.head.weight[256:] += 10 * model.head.weight[:256].norm(dim=-1).max()
    tokens, _ = model.generate(torch.tensor([list(b"hi")]), 8, temperature=0, vocab_limit=256)
    assert tokens.max() < 256
    assert model.generate(torch.tensor([list(b"hi")]), 8, temperature=0)[0].min() >= 256
    capsys.readouterr()
    # the untrained model puts about half its mass on ids 256-511: a byte tokenizer could not decode them
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "16", "--temperature",
                 "2", "--seed", "1"]) == 0
    with pytest.raises(ValueError, match=r"vocab_limit must be an integer in \[1, 512\] or None, got 600"):
        model.generate(torch.tensor([list(b"hi")]), 2, vocab_limit=600)


def _task_run(tmp_path, name="run", **changes):
    values = {"seq_len": 16, "batch_size": 2, "max_steps": 2, "progress": False, **changes}
    config = TrainConfig(model="titans-lmm-tiny", data="task:mqar", data_params={"pairs": 1, "queries": 1},
                         out_dir=str(tmp_path / name), **values)
    train(config)
    return tmp_path / name


def test_a_corpus_that_cannot_be_reached_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import miras.data.text

    def unreachable(spec):
        raise ConnectionError(f"Couldn't reach {spec!r} on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(miras.data.text, "load_corpus", unreachable)
    assert main(["train", "transformer-tiny", "data=text:hf:no/such", "seq_len=8", f"out_dir={tmp_path / 'run'}",
                 "progress=false"]) == 2
    assert capsys.readouterr().err == ("miras train: error: data 'text:hf:no/such': Couldn't reach 'hf:no/such' on "
                                       "the Hub (LocalEntryNotFoundError)\n")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import miras.train

    def interrupted(config, data=None):
        raise miras.train.Interrupted("interrupted at step 7: the latest checkpoint is step 5; run the same command "
                                      "again to continue from it")

    monkeypatch.setattr(miras.train, "train", interrupted)
    assert main(["train", "transformer-tiny", "progress=false"]) == 130
    assert capsys.readouterr().err == ("miras train: interrupted at step 7: the latest checkpoint is step 5; run the "
                                       "same command again to continue from it\n")
    monkeypatch.setattr(miras.train, "train", lambda config, data=None: (_ for _ in ()).throw(
        miras.train.Interrupted("")))  # what ranks other than 0 raise under torchrun: rank 0 alone says it
    assert main(["train", "transformer-tiny", "progress=false"]) == 130 and capsys.readouterr().err == ""

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "presets", dataclasses.replace(COMMANDS["presets"], run=ctrl_c))
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "miras presets: interrupted\n"


def test_damaged_run_files_are_one_line_errors(tmp_path, capsys):
    run = _task_run(tmp_path)
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "train": {**saved["train"], "seq_len": "abc"}}))
    for argv in (["generate", str(run), "--prompt", "hi"], ["eval", str(run), "--lengths", "16", "--examples", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "config.json is damaged: seq_len must be an integer, got 'abc'" in err and err.count("\n") == 1
    (run / "config.json").write_text(json.dumps({**saved, "tokenizer": True}))
    (run / "miras_tokenizer.json").write_text("xx")
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "the run's saved tokenizer cannot be loaded" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps(saved))
    [checkpoint] = (run / "checkpoints").glob("step_*.pt")
    torch.save({"format": "miras.checkpoint/1", "step": 2}, checkpoint)
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.endswith("is damaged: it lacks 'elapsed', 'model', 'optimizer', 'rng', "
                                            "'train_config', 'model_config'\n")


def test_resuming_a_task_run_does_not_need_a_tokenizer_and_refuses_to_go_back(tmp_path, capsys):
    run = _task_run(tmp_path, max_steps=2)
    (run / "miras_tokenizer.json").unlink(missing_ok=True)
    _task_run(tmp_path, max_steps=3, resume=True)  # task data is bytes: no tokenizer file needed
    before = (run / "config.json").read_text()
    capsys.readouterr()
    argv = ["train", "titans-lmm-tiny", "data=task:mqar", 'data_params={"pairs": 1, "queries": 1}', "seq_len=16",
            "batch_size=2", "max_steps=1", "progress=false", "resume=true", f"out_dir={run}"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"miras train: error: {run} is already at step 3, past max_steps=1: pass "
                                       "max_steps >= 3 to continue it, or another out_dir\n")
    assert (run / "config.json").read_text() == before


def test_a_diverged_run_is_one_line_and_its_folder_takes_the_next_config(tmp_path, capsys):
    argv = ["train", "titans-lmm-tiny", "data=task:passkey", "seq_len=128", "batch_size=2", "max_steps=5",
            "progress=false", f"out_dir={tmp_path / 'run'}"]
    assert main([*argv, "lr=1e6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miras train: error: training diverged at step ") and err.count("\n") == 1
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    # no checkpoint was saved, so the folder holds nothing to continue: another config may use it
    assert main([*argv, "lr=1e-3", "max_steps=1"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e-3


def test_eval_skips_tasks_longer_than_every_length(tmp_path, capsys):
    run = _task_run(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "mqar,passkey", "--lengths", "32,64", "--examples", "1"]) == 0
    out, err = capsys.readouterr()
    assert "skipping passkey needs at least" in err and "mqar" in out
    assert main(["eval", str(run), "--tasks", "passkey", "--lengths", "32", "--examples", "1"]) == 2
    assert "every task is longer than the longest of --lengths (32 tokens): passkey needs at least" in \
        capsys.readouterr().err


def test_eval_says_what_is_wrong_with_its_run_folder_and_its_lm_eval_options(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["eval", str(tmp_path / "afile"), "--lengths", "32"]) == 2  # the run folder's fault, not --out's
    message = f"miras eval: error: {tmp_path / 'afile'} is not a run directory (no config.json)\n"
    assert capsys.readouterr().err == message
    run = _task_run(tmp_path)
    capsys.readouterr()
    for flags, named in ((["--limit", "2"], "--limit"), (["--include-path", str(tmp_path)], "--include-path")):
        assert main(["eval", str(run), "--lengths", "32", *flags]) == 2  # lm-eval's options, never ignored
        assert capsys.readouterr().err == (f"miras eval: error: {named}: options of --lm-eval, not of the native "
                                           "evaluation\n")
    assert main(["eval", str(run), "--lm-eval", ""]) == 2  # no task: not the native evaluation instead
    assert "miras eval: error: --lm-eval" in capsys.readouterr().err
    assert not (run / "results.json").exists()


def test_eval_out_of_memory_is_one_line_and_other_errors_stay_loud(tmp_path, capsys, monkeypatch):
    import miras.evaluate

    run = _task_run(tmp_path)
    capsys.readouterr()
    for error in (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB\n..."),
                  MemoryError()):
        monkeypatch.setattr(miras.evaluate, "evaluate", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        assert main(["eval", str(run), "--lengths", "32,64", "--examples", "1"]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("miras eval: error: out of memory (lengths up to 64 tokens, --batch-size 8, --segment ")
        assert err.endswith("; fewer or shorter --lengths, or a smaller --batch-size")
    monkeypatch.setattr(miras.evaluate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["eval", str(run), "--lengths", "32", "--examples", "1"])
    assert not (run / "results.json").exists()


def test_eval_stopped_at_a_later_length_keeps_the_lengths_it_measured(tmp_path, capsys, monkeypatch):
    """An evaluation out of memory (or interrupted) at its longest length lost every length before it: nothing was
    written until all were done. Now what was measured is written, marked incomplete."""
    import miras.evaluate

    run = _task_run(tmp_path)
    measure = miras.evaluate.task_accuracy
    for error, code, why in ((RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 TB"), 2, "out of memory"),
                             (KeyboardInterrupt(), 130, "interrupted")):
        def failing(model, task, lengths, *args, error=error):
            if lengths[0] == 64:
                raise error
            return measure(model, task, lengths, *args)

        out = tmp_path / f"out-{code}"
        assert main(["eval", str(run), "--lengths", "32", "--examples", "2", "--out", str(out)]) == 0  # an earlier one
        assert (out / "accuracy.png").is_file()
        monkeypatch.setattr(miras.evaluate, "task_accuracy", failing)
        capsys.readouterr()
        assert main(["eval", str(run), "--lengths", "32,64", "--examples", "2", "--out", str(out)]) == code
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"; the lengths measured before it are in {out / 'results.json'}")
        results = json.loads((out / "results.json").read_text())
        assert results["incomplete"] == why
        assert [row["context_length"] for row in results["tasks"]["mqar"]["results"][run.name]] == [32]
        assert (out / "results.md").read_text().startswith(f"**Incomplete** ({why}): the lengths measured before it.")
        assert not (out / "accuracy.png").exists()  # the earlier evaluation's plot is not of these results
        monkeypatch.setattr(miras.evaluate, "task_accuracy", measure)


def test_eval_names_skipped_lengths_and_survives_a_torn_metrics_line(tmp_path, capsys):
    run = _task_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "lo')  # what a killed run leaves
    capsys.readouterr()
    assert main(["eval", str(run), "--lengths", "3,32", "--examples", "2", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "miras eval: mqar skipped at 3 tokens: it needs at least 4\n" in err
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_results_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails (a full disk) leaves the previous results whole."""
    import miras.files
    from miras.evaluate import plot_accuracy, write_json

    results = {"tasks": {"mqar": {"results": {"m": [{"context_length": 32, "accuracy": 0.5, "ci_low": 0.2,
                                                          "ci_high": 0.8}]}}}, "train_length": 32}
    write_json(results, tmp_path / "results.json")
    plot_accuracy(results, tmp_path / "accuracy.png")
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "accuracy.png")}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(miras.files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_json({**results, "more": "x" * 10_000}, tmp_path / "results.json")
    with pytest.raises(OSError):
        plot_accuracy({**results, "train_length": 64}, tmp_path / "accuracy.png")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "results.json"]  # no temp file left
    monkeypatch.undo()
    assert plot_accuracy(results, tmp_path / "accuracy.pdf").read_bytes()[:5] == b"%PDF-"  # the suffix's format


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    run = _task_run(tmp_path)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "caf\udce9", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == ("miras generate: error: --prompt is not valid UTF-8 text (check the "
                                       "terminal's encoding)\n")


def test_generate_from_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"miras generate: error: {tmp_path / 'nowhere'} does not exist\n"
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"miras generate: error: {tmp_path / 'empty'} is not a run directory " \
                                      "(no config.json)\n"
    # a folder of runs (the demo's runs/demo/<model>/seed-<n>) names them
    for model in ("lmm", "mac"):
        _task_run(tmp_path, f"demo/{model}/seed-0", max_steps=0)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "demo"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"miras generate: error: {tmp_path / 'demo'} is not a run directory " \
                                      "(no config.json); the runs inside it: lmm/seed-0, mac/seed-0\n"
    (tmp_path / "demo" / "lmm" / "seed-0" / "checkpoints" / "step_00000000.pt").unlink()
    assert main(["generate", str(tmp_path / "demo" / "lmm" / "seed-0"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.endswith("has no checkpoint: its training stopped before the first save "
                                            "(save_every); the same train command continues it\n")


def test_bench_measures_with_overrides(tmp_path, capsys):
    """`miras bench` at tiny size: one training and one decoding row per family, config overrides applied."""
    out = tmp_path / "bench"
    assert main(["bench", "--families", "titans-lmm", "--size", "tiny", "--lengths", "32", "40", "--contexts", "40",
                 "--overrides", "recompute=2", "--long-from", "40", "--long-overrides", "recompute=4",
                 "--out", str(out)]) == 0
    results = json.loads((out / "models.json").read_text())
    assert results["meta"]["overrides"] == {"recompute": 2} and results["meta"]["long_overrides"] == {"recompute": 4}
    train_row, long_row, decode_row = results["results"]
    assert train_row["kind"] == "train" and train_row["tokens_per_s"] > 0 and train_row["overrides"] == {"recompute": 2}
    assert train_row["gflop_per_s"] == pytest.approx(train_row["model_gflops"] * train_row["tokens_per_s"] / 32)
    assert long_row["T"] == 40 and long_row["overrides"] == {"recompute": 4}
    assert results["meta"]["matmul_gflops"] > 0
    assert decode_row["kind"] == "decode" and decode_row["state_mb"] > 0 and decode_row["overrides"] == {"recompute": 2}
    written = (out / "models.md").read_text()
    assert "| titans-lmm | 32 |" in written and "from T = 40 training also takes {'recompute': 4}" in written
    printed = capsys.readouterr().out.splitlines()  # each table's header before its first row
    assert printed[1].startswith("| family | T | train tokens/s |") and printed[1].endswith("| overrides |")
    assert printed[3].startswith("| titans-lmm | 32 |") and printed[3].endswith("| recompute=2 |")
    assert printed[4].startswith("| titans-lmm | 40 |") and printed[4].endswith("| recompute=4 |")
    assert printed[5].startswith("| family | context | decode tokens/s |") and printed[7].startswith("| titans-lmm |")
    assert main(["bench", "--overrides", "recompute=x", "--out", str(out)]) == 2
    assert main(["bench", "--overrides", "width=3", "--out", str(out)]) == 2
    assert "KEY a model config field" in capsys.readouterr().err


def test_bench_counts_model_flops():
    """3x the forward FLOPs: every matmul of transformer-tiny plus causal attention over T(T+1)/2 pairs."""
    from miras.bench import model_flops

    tokens = 40
    ids = torch.randint(0, 256, (1, tokens))
    dim, hidden, heads, layers, vocab = 64, 176, 2, 2, 256  # transformer-tiny
    weights = layers * dim * (3 * dim + dim + 3 * hidden) + dim * vocab  # qkv, out, SwiGLU; tied head
    attention = layers * 2 * heads * (tokens * (tokens + 1) // 2) * 2 * (dim // heads)  # Q·Kᵀ and P·V
    assert model_flops({"family": "transformer", "size": "tiny"}, ids) == 3 * (2 * tokens * weights + attention)
    # A masked call counts every query-key pair it is given: sliding-window attention below 2 windows.
    swa = model_flops({"family": "swa-transformer", "size": "tiny"}, ids)
    assert swa == 3 * (2 * tokens * weights + 2 * attention * tokens / (tokens + 1))


def test_attention_flop_formulas_read_is_causal_where_each_kernel_takes_it():
    from miras.bench import _biased_attention_flops, _flash_attention_flops, attention_flops

    shape = (1, 2, 10, 8)
    causal, full = 2 * 2 * 55 * 16, 2 * 2 * 100 * 16  # 10·11/2 and 10·10 query-key pairs
    assert attention_flops(shape, shape, shape, True) == causal
    assert _flash_attention_flops(shape, shape, shape, 0.0, True) == causal
    assert _flash_attention_flops(shape, shape, shape) == full
    assert _biased_attention_flops(shape, shape, shape, None, False, 0.0, True) == causal
    assert _biased_attention_flops(shape, shape, shape, None, True) == full
    assert attention_flops((1, 2, 4, 8), shape, shape, True) == 2 * 2 * 10 * 16  # top-left aligned: 1+2+3+4
