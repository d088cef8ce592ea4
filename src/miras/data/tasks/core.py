"""What every task shares: explicit-generator randomness, ``Example``, the ``Task`` base config,
``generate`` and the exact-match scoring (``miras.data.tasks`` documents the tasks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


# ---------------------------------------------------------------- randomness (explicit generator only)
def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _choice(generator: torch.Generator, items: Sequence):
    return items[_randint(generator, 0, len(items))]


def _sample(generator: torch.Generator, items: Sequence, k: int) -> list:
    """k distinct items in random order."""
    return [items[i] for i in torch.randperm(len(items), generator=generator)[:k].tolist()]


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _digits(generator: torch.Generator, count: int) -> str:
    """A random decimal number of exactly `count` digits (no leading zero)."""
    rest = torch.randint(0, 10, (count - 1,), generator=generator).tolist()
    return "".join(str(d) for d in [_randint(generator, 1, 10), *rest])


# ---------------------------------------------------------------- examples and validation
@dataclass(frozen=True, eq=False)
class Example:
    """One example: ``tokens [T]`` int64 byte ids and ``answer [T]`` bool, True on the answer tokens."""

    tokens: Tensor
    answer: Tensor

    def __post_init__(self):
        if self.tokens.dtype != torch.int64 or self.answer.dtype != torch.bool or self.tokens.dim() != 1:
            raise ValueError("Example needs tokens [T] int64 and answer [T] bool")
        if self.tokens.shape != self.answer.shape or not self.answer.any() or self.answer[0]:
            raise ValueError("Example.answer must have the shape of tokens, mark >= 1 token and not token 0")

    def text(self) -> str:
        """The whole example as text (for debugging; undecodable bytes become U+FFFD)."""
        return bytes(self.tokens.tolist()).decode("utf-8", errors="replace")

    def answer_text(self) -> str:
        return bytes(self.tokens[self.answer].tolist()).decode("utf-8", errors="replace")


def _text_example(prompt: bytes, answer: bytes) -> Example:
    tokens = torch.frombuffer(bytearray(prompt + answer), dtype=torch.uint8).to(torch.int64)
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[len(prompt):] = True
    return Example(tokens, mask)


def _check_int(task: str, name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{task}: {name} must be an int {allowed}, got {value!r}")


def _check_option(task: str, name: str, value, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{task}: {name} must be one of {', '.join(map(repr, options))}; got {value!r}")


# ---------------------------------------------------------------- task configs
@dataclass(frozen=True, kw_only=True)
class Task:
    """Base of every task config: ``context_length`` is the exact number of tokens of an example."""

    name: ClassVar[str]
    context_length: int

    def __post_init__(self):
        self._validate()
        need = self.minimum_length()
        if self.context_length < need:
            raise ValueError(f"{type(self).__name__}: context_length={self.context_length} is too short; these "
                             f"parameters need at least {need} tokens to hold {self._contents()}")

    def _validate(self) -> None:
        _check_int(type(self).__name__, "context_length", self.context_length, 2)

    def minimum_length(self) -> int:
        """A context_length that holds every random draw of these parameters: the shortest one, where a task's
        own docstring says no otherwise."""
        raise NotImplementedError

    def _contents(self) -> str:
        return "the prompt and the answer"

    def build(self, generator: torch.Generator) -> Example:
        raise NotImplementedError


def generate(task: Task, generator: torch.Generator) -> Example:
    """One example of `task`, every random draw taken from `generator`."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generate needs an explicit torch.Generator, got {type(generator).__name__}")
    example = task.build(generator)
    # a guard for the builders above: the exact length is the contract every caller relies on
    assert example.tokens.shape == (task.context_length,), (task, example.tokens.shape)
    return example


# ---------------------------------------------------------------- scoring
def exact_match(logits: Tensor, examples: Example | Sequence[Example]) -> Tensor:
    """[B] bool: whether ``argmax(logits[t - 1]) == tokens[t]`` at every answer position t.

    ``logits`` is ``[T, V]`` for one example or ``[B, T, V]`` for B examples of equal length L,
    with T = L (a forward pass over all tokens; the last row is unused) or T = L - 1 (over inputs).
    """
    if isinstance(examples, Example):
        if logits.dim() != 2:
            raise ValueError(f"one example takes logits [T, V], got shape {tuple(logits.shape)}")
        examples, logits = [examples], logits.unsqueeze(0)
    lengths = {len(e.tokens) for e in examples}
    if logits.dim() != 3 or logits.shape[0] != len(examples) or len(lengths) != 1:
        raise ValueError(f"logits [B, T, V] need B={len(examples)} examples of one length; "
                         f"got shape {tuple(logits.shape)} and lengths {sorted(lengths)}")
    (length,) = lengths
    if logits.shape[1] not in (length, length - 1):
        raise ValueError(f"logits cover {logits.shape[1]} positions; expected {length} or {length - 1}")
    tokens = torch.stack([e.tokens for e in examples]).to(logits.device)
    answer = torch.stack([e.answer for e in examples]).to(logits.device)
    guesses = logits[:, : length - 1].argmax(dim=-1)  # guesses[:, t - 1] predicts tokens[:, t]
    return ((guesses == tokens[:, 1:]) | ~answer[:, 1:]).all(dim=1)


def score(logits: Tensor, examples: Example | Sequence[Example]) -> float:
    """Exact-match accuracy: the fraction of examples whose whole answer is the argmax (see exact_match)."""
    return exact_match(logits, examples).float().mean().item()
