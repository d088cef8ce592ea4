"""Run EleutherAI's lm-evaluation-harness on a saved miras model (its HF backend, ``model="hf"``).

    results = run_lm_eval("out/hf", ["lambada_openai"], limit=100)
    results["results"]["lambada_openai"]["acc,none"]

Offline use: the model and tokenizer load from ``model_dir``; a task's data must be local too. A
task of one's own is a YAML file in a folder passed as ``include_path`` (tests/hf/fixtures has one
that reads a JSONL file beside it). RULER's synthetic ``niah_single_1`` builds its data locally from
the model's own tokenizer (it needs ``pip install wonderwords``); give it short lengths with
``metadata={"max_seq_lengths": [1024]}``. Needs ``pip install lm-eval`` (``miras-lm[eval]``).

Batches of prompts of unequal length are padded, which miras models refuse (padding would flow
into the recurrent state): keep ``batch_size=1`` (the default here) for generation tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def check_lm_eval_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> None:
    """A ValueError naming the tasks lm-eval does not know (names, groups, tags or patterns), or that there
    are none; ImportError without lm-eval. (Indexing lm-eval's tasks takes some seconds.)"""
    if not tasks:
        raise ValueError("no lm-eval task given: name one or more, comma-separated (e.g. lambada_openai)")
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":
            raise
        raise ImportError("lm-eval tasks need lm-evaluation-harness: pip install 'miras-lm[eval]' (lm-eval and "
                          "wonderwords, which some of its tasks import)") from None
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        where = f" (nor in {include_path})" if include_path is not None else ""
        raise ValueError(f"unknown lm-eval task(s) {unknown}{where}; `lm-eval ls tasks` lists those installed")


# lm-eval's HF model keeps the last `max_length` tokens of a context, 2048 unless the config names a length. The
# recurrent models here have no positional limit: keep 2**20 tokens (as the native evaluation streams).
CONTEXT_LIMIT = 2**20


def run_lm_eval(model_dir: str | os.PathLike, tasks: Sequence[str], limit: int | float | None = None, *,
                include_path: str | os.PathLike | None = None, batch_size: int = 1, device: str = "cpu",
                dtype: str | None = None, num_fewshot: int | None = None, max_length: int | None = CONTEXT_LIMIT,
                metadata: dict | None = None, **evaluate_kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on the HF folder ``model_dir`` (loaded with ``trust_remote_code``).
    ``limit``: examples per task (a fraction if < 1). ``max_length``: the tokens of context lm-eval keeps
    (it cuts longer contexts from the start; None: its own default, 2048). ``metadata`` goes to the tasks
    (e.g. RULER's ``{"max_seq_lengths": [4096, 16384]}``). Other keywords go to ``simple_evaluate``.
    Returns its result dict (``results[task][metric]``, plus configs and, by default, samples)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":
            raise
        raise ImportError("run_lm_eval needs lm-evaluation-harness: pip install 'miras-lm[eval]' (lm-eval and "
                          "wonderwords, which some of its tasks import)") from None
    model_args = {"pretrained": str(model_dir), "trust_remote_code": True}
    if dtype is not None:
        model_args["dtype"] = dtype
    if max_length is not None:
        model_args["max_length"] = max_length
    # Tasks see the model arguments in their metadata (RULER takes its tokenizer from `pretrained`).
    task_manager = TaskManager(include_path=None if include_path is None else str(include_path),
                               metadata={**model_args, **(metadata or {})})
    results = simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), limit=limit,
                              batch_size=batch_size, device=device, num_fewshot=num_fewshot,
                              task_manager=task_manager, **evaluate_kwargs)
    if results is None:  # simple_evaluate returns None on the non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (is this a non-zero rank?)")
    return results
