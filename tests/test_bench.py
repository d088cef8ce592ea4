"""`miras bench`: every option is checked before anything is timed or written (one line, exit code 2)."""

from __future__ import annotations

import json

import pytest
import torch

import miras.bench
from miras.cli import main


@pytest.fixture
def nothing_runs(monkeypatch):
    """The bench must stop before its matmul timing and its cases: either one now fails the test."""
    def timed(*args, **kwargs):
        raise AssertionError("the bench timed something before rejecting its input")

    monkeypatch.setattr(miras.bench, "matmul_rate", timed)
    monkeypatch.setattr(miras.bench, "spawn", timed)


TINY = ["bench", "--families", "titans-lmm", "--size", "tiny", "--lengths", "32", "--contexts", "40"]


@pytest.mark.parametrize("options, message", [
    (["--device", "foo"], "--device: unknown device 'foo'; e.g. auto, cpu, cuda, cuda:1"),
    (["--device", "mps"], "--device: device 'mps' is not supported; e.g. auto, cpu, cuda, cuda:1"),
    (["--threads", "0"], "--threads must be >= 1 (torch CPU threads per case), got 0"),
    (["--threads", "-2"], "--threads must be >= 1 (torch CPU threads per case), got -2"),
    (["--lengths", "0", "32"], "--lengths must be >= 1 (training lengths in tokens), got 0"),
    (["--contexts", "-1"], "--contexts must be >= 0 (decoding contexts in tokens), got -1"),
    (["--lengths", "--contexts"], "--lengths and --contexts are both empty: nothing to measure; give at least one"),
    (["--overrides", "dim=0"], "--overrides dim=0: titans-lmm-tiny: dim must be >= 1, got 0"),
    (["--overrides", "recompute=x"], "--overrides recompute='x': expected an integer"),
    (["--overrides", "vocab_size=100"], "--overrides vocab_size=100: vocab_size=100, but the bench feeds random "
                                        "byte ids (0-255): vocab_size must be >= 256"),
    (["--long-from", "0"], "--long-from must be >= 1 (a training length in tokens), got 0"),
    (["--long-overrides", "recompute=x"], "--long-overrides recompute='x': expected an integer"),
    (["--long-overrides", "recompute=2"], "--long-overrides recompute=2: no training length is >= --long-from 16384 "
                                          "(--lengths 32): they would apply to nothing; leave them out or lower "
                                          "--long-from"),
    (["--long-from", "32"], "--long-from 32 without --long-overrides: there are no overrides to apply from there; "
                            "give --long-overrides KEY=VALUE ... too, or leave --long-from out"),
    (["--long-from", "32", "--long-overrides", "chunk_size=0"],
     "--overrides/--long-overrides chunk_size=0: titans-lmm-tiny: chunk_size must be >= 1, got 0"),
])
def test_bench_rejects_bad_options_before_timing_anything(tmp_path, capsys, nothing_runs, options, message):
    out = tmp_path / "bench"
    assert main([*TINY, *options, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"miras bench: error: {message}\n" and captured.out == ""
    assert not out.exists()


def test_bench_checks_every_family_with_the_overrides(tmp_path, capsys, nothing_runs):
    """impl=delta is the online rule: fine for deltanet, an error for titans-lmm's MLP memory."""
    out = tmp_path / "bench"
    assert main([*TINY[:2], "deltanet", "titans-lmm", *TINY[3:], "--overrides", "impl=delta", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miras bench: error: --overrides impl=delta: titans-lmm-tiny: impl=delta (the exact online "
                          "rule, chunk_size 1) takes a matrix memory") and err.count("\n") == 1
    assert main([*TINY, "--overrides", "family=transformer", "--out", str(out)]) == 2
    assert "titans-lmm-tiny: family='transformer' contradicts preset 'titans-lmm-tiny'" in capsys.readouterr().err
    assert not out.exists()


def test_bench_gives_each_family_the_overrides_it_uses(tmp_path, capsys, nothing_runs):
    """One set of --overrides for several families: each takes those it reads; one that no family reads
    is an error (a typo or a mistake, not a silently identical run)."""
    out = tmp_path / "bench"
    cases = list(miras.bench.cases(["transformer", "titans-lmm"], "tiny", [32], [40], {"impl": "compiled",
                                                                                      "recompute": 2}))
    assert {(c["family"], c["kind"]): c["overrides"] for c in cases} == {
        ("transformer", "train"): {"recompute": 2}, ("transformer", "decode"): {"recompute": 2},
        ("titans-lmm", "train"): {"impl": "compiled", "recompute": 2},
        ("titans-lmm", "decode"): {"impl": "compiled", "recompute": 2}}
    assert main([*TINY[:2], "transformer", *TINY[3:], "--overrides", "impl=compiled", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("miras bench: error: --overrides impl=compiled: no family here uses impl "
                                       "(transformer): leave it out\n")
    assert not out.exists()


def test_bench_gives_long_training_rows_their_own_overrides(tmp_path, capsys, nothing_runs):
    """--long-overrides apply to the training rows of --long-from tokens or more, over --overrides, each family
    taking those it reads; decoding keeps --overrides. A key that no family reads is an error there too."""
    cases = list(miras.bench.cases(["transformer", "titans-lmm"], "tiny", [32, 64], [40], {"recompute": 2},
                                   long_overrides={"impl": "compiled", "recompute": 4}, long_from=64))
    assert [(c["family"], c["kind"], c.get("T"), c["overrides"]) for c in cases] == [
        ("transformer", "train", 32, {"recompute": 2}), ("transformer", "train", 64, {"recompute": 4}),
        ("titans-lmm", "train", 32, {"recompute": 2}),
        ("titans-lmm", "train", 64, {"impl": "compiled", "recompute": 4}),
        ("transformer", "decode", None, {"recompute": 2}), ("titans-lmm", "decode", None, {"recompute": 2})]
    out = tmp_path / "bench"
    assert main([*TINY[:2], "transformer", *TINY[3:], "--long-from", "32", "--long-overrides", "impl=compiled",
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("miras bench: error: --long-overrides impl=compiled: no family here uses impl "
                                       "(transformer): leave it out\n")
    assert not out.exists()


def test_benchmarks_models_py_keeps_the_defaults_that_its_arguments_do_not_replace():
    """benchmarks/models.py is the committed run (1K, 4K, 16K; recompute=64 from 16K) unless told otherwise: given
    lengths replace the lengths (and leave out the long overrides when none reaches --long-from), given long
    overrides replace only those."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"
    spec = importlib.util.spec_from_file_location("benchmark_models", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    full = ["--lengths", "1024", "4096", "16384", "--long-overrides", "recompute=64"]
    assert script.defaults([]) == script.defaults(["--families", "transformer"]) == full
    assert script.defaults(["--long-overrides", "recompute=16"]) == full[:4]
    assert script.defaults(["--lengths", "1024"]) == script.defaults(["--lengths=1024"]) == []
    assert script.defaults(["--lengths", "1024", "32768"]) == full[4:]
    assert script.defaults(["--lengths", "1024", "--long-from", "1024"]) == full[4:]
    assert script.defaults(["--lengths", "x"]) == []  # (miras bench then says what is wrong)
    # a --long-from no length reaches keeps the long overrides, so that miras bench says they apply to nothing
    assert script.defaults(["--long-from", "32768"]) == full
    assert script.defaults(["--lengths", "1024", "--long-from", "4096"]) == full[4:]


def test_bench_tables_show_each_training_rows_overrides_when_long_rows_have_their_own():
    row = {"family": "titans-lmm", "kind": "train", "T": 64, "tokens_per_s": 1000.0, "gflop_per_s": 2.0,
           "peak_rss_mb": 400.0, "params": 160396, "overrides": {"impl": "compiled", "recompute": 4}}
    plain = {**row, "T": 32, "overrides": {}}
    failed = {"family": "titans-lmm", "kind": "train", "T": 128, "overrides": {"recompute": 4},
              "error": "timed out after 900 s"}
    lines = miras.bench.tables([plain, row, failed], 10.0, settings=True).splitlines()
    assert lines[0].endswith("| params | overrides |") and lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| titans-lmm | 32 | 1,000 | 2.0 | 20% | 400 | 160,396 | none |"
    assert lines[3] == "| titans-lmm | 64 | 1,000 | 2.0 | 20% | 400 | 160,396 | impl=compiled, recompute=4 |"
    assert lines[4] == "| titans-lmm | 128 | error: timed out after 900 s |  |  |  |  | recompute=4 |"
    assert len(lines[4].split("|")) == len(lines[0].split("|"))  # its overrides in their column
    without = miras.bench.tables([plain], 10.0).splitlines()
    assert without[0].endswith("| params |") and without[2] == "| titans-lmm | 32 | 1,000 | 2.0 | 20% | 400 | 160,396 |"


def test_bench_reports_the_largest_decoding_state():
    """Mid-chunk a memory keeps its chunk-start weights too: the bench reports the largest state of its
    decoding steps (as evaluate does), not the one where the 64 steps happen to end (a chunk boundary)."""
    row = miras.bench.run_case({"family": "titans-lmm", "size": "tiny", "kind": "decode", "context": 40,
                                "threads": 1})
    from miras.models import create

    model = create("titans-lmm-tiny")
    with torch.no_grad():
        _, state = model(torch.zeros(1, 40, dtype=torch.long))
        sizes = []
        for _ in range(65):
            _, state = model(torch.zeros(1, 1, dtype=torch.long), state)
            sizes.append(model.state_bytes(state))
    assert max(sizes) > min(sizes)  # at a chunk boundary (every 8th step) the state is smaller
    assert row["state_mb"] * 2**20 == max(sizes)


def test_bench_checks_cuda_devices(tmp_path, capsys, nothing_runs, monkeypatch):
    out = tmp_path / "bench"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*TINY, "--device", "cuda", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"miras bench: error: --device: device 'cuda' asked for, but CUDA is not "
                                       f"available (torch {torch.__version__})\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*TINY, "--device", "cuda:2", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # the index checked by resolve_device (the wording is train_config's)
    assert err.startswith("miras bench: error: --device: device 'cuda:2'") and "2 CUDA device(s)" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_bench_checks_the_out_folder(tmp_path, capsys, nothing_runs):
    afile = tmp_path / "results.txt"
    afile.write_text("keep")
    for out in (afile, afile / "bench"):
        assert main([*TINY, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"miras bench: error: --out {str(out)!r}: {str(afile)!r} is not a folder; "
                                           "give a folder for models.json / models.md\n")
    assert afile.read_text() == "keep"
    broken = tmp_path / "broken"  # a symlink to nothing: mkdir would fail there after every case had run
    broken.symlink_to(tmp_path / "nowhere" / "x")
    assert main([*TINY, "--out", str(broken)]) == 2
    assert capsys.readouterr().err == (f"miras bench: error: --out {str(broken)!r}: {str(broken)!r} is not a "
                                       "folder; give a folder for models.json / models.md\n")


def test_bench_that_cannot_write_its_results_prints_them(tmp_path, monkeypatch, capsys):
    """The folder or the disk may change while the cases run: the measurements are printed, not lost."""
    out = tmp_path / "bench"

    def measure(case):
        out.write_text("made a file meanwhile")
        return {**case, "error": "RuntimeError: measured"}

    monkeypatch.setattr(miras.bench, "matmul_rate", lambda device, threads: 100.0)
    monkeypatch.setattr(miras.bench, "spawn", measure)
    assert main([*TINY, "--out", str(out)]) == 2
    printed = capsys.readouterr()
    report = json.loads(printed.out[printed.out.index('{\n "meta"'):])
    assert [r["error"] for r in report["results"]] == ["RuntimeError: measured"] * 2
    assert printed.err.startswith(f"miras bench: error: cannot write into --out {str(out)!r} (")
    assert out.read_text() == "made a file meanwhile"


def test_bench_module_entry_point_reports_one_line(tmp_path, capsys, nothing_runs):
    """``python -m miras.bench`` / benchmarks/models.py: the same check, the same line, without the CLI."""
    assert miras.bench.main(["--size", "tiny", "--threads", "0", "--out", str(tmp_path / "bench")]) == 2
    assert capsys.readouterr().err == "miras bench: error: --threads must be >= 1 (torch CPU threads per case), got 0\n"
    assert not (tmp_path / "bench").exists()


def test_bench_accepts_good_options(tmp_path, monkeypatch):
    """Valid options pass the checks: `auto` resolves to a device this machine has; contexts may be 0."""
    seen = {}

    class Stop(Exception):
        pass

    def stop(device, threads):
        seen.update(device=device, threads=threads)
        raise Stop  # stop at the first timing: the checks are what is tested

    monkeypatch.setattr(miras.bench, "matmul_rate", stop)
    with pytest.raises(Stop):
        main([*TINY, "--contexts", "0", "--device", "auto", "--threads", "1", "--overrides", "recompute=2",
              "--out", str(tmp_path / "new" / "bench")])
    assert seen == {"device": torch.device("cuda" if torch.cuda.is_available() else "cpu"), "threads": 1}


def test_a_failed_case_is_a_row_and_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    """Every case is measured and written (a failure is its row's error); the exit code then says 1."""
    monkeypatch.setattr(miras.bench, "matmul_rate", lambda device, threads: 100.0)
    monkeypatch.setattr(miras.bench, "spawn", lambda case: {**case, "error": "RuntimeError: can't allocate memory"})
    assert main([*TINY, "--out", str(tmp_path / "bench")]) == 1
    assert capsys.readouterr().err == "miras bench: 2 of 2 case(s) failed (their rows say why)\n"
    assert "can't allocate memory" in (tmp_path / "bench" / "models.md").read_text()


# ------------------------------------------------------------------------------------------ what it measures


def test_attention_flops_count_the_cpu_kernel_forward_and_backward():
    """torch's FlopCounterMode has no formula for the CPU flash kernel (it counts 0): ours counts Q·Kᵀ and P·V
    over the causal pairs, and twice that for the backward."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(1, 2, 48, 16, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False, custom_mapping=miras.bench.attention_flop_formulas())
    with counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    forward = 2 * 1 * 2 * (48 * 49 // 2) * (16 + 16)
    assert miras.bench.attention_flops((1, 2, 48, 16), (1, 2, 48, 16), (1, 2, 48, 16), True) == forward
    assert counter.get_total_flops() == 3 * forward


def test_peak_rss_is_the_case_process_own_not_its_parents():
    """A case process started by a parent that once held 1 GB reports its own peak, far below it (ru_maxrss
    would report the parent's 1 GB: Linux carries it across fork and exec)."""
    import subprocess
    import sys

    child = "from miras.bench import peak_rss_mb; print(peak_rss_mb())"
    parent = (f"import subprocess, sys; big = bytearray(2**30); big[::4096] = b'x' * len(big[::4096]); del big; "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    out = subprocess.run([sys.executable, "-c", parent], check=True, capture_output=True, text=True).stdout
    assert 0 < float(out) < 700


def test_memory_gates_reports_the_inner_learning_rate_at_each_role_of_an_mqar_example(monkeypatch):
    """benchmarks/memory_gates.py: θ at the pair's key (token 0), its value (1), the noise (2..T-3) and the query's
    key (T-2), each a mean over examples, batch and heads; with θ set by position, each role gets exactly its own."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    from miras.layers import MemoryLayer
    from miras.models import create

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_gates.py"
    spec = importlib.util.spec_from_file_location("benchmark_memory_gates", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    length = 24
    by_position = torch.full((length,), 0.01)
    by_position[0], by_position[1], by_position[length - 2], by_position[length - 1] = 0.1, 0.5, 0.2, 0.9
    compute = MemoryLayer._gates

    def gates(self, x, dtype):  # the layer's gates with θ replaced by the positions' values (one call: 0..T-1)
        found = compute(self, x, dtype)
        return dataclasses.replace(found, lr=by_position[:x.shape[1], None].expand_as(found.lr).to(dtype))

    monkeypatch.setattr(MemoryLayer, "_gates", gates)
    torch.manual_seed(0)
    model = create("titans-lmm-tiny")
    monkeypatch.setattr(script, "load_run", lambda run: (model, None, None))
    stats = script.gate_statistics("run", length, examples=2, seed=0)
    expected = {"key": 0.1, "value": 0.5, "noise": 0.01, "query": 0.2}
    assert len(stats["lr_by_role"]) == model.config.layers
    for layer in stats["lr_by_role"]:
        assert layer == pytest.approx(expected, abs=1e-7)
    assert stats["mean_lr"] == pytest.approx([by_position.mean().item()] * model.config.layers, abs=1e-7)
