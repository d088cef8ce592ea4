"""miras.evaluate: streaming equals one pass, scoring against a causal oracle, perplexity, reports, bounded memory."""

import argparse
import json
import math
import statistics
import subprocess
import sys
import types
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from miras.data.tasks import MQAR, FactQA, WordNeedle, generate
from miras.evaluate import (
    WILSON_Z,
    add_eval_arguments,
    evaluate,
    example_generator,
    markdown_table,
    perplexity,
    plot_accuracy,
    plot_losses,
    run_eval,
    stream_logits,
    task_accuracy,
    wilson_interval,
    write_json,
)
from miras.models import create

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SuccessorOracle(nn.Module):
    """A causal model that solves MQAR: after token a it predicts the token that last followed a.

    Its state is a table [B, V] of last successors (-1: none yet) and the previous token, carried between
    calls, so it scores 1.0 only if the state really streams across segments. Tokens >= ``blind`` are never
    predicted (it guesses 0 instead), which makes its accuracy depend on the examples drawn.
    """

    def __init__(self, vocab_size: int = 256, blind: int | None = None):
        super().__init__()
        self.vocab_size, self.blind = vocab_size, blind

    def forward(self, ids, state=None):
        batch, length = ids.shape
        if state is None:
            state = (torch.full((batch, self.vocab_size), -1), None)
        table, previous = state[0].clone(), state[1]
        rows = torch.arange(batch)
        guesses = torch.empty_like(ids)
        for t in range(length):
            if previous is not None:
                table[rows, previous] = ids[:, t]
            guesses[:, t] = table[rows, ids[:, t]]
            previous = ids[:, t]
        if self.blind is not None:
            guesses = guesses.masked_fill(guesses >= self.blind, -1)
        logits = F.one_hot(guesses.clamp(min=0), self.vocab_size).double()
        return logits.masked_fill((guesses < 0)[..., None], 0.0), (table, previous)

    def state_bytes(self, state) -> int:
        table = state[0]
        return table.element_size() * table.shape[1]


class Uniform(nn.Module):
    """Equal logits over the vocabulary: its loss is log V at every token."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, ids, state=None):
        return torch.zeros(*ids.shape, self.vocab_size), state


class Spy(nn.Module):
    """Wraps a model and records, at each call, how many logits tensors of earlier calls are still alive, and the
    width and rows of its input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.outputs, self.alive, self.widths, self.rows = model, [], [], [], []

    def forward(self, ids, state=None):
        self.alive.append(sum(ref() is not None for ref in self.outputs))
        self.widths.append(ids.shape[1])
        self.rows.append(ids.shape[0])
        logits, state = self.model(ids, state)
        self.outputs.append(weakref.ref(logits))
        return logits, state

    def state_bytes(self, state) -> int:
        return self.model.state_bytes(state)


class Teacher(nn.Module):
    """An oracle over known examples: it finds each row's example by the tokens fed so far and predicts its true
    next token, except at the first answer token of the examples whose index is in ``wrong``."""

    def __init__(self, examples, wrong=()):
        super().__init__()
        self.examples, self.wrong = examples, set(wrong)

    def forward(self, ids, state=None):
        fed = ids if state is None else torch.cat([state, ids], dim=1)
        start, end = fed.shape[1] - ids.shape[1], fed.shape[1]
        logits = torch.zeros(*ids.shape, 256)
        for row in range(len(ids)):
            index = next(i for i, e in enumerate(self.examples) if torch.equal(e.tokens[:end], fed[row]))
            example = self.examples[index]
            nexts = example.tokens[start + 1 : end + 1].clone()  # nexts[t] follows the input at start + t
            first = int(example.answer.nonzero()[0])
            if index in self.wrong and start <= first - 1 < end:
                nexts[first - 1 - start] = (nexts[first - 1 - start] + 1) % 256
            logits[row, torch.arange(len(nexts)), nexts] = 1.0
        return logits, fed


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return create(name, **overrides).eval()


@pytest.mark.parametrize("name", ["titans-lmm-tiny", "transformer-tiny", "titans-mac-tiny"])
def test_streamed_tail_equals_one_pass(name):
    model = tiny(name, dim=16, heads=2).double()
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, state = model(ids)
    streamed = stream_logits(model, ids, segment=7, keep=11)
    assert streamed.logits.shape == (2, 11, 256)
    torch.testing.assert_close(streamed.logits, full[:, -11:], rtol=0, atol=1e-10)
    assert streamed.state.seen == 45
    # the peak over the segments (MAC's segment buffer is larger part-way than at the end)
    sizes, carried = [], None
    with torch.no_grad():
        for start in range(0, 45, 7):
            _, carried = model(ids[:, start : start + 7], carried)
            sizes.append(model.state_bytes(carried))
    assert streamed.state_bytes == max(sizes) >= model.state_bytes(state)


def test_task_accuracy_of_a_causal_oracle_is_one():
    task = MQAR(context_length=40, pairs=4, queries=4)
    # 100 is not a multiple of the segment 16, 10 examples not a multiple of the batch 4
    rows = task_accuracy(SuccessorOracle(), task, [40, 100], examples=10, seed=3, segment=16, batch_size=4)
    assert [row["context_length"] for row in rows] == [40, 100]
    for row in rows:
        assert (row["correct"], row["examples"], row["accuracy"]) == (10, 10, 1.0)
        assert row["ci_high"] == 1.0
        assert row["ci_low"] == pytest.approx(10 / (10 + WILSON_Z**2), abs=1e-12)
        assert row["state_bytes"] == 256 * 8
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0


def test_task_accuracy_counts_exactly_the_examples_it_gets_right():
    task, examples = MQAR(context_length=48, pairs=3, queries=1), 24
    # the blind oracle is right exactly when the single answer (a value in [192, 256)) is below 224
    expected = sum(int(generate(task, example_generator(5, 48, i)).tokens[-1] < 224) for i in range(examples))
    assert 0 < expected < examples
    first = task_accuracy(SuccessorOracle(blind=224), task, [48], examples=examples, seed=5, segment=10,
                          batch_size=5)
    again = task_accuracy(SuccessorOracle(blind=224), task, [48], examples=examples, seed=5, segment=48,
                          batch_size=24)
    assert first[0]["correct"] == again[0]["correct"] == expected
    assert first[0]["accuracy"] == expected / examples
    # no evaluation example is a training row, whatever the seeds: training rows hash (seed, step, row)
    from miras.data.tasks import TaskBatches

    rows = TaskBatches(task, batch_size=8, seed=5)
    assert not any(torch.equal(generate(task, example_generator(5, 48, i)).tokens, rows.example(48, i).tokens)
                   for i in range(8))
    other = generate(task, example_generator(6, 48, 0)).tokens
    assert not torch.equal(other, generate(task, example_generator(5, 48, 0)).tokens)
    assert torch.equal(generate(task, example_generator(5, 48, 7)).tokens,
                       generate(task, example_generator(5, 48, 7)).tokens)


@pytest.mark.parametrize("task", [WordNeedle(context_length=400), FactQA(context_length=400, facts=3),
                                  FactQA(context_length=400, facts=3, question="object")],
                         ids=["word_needle", "fact_qa-person", "fact_qa-object"])
def test_task_accuracy_scores_whole_answers_of_unequal_lengths_in_one_batch(task):
    """Answers of different lengths in one batch (words, places) start at different positions: every answer token
    of every example is scored. An oracle wrong at the first answer token of the odd examples gets exactly the
    even ones right, whatever the batch size."""
    examples, length = 12, 400
    drawn = [generate(task, example_generator(2, length, i)) for i in range(examples)]
    assert len({int(e.answer.sum()) for e in drawn[:8]}) > 1  # the first batch mixes answer lengths
    for batch_size in (8, 1):
        teacher = Teacher(drawn, wrong=range(1, examples, 2))
        (row,) = task_accuracy(teacher, task, [length], examples=examples, seed=2, segment=150, batch_size=batch_size)
        assert row["correct"] == examples // 2, batch_size
    (row,) = task_accuracy(Teacher(drawn), task, [length], examples=examples, seed=2, segment=150, batch_size=8)
    assert row["correct"] == examples


def test_untrained_model_is_near_chance():
    task = MQAR(context_length=32, pairs=2, queries=1)
    (row,) = task_accuracy(tiny("titans-lmm-tiny", dim=16), task, [32], examples=16, segment=16, batch_size=8)
    assert row["accuracy"] <= 3 / 16
    # chance: one of the 64 values
    assert row["ci_low"] <= 1 / 64 <= row["ci_high"]
    assert row["state_bytes"] > 0


def test_wilson_interval_closed_forms():
    z2 = WILSON_Z**2
    assert wilson_interval(0, 20) == (0.0, pytest.approx(z2 / (20 + z2)))
    assert wilson_interval(20, 20) == (pytest.approx(20 / (20 + z2)), 1.0)
    low, high = wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5)
    assert high - low == pytest.approx(2 * WILSON_Z * math.sqrt(0.25 / 100 + z2 / 40000) / (1 + z2 / 100))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_wilson_interval_is_the_95_percent_score_interval():
    """Against the score interval written out here, (k + z²/2 ± z √(k(n - k)/n + z²/4)) / (n + z²) with z the
    97.5% quantile of the standard normal; the ends are exactly 0 at no successes and 1 at all; n = 0 is an
    error (not a division by zero)."""
    z = statistics.NormalDist().inv_cdf(0.975)
    assert WILSON_Z == pytest.approx(z, rel=1e-12)
    for n in (1, 2, 3, 7, 10, 12, 13, 100, 300):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            half = z * math.sqrt(k * (n - k) / n + z * z / 4)
            expected = ((k + z * z / 2 - half) / (n + z * z), (k + z * z / 2 + half) / (n + z * z))
            assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-12), (k, n)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0  # exactly, not 1e-17 off
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook example
    for successes, trials in ((0, 0), (1, 0), (-1, 5)):
        with pytest.raises(ValueError, match="need 0 <= successes <= trials and trials >= 1"):
            wilson_interval(successes, trials)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    tokens = (np.arange(1000) * 7 % 50).astype(np.uint16)
    result = perplexity(Uniform(50), tokens, seq_len=64, segment=24, max_tokens=500, batch_size=3)
    assert result["tokens"] == 500
    assert result["loss"] == pytest.approx(math.log(50), abs=1e-12)
    assert abs(result["perplexity"] - 50) < 1e-5
    assert result["bits_per_token"] == pytest.approx(math.log2(50), abs=1e-12)


def test_evaluate_streams_in_segments_and_batches_and_scores_max_tokens():
    """evaluate feeds each length in segments of ``segment`` tokens and batches of ``batch_size`` (not the other way
    round), throughput counts the inputs fed (``examples * (L - 1)`` tokens) and the perplexity scores the first
    ``max_tokens`` targets."""
    spy = Spy(SuccessorOracle())
    text = (np.arange(300) % 256).astype(np.uint16)
    results = evaluate({"m": spy}, {"mqar": MQAR(context_length=40, pairs=4, queries=1)}, [40], examples=6,
                       segment=16, batch_size=4, text=text, seq_len=50, max_tokens=60)
    (row,) = results["tasks"]["mqar"]["results"]["m"]
    # the task: 6 examples of 39 inputs as 4 + 2, in segments 16 + 16 + 7; then the perplexity: 61 tokens give
    # 60 targets, in windows of 50 (the second padded): one batch of 2, in segments 16 + 16 + 16 + 2
    assert spy.widths == [16, 16, 7] * 2 + [16, 16, 16, 2] and spy.rows == [4] * 3 + [2] * 3 + [2] * 4
    fed = sum(w * r for w, r in zip(spy.widths[:6], spy.rows[:6]))
    assert fed == 6 * 39 and row["tokens_per_s"] == pytest.approx(fed / row["seconds"], rel=1e-9)
    scored = results["perplexity"]["results"]["m"]
    assert scored["tokens"] == 60
    assert scored["tokens_per_s"] == pytest.approx(60 / scored["seconds"], rel=1e-9)


def test_streamed_perplexity_equals_the_loss_of_whole_windows():
    model = tiny("transformer-tiny", dim=16).double()
    tokens = torch.randint(0, 256, (301,), generator=torch.Generator().manual_seed(2)).numpy()
    result = perplexity(model, tokens, seq_len=64, segment=20, batch_size=2)
    losses = []
    with torch.no_grad():
        for start in range(0, 300, 64):
            window = torch.from_numpy(tokens[start : start + 65]).long()[None]
            logits, _ = model(window[:, :-1])
            losses.append(F.cross_entropy(logits[0], window[0, 1:], reduction="none"))
    expected = torch.cat(losses)
    assert result["tokens"] == 300 == len(expected)
    assert result["loss"] == pytest.approx(expected.mean().item(), abs=1e-10)


def test_reports_are_written(tmp_path):
    models = {"oracle": SuccessorOracle(), "blind": SuccessorOracle(blind=224)}
    tokens = (np.arange(200) % 256).astype(np.uint16)
    results = evaluate(models, {"mqar": MQAR(context_length=32, pairs=4, queries=1)}, [8, 32, 64], examples=6,
                       segment=16, batch_size=4, train_length=32, text=tokens, seq_len=50)
    assert results["tasks"]["mqar"]["skipped_lengths"] == [8]  # 4 pairs and 1 query need 10 tokens
    assert [row["accuracy"] for row in results["tasks"]["mqar"]["results"]["oracle"]] == [1.0, 1.0]
    assert results["perplexity"]["results"]["oracle"]["tokens"] == 199
    assert json.loads(write_json(results, tmp_path / "results.json").read_text()) == results

    table = markdown_table(results)
    assert "| model | 8 | 32 | 64 |" in table
    assert "| oracle | – | 1.00 [0." in table
    assert "Not run at 8 tokens (–): shorter than the task needs." in table  # (said on stderr only)
    assert "### State size per sequence (KiB)" in table and "| oracle | – | 2.0 | 2.0 |" in table
    assert "### Perplexity (windows of 50 tokens)" in table

    png = plot_accuracy(results, tmp_path / "accuracy.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(record) + "\n" for record in
                               [{"step": s, "loss": 5 / (s + 1)} for s in range(10)] + [{"step": 9, "val_loss": 1.0}]))
    png = plot_losses({"run": metrics}, tmp_path / "loss.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def fake_row(length: int, accuracy: float, low: float, high: float, state_bytes: int | None) -> dict:
    return {"context_length": length, "examples": 10, "correct": round(10 * accuracy), "accuracy": accuracy,
            "ci_low": low, "ci_high": high, "seconds": 1.0, "tokens_per_s": 1.0, "state_bytes": state_bytes}


def test_markdown_columns_and_state_sizes():
    """Columns say K and M only for whole multiples of 2**10 and 2**20 (1536 is not "1K"); the state table shows,
    in KiB, the largest state over the tasks at each length (not the last task's)."""
    lengths = [1000, 1024, 1536, 2**20, 3 * 2**19]
    results = {"lengths": lengths, "examples": 10, "tasks": {
        "a": {"results": {"m": [fake_row(1024, 0.5, 0.2, 0.8, 4096), fake_row(1536, 0.5, 0.2, 0.8, 10 * 2**10)]}},
        "b": {"results": {"m": [fake_row(1024, 0.5, 0.2, 0.8, 1024), fake_row(1000, 0.5, 0.2, 0.8, 512)]}}}}
    table = markdown_table(results)
    assert "| model | 1000 | 1K | 1536 | 1M | 1536K |" in table
    states = table[table.index("### State size per sequence (KiB)"):].splitlines()
    assert states[2:5] == ["| model | 1000 | 1K | 1536 | 1M | 1536K |", "|---|---|---|---|---|---|",
                           "| m | 0.5 | 4.0 | 10.0 | – | – |"]  # 512, max(4096, 1024) and 10240 bytes


def test_accuracy_error_bars_run_from_ci_low_to_ci_high(tmp_path, monkeypatch):
    """The bars are [accuracy - ci_low, ci_high - accuracy] (below, above): a Wilson interval is not symmetric,
    at 10/10 all of it is below the point."""
    import matplotlib.axes

    drawn, errorbar = [], matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, yerr=None, **kwargs):
        drawn.append(np.asarray(yerr))
        return errorbar(self, x, y, *args, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    results = {"lengths": [64, 128], "tasks": {"mqar": {"results": {"m": [fake_row(64, 1.0, 0.7, 1.0, None),
                                                                         fake_row(128, 0.2, 0.1, 0.5, None)]}}}}
    plot_accuracy(results, tmp_path / "accuracy.png")
    (bars,) = drawn
    np.testing.assert_allclose(bars, [[0.3, 0.1], [0.0, 0.3]], atol=1e-12)


def test_memory_stays_bounded_at_long_context():
    """A recurrent model over 8192 tokens in segments of 512: at no call is more than one earlier segment's
    logits alive, what is returned holds only the kept positions, and the state does not grow."""
    spy = Spy(tiny("deltanet-tiny", dim=16, layers=1, heads=1))
    ids = torch.randint(0, 256, (1, 8192), generator=torch.Generator().manual_seed(0))
    streamed = stream_logits(spy, ids, segment=512, keep=5)
    assert spy.widths == [512] * 16
    assert max(spy.alive) <= 1
    assert streamed.logits.shape == (1, 5, 256)
    assert streamed.logits.untyped_storage().nbytes() == 5 * 256 * 4
    with torch.no_grad():
        _, first = spy.model(ids[:, :512])
    assert streamed.state_bytes == spy.model.state_bytes(first) == spy.model.state_bytes(streamed.state)


def test_importing_miras_does_not_import_matplotlib():
    code = "import sys, miras, miras.evaluate; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_depth_sweep_evaluates_each_needle_task_once_per_depth(tmp_path, monkeypatch, capsys):
    """RULER's grid: --depths puts the needle at each depth in turn (task@depth), the same examples otherwise;
    tasks without a needle (mqar) are evaluated once; none with one is an error."""
    from miras.data.tasks import PassKey
    from miras.evaluate import at_depths

    tasks = {"passkey": PassKey(context_length=128), "mqar": MQAR(context_length=128, pairs=2, queries=1)}
    swept = at_depths(tasks, [0.0, 0.5, 1.0])
    assert list(swept) == ["passkey@0", "passkey@0.5", "passkey@1", "mqar"]
    assert [swept[f"passkey@{d}"].depth for d in ("0", "0.5", "1")] == [0.0, 0.5, 1.0]
    assert swept["mqar"] is tasks["mqar"]
    with pytest.raises(ValueError, match=r"none of \['mqar'\] puts one; tasks that do: multikey_needle, "
                                         r"number_needle, passkey, word_needle"):
        at_depths({"mqar": tasks["mqar"]}, [0.5])

    parser = add_eval_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["run", "--depths", "1,0,0.25"]).depths == [0.0, 0.25, 1.0]
    for bad in ("0.5,0.5", "1.5", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--depths", bad])
    capsys.readouterr()
    config = types.SimpleNamespace(data="task:passkey", seq_len=63, data_params={})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, None)
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "128", "--examples", "2", "--depths", "0,1",
                              "--out", str(tmp_path / "out")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["tasks"]) == ["passkey@0", "passkey@1"]
    assert [results["tasks"][n]["config"]["depth"] for n in results["tasks"]] == [0.0, 1.0]
    args = parser.parse_args([str(tmp_path / "run"), "--depths", "0,1", "--task-params", '{"depth": 0.5}',
                              "--out", str(tmp_path / "bad")])
    assert run_eval(args) == 2
    assert "--depths and a depth in --task-params" in capsys.readouterr().err


def test_a_sweep_evaluates_each_task_with_the_parameter_once_per_value(tmp_path, monkeypatch, capsys):
    """--sweep pairs=1,4,16: recall against the number of facts in one evaluation (task@pairs=<n>); tasks
    without the parameter run once; values a task refuses, and unknown parameters, are errors."""
    from miras.data.tasks import PassKey
    from miras.evaluate import at_depths, swept

    tasks = {"mqar": MQAR(context_length=128, pairs=2, queries=1), "passkey": PassKey(context_length=128)}
    result = swept(tasks, "pairs", [1, 4])
    assert list(result) == ["mqar@pairs=1", "mqar@pairs=4", "passkey"]
    assert [result[name].pairs for name in ("mqar@pairs=1", "mqar@pairs=4")] == [1, 4]
    assert result["passkey"] is tasks["passkey"]
    with pytest.raises(ValueError, match=r"^mqar@pairs=1: MQAR: queries must be an int in \[1, 1\], got 2 "
                                         r"\(the task.s other parameters are set with --task-params\)"):
        swept({"mqar": MQAR(context_length=128, pairs=2, queries=2)}, "pairs", [1])
    with pytest.raises(ValueError, match=r"none of the tasks \['mqar'\] has a parameter 'needles'; tasks that do: "
                                         r"multikey_needle"):
        swept({"mqar": tasks["mqar"]}, "needles", [2])

    parser = add_eval_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["run", "--sweep", "pairs=1, 4,16"]).sweep == ("pairs", [1, 4, 16])
    assert parser.parse_args(["run", "--sweep", "haystack=text,noise"]).sweep == ("haystack", ["text", "noise"])
    for bad in ("pairs", "=1,2", "pairs=", "pairs=1,1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--sweep", bad])
    capsys.readouterr()
    config = types.SimpleNamespace(data="task:mqar", seq_len=63, data_params={"pairs": 1, "queries": 1})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, None)
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "64,256", "--examples", "2", "--sweep",
                              "pairs=1,8,64", "--out", str(tmp_path / "out")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["tasks"]) == ["mqar@pairs=1", "mqar@pairs=8", "mqar@pairs=64"]
    assert [results["tasks"][n]["config"]["pairs"] for n in results["tasks"]] == [1, 8, 64]
    # 64 pairs and a query need 130 tokens: evaluated at 256 only, and said so
    assert results["tasks"]["mqar@pairs=64"]["skipped_lengths"] == [64]
    assert [row["accuracy"] for row in results["tasks"]["mqar@pairs=64"]["results"]["run"]] == [1.0]
    err = capsys.readouterr().err
    assert "mqar@pairs=64 skipped at 64 tokens: it needs at least 130" in err
    assert err.startswith("miras eval: 3 task(s) x 2 length(s) up to 256 tokens x 2 examples, one line per task "
                          "and length as each is done\nmqar@pairs=1 run L=64: 1.000 (")
    # the run's own task (64 pairs) does not fit in 64 tokens, the swept ones do
    config.data_params = {"pairs": 64, "queries": 1}
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "64", "--examples", "2", "--sweep", "pairs=1,4",
                              "--out", str(tmp_path / "small")])
    assert run_eval(args) == 0
    assert list(json.loads((tmp_path / "small" / "results.json").read_text())["tasks"]) == ["mqar@pairs=1",
                                                                                           "mqar@pairs=4"]
    assert parser.parse_args(["run", "--sweep", "kind=nan,inf,1e1"]).sweep == ("kind", ["nan", "inf", 10.0])
    with pytest.raises(ValueError, match=r"give two tasks the same name 'passkey@0.123456789012'"):
        at_depths({"passkey": PassKey(context_length=128)}, [0.1234567890123, 0.1234567890124])
    config.data_params = {"pairs": 1, "queries": 1}
    for extra, message in ((["--task-params", '{"pairs": 2}'], "--sweep pairs=... and a pairs in --task-params"),
                           (["--sweep", "colour=1"], "none of the tasks ['mqar'] has a parameter 'colour'"),
                           (["--sweep", "pairs=65"], "MQAR: pairs must be an int in [1, 64], got 65")):
        args = parser.parse_args([str(tmp_path / "run"), "--sweep", "pairs=1", *extra, "--out", str(tmp_path / "bad")])
        assert run_eval(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_tasks_are_refused_for_a_run_that_reads_other_ids_than_bytes(tmp_path, monkeypatch, capsys):
    """The tasks are written in bytes: a BPE run read them as other tokens altogether, and its accuracies,
    noise, were written with a warning. Now that is an error; its perplexity is what can be evaluated."""
    from miras.data.tokenizers import ByteTokenizer

    class BPELike(ByteTokenizer):  # bytes underneath, so that the oracle's 256 logits fit; kind is what counts
        kind = "bpe"

        @property
        def identity(self) -> str:
            return "bpe-like"

    corpus = tmp_path / "corpus.txt"
    config = types.SimpleNamespace(data=f"text:{corpus}", seq_len=32, data_params={})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, BPELike())
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus.write_text("".join(f"line {i} of a small corpus\n" for i in range(400)))
    parser = add_eval_arguments(argparse.ArgumentParser())
    for flags, given in ((["--tasks", "mqar"], "--tasks"),
                         (["--tasks", "mqar", "--perplexity", str(corpus)], "--tasks"),
                         (["--task-params", '{"pairs": 2}', "--perplexity", str(corpus)], "--task-params"),
                         (["--depths", "0,0.5"], "--depths"), (["--sweep", "pairs=1,2"], "--sweep")):
        args = parser.parse_args([str(tmp_path / "run"), "--examples", "1", "--out", str(tmp_path / "bad"), *flags])
        assert run_eval(args) == 2, flags
        err = capsys.readouterr().err
        assert f"{given}: the run reads 'bpe' token ids and the tasks are written in bytes" in err
        assert err.count("\n") == 1
    # the perplexity such a run measures without --perplexity takes --perplexity-tokens too (0 crashed, -100 cut
    # the last 99 tokens off)
    for tokens in ("0", "-100"):
        args = parser.parse_args([str(tmp_path / "run"), "--perplexity-tokens", tokens, "--out", str(tmp_path / "bad")])
        assert run_eval(args) == 2
        assert capsys.readouterr().err == f"miras eval: error: --perplexity-tokens must be >= 2, got {tokens}\n"
    assert not (tmp_path / "bad").exists()
    args = parser.parse_args([str(tmp_path / "run"), "--perplexity", str(corpus), "--out", str(tmp_path / "out")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"] == {} and results["perplexity"]["results"]["run"]["tokens"] > 0
    # no flags: the perplexity on the corpus it trained on (it was an error that asked for --perplexity)
    capsys.readouterr()
    assert run_eval(parser.parse_args([str(tmp_path / "run"), "--out", str(tmp_path / "own")])) == 0
    assert (f"miras eval: the perplexity on the validation split of {str(corpus)!r}, the corpus the run trained on "
            "(--perplexity names another)") in capsys.readouterr().err.splitlines()
    own = json.loads((tmp_path / "own" / "results.json").read_text())["perplexity"]["results"]["run"]
    assert {key: own[key] for key in ("loss", "tokens")} == {key: results["perplexity"]["results"]["run"][key]
                                                             for key in ("loss", "tokens")}
    # the corpus as train's data= names it: with the text: prefix (refused as a missing file before)
    args = parser.parse_args([str(tmp_path / "run"), "--perplexity", f"text:{corpus}", "--out", str(tmp_path / "pre")])
    assert run_eval(args) == 0
    prefixed = json.loads((tmp_path / "pre" / "results.json").read_text())["perplexity"]["results"]["run"]
    assert prefixed["loss"] == results["perplexity"]["results"]["run"]["loss"]


def test_cli_arguments_and_run(tmp_path, monkeypatch, capsys):
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path / "run"), "--tasks", "mqar", "--lengths", "32,64", "--examples", "4",
                              "--segment", "16", "--out", str(tmp_path / "out")])
    assert (args.tasks, args.lengths, args.examples, args.segment) == (["mqar"], [32, 64], 4, 16)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--lengths", "32,x"])
    assert parser.parse_args(["run", "--lengths", "64,16,32"]).lengths == [16, 32, 64]  # columns short to long
    with pytest.raises(SystemExit):  # a length twice was evaluated twice: two equal columns, twice the time
        parser.parse_args(["run", "--lengths", "64,16,64"])
    assert "'64,16,64': a context length is given twice; give each once" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"lengths must be distinct .*got \[64, 64\]"):
        evaluate({"oracle": SuccessorOracle()}, {"mqar": MQAR(context_length=32, pairs=1, queries=1)}, [64, 64])

    config = types.SimpleNamespace(data="task:mqar", seq_len=32, data_params={"pairs": 3, "queries": 2})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, None)
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["mqar"]["config"] == {"name": "mqar", "context_length": 64, "pairs": 3, "queries": 2}
    assert [row["accuracy"] for row in results["tasks"]["mqar"]["results"]["run"]] == [1.0, 1.0]
    assert (tmp_path / "out" / "results.md").read_text().startswith("### mqar")
    assert (tmp_path / "out" / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)

    # defaults: the training length x 1 .. 64
    args = parser.parse_args([str(tmp_path / "run"), "--examples", "1", "--out", str(tmp_path / "defaults")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "defaults" / "results.json").read_text())
    assert results["lengths"] == [32 * 2**k for k in range(7)] and results["segment"] == 32

    args = parser.parse_args([str(tmp_path / "run"), "--tasks", "nope", "--out", str(tmp_path / "bad")])
    assert run_eval(args) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    for flags, message in [(["--examples", "0"], "--examples must be >= 1, got 0"),
                           (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
                           (["--segment", "0"], "--segment must be >= 1, got 0"),
                           (["--device", "nowhere"], "unknown device 'nowhere'"),
                           (["--perplexity", str(tmp_path / "missing.txt")], "missing.txt': no such file or folder"),
                           (["--perplexity", "stdlib", "--perplexity-tokens", "1"], "--perplexity-tokens must be >= 2"),
                           # a byte run measures a perplexity only with --perplexity (the count was dropped unsaid)
                           (["--perplexity-tokens", "4096"], "--perplexity-tokens: this run measures no perplexity"),
                           (["--out", str(tmp_path / "a-file")], "a-file is a file, not a folder"),
                           (["--out", str(tmp_path / "a-file" / "out")], "cannot write there (Not a directory)")]:
        args = parser.parse_args([str(tmp_path / "run"), "--examples", "1", *flags])
        args.out = args.out or str(tmp_path / "bad")
        assert run_eval(args) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--tasks", " , "])
    assert "expected comma-separated task names" in capsys.readouterr().err

    # --task-params: more facts than in training, over the run's own parameters
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "64", "--examples", "2", "--task-params",
                              '{"pairs": 8, "queries": 1}', "--out", str(tmp_path / "facts")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "facts" / "results.json").read_text())
    assert results["tasks"]["mqar"]["config"] == {"name": "mqar", "context_length": 64, "pairs": 8, "queries": 1}
    # results.md names the parameters that are not the task's defaults (it said "mqar" alone: read as the training task)
    assert "### mqar (queries=1): exact-match accuracy (2 examples" in (tmp_path / "facts" / "results.md").read_text()
    for bad, message in [('{"pairs": 0}', "pairs must be an int in [1, 64]"),
                         # (the parameters it lists leave out context_length, which --task-params refuses)
                         ('{"keys": 3}', "--task-params: mqar has no parameter(s) keys; its parameters: "
                                         "pairs, queries\n"),
                         ('{"context_length": 99}', "lengths come from --lengths")]:
        args = parser.parse_args([str(tmp_path / "run"), "--task-params", bad, "--out", str(tmp_path / "bad")])
        assert run_eval(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    for bad in ["[1, 2]", "{pairs: 3}"]:
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--task-params", bad])
    assert "JSON" in capsys.readouterr().err


def test_a_length_equal_to_the_task_minimum_is_evaluated(tmp_path, monkeypatch, capsys):
    """A task fits a length equal to its minimum (MQAR: 2 * pairs + 2 * queries tokens): evaluated there, in
    ``evaluate`` and ``miras eval``; one token less is skipped (``--lengths 1`` is refused when parsed)."""
    results = evaluate({"oracle": SuccessorOracle()}, {"mqar": MQAR(context_length=32, pairs=4, queries=1)},
                       [9, 10, 32], examples=2, segment=16)
    assert results["tasks"]["mqar"]["skipped_lengths"] == [9]
    assert [row["context_length"] for row in results["tasks"]["mqar"]["results"]["oracle"]] == [10, 32]

    parser = add_eval_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["run", "--lengths", "2,64"]).lengths == [2, 64]
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--lengths", "1,64"])
    assert "'1,64': expected context lengths >= 2" in capsys.readouterr().err
    config = types.SimpleNamespace(data="task:mqar", seq_len=31, data_params={"pairs": 1, "queries": 1})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, None)
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "3,4", "--examples", "2", "--out",
                              str(tmp_path / "out")])
    assert run_eval(args) == 0
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["mqar"]
    assert entry["skipped_lengths"] == [3]
    assert [(row["context_length"], row["accuracy"]) for row in entry["results"]["run"]] == [(4, 1.0)]


def test_a_byte_text_run_is_evaluated_on_passkey_and_mqar_by_default(tmp_path, monkeypatch):
    """A run trained on text in bytes has no task of its own: without --tasks, the pass key and MQAR."""
    config = types.SimpleNamespace(data="text:stdlib", seq_len=127, data_params={})
    fake = types.ModuleType("miras.train")
    fake.load_run = lambda run_dir, device="cpu": (SuccessorOracle(), config, None)
    monkeypatch.setitem(sys.modules, "miras.train", fake)
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path / "run"), "--lengths", "128", "--examples", "1", "--out",
                              str(tmp_path / "out")])
    assert run_eval(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["tasks"]) == ["passkey", "mqar"]
    assert [results["tasks"][name]["config"]["name"] for name in results["tasks"]] == ["passkey", "mqar"]
