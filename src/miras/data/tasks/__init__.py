"""Synthetic long-context tasks, generated procedurally in the byte vocabulary.

A task is a frozen, keyword-only config (``PassKey(context_length=4096)``); ``generate(task,
generator)`` draws one ``Example`` from an explicit ``torch.Generator`` (never the global RNG).
Every example is exactly ``context_length`` byte ids in [0, 256) and its answer is the LAST part:
a model is scored on predicting ``tokens[answer]`` from everything before them.

Text tasks (``prompt = haystack + question``, then the answer bytes; the haystack is filler with
the needles or facts inserted at sentence starts; filler is either the repeated sentences
"The grass is green. The sky is blue. ..." (``haystack="repeat"``) or the config's ``corpus`` read
cyclically from a random offset (``haystack="text"``; ``corpus`` is the text itself, or
``"text:<corpus>"`` names one as ``data=text:<corpus>`` does, e.g. ``"text:stdlib"``, loaded once per
process); the filler is cut to length, so the haystack can end mid-sentence):

- ``PassKey`` (S-NIAH pass-key): needle "The pass key is 71432. Remember it. 71432 is the pass
  key." at ``depth`` (fraction of the haystack; None = uniform); question "What is the pass key?
  The pass key is " and the answer "71432".
- ``NumberNeedle`` / ``WordNeedle`` (RULER S-NIAH-2/3): needle "One of the special magic numbers
  for calm-river is: 4821937." (a word, or a uuid "1f0c...-...", for ``WordNeedle``); question
  "What is the special magic number for calm-river? The special magic number for calm-river is: ".
- ``MultiKeyNeedle`` (RULER MK-NIAH): ``needles`` number needles with distinct keys and values at
  random depths; one is asked (``depth`` places the asked one).
- ``FactQA`` (bAbI qa1/qa2, BABILong-style): ``facts`` sentences ("Mary went to the kitchen.",
  "John picked up the apple.", "John dropped the apple.") scattered in order through the filler;
  question "Where is Mary? Answer: " or "Where is the apple? Answer: " and the place. The story
  is simulated, so the answer is right by construction: every person acts alike (a random person
  moves, picks up or drops at each fact), and the subject is drawn afterwards from those who have
  moved (their last move is the answer) or the objects picked up (where the holder is now, or where
  it was dropped), so that nothing but the question says whose facts matter.

Symbol tasks (byte ranges kept disjoint so that the role of every token is unambiguous):

- ``MQAR`` (Zoology multi-query associative recall): ``[k1 v1 ... kP vP] [noise] [q1 a1 ... qQ aQ]``
  with keys in [128, 192) (distinct), values in [192, 256), noise in [0, 128); each query is one
  of the keys (distinct) and the answer positions are the values a_j, interleaved with the
  query keys in the last ``2 * queries`` tokens.
- ``SelectiveCopy``: ``content_tokens`` tokens from [128, 256) at random positions among noise in
  [1, 128), then the separator 0, then the content tokens in order (the answer).

Scoring (the same for every task): an example is correct only if ``argmax(logits[t - 1]) ==
tokens[t]`` for EVERY answer position t (teacher-forced exact match, which equals greedy decoding
of the answer). ``score`` is the fraction of correct examples.

Training: ``TaskBatches`` rows are examples; ``seq_len = context_length - 1``, ``inputs =
tokens[:-1]`` and ``targets[t] = tokens[t + 1]`` where that token is an answer token, else IGNORE.
A config round-trips through ``make_task(**{"name": task.name, **dataclasses.asdict(task)})``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import Tensor

from ..base import IGNORE
from .core import Example, Task, _check_int, exact_match, generate, score
from .haystack import FactQA, MultiKeyNeedle, NumberNeedle, PassKey, WordNeedle
from .symbolic import MQAR, SelectiveCopy

__all__ = ["TASKS", "Example", "Task", "PassKey", "NumberNeedle", "WordNeedle", "MultiKeyNeedle", "MQAR",
           "SelectiveCopy", "FactQA", "TaskBatches", "make_task", "generate", "exact_match", "score"]

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (PassKey, NumberNeedle, WordNeedle, MultiKeyNeedle, MQAR, SelectiveCopy, FactQA)
}


def make_task(name: str, **params) -> Task:
    """The task config registered as `name`, e.g. ``make_task("passkey", context_length=4096, digits=5)``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    fields = [f for f in dataclasses.fields(TASKS[name]) if f.init]
    valid = [f.name for f in fields]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(valid)}")
    missing = [f.name for f in fields if f.name not in params
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{name}: missing required parameter(s) {', '.join(missing)}")
    return TASKS[name](**params)


# ---------------------------------------------------------------- training batches
def _row_generator(seed: int, step: int, row: int) -> torch.Generator:
    # a hash, not arithmetic on the seed: nearby (seed, step, row) triples get unrelated streams
    digest = hashlib.blake2b(f"{seed}/{step}/{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class TaskBatches:
    """Training batches of one task (the ``Batches`` protocol of ``base.py``).

    Row i of step s is ``example(s, i)``, drawn from a generator seeded by (seed, s, i) alone, so a
    rank's slice equals the same rows of the single-process batch and resuming reproduces a run.
    ``seq_len = context_length - 1``: ``inputs = tokens[:-1]`` and ``targets[t] = tokens[t + 1]``
    where token t + 1 is an answer token, IGNORE elsewhere.
    """

    def __init__(self, task: Task, batch_size: int, seed: int):
        if not isinstance(task, Task):
            raise TypeError(f"TaskBatches needs a task config (one of {', '.join(sorted(TASKS))}), got {task!r}")
        _check_int("TaskBatches", "batch_size", batch_size, 1)
        _check_int("TaskBatches", "seed", seed, 0)
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.seq_len = task.context_length - 1

    def example(self, step: int, row: int) -> Example:
        return generate(self.task, _row_generator(self.seed, step, row))

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        _check_int("TaskBatches", "step", step, 0)
        _check_int("TaskBatches", "world", world, 1)
        _check_int("TaskBatches", "rank", rank, 0, world - 1)
        if self.batch_size % world:
            raise ValueError(f"TaskBatches: batch_size={self.batch_size} must be divisible by world={world}")
        rows = self.batch_size // world
        examples = [self.example(step, i) for i in range(rank * rows, (rank + 1) * rows)]
        tokens = torch.stack([e.tokens for e in examples])
        answer = torch.stack([e.answer for e in examples])
        return tokens[:, :-1], torch.where(answer[:, 1:], tokens[:, 1:], IGNORE)
