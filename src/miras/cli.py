"""The ``miras`` command line: ``miras train | generate | eval | export | bench | presets | cache | demo``.

    miras train titans-lmm-tiny data=task:passkey max_steps=200 out_dir=runs/passkey
    miras generate runs/passkey --prompt "The " --max-new-tokens 100
    miras presets
    torchrun --nproc_per_node 2 -m miras.cli train titans-mac-small data=text:stdlib batch_size=64

Every subcommand is one ``Command`` in ``COMMANDS`` (bottom of this file): its one-line help, its
examples, a function adding its arguments to its parser and a function running it (returning the
exit code). Adding a subcommand is adding an entry there. Errors a user can fix (a ``ConfigError``
from ``miras.train``, or raised by a command) print one line on stderr and exit with code 2.
Nothing heavy is imported until a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    help: str  # one line, shown in ``miras --help``
    examples: str | Callable[[], str]  # the end of ``miras <name> --help``; a function runs only when shown
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when the help is printed, and
    whose usage errors are one line (argparse prints the whole usage block first)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------- train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", metavar="PRESET", help="model preset (`miras presets` lists them)")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[],
                        help="train config fields, model.<field>")


def _train_examples() -> str:
    import dataclasses

    from .models import ModelConfig
    from .train import TrainConfig

    keys = []
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "runs/<preset>" if f.name == "out_dir" else _as_typed(default)
            keys.append(f"  {f.name:<18} {shown:<14} {f.metadata['help']}")
    from .data.tasks import TASKS

    model_fields = ", ".join(f.name for f in dataclasses.fields(ModelConfig) if f.name != "family")
    return f"""examples:
  miras train titans-lmm-tiny data=task:passkey max_steps=200 out_dir=runs/passkey
  miras train transformer-small data=text:stdlib seq_len=512 batch_size=32 precision=bf16 model.dim=384
  miras train titans-lmm-tiny data=task:passkey out_dir=runs/passkey resume=true max_steps=400
  torchrun --nproc_per_node 4 -m miras.cli train titans-mac-small batch_size=64 parallel=ddp

Running again with the same out_dir continues from its latest checkpoint; resume=true also lets
max_steps, logging, device and the other run-time settings change.

keys, their defaults and what they do (bools true/false, dicts and lists as JSON, optional values none):
{chr(10).join(keys)}
  model.<field>      overrides a field of the preset: {model_fields}
  tasks (data=task:<name>): {", ".join(sorted(TASKS))}"""


def _run_train(args: argparse.Namespace) -> int:
    from .train import ConfigError, config_from_args, train

    try:
        config = config_from_args(args.preset, args.overrides)
    except ConfigError:
        # torchrun gives every rank the same command line, so every rank finds the same error in it: rank 0
        # alone says it (errors found later, in the data or a checkpoint, still come from every rank)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
            return 2
        raise
    train(config)
    return 0


# ---------------------------------------------------------------------------------------------- generate


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `miras train`")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="go on past the tokenizer's end-of-document token (default: stop there)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1 or auto (default: auto, as eval; sampled text depends on the device)")


GENERATE_EXAMPLES = """examples:
  miras generate runs/shakespeare --prompt "ROMEO:" --max-new-tokens 300
  miras generate runs/shakespeare --prompt "To be" --temperature 0 --max-new-tokens 50
  miras generate runs/shakespeare --prompt "The " --top-p 0.9 --seed 3 --device cuda

Prints the continuation only, up to the tokenizer's end-of-document token (a BPE's <|endoftext|>; bytes
have none) unless --ignore-eos. The run's tokenizer is used if it saved one, else UTF-8 bytes. On a
terminal, control characters other than newline and tab are printed as escapes (\\x1b); piped, the
text is printed as decoded."""


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .data.tokenizers import get_tokenizer
    from .models.lm import check_sampling
    from .train import ConfigError, load_run, resolve_device

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       name=lambda argument: "--" + argument.replace("_", "-"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    device = resolve_device(args.device)
    model, _, tokenizer = load_run(args.run_dir, str(device))
    if tokenizer is None:  # a run trained on a DataSource without one (tests, custom data)
        if model.config.vocab_size > 256:
            raise ConfigError(f"{args.run_dir} saved no tokenizer and its vocabulary is not bytes")
        tokenizer = get_tokenizer("byte")
    try:  # a prompt that is not UTF-8 arrives with surrogate escapes, which no tokenizer can encode
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("--prompt is not valid UTF-8 text (check the terminal's encoding)") from None
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=device)
    if prompt.numel() == 0:
        raise ConfigError("the prompt is empty")
    # a model may have more ids than its tokenizer (model.vocab_size above the data's): never draw those
    limit = min(tokenizer.vocab_size, model.config.vocab_size)
    tokens, _ = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, vocab_limit=limit)
    ids = tokens[0].tolist()
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids and not args.ignore_eos:
        ids = ids[:ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    print(escape_controls(text) if sys.stdout.isatty() else text)
    return 0


def escape_controls(text: str) -> str:
    """``text`` with its control characters other than newline and tab written as escapes (``\\x1b``),
    so that a sampled escape sequence cannot move the cursor or recolour the user's terminal."""
    return "".join(char if char in "\n\t" or unicodedata.category(char) != "Cc" else repr(char)[1:-1]
                   for char in text)


# ----------------------------------------------------------------------------------------------- presets


def _run_presets(args: argparse.Namespace) -> int:
    import torch

    from .models import PRESETS, LanguageModel, preset_config

    print(f"{'preset':<26}{'dim':>6}{'layers':>8}{'heads':>7}{'vocab':>8}{'parameters':>15}")
    for name in sorted(PRESETS):
        config = preset_config(name)
        with torch.device("meta"):  # counted without allocating the weights
            parameters = LanguageModel(config).num_parameters()
        print(f"{name:<26}{config.dim:>6}{config.layers:>8}{config.heads:>7}{config.vocab_size:>8}{parameters:>15,}")
    return 0


PRESETS_EXAMPLES = """examples:
  miras demo
  miras presets
  miras presets | grep titans-mac"""


# ------------------------------------------------------------------------------------------------- cache


def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clear", action="store_true", help="delete the cache files (runs tokenise again; a temp "
                        "file written in the last hour is left: a run may be writing it)")
    parser.add_argument("--dir", default=None, help="the cache folder (default: $MIRAS_CACHE_DIR or "
                                                    "~/.cache/miras/tokens)")


def _run_cache(args: argparse.Namespace) -> int:
    from .data.text import cache_description, cache_files, clear_cache, default_cache_dir, is_token_file

    folder = Path(args.dir).expanduser() if args.dir is not None else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        given = (f"--dir {args.dir}" if args.dir is not None else
                 f"MIRAS_CACHE_DIR={os.environ['MIRAS_CACHE_DIR']}" if "MIRAS_CACHE_DIR" in os.environ else folder)
        print(f"miras cache: error: {given}: not a folder", file=sys.stderr)
        return 2
    if not folder.exists():
        print(f"nothing cached: {folder} does not exist (a text run makes it when it first tokenises a corpus)")
        return 0
    if args.clear:
        files, freed = clear_cache(folder)
        print(f"deleted {files} cache file(s), {freed / 2**20:,.1f} MiB, from {folder}")
        return 0
    found, total = [path for path in cache_files(folder) if is_token_file(path)], 0  # descriptions: beside them
    for path in found:
        stat = path.stat()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
        about = cache_description(path) or ("being written, or left by a killed run" if path.name.startswith(".")
                                            else "no description (cached by an older miras)")
        print(f"{stat.st_size / 2**20:>10,.1f} MiB  {when}  {path.name}  {about}")
        total += stat.st_size
    print(f"{len(found)} cache file(s), {total / 2**20:,.1f} MiB, in {folder}"
          + (" (miras cache --clear deletes them)" if found else ""))
    return 0


CACHE_EXAMPLES = """examples:
  miras cache                              # list the token cache's files (one per corpus split and tokenizer)
  miras cache --clear                      # delete them; a run tokenises its corpus again
  MIRAS_CACHE_DIR=/scratch/tokens miras cache"""


# ---------------------------------------------------------------------------------------------- registry

EVAL_EXAMPLES = """examples:
  miras eval runs/passkey
  miras eval runs/passkey --tasks passkey,mqar --lengths 256,1024,4096,16384 --examples 50
  miras eval runs/mqar --task-params '{"pairs": 16}' --lengths 256     # more facts than in training
  miras eval runs/passkey --lengths 1024,4096 --depths 0,0.25,0.5,0.75,1   # needle depth x length (RULER)
  miras eval runs/mqar --tasks mqar --task-params '{"queries": 1}' --sweep pairs=1,4,16,64 --lengths 256
  miras eval runs/text --perplexity stdlib
  miras eval runs/text --lm-eval lambada_openai --limit 100        # lm-evaluation-harness (miras-lm[eval])
  miras eval out/hf --lm-eval my_task --include-path tasks/ --limit 20"""


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluate import add_eval_arguments, json_object

    add_eval_arguments(parser)
    parser.add_argument("--lm-eval", metavar="TASKS", default=None,
                        help="comma-separated lm-evaluation-harness tasks, run on the HF export of the run "
                             "(written to RUN_DIR/hf) or on an HF folder; needs miras-lm[eval]")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (a fraction if < 1)")
    parser.add_argument("--include-path", default=None, help="lm-eval: a folder of task YAMLs of your own")
    parser.add_argument("--max-length", type=int, default=None,
                        help="lm-eval: context tokens kept (longer contexts lose their start; default 2**20)")
    parser.add_argument("--metadata", type=json_object("--metadata", '{"max_seq_lengths": [4096]}'), default=None,
                        help="lm-eval: task metadata as JSON, e.g. '{\"max_seq_lengths\": [4096, 16384]}' (RULER)")


def _run_eval(args: argparse.Namespace) -> int:
    from .train import ConfigError

    if args.lm_eval is not None:  # (an empty task list too: refused there, never taken for the native evaluation)
        return _run_lm_eval(args)
    given = [flag for flag, value in (("--limit", args.limit), ("--include-path", args.include_path),
                                      ("--max-length", args.max_length), ("--metadata", args.metadata))
             if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: options of --lm-eval, not of the native evaluation")
    from .evaluate import run_eval

    return run_eval(args)


# `miras eval` options that only the native evaluation reads: refused with --lm-eval when not at their defaults
NATIVE_EVAL_OPTIONS = ("tasks", "lengths", "task_params", "depths", "sweep", "examples", "segment", "seed",
                       "perplexity", "perplexity_tokens")


def _run_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval on an HF folder, exporting a native run first (its folder's ``hf/``); results.json into --out."""
    from .evaluate import add_eval_arguments, check_out_folder, write_json
    from .train import ConfigError, resolve_device
    from .train_config import first_line

    defaults = add_eval_arguments(argparse.ArgumentParser())  # the defaults as the eval parser sets them
    given = [f"--{name.replace('_', '-')}" for name in NATIVE_EVAL_OPTIONS
             if getattr(args, name) != defaults.get_default(name)]
    if given:
        raise ConfigError(f"{', '.join(given)}: options of the native evaluation, not of --lm-eval (which takes "
                          "--limit, --include-path, --max-length, --metadata, --batch-size, --device and --out)")
    if args.max_length is not None and args.max_length < 1:
        raise ConfigError(f"--max-length must be >= 1 (context tokens lm-eval keeps), got {args.max_length}")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError(f"--limit must be > 0 (examples per task, a fraction if < 1), got {args.limit:g}")
    batch_size = 1 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    device = str(resolve_device(args.device))
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        try:
            check_out_folder(out)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    from .runs import holds_a_run

    run_dir = Path(args.run_dir)
    if not holds_a_run(run_dir):
        raise ConfigError(f"{run_dir} holds no config.json: give a miras run folder or an exported HF folder")
    export_run, run_lm_eval, check_tasks, padding_error = _hf("export_run", "run_lm_eval", "check_lm_eval_tasks",
                                                              "PaddingError")
    from .hf.export import is_export

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    try:  # before anything is exported
        check_tasks(tasks, args.include_path)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"--lm-eval: {error}") from None
    # a native run is exported first (also one whose config.json is missing or damaged: export_run reads the
    # configs from its checkpoints)
    hf_dir = run_dir
    if not is_export(run_dir):
        hf_dir = run_dir / "hf"
        export_run(run_dir, hf_dir)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    extra = {"max_length": args.max_length} if args.max_length is not None else {}
    try:
        results = run_lm_eval(hf_dir, tasks, limit=limit, include_path=args.include_path, log_samples=False,
                              batch_size=batch_size, device=device, metadata=args.metadata, **extra)
    except padding_error as error:  # lm-eval left-pads a batch of generation prompts, which the models refuse
        if batch_size == 1:
            raise
        raise ConfigError(f"--lm-eval with --batch-size {batch_size}: {first_line(error)}; generation tasks batch "
                          "prompts of unequal length with padding: use --batch-size 1 for them (log-likelihood "
                          "tasks may use larger batches)") from None
    print(json.dumps(results["results"], indent=1, default=str))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json({"lm_eval": results["results"], "tasks": tasks, "limit": limit, "model_dir": str(hf_dir)},
                   out / "results.json")
        print(f"wrote {out / 'results.json'}")
    return 0


EXPORT_EXAMPLES = """examples:
  miras export runs/passkey out/passkey-hf
  then, in Python: AutoModelForCausalLM.from_pretrained("out/passkey-hf", trust_remote_code=True)"""


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a miras training run")
    parser.add_argument("hf_dir", help="the folder to write (safetensors, config, tokenizer, modeling_miras.py)")


def _hf(*names: str):
    """Names from miras.hf; without transformers installed, one clear error line."""
    from .train import ConfigError

    try:
        import miras.hf as hf
    except ImportError as error:
        missing = f"{error.name} is not installed" if error.name else str(error)
        raise ConfigError(f"this command needs the HF extra ({missing}): pip install 'miras-lm[hf]' "
                          "(and 'miras-lm[eval]' for lm-eval)") from None
    return [getattr(hf, name) for name in names]


def _run_export(args: argparse.Namespace) -> int:
    from .runs import holds_a_run
    from .train import ConfigError

    if not holds_a_run(Path(args.run_dir)):
        raise ConfigError(f"{args.run_dir} is not a miras run (no config.json)")
    (export_run,) = _hf("export_run")
    from .hf.export import check_export_folder

    try:  # before loading the run: a run folder or another program's config.json is never written over
        check_export_folder(Path(args.hf_dir))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    export_run(args.run_dir, args.hf_dir)
    print(f"wrote {args.hf_dir}")
    return 0


BENCH_EXAMPLES = """examples:
  miras bench --families titans-lmm transformer --lengths 1024 --contexts 1024 16384
  miras bench --lengths 1024 4096 16384 --long-overrides recompute=64   # the 16K rows recompute
  miras bench --size tiny --out runs/bench-tiny"""


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


DEMO_EXAMPLES = """examples:
  miras demo                     # the full demo (<= 15 min on 2 CPU cores): runs/demo/report.md
  miras demo --quick             # a smoke test of the whole pipeline in seconds
  miras demo --seeds 0 1 2 3 --out runs/demo4"""


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import add_demo_arguments

    add_demo_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_command

    return run_demo_command(args)


# The subcommands, in the order of `miras --help`: Command(help, examples, add_arguments, run), with heavy
# imports inside `run`.
COMMANDS: dict[str, Command] = {
    "train": Command("train a model (single process or under torchrun)", _train_examples, _train_arguments,
                     _run_train),
    "generate": Command("continue a prompt with a trained run", GENERATE_EXAMPLES, _generate_arguments,
                        _run_generate),
    "eval": Command("evaluate a run: task accuracy over context lengths, perplexity, report and plots",
                    EVAL_EXAMPLES, _eval_arguments, _run_eval),
    "export": Command("convert a run into a HuggingFace folder (AutoModelForCausalLM, trust_remote_code)",
                      EXPORT_EXAMPLES, _export_arguments, _run_export),
    "bench": Command("training/decoding throughput, peak memory and state size per model family",
                     BENCH_EXAMPLES, _bench_arguments, _run_bench),
    "presets": Command("list the model presets", PRESETS_EXAMPLES, lambda parser: None, _run_presets),
    "cache": Command("list or clear the token cache (tokenised text corpora)", CACHE_EXAMPLES, _cache_arguments,
                     _run_cache),
    "demo": Command("train Titans and baselines on a recall task and test them far past the training length",
                    DEMO_EXAMPLES, _demo_arguments, _run_demo),
}

EXAMPLES = """examples:
  miras demo
  miras presets
  miras train titans-lmm-tiny data=task:passkey max_steps=200 out_dir=runs/passkey
  miras generate runs/passkey --prompt "The " --max-new-tokens 100
  torchrun --nproc_per_node 2 -m miras.cli train titans-mac-small batch_size=64

`miras COMMAND --help` shows each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miras", description="Titans and MIRAS: long-context memory models.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help, epilog=command.examples,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
    return parser


def _as_typed(value) -> str:
    """A default as one would type it after ``key=``: true/false, none, JSON for a tuple or dict."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return json.dumps(value) if isinstance(value, (tuple, list, dict)) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``miras ...``: returns the exit code (0 done, 2 a usage or config error reported on stderr, 130
    interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt as error:  # Ctrl-C: one line (train's says which checkpoint a rerun continues from)
        if str(error) or type(error) is KeyboardInterrupt:  # (an empty train.Interrupted: a rank other than 0)
            print(f"miras {args.command}: {str(error) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `miras presets | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as error:
        from .train import ConfigError

        if not isinstance(error, ConfigError):
            raise
        print(f"miras {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
