"""The symbol tasks: MQAR (multi-query associative recall) and selective copying, in disjoint byte ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .core import Example, Task, _check_int


@dataclass(frozen=True, kw_only=True)
class MQAR(Task):
    """Zoology multi-query associative recall: pairs first, noise, then the queries with their values."""

    name: ClassVar[str] = "mqar"
    pairs: int = 8
    queries: int = 8

    def _validate(self) -> None:
        super()._validate()
        _check_int("MQAR", "pairs", self.pairs, 1, 64)  # 64 key symbols: [128, 192)
        _check_int("MQAR", "queries", self.queries, 1, self.pairs)

    def minimum_length(self) -> int:
        return 2 * self.pairs + 2 * self.queries

    def _contents(self) -> str:
        return f"{self.pairs} key-value pairs and {self.queries} queries with their values"

    def build(self, generator: torch.Generator) -> Example:
        keys = torch.randperm(64, generator=generator)[: self.pairs] + 128
        values = torch.randint(192, 256, (self.pairs,), generator=generator)
        asked = torch.randperm(self.pairs, generator=generator)[: self.queries]
        noise = torch.randint(0, 128, (self.context_length - self.minimum_length(),), generator=generator)
        pairs = torch.stack([keys, values], dim=1).flatten()
        probes = torch.stack([keys[asked], values[asked]], dim=1).flatten()
        answer = torch.zeros(self.context_length, dtype=torch.bool)
        answer[self.context_length - 2 * self.queries + 1 :: 2] = True
        return Example(torch.cat([pairs, noise, probes]), answer)


@dataclass(frozen=True, kw_only=True)
class SelectiveCopy(Task):
    """Copy the content tokens scattered among noise, in order, after the separator."""

    name: ClassVar[str] = "selective_copy"
    content_tokens: int = 16

    def _validate(self) -> None:
        super()._validate()
        _check_int("SelectiveCopy", "content_tokens", self.content_tokens, 1)

    def minimum_length(self) -> int:
        return 2 * self.content_tokens + 1

    def _contents(self) -> str:
        return f"{self.content_tokens} content tokens, the separator and their copy"

    def build(self, generator: torch.Generator) -> Example:
        count, region = self.content_tokens, self.context_length - 1 - self.content_tokens
        tokens = torch.randint(1, 128, (region,), generator=generator)
        where = torch.randperm(region, generator=generator)[:count].sort().values
        content = torch.randint(128, 256, (count,), generator=generator)
        tokens[where] = content
        answer = torch.zeros(self.context_length, dtype=torch.bool)
        answer[-count:] = True
        return Example(torch.cat([tokens, torch.zeros(1, dtype=torch.int64), content]), answer)
