"""Training: one flat loop (nanoGPT-style), DDP or FSDP2 under ``torchrun``, atomic checkpoints, exact resume.

From the shell (``miras train --help`` lists every key)::

    miras train titans-lmm-tiny data=task:passkey max_steps=200 out_dir=runs/passkey
    torchrun --nproc_per_node 8 -m miras.cli train titans-mac-170m data=text:stdlib batch_size=256 precision=bf16

From Python::

    from miras.train import TrainConfig, train, load_run
    run_dir = train(TrainConfig(model="titans-lmm-tiny", data="task:passkey", max_steps=200))
    model, config, tokenizer = load_run(run_dir)

Choices the papers and the issue leave open, written down here:

- ``batch_size`` is the global batch of one optimizer step. It is cut into ``world * grad_accum``
  row slices; micro-batch ``i`` of rank ``r`` is slice ``r * grad_accum + i``
  (``Batches.batch(step, slice, world * grad_accum)``), so a step trains on the same rows whatever
  the number of processes and of accumulation steps.
- The loss of a step is the sum of the token losses over the whole global batch divided by its
  number of scored tokens (targets != IGNORE). Every micro-batch, BPTT segment and rank adds its
  share of that one mean, so a 2-process run logs and optimises the loss of a 1-process run.
- ``bptt``: each row is fed in segments of ``bptt`` tokens, the model state carried and detached
  between them, each segment backpropagated on its own (activation memory of one segment).
- Weight decay applies only to the weight matrices of ``nn.Linear`` layers, except the memory's gate
  projections. Embeddings (also when tied to the output head), norms, biases, the gates (``gate_proj``,
  weight and bias: the memory's inner learning rate θ, momentum η, forgetting α and Huber δ; with
  channel-wise gates also their low-rank ``gate_down`` / ``gate_up``), depthwise
  conv kernels, the memory's learned initial weights and persistent tokens are not decayed: pulling
  those towards zero changes what the model computes instead of regularising a linear map (a gate
  projection's weights start at zero, and decaying them pulls every gate towards a data-independent
  value). The output gates (``out_gate``, σ(W x) ⊙ y) are ordinary feature maps and are decayed.
- The learning rate is a pure function of the step (linear warmup, cosine to ``lr * min_lr_ratio``
  at ``decay_steps`` or else ``max_steps``), so the step stored in a checkpoint is the scheduler's whole
  state. Extending a finished run (``resume=true max_steps=<more>``) stretches a ``max_steps`` cosine, so
  the learning rate rises again (train prints a note with both values); ``decay_steps`` fixes the
  cosine's length (after it, the learning rate stays at its floor), and a resumed run may add it when
  every step already trained keeps its learning rate (``decay_steps=<the old max_steps>``).
- Checkpoints: ``out_dir/checkpoints/step_XXXXXXXX.pt``, one file holding full (unsharded) model and
  optimizer state dicts, RNG states, the step and both configs, written to a temp file in the same
  folder and renamed (a crash never leaves a half-written checkpoint); the last
  ``keep_checkpoints`` are kept. They are read with ``torch.load(weights_only=True)``: plain
  containers of tensors, never pickled code. Python's ``random`` and torch's RNGs are saved (rank
  0's; training draws from neither, the data being a function of the step); numpy's global RNG is
  not used anywhere (the text batches seed a generator per row).
- Resume: running again with the same ``out_dir`` and config continues from the latest checkpoint,
  and the losses after it equal those of an uninterrupted run exactly. A saved run whose config
  differs is an error naming the fields; with ``resume=true`` the fields in ``RUNTIME_FIELDS``
  (``max_steps``, logging, device, ...) may change.
- ``parallel="fsdp"`` shards parameters, gradients and optimizer state with FSDP2 (``fully_shard``,
  see ``_shard``) instead of replicating them with DDP; checkpoints are gathered into the same full
  format, so a run may switch between them. Both are tested on CPU/gloo with 2 ranks: the losses of
  one process with the same global batch, and (FSDP2) one process continuing the sharded run's
  checkpoint as it continues its own.
- Data (``make_batches``): ``data="task:<name>"`` generates ``miras.data.tasks`` examples of
  ``seq_len + 1`` bytes (``data_params`` are the task's parameters) and validates on the same task
  under another seed; ``data="text:<spec>"`` reads a corpus (``stdlib``, a file, folder or glob,
  ``hf:<name>``), tokenises it with ``tokenizer`` and validates on its held-out documents. The
  tokenizer is saved in the run directory, where ``load_run`` finds it. Under ``torchrun`` rank 0
  loads a corpus first (a BPE is trained and the corpus tokenised once, into the token cache); the
  other ranks then take its BPE and read the cache (``_rank_zero_first``).
- Ctrl-C (SIGINT, in the main thread): the first one lets the current step end, saves a checkpoint
  of it and stops (``Interrupted``: a rerun of the same command continues from that step, exactly);
  a second one stops at once, keeping the checkpoints already on disk. Under ``torchrun`` the ranks
  agree on the step to stop after (one flag all-reduced per step), and a second Ctrl-C is left to
  torchrun (``_StopRequest``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
from torch.distributed.tensor import DTensor

from .data.base import IGNORE, Batches
from .memory.state import InputRangeError
from .models import LanguageModel, preset_config
from .runs import (
    CHECKPOINT_FORMAT,
    check_model_state,
    checkpoint_step,
    checkpoints,
    load_run,
    lock_run_folder,
    make_run_folder,
    resume_point,
    run_tokenizer,
    save_checkpoint,
    set_rng_state,
    write_run_dir,
)
from .train_config import (
    RUNTIME_FIELDS,
    UNCOMPARED_FIELDS,
    VALIDATION_SEED_OFFSET,
    ConfigError,
    TrainConfig,
    config_from_args,
    first_line,
    lr_at,
    parse_value,
    resolve_device,
)

# The public names, including those defined in miras.train_config and miras.runs (re-exported here).
__all__ = ["CHECKPOINT_FORMAT", "RUNTIME_FIELDS", "UNCOMPARED_FIELDS", "VALIDATION_SEED_OFFSET", "ConfigError",
           "DataSource", "Interrupted", "TrainConfig", "checkpoints", "config_from_args", "evaluate", "load_run",
           "lr_at", "make_batches", "param_groups", "parse_value", "resolve_device", "resolve_precision", "train"]

# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSource:
    """What ``train`` reads: training batches, optional validation batches (same shapes), the
    tokenizer to save beside the run (anything with ``save(dir)``) and the data's vocabulary size."""

    train: Batches
    validation: Batches | None = None
    tokenizer: object | None = None
    vocab_size: int | None = None
    # what the training rows are read from, saved in checkpoints: a rerun whose data differs is refused (a
    # text corpus: its token cache's key, which changes with the corpus's contents; None: not checked)
    identity: str | None = None
    note: str | None = None  # printed before training: e.g. the files of a folder corpus that are not text


def make_batches(config: TrainConfig, tokenizer=None) -> DataSource:
    """The data of ``config.data``. A task (``miras.data.tasks``, in bytes) has examples of ``seq_len + 1``
    tokens and validates on the same task under another seed; a text corpus (``miras.data.text``) is
    tokenised once into the token cache (with ``tokenizer`` if given, e.g. the one a resumed run saved;
    else ``config.tokenizer``, a BPE trained on the corpus) and validates on its held-out documents
    when ``eval_every`` > 0."""
    from .data.tokenizers import bpe_size, get_tokenizer

    kind, _, spec = config.data.partition(":")
    try:
        if kind == "task":
            from .data.tasks import TaskBatches, make_task

            task = make_task(spec, context_length=config.seq_len + 1, **config.data_params)
            return DataSource(TaskBatches(task, config.batch_size, config.seed),
                              TaskBatches(task, config.batch_size, config.seed + VALIDATION_SEED_OFFSET),
                              get_tokenizer("byte"), 256)
        from .data.text import TextBatches, cached_tokens, load_corpus

        corpus = load_corpus(spec)
        tokenizer = tokenizer or get_tokenizer(config.tokenizer, corpus)
        train = TextBatches(cached_tokens(corpus, tokenizer, "train"), config.batch_size, config.seq_len, config.seed)
        validation = None
        if config.eval_every:
            try:
                validation = TextBatches(cached_tokens(corpus, tokenizer, "validation"), config.batch_size,
                                         config.seq_len, config.seed)
            except ValueError as error:
                raise ValueError(f"validation split: {error} (or eval_every=0: no validation)") from None
        notes = [corpus.skipped_note()]
        asked = bpe_size(config.tokenizer)
        if asked and tokenizer.vocab_size < asked:
            notes.append(f"note: the BPE learned {tokenizer.vocab_size} token ids of the {asked} asked for (the "
                         "corpus ran out of pairs to merge)")
        return DataSource(train, validation, tokenizer, tokenizer.vocab_size, Path(train.tokens.filename).stem,
                          "\n".join(note for note in notes if note) or None)
    except (TypeError, ValueError, OSError, ImportError) as error:  # OSError: also a hub that cannot be reached
        raise ConfigError(f"data {config.data!r}: {first_line(error)}") from None


# ------------------------------------------------------------------------------------- optimizer, schedule


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` as the precision that is faster on ``device``: bf16 autocast on a CUDA device with
    bf16 and on a CPU with AMX tiles (``amx_bf16``), float32 elsewhere. On a CPU with AVX-512 bf16
    but no AMX (this project's 2-core EPYC), bf16 autocast made the memory layer's training step
    1.6x slower (3,937 vs 2,517 tokens/s at T = 4096, ``benchmarks/results/memory_layer.md``)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and CPUINFO.exists():
        return "bf16" if " amx_bf16" in CPUINFO.read_text() else "fp32"
    return "fp32"


CPUINFO = Path("/proc/cpuinfo")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weights of ``nn.Linear`` layers that are neither embeddings nor the memory's
    gate projections (``gate_proj``); nothing else."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A memory layer's gates: gate_proj, and with channel-wise gates its low-rank gate_down / gate_up (not the
    # SwiGLU MLP's gate_up, a feature map that is decayed)
    gates = {id(getattr(m, name).weight) for m in model.modules()
             if isinstance(getattr(m, "gate_proj", None), nn.Linear)
             for name in ("gate_proj", "gate_down", "gate_up") if isinstance(getattr(m, name, None), nn.Linear)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings - gates
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in parameters if id(p) in linear], "weight_decay": weight_decay},
            {"params": [p for p in parameters if id(p) not in linear], "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------- distributed


@dataclass
class _Distributed:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we destroy it
    lock: int | None = None  # rank 0: the run folder's lock (lock_run_folder), released when train ends


def _setup_distributed(device: str) -> _Distributed:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on GPU; one GPU per local rank."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank if chosen.index is None else chosen.index)
        torch.cuda.set_device(chosen)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return _Distributed(rank, world, chosen, owns)


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def _wrap(model: nn.Module, config: TrainConfig, world: int, bptt_segments: int
          ) -> tuple[nn.Module, Callable[[bool], contextlib.AbstractContextManager]]:
    """The model to call (compiled, DDP-wrapped) and ``sync(last)``, the context of each forward/backward:
    gradients are all-reduced only on the last backward of a step and accumulate locally before."""
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if world == 1:
        return model, lambda last: contextlib.nullcontext()
    if config.parallel == "fsdp":
        def sync(last: bool) -> contextlib.AbstractContextManager:
            raw_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return model, sync
    # After the first BPTT segment the persistent tokens are not used: DDP must be told to expect that.
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=bptt_segments > 1)
    return wrapped, lambda last: contextlib.nullcontext() if last else wrapped.no_sync()


def _shard(model: nn.Module) -> None:
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks, gathered for each forward.

    One unit for the whole model: ``LanguageModel.forward`` builds every block's initial state (from the
    blocks' parameters) before any block runs, so per-block units would be read while still sharded."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)


# ------------------------------------------------------------------------------------------------ training


def train(config: TrainConfig, data: DataSource | None = None) -> Path:
    """Train ``config.model`` on ``data`` (default: ``make_batches(config)``); returns the run directory.

    Under ``torchrun`` every rank calls this; rank 0 alone prints and writes. Raises ConfigError, before
    writing anything, for an unusable config, out_dir or checkpoint."""
    distributed = _setup_distributed(config.device)
    try:
        run_dir = _train(config, data, distributed)
        if distributed.owns_group and distributed.world > 1:
            # every rank done before the group goes: no collective of this rank still in flight when it is
            # destroyed (a gloo rank once aborted there, "terminate called without an active exception", under load)
            dist.barrier()
        return run_dir
    finally:
        if distributed.lock is not None:
            os.close(distributed.lock)
        if distributed.owns_group:
            dist.destroy_process_group()


LOAD_TIMEOUT = datetime.timedelta(hours=24)  # how long the other ranks wait for rank 0 to load a text corpus


def _rank_zero_first(config: TrainConfig, tokenizer, distributed: _Distributed) -> DataSource:
    """``make_batches`` under torchrun: rank 0 first, so that a text corpus is tokenised once (into the token
    cache, which the other ranks then read) and a BPE trained once; the other ranks take rank 0's BPE. If
    rank 0 cannot load the data, every rank stops (rank 0 with the reason)."""
    if distributed.world == 1 or not config.data.startswith("text:"):
        return make_batches(config, tokenizer)
    from .data.tokenizers import BPETokenizer

    # The others wait while rank 0 loads (minutes for a large corpus): on a group of their own whose timeout is
    # not the training collectives' (NCCL's 10 minutes would end the wait with an error).
    waiting = dist.new_group(backend="gloo", timeout=LOAD_TIMEOUT)
    failure, shared = None, [None]  # rank 0's BPE as JSON; False: rank 0 could not load the data
    if distributed.rank == 0:
        try:
            data = make_batches(config, tokenizer)
            shared = [data.tokenizer.to_json() if isinstance(data.tokenizer, BPETokenizer) else None]
        except ConfigError as error:
            failure, shared = error, [False]
    dist.broadcast_object_list(shared, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if distributed.rank == 0:
        if failure is not None:
            raise failure
        return data
    if shared[0] is False:
        raise ConfigError(f"data {config.data!r}: rank 0 could not load it (its error says why)")
    return make_batches(config, BPETokenizer.from_json(shared[0]) if shared[0] else tokenizer)


def _train(config: TrainConfig, data: DataSource | None, distributed: _Distributed) -> Path:
    rank, world, device = distributed.rank, distributed.world, distributed.device
    main, slices, accum = rank == 0, world * config.grad_accum, config.grad_accum
    if config.batch_size % slices:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by world size {world} x grad_accum "
                          f"{config.grad_accum}")
    model_config, run_dir = preset_config(config.model, **config.model_overrides), Path(config.out_dir)
    checkpoint = resume_point(run_dir, config, model_config)
    if config.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    if data is None:
        # A resumed run keeps the tokenizer it saved: a BPE retrained on a corpus that has changed
        # since would renumber the tokens under the checkpoint's embeddings.
        text = config.data.startswith("text:")  # task data is bytes: no tokenizer to keep
        saved = run_tokenizer(run_dir) if checkpoint is not None and text else None
        from .data.tokenizers import bpe_size

        asked = bpe_size(config.tokenizer)
        if saved is None and text and asked and asked > model_config.vocab_size:  # before the BPE is trained
            raise ConfigError(f"tokenizer={config.tokenizer} gives up to {asked} token ids but the model's vocab_size "
                              f"is {model_config.vocab_size}; set model.vocab_size={asked}")
        data = _rank_zero_first(config, saved, distributed)
    if (data.train.batch_size, data.train.seq_len) != (config.batch_size, config.seq_len):
        raise ConfigError(f"data gives batches of {data.train.batch_size} x {data.train.seq_len}, config says "
                          f"batch_size={config.batch_size}, seq_len={config.seq_len}")
    if data.vocab_size is not None and data.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the data has {data.vocab_size} token ids but the model's vocab_size is "
                          f"{model_config.vocab_size}; set model.vocab_size={data.vocab_size}")
    if checkpoint is not None and None not in (checkpoint.get("data"), data.identity) \
            and checkpoint["data"] != data.identity:
        changed = (f"the training data ({config.data}) is not what the checkpoint of step {checkpoint['step']} "
                   "trained on: the corpus or its tokenisation has changed")
        if not config.resume:
            raise ConfigError(f"{run_dir}: {changed}; pass resume=true to continue on the new contents, or use "
                              "another out_dir")
        if main:
            print(f"note: {changed}; continuing on the new contents (resume=true)", flush=True)
    if main and data.note:
        print(data.note, flush=True)
    if world == 1 and config.parallel == "fsdp":
        print("note: parallel=fsdp shards the model over the processes of a torchrun; one process trains it whole",
              flush=True)
    torch.manual_seed(config.seed)
    try:  # before the run folder is made: a model too large for this machine leaves nothing behind
        raw_model = LanguageModel(model_config).to(device)
    except (RuntimeError, MemoryError) as error:  # (torch.OutOfMemoryError is a RuntimeError)
        raise ConfigError(f"cannot build {config.model} with model_overrides {config.model_overrides} on {device}: "
                          f"{first_line(error)}") from None
    # Every rank has validated the run; rank 0 makes its folder, and every rank stops if it could not.
    failure = None
    if main:
        try:
            make_run_folder(run_dir)
            distributed.lock = lock_run_folder(run_dir)
        except ConfigError as error:
            failure = error
    if _all_reduce(torch.tensor(float(failure is not None), device=device), world).item():
        raise failure or ConfigError(f"out_dir {run_dir}: rank 0 could not make the run folder (its error says why)")

    if world > 1 and config.parallel == "fsdp":
        _shard(raw_model)
    optimizer = torch.optim.AdamW(param_groups(raw_model, config.weight_decay), lr=config.lr, betas=config.betas)
    step, elapsed = 0, 0.0
    if checkpoint is not None:
        # set_state_dict would fill a missing tensor from the fresh model silently: check names and shapes first
        check_model_state(checkpoints(run_dir)[-1], checkpoint["model"], raw_model.state_dict())
        set_state_dict(raw_model, optimizer, model_state_dict=checkpoint["model"],
                       optim_state_dict=checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
        set_rng_state(checkpoint["rng"])
        step, elapsed = checkpoint["step"], checkpoint["elapsed"]
    segment = min(config.bptt or config.seq_len, config.seq_len)
    model, sync = _wrap(raw_model, config, world, math.ceil(config.seq_len / segment))

    precision = resolve_precision(config.precision, device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    metrics, writer, bar = None, None, None
    if main:
        write_run_dir(run_dir, config, model_config, data.tokenizer, step)
        metrics = open(run_dir / "metrics.jsonl", "a")  # closed in the finally below
        writer = SummaryWriter(str(run_dir / "tensorboard")) if config.tensorboard else None
        print(f"{config.model}: {raw_model.num_parameters():,} parameters, {world} process(es) on {device}, "
              f"{precision}, {config.batch_size * config.seq_len:,} tokens/step, run dir {run_dir}"
              + (f", resuming at step {step}" if step else ""), flush=True)
        if step >= config.max_steps and checkpoint is not None:
            print(f"{run_dir} is already at max_steps={config.max_steps}: nothing to train (continue it with a "
                  "larger max_steps and resume=true)", flush=True)
        elif checkpoint is not None and (note := _schedule_note(checkpoint, config, step)):
            print(note, flush=True)
        if config.warmup_steps > config.max_steps and step < config.max_steps:
            print(f"note: warmup_steps={config.warmup_steps} > max_steps={config.max_steps}: the learning rate "
                  f"never reaches lr={config.lr:g}", flush=True)
        from tqdm import tqdm

        # progress without a terminal (stdout or stderr a pipe or a log file): a plain line per log step on stdout
        # instead of the bar's redraws on stderr
        lines = config.progress and not (sys.stdout.isatty() and sys.stderr.isatty())
        bar = tqdm(total=config.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=not config.progress or lines)

    last_saved, tokens_per_step = step if checkpoint is not None else None, config.batch_size * config.seq_len
    first_step, last = step, {}  # last: the latest logged loss and validation loss, for the closing line
    clock, last_log = time.perf_counter(), (time.perf_counter(), step)

    def save(at: int, seconds: float) -> None:
        save_checkpoint(run_dir, raw_model, optimizer, config, model_config, at, seconds, main, data=data.identity)

    stop = _StopRequest(world, main)
    try:
        stop.install()
        while step < config.max_steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [tuple(t.to(device, non_blocking=True) for t in data.train.batch(step, rank * accum + i, slices))
                     for i in range(accum)]
            # The step's loss is one mean over the global batch's scored tokens, whatever the layout.
            scored = _all_reduce(sum((y != IGNORE).sum() for _, y in micro), world).clamp(min=1)
            step_loss = torch.zeros((), device=device)
            try:
                for i, (inputs, targets) in enumerate(micro):
                    state = None
                    for start in range(0, config.seq_len, segment):
                        end = start + segment
                        with sync(i == accum - 1 and end >= config.seq_len):
                            with autocast():
                                logits, state = model(inputs[:, start:end], state)
                            loss = F.cross_entropy(logits.float().flatten(0, 1), targets[:, start:end].flatten(),
                                                   ignore_index=IGNORE, reduction="sum") / scored
                            # DDP and FSDP average gradients over ranks; scaling by world makes that a sum.
                            (loss * world).backward()
                        state = state.detach()
                        step_loss += loss.detach()
            except InputRangeError as error:  # the memory engine refuses non-finite gates and inputs: diverged
                raise ConfigError(f"training diverged at step {step + 1} (lr {lr:.3g}): {error}; "
                                  f"{_kept(last_saved)}") from None
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip or math.inf)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm of sharded gradients
                grad_norm = grad_norm.full_tensor()
            # Checked every step, before the update (the same on every rank: the gradients are reduced), so that
            # no checkpoint ever holds the weights of a diverged step.
            if not math.isfinite(float(grad_norm)):
                loss_value = _all_reduce(step_loss, world).item()
                raise ConfigError(f"training diverged at step {step + 1} (lr {lr:.3g}): the loss is {loss_value:.4g} "
                                  f"and the gradient norm {float(grad_norm)}; {_kept(last_saved)}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % config.log_every == 0 or step == config.max_steps:
                loss_value = _all_reduce(step_loss, world).item()
                if not math.isfinite(loss_value):
                    raise ConfigError(f"training diverged by step {step} (lr {lr:.3g}): the loss is {loss_value}; "
                                      f"{_kept(last_saved)}")
                now = time.perf_counter()
                tokens_per_s = (step - last_log[1]) * tokens_per_step / max(now - last_log[0], 1e-9)
                last_log = (now, step)
                record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_seen": step * tokens_per_step, "tokens_per_s": tokens_per_s,
                          "elapsed": elapsed + now - clock}
                last["loss"] = loss_value
                if main:
                    _log(metrics, writer, record)
                    bar.set_postfix(loss=f"{loss_value:.4f}", grad_norm=f"{record['grad_norm']:.3g}",
                                    tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                    if lines:
                        print(f"step {step}/{config.max_steps}: loss {loss_value:.4f}, lr {lr:.3g}, grad norm "
                              f"{record['grad_norm']:.3g}, {tokens_per_s:,.0f} tokens/s", flush=True)
            if data.validation is not None and config.eval_every and (step % config.eval_every == 0
                                                                     or step == config.max_steps):
                val_loss = last["validation loss"] = evaluate(raw_model, data.validation, config, rank, world,
                                                              autocast)
                if main:
                    _log(metrics, writer, {"step": step, "val_loss": val_loss, "elapsed": elapsed + time.perf_counter()
                                           - clock})
                    if lines:
                        print(f"step {step}/{config.max_steps}: validation loss {val_loss:.4f}", flush=True)
            if step % config.save_every == 0 or step == config.max_steps:
                save(step, elapsed + time.perf_counter() - clock)
                last_saved = step
            if main:
                bar.update(1)
            if step < config.max_steps and stop.agreed(device):  # the first Ctrl-C: end with this step saved
                if last_saved != step:
                    save(step, elapsed + time.perf_counter() - clock)
                    last_saved = step
                raise KeyboardInterrupt
        if last_saved != step:  # max_steps=0: still leave a loadable run (the initial weights)
            save(step, elapsed)
    except KeyboardInterrupt:  # every rank gets the signal; rank 0 says what is on disk (a save may have ended)
        saved = checkpoints(run_dir) if main else []
        kept = (f"the latest checkpoint is step {checkpoint_step(saved[-1])}; run the same command again to continue "
                "from it" if saved else "nothing was saved (the first checkpoint comes at step "
                f"{min(config.save_every, config.max_steps)}, save_every)")
        raise Interrupted(f"interrupted at step {step}: {kept}" if main else "") from None
    finally:
        stop.uninstall()
        if main:
            bar.close()
            metrics.close()
            if writer is not None:
                writer.close()
    if main and config.progress and step > first_step:
        print(f"done: step {step}/{config.max_steps}, "
              + "".join(f"{name} {value:.4f}, " for name, value in last.items())
              + f"{time.perf_counter() - clock:.0f} s; checkpoint {checkpoints(run_dir)[-1]}", flush=True)
    return run_dir


def _schedule_note(checkpoint: dict, config: TrainConfig, step: int) -> str | None:
    """What a resume with another max_steps does to the learning rate (None: nothing)."""
    try:
        saved = TrainConfig.from_dict({**checkpoint["train_config"], "out_dir": config.out_dir})
    except (TypeError, ValueError):  # a config this version reads otherwise: resume_point has compared it
        return None
    moved = next((s for s in range(step, config.max_steps) if lr_at(s, saved) != lr_at(s, config)), None)
    if moved is None:
        return None
    keep = f"; decay_steps={saved.decay_steps or saved.max_steps} keeps it" if not config.decay_steps else ""
    return (f"note: max_steps {saved.max_steps} -> {config.max_steps} changes the cosine schedule, which ends at "
            f"max_steps{keep}: the learning rate at step {moved + 1} is {lr_at(moved, config):.3g} where the saved "
            f"run would have had {lr_at(moved, saved):.3g}")


class _StopRequest:
    """Ctrl-C during training: the first SIGINT asks the loop to stop after the current step (saving it), the
    second raises KeyboardInterrupt at once. Installed only over Python's default handler in the main thread
    (an ignored SIGINT or another program's handler is left alone, and then Ctrl-C acts at once as before).
    Under torchrun later SIGINTs are ignored: its agent sends every worker the terminal's Ctrl-C a second
    time, and a rank stopping at once would leave the others waiting in a collective; the agent kills
    workers that have not stopped after its grace period (a checkpoint being written is then not there at
    all: the rename is atomic)."""

    def __init__(self, world: int = 1, main: bool = True):
        # torchrun's agent forwards Ctrl-C to its workers, with one worker too
        self.forwarded = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        self.asked, self.world, self.main, self._previous = False, world, main, None

    def install(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.asked:
            if not self.forwarded:
                raise KeyboardInterrupt
            return
        self.asked = True
        if self.main:  # (under torchrun, rank 0 speaks for all); os.write: a print here could re-enter a stderr write
            again = "" if self.forwarded else " (Ctrl-C again to stop at once)"
            os.write(2, f"\nCtrl-C: stopping after this step, which is saved{again}\n".encode())

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank)."""
        if self.world == 1:
            return self.asked
        return bool(_all_reduce(torch.tensor(float(self.asked), device=device), self.world).item())


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT); the message says which checkpoint a rerun continues from (rank 0's;
    the other ranks' is empty, and the CLI prints nothing for them)."""


def _kept(last_saved: int | None) -> str:
    """The end of a divergence error: what is kept, and what to do (lr defines a run: another out_dir)."""
    kept = ("nothing was saved" if last_saved is None else
            f"the checkpoints up to step {last_saved} are kept, none after it")
    return f"{kept}; lower lr (a new run: another out_dir) or keep grad_clip > 0"


def _log(metrics: typing.TextIO, writer, record: dict) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
            if key in record:
                writer.add_scalar(f"{'val' if key == 'val_loss' else 'train'}/{key}", record[key], record["step"])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, config: TrainConfig, rank: int = 0, world: int = 1,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean loss per scored token over the first ``config.eval_batches`` global batches of ``batches``
    (each rank evaluates its slices, the same micro-batches as training; the sums are all-reduced)."""
    device = next(model.parameters()).device
    slices, totals = world * config.grad_accum, torch.zeros(2, dtype=torch.float64, device=device)
    for index in range(config.eval_batches):
        for i in range(config.grad_accum):
            inputs, targets = (t.to(device) for t in batches.batch(index, rank * config.grad_accum + i, slices))
            with autocast():
                logits, _ = model(inputs)
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                         reduction="sum")
            totals[1] += (targets != IGNORE).sum()
    _all_reduce(totals, world)
    return (totals[0] / totals[1].clamp(min=1)).item()


