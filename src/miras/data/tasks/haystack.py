"""The text tasks: pass-key, number/word/multi-key needles and bAbI-style fact QA in a haystack of filler."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .core import Example, Task, _check_int, _check_option, _choice, _digits, _randint, _sample, _text_example, _uniform

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


@functools.lru_cache(maxsize=4)
def _encode(corpus: str) -> bytes:
    return corpus.encode("utf-8") + b" "


def _encodes(corpus: str) -> bool:
    """Whether ``_encode`` takes ``corpus`` (a lone surrogate, e.g. from JSON's "\\ud800", is not UTF-8); its
    bytes are then cached for the examples."""
    try:
        _encode(corpus)
    except UnicodeEncodeError:
        return False
    return True


CORPUS_PREFIX = "text:"  # corpus="text:<corpus>": a corpus by name, as data=text:<corpus> names one


@functools.lru_cache(maxsize=4)
def _named_corpus(spec: str) -> str:
    """The documents of ``miras.data.text.load_corpus(spec)`` (both splits, in order), as one text."""
    from ..text import load_corpus

    return "\n\n".join(document.text for document in load_corpus(spec).documents)


def _corpus_text(corpus: str) -> str:
    return _named_corpus(corpus[len(CORPUS_PREFIX):]) if corpus.startswith(CORPUS_PREFIX) else corpus


def _sentence_start(filler: bytes, position: int, *, starts_sentence: bool) -> int:
    """The last sentence start at or before `position` (looking back a little; the filler's start, if it
    `starts_sentence`), else the last word start, else the last character start."""
    low = max(0, position - _LOOK_BACK)
    found = [filler.rfind(mark, low, position) for mark in _SENTENCE_ENDS]
    starts = [i + len(mark) for i, mark in zip(found, _SENTENCE_ENDS) if i >= 0]
    if starts:
        return max(starts)
    if low == 0 and starts_sentence:
        return 0
    space = filler.rfind(b" ", low, position)
    if space >= 0:
        return space + 1
    while 0 < position < len(filler) and _continues(filler[position]):  # never inside a UTF-8 character
        position -= 1
    return position


def _continues(byte: int) -> bool:
    """A UTF-8 continuation byte (10xxxxxx): not the start of a character."""
    return byte & 0xC0 == 0x80


def _whole_characters(filler: bytes) -> bytes:
    """`filler` with the pieces of UTF-8 characters cut at either end (a slice at a byte offset) blanked to
    spaces: the same length, valid UTF-8 wherever the source was."""
    text = bytearray(filler)
    head = 0
    while head < len(text) and _continues(text[head]):
        head += 1
    text[:head] = b" " * head
    lead = len(text) - 1
    while lead >= max(head, len(text) - 3) and _continues(text[lead]):
        lead -= 1
    if lead >= head and text[lead] >= 0xC0:  # the last character's first byte: is the character whole?
        width = 2 if text[lead] < 0xE0 else 3 if text[lead] < 0xF0 else 4
        if len(text) - lead < width:
            text[lead:] = b" " * (len(text) - lead)
    return bytes(text)


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
        if self.haystack == "text" and self.corpus.startswith(CORPUS_PREFIX):
            if not self.corpus[len(CORPUS_PREFIX):].strip():  # (an empty name would be the working directory)
                raise ValueError(f"{task}: corpus={self.corpus!r} names no corpus; give {CORPUS_PREFIX}<corpus>, "
                                 f"e.g. {CORPUS_PREFIX}stdlib")
            _corpus_text(self.corpus)  # loaded (once per process) now: a missing corpus is an error here
        elif self.haystack == "text" and not _encodes(self.corpus):
            raise ValueError(f"{task}: corpus is not valid text (it cannot be written as UTF-8)")
        elif self.haystack == "text" and "\n" not in self.corpus and len(self.corpus) < 256 and (
                self.corpus == "stdlib" or self.corpus.startswith("hf:") or os.path.exists(self.corpus)):
            raise ValueError(f"{task}: corpus={self.corpus!r} would be the filler text itself; to draw the filler "
                             f"from a corpus give its name as {CORPUS_PREFIX + self.corpus!r}")
        if self.haystack == "repeat" and self.corpus is not None:
            raise ValueError(f"{task}: `corpus` is only read with haystack='text' (haystack is 'repeat')")

    def _haystack(self, length: int, pieces: list[tuple[float, str]], generator: torch.Generator) -> bytes:
        """`length` bytes of filler with the pieces inserted in order, each at its depth (a fraction of the
        filler, nondecreasing) moved back to the sentence start before it."""
        encoded = [piece.encode() for _, piece in pieces]
        size = length - sum(map(len, encoded))
        source = _FILLER if self.haystack == "repeat" else _encode(_corpus_text(self.corpus))
        start = 0 if self.haystack == "repeat" else _randint(generator, 0, len(source))
        filler = _whole_characters((source * ((start + size) // len(source) + 1))[start:start + size])
        parts, last = [], 0
        for (depth, _), piece in zip(pieces, encoded):
            # max(): insertion points never move before the previous one, so the pieces keep their order
            position = max(last, _sentence_start(filler, round(depth * size), starts_sentence=start == 0))
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
        """The longest fact, question and answer counted apart, though no draw holds all three (a person's question
        is shorter than "the <object>", an object question's story has a pick-up): 3-6 tokens above the longest
        draw, never below it."""
        verbs = [verb for group in _VERBS.values() for verb in group]
        fact = f"{_longest(_NAMES)} {_longest(verbs)} the {_longest(_PLACES + _OBJECTS)}. "
        return self.facts * len(fact) + len(self._ask("the " + _longest(_NAMES + _OBJECTS))) + len(_longest(_PLACES))

    def _contents(self) -> str:
        return f"{self.facts} facts, the question and the answer"

    @staticmethod
    def _ask(subject: str) -> str:
        return f"\nWhere is {subject}? Answer: "

    def _story(self, generator: torch.Generator) -> tuple[list[str], str, str]:
        """The fact sentences in order, the question's subject and its answer (by simulating the world).

        Every person acts alike (each fact: a random person, a random action they can take), and the subject
        is drawn afterwards from those the question can be asked about: a person who has moved, an object
        that has been picked up. So nothing but the question says whose facts matter (an earlier version
        gave the asked person a fixed plan and the others pick-ups and drops: "the last place of the person
        who moves most" answered 0.79 of its questions unread). A story with no pick-up, which an object
        question cannot use, is drawn again."""
        while True:
            people = _sample(generator, _NAMES, self.people)
            place: dict[str, str] = {}
            holder: dict[str, str] = {}
            dropped: dict[str, str] = {}
            taken: list[str] = []
            sentences = []
            for _ in range(self.facts):
                person = _choice(generator, people)
                held = [o for o in _OBJECTS if holder.get(o) == person]
                free = [o for o in _OBJECTS if o not in holder] if person in place else []
                kind = _choice(generator, ["move"] + ["take"] * bool(free) + ["drop"] * bool(held))
                if kind == "move":
                    thing = _choice(generator, [p for p in _PLACES if p != place.get(person)])
                    place[person] = thing
                elif kind == "take":
                    thing = _choice(generator, free)
                    holder[thing] = person
                    if thing not in taken:
                        taken.append(thing)
                else:
                    thing = _choice(generator, held)
                    del holder[thing]
                    dropped[thing] = place[person]
                sentences.append(f"{person} {_choice(generator, _VERBS[kind])} the {thing}. ")
            if self.question == "person":  # the first fact is a move: someone has a place
                subject = _choice(generator, [person for person in people if person in place])
                return sentences, subject, place[subject]
            if taken:
                target = _choice(generator, taken)
                return sentences, f"the {target}", place[holder[target]] if target in holder else dropped[target]

    def build(self, generator: torch.Generator) -> Example:
        sentences, subject, answer = self._story(generator)
        depths = sorted(_uniform(generator) for _ in sentences)
        question = self._ask(subject)
        length = self.context_length - len(question) - len(answer)
        haystack = self._haystack(length, list(zip(depths, sentences)), generator)
        return _text_example(haystack + question.encode(), answer.encode())
