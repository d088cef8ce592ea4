"""Synthetic long-context tasks, generated procedurally in the byte vocabulary (DESIGN.md §5).

A task is a frozen, keyword-only config (``PassKey(context_length=4096)``); ``generate(task,
generator)`` draws one ``Example`` from an explicit ``torch.Generator`` (never the global RNG).
Every example is exactly ``context_length`` byte ids in [0, 256) and its answer is the LAST part:
a model is scored on predicting ``tokens[answer]`` from everything before them.

Text tasks (``prompt = haystack + question``, then the answer bytes; the haystack is filler with
the needles or facts inserted at sentence starts; filler is either the repeated sentences
"The grass is green. The sky is blue. ..." (``haystack="repeat"``) or the config's ``corpus`` read
cyclically from a random offset (``haystack="text"``); the filler is cut to length, so the
haystack can end mid-sentence):

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
  is simulated, so the answer is right by construction: the asked person moves up to three times
  (the last move is the answer); an asked object is picked up, carried, and sometimes dropped.

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
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .base import IGNORE

_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_SENTENCE_ENDS = (b". ", b"! ", b"? ", b"\n")
_LOOK_BACK = 256  # how far an insertion may move back to reach a sentence start
_ADJECTIVES = ("calm", "bright", "silent", "rapid", "golden", "hidden", "frozen", "gentle", "brave", "ancient",
               "hollow", "quiet", "crimson", "distant", "velvet", "wild", "lucky", "misty", "noble", "rusty")
_NOUNS = ("river", "forest", "lantern", "meadow", "harbor", "falcon", "canyon", "garden", "mirror", "island",
          "comet", "valley", "castle", "anchor", "willow", "ember", "glacier", "orchard", "compass", "thunder")
_KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)
_WORDS = ("apple", "banjo", "cactus", "dolphin", "eclipse", "fiddle", "giraffe", "harvest", "igloo", "jasmine",
          "kettle", "lemon", "marble", "nectar", "oyster", "pepper", "quartz", "raven", "saddle", "tulip",
          "umbrella", "violin", "walnut", "yogurt", "zephyr", "biscuit", "crayon", "donkey", "feather", "pillow")
_NAMES = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Julie", "Emma")
_PLACES = ("kitchen", "garden", "bathroom", "bedroom", "office", "hallway", "cellar", "balcony")
_OBJECTS = ("apple", "football", "milk", "book", "umbrella", "cup", "ball", "hat")
_VERBS = {"move": ("went to", "moved to", "travelled to", "journeyed to"),
          "take": ("picked up", "grabbed", "got"),
          "drop": ("dropped", "put down", "discarded")}


def _longest(words: Sequence[str]) -> str:
    return max(words, key=len)


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


@functools.lru_cache(maxsize=4)
def _encode(corpus: str) -> bytes:
    return corpus.encode("utf-8") + b" "


def _sentence_start(filler: bytes, position: int) -> int:
    """The last sentence start at or before `position` (looking back a little), else the last word start."""
    low = max(0, position - _LOOK_BACK)
    found = [filler.rfind(mark, low, position) for mark in _SENTENCE_ENDS]
    starts = [i + len(mark) for i, mark in zip(found, _SENTENCE_ENDS) if i >= 0]
    if starts:
        return max(starts)
    if low == 0:
        return 0
    space = filler.rfind(b" ", low, position)
    return space + 1 if space >= 0 else position


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
        """The shortest context_length that holds every random draw of these parameters."""
        raise NotImplementedError

    def _contents(self) -> str:
        return "the prompt and the answer"

    def build(self, generator: torch.Generator) -> Example:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _HaystackTask(Task):
    haystack: str = "repeat"  # "repeat": the repeated filler sentences; "text": `corpus` from a random offset
    corpus: str | None = field(default=None, repr=False)

    def _validate(self) -> None:
        super()._validate()
        task = type(self).__name__
        _check_option(task, "haystack", self.haystack, ("repeat", "text"))
        if self.haystack == "text" and not (isinstance(self.corpus, str) and self.corpus):
            raise ValueError(f"{task}: haystack='text' takes its filler from `corpus`, a non-empty str; none given")
        if self.haystack == "repeat" and self.corpus is not None:
            raise ValueError(f"{task}: `corpus` is only read with haystack='text' (haystack is 'repeat')")

    def _haystack(self, length: int, pieces: list[tuple[float, str]], generator: torch.Generator) -> bytes:
        """`length` bytes of filler with the pieces inserted in order, each at its depth (a fraction of the
        filler, nondecreasing) moved back to the sentence start before it."""
        encoded = [piece.encode() for _, piece in pieces]
        size = length - sum(map(len, encoded))
        source = _FILLER if self.haystack == "repeat" else _encode(self.corpus)
        start = 0 if self.haystack == "repeat" else _randint(generator, 0, len(source))
        filler = (source * ((start + size) // len(source) + 1))[start:start + size]
        parts, last = [], 0
        for (depth, _), piece in zip(pieces, encoded):
            # max(): insertion points never move before the previous one, so the pieces keep their order
            position = max(last, _sentence_start(filler, round(depth * size)))
            parts += [filler[last:position], piece]
            last = position
        return b"".join([*parts, filler[last:]])


def _check_depth(task: Task) -> None:
    depth = task.depth
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        raise ValueError(f"{type(task).__name__}: depth must be a number in [0, 1] or None (uniform); got {depth!r}")


@dataclass(frozen=True, kw_only=True)
class PassKey(_HaystackTask):
    """S-NIAH pass-key retrieval."""

    name: ClassVar[str] = "passkey"
    digits: int = 5
    depth: float | None = None  # where the needle starts, as a fraction of the haystack; None: uniform

    def _validate(self) -> None:
        super()._validate()
        _check_int("PassKey", "digits", self.digits, 1, 64)
        _check_depth(self)

    _QUESTION: ClassVar[str] = "\nWhat is the pass key? The pass key is "

    def _needle(self, key: str) -> str:
        return f"The pass key is {key}. Remember it. {key} is the pass key. "

    def minimum_length(self) -> int:
        return len(self._needle("0" * self.digits)) + len(self._QUESTION) + self.digits

    def _contents(self) -> str:
        return f"the needle, the question and the {self.digits}-digit answer"

    def build(self, generator: torch.Generator) -> Example:
        key = _digits(generator, self.digits)
        depth = self.depth if self.depth is not None else _uniform(generator)
        length = self.context_length - len(self._QUESTION) - len(key)
        return _text_example(self._haystack(length, [(depth, self._needle(key))], generator) +
                             self._QUESTION.encode(), key.encode())


@dataclass(frozen=True, kw_only=True)
class _MagicNeedle(_HaystackTask):
    """RULER-style needles "One of the special magic <noun>s for <key> is: <value>."; the first key is asked."""

    depth: float | None = None  # depth of the asked needle; None: uniform (other needles are always uniform)

    def _validate(self) -> None:
        super()._validate()
        _check_depth(self)

    def _needles(self) -> int:
        return 1

    def _noun(self) -> str:
        raise NotImplementedError

    def _value(self, generator: torch.Generator) -> str:
        raise NotImplementedError

    def _longest_value(self) -> int:
        raise NotImplementedError

    def _needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self._noun()}s for {key} is: {value}. "

    def _question(self, key: str) -> str:
        noun = self._noun()
        return f"\nWhat is the special magic {noun} for {key}? The special magic {noun} for {key} is: "

    def minimum_length(self) -> int:
        key, value = _longest(_KEYS), "0" * self._longest_value()
        return self._needles() * len(self._needle(key, value)) + len(self._question(key)) + len(value)

    def _contents(self) -> str:
        return f"{self._needles()} needle(s), the question and the answer"

    def build(self, generator: torch.Generator) -> Example:
        count = self._needles()
        keys, values = _sample(generator, _KEYS, count), []
        while len(values) < count:  # distinct values, so the asked key has exactly one right answer
            value = self._value(generator)
            values += [value] if value not in values else []
        depths = [self.depth if self.depth is not None else _uniform(generator)]
        depths += [_uniform(generator) for _ in range(count - 1)]
        pieces = sorted(((d, self._needle(k, v)) for d, k, v in zip(depths, keys, values)), key=lambda p: p[0])
        question = self._question(keys[0])
        length = self.context_length - len(question) - len(values[0])
        return _text_example(self._haystack(length, pieces, generator) + question.encode(), values[0].encode())


@dataclass(frozen=True, kw_only=True)
class NumberNeedle(_MagicNeedle):
    """RULER S-NIAH-2: one number needle with a word key."""

    name: ClassVar[str] = "number_needle"
    digits: int = 7

    def _validate(self) -> None:
        super()._validate()
        _check_int(type(self).__name__, "digits", self.digits, 1, 64)

    def _noun(self) -> str:
        return "number"

    def _value(self, generator: torch.Generator) -> str:
        return _digits(generator, self.digits)

    def _longest_value(self) -> int:
        return self.digits


@dataclass(frozen=True, kw_only=True)
class WordNeedle(_MagicNeedle):
    """RULER S-NIAH-3 style: one needle whose value is a word (``kind="word"``) or a uuid (``"uuid"``)."""

    name: ClassVar[str] = "word_needle"
    kind: str = "word"

    def _validate(self) -> None:
        super()._validate()
        _check_option("WordNeedle", "kind", self.kind, ("word", "uuid"))

    def _noun(self) -> str:
        return self.kind

    def _value(self, generator: torch.Generator) -> str:
        if self.kind == "word":
            return _choice(generator, _WORDS)
        hexes = "".join("0123456789abcdef"[i] for i in torch.randint(0, 16, (32,), generator=generator).tolist())
        return "-".join(hexes[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))

    def _longest_value(self) -> int:
        return len(_longest(_WORDS)) if self.kind == "word" else 36


@dataclass(frozen=True, kw_only=True)
class MultiKeyNeedle(NumberNeedle):
    """RULER MK-NIAH: `needles` number needles with distinct keys and values; one key is asked."""

    name: ClassVar[str] = "multikey_needle"
    needles: int = 4

    def _validate(self) -> None:
        super()._validate()
        _check_int("MultiKeyNeedle", "needles", self.needles, 2, min(len(_KEYS), 9 * 10 ** (self.digits - 1)))

    def _needles(self) -> int:
        return self.needles


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


@dataclass(frozen=True, kw_only=True)
class FactQA(_HaystackTask):
    """bAbI-style where-is questions (qa1 ``question="person"``, qa2 ``"object"``), facts in long filler."""

    name: ClassVar[str] = "fact_qa"
    facts: int = 10
    people: int = 4
    question: str = "person"

    def _validate(self) -> None:
        super()._validate()
        _check_option("FactQA", "question", self.question, ("person", "object"))
        # an object question needs its holder to move to a place and pick it up: two facts
        _check_int("FactQA", "facts", self.facts, 1 if self.question == "person" else 2)
        _check_int("FactQA", "people", self.people, 2, len(_NAMES))

    def minimum_length(self) -> int:
        verbs = [verb for group in _VERBS.values() for verb in group]
        fact = f"{_longest(_NAMES)} {_longest(verbs)} the {_longest(_PLACES + _OBJECTS)}. "
        return self.facts * len(fact) + len(self._ask("the " + _longest(_NAMES + _OBJECTS))) + len(_longest(_PLACES))

    def _contents(self) -> str:
        return f"{self.facts} facts, the question and the answer"

    @staticmethod
    def _ask(subject: str) -> str:
        return f"\nWhere is {subject}? Answer: "

    def _plan(self, generator: torch.Generator) -> list[str]:
        """The asked subject's own events, in order (the actor is the asked person or the object's holder)."""
        if self.question == "person":
            return ["move"] * min(self.facts, 3)
        rest = ["move"] * min(self.facts - 2, 3)
        if len(rest) == 3 and _randint(generator, 0, 2):
            rest[1] = "drop"  # dropped, then the holder walks on: the answer is where it was dropped
        return ["move", "take", *rest]

    def _story(self, generator: torch.Generator) -> tuple[list[str], str, str]:
        """The fact sentences in order, the question's subject and its answer (by simulating the world)."""
        people = _sample(generator, _NAMES, self.people)
        actor, others, objects = people[0], people[1:], list(_OBJECTS)
        target = _choice(generator, objects) if self.question == "object" else None
        if target is not None:
            objects.remove(target)  # the other people never touch the asked object, nor the actor
        place: dict[str, str] = {}
        holder: dict[str, str] = {}
        dropped: dict[str, str] = {}
        plan = self._plan(generator)
        slots = set(torch.randperm(self.facts, generator=generator)[: len(plan)].tolist())
        sentences = []
        for slot in range(self.facts):
            if slot in slots:
                person, kind, thing = actor, plan.pop(0), target
            else:
                person = _choice(generator, others)
                held = [o for o in objects if holder.get(o) == person]
                free = [o for o in objects if o not in holder] if person in place else []
                kind = _choice(generator, ["move"] + ["take"] * bool(free) + ["drop"] * bool(held))
                thing = _choice(generator, free if kind == "take" else held) if kind != "move" else None
            if kind == "move":
                thing = _choice(generator, [p for p in _PLACES if p != place.get(person)])
                place[person] = thing
            elif kind == "take":
                holder[thing] = person
            else:
                del holder[thing]
                dropped[thing] = place[person]
            sentences.append(f"{person} {_choice(generator, _VERBS[kind])} the {thing}. ")
        if target is None:
            return sentences, actor, place[actor]
        return sentences, f"the {target}", place[actor] if target in holder else dropped[target]

    def build(self, generator: torch.Generator) -> Example:
        sentences, subject, answer = self._story(generator)
        depths = sorted(_uniform(generator) for _ in sentences)
        question = self._ask(subject)
        length = self.context_length - len(question) - len(answer)
        haystack = self._haystack(length, list(zip(depths, sentences)), generator)
        return _text_example(haystack + question.encode(), answer.encode())


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
