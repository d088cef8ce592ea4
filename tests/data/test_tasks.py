"""Synthetic tasks: exact lengths, answers checked by solving each task from its text, depth, scoring, batches."""

import dataclasses
import re

import pytest
import torch

from miras.data import IGNORE, Batches
from miras.data.tasks import (
    MQAR,
    TASKS,
    Example,
    FactQA,
    MultiKeyNeedle,
    NumberNeedle,
    PassKey,
    SelectiveCopy,
    TaskBatches,
    WordNeedle,
    exact_match,
    generate,
    make_task,
    score,
)

# A corpus of our own: short sentences, no digits and nothing that looks like a needle or a fact.
CORPUS = (
    "The old lighthouse stood on the cliff above the bay. Its lamp had been dark for years. "
    "Fishermen still looked up at it when the fog rolled in!\nA gull circled the tower and cried. "
    "Was anyone left to climb the stairs? Nobody in the village could say. "
    "In spring the meadow below turned yellow with flowers, and children ran through it. "
)
LONGEST_CORPUS_SENTENCE = max(len(s) for s in re.split(r"(?<=[.!?\n]) ?", CORPUS)) + 1
# Sentences of 75 to 217 bytes: far longer than a word, each within the 256 bytes a needle may move back.
LONG_SENTENCES = "".join(f"The {' '.join(['quiet'] * n)} river runs on. " for n in (10, 25, 17, 33, 12, 29))
SENTENCE_ENDS = (". ", "! ", "? ", "\n")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def configs(length: int) -> list:
    """One config per task and variant, with parameters small enough to fit `length` >= 257."""
    text = {"haystack": "text", "corpus": CORPUS}
    return [
        PassKey(context_length=length),
        PassKey(context_length=length, digits=9, **text),
        NumberNeedle(context_length=length),
        NumberNeedle(context_length=length, **text),
        WordNeedle(context_length=length),
        WordNeedle(context_length=length, kind="uuid", **text),
        MultiKeyNeedle(context_length=length, needles=2),
        FactQA(context_length=length, facts=4),
        FactQA(context_length=length, facts=4, question="object", **text),
        MQAR(context_length=length, pairs=8, queries=5),
        SelectiveCopy(context_length=length, content_tokens=16),
    ]


def split(example: Example) -> tuple[str, str]:
    """(prompt text, answer text) of a text task, whose answer is one run of tokens at the very end."""
    where = example.answer.nonzero().flatten()
    assert where.tolist() == list(range(len(example.tokens) - len(where), len(example.tokens)))
    cut = len(example.tokens) - len(where)
    return bytes(example.tokens[:cut].tolist()).decode(), example.answer_text()


# ---------------------------------------------------------------- independent solvers, from the text alone
def solve_passkey(prompt: str) -> str:
    found = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ", prompt)
    assert len(found) == 1 and found[0][0] == found[0][1]
    assert prompt.endswith("\nWhat is the pass key? The pass key is ")
    return found[0][0]


def solve_magic(prompt: str, needles: int = 1) -> str:
    noun, key = re.search(r"What is the special magic (\w+) for ([\w-]+)\? The special magic \1 for \2 is: $",
                          prompt).groups()
    assert len(re.findall(rf"One of the special magic {noun}s for [\w-]+ is: [\w-]+\. ", prompt)) == needles
    found = re.findall(rf"One of the special magic {noun}s for {key} is: ([\w-]+)\. ", prompt)
    assert len(found) == 1
    return found[0]


FACT = re.compile(r"([A-Z]\w+) (went to|moved to|travelled to|journeyed to|picked up|grabbed|got|dropped|put down"
                  r"|discarded) the (\w+)\. ")


MOVES = ("went to", "moved to", "travelled to", "journeyed to")


def solve_fact_qa(prompt: str, facts: int) -> str:
    place, holder, lying = {}, {}, {}
    events = FACT.findall(prompt)
    assert len(events) == facts
    for person, verb, thing in events:
        if verb in MOVES:
            assert place.get(person) != thing  # (bAbI) a move goes somewhere else
            place[person] = thing
        elif verb in ("picked up", "grabbed", "got"):
            assert thing not in holder and person in place
            holder[thing] = person
        else:
            assert holder.pop(thing) == person
            lying[thing] = place[person]
    the, subject = re.search(r"\nWhere is (the )?(\w+)\? Answer: $", prompt).groups()
    if the is None:
        return place[subject]  # KeyError if the asked person never moved: a question without an answer
    return place[holder[subject]] if subject in holder else lying[subject]


def check_mqar(example: Example, task: MQAR) -> None:
    tokens, length = example.tokens.tolist(), task.context_length
    keys, values = tokens[0 : 2 * task.pairs : 2], tokens[1 : 2 * task.pairs : 2]
    assert len(set(keys)) == task.pairs and all(128 <= k < 192 for k in keys) and all(v >= 192 for v in values)
    assert all(t < 128 for t in tokens[2 * task.pairs : length - 2 * task.queries])
    where = example.answer.nonzero().flatten().tolist()
    assert where == list(range(length - 2 * task.queries + 1, length, 2))
    asked = [tokens[t - 1] for t in where]
    assert len(set(asked)) == task.queries
    assert [tokens[t] for t in where] == [dict(zip(keys, values))[k] for k in asked]


def check_selective_copy(example: Example, task: SelectiveCopy) -> None:
    tokens, count = example.tokens.tolist(), task.content_tokens
    prompt = tokens[: -count - 1]
    assert tokens[-count - 1] == 0 and all(t > 0 for t in prompt)
    assert example.answer.nonzero().flatten().tolist() == list(range(len(tokens) - count, len(tokens)))
    assert tokens[-count:] == [t for t in prompt if t >= 128]


def check_answer(example: Example, task) -> None:
    """Solve the example from its content alone and compare with tokens[answer]."""
    if isinstance(task, MQAR):
        return check_mqar(example, task)
    if isinstance(task, SelectiveCopy):
        return check_selective_copy(example, task)
    prompt, answer = split(example)
    if isinstance(task, PassKey):
        assert answer == solve_passkey(prompt) and len(answer) == task.digits
    elif isinstance(task, FactQA):
        assert answer == solve_fact_qa(prompt, task.facts)
    else:
        assert answer == solve_magic(prompt, getattr(task, "needles", 1))
        if isinstance(task, WordNeedle) and task.kind == "uuid":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", answer)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("task", configs(600), ids=lambda t: f"{t.name}-{getattr(t, 'haystack', '')}")
def test_deterministic_per_generator_seed(task):
    torch.manual_seed(0)
    first = generate(task, gen(11))
    torch.manual_seed(1)  # the global RNG must play no part
    again = generate(task, gen(11))
    other = generate(task, gen(12))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.answer, again.answer)
    assert not torch.equal(first.tokens, other.tokens)


@pytest.mark.parametrize("length", [64, 257, 1000, 4099, 16411])
def test_exact_length_and_byte_range(length):
    tasks = [MQAR(context_length=length, pairs=8, queries=8), SelectiveCopy(context_length=length, content_tokens=8)]
    if length >= 257:
        tasks += configs(length)
    for seed, task in enumerate(tasks):
        example = generate(task, gen(seed))
        assert example.tokens.shape == (length,) and example.answer.shape == (length,)
        assert example.tokens.dtype == torch.int64 and example.answer.dtype == torch.bool
        assert 0 <= int(example.tokens.min()) and int(example.tokens.max()) < 256
        assert example.answer[-1] and not example.answer[0]
        check_answer(example, task)


@pytest.mark.parametrize("task", configs(700), ids=lambda t: f"{t.name}-{getattr(t, 'haystack', '')}")
def test_answer_correct_by_construction(task):
    for seed in range(25):
        check_answer(generate(task, gen(seed)), task)


def test_fact_qa_object_answers_cover_dropped_and_carried():
    task = FactQA(context_length=2000, facts=12, question="object")
    prompts = [split(generate(task, gen(seed)))[0] for seed in range(30)]
    dropped = [p for p in prompts if re.search(r"(dropped|put down|discarded) the "
                                               + re.search(r"Where is the (\w+)\?", p).group(1), p)]
    assert 0 < len(dropped) < len(prompts)  # both cases occur, and the solver above agrees on all of them
    for seed, prompt in enumerate(prompts):
        assert solve_fact_qa(prompt, 12) == generate(task, gen(seed)).answer_text()


def test_a_text_haystack_can_name_its_corpus(tmp_path):
    """corpus="text:<corpus>" draws the filler from a corpus by name (the CLI can pass that in --task-params;
    the text itself it could not); a bare corpus name would be taken as the filler text: an error."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(f"Document {i} says that the river runs north. " * 40)
    task = PassKey(context_length=1500, haystack="text", corpus=f"text:{folder}")
    example = generate(task, gen(4))
    prompt, answer = split(example)
    assert len(example.tokens) == 1500 and "the river runs north" in prompt and "The grass is green" not in prompt
    assert answer == solve_passkey(prompt) and generate(task, gen(4)).tokens.equal(example.tokens)
    inline = PassKey(context_length=1500, haystack="text", corpus="".join(d.read_text() for d in sorted(
        folder.iterdir())))
    assert "the river runs north" in split(generate(inline, gen(4)))[0]
    for name in ("stdlib", str(folder), "hf:wikitext"):
        with pytest.raises(ValueError, match=r"corpus='.*' would be the filler text itself; .* as 'text:"):
            PassKey(context_length=1500, haystack="text", corpus=name)
    with pytest.raises(ValueError, match="no such file or folder"):
        PassKey(context_length=1500, haystack="text", corpus=f"text:{tmp_path / 'missing'}")
    for empty in ("text:", "text: "):  # not the working directory's text files
        with pytest.raises(ValueError, match=rf"PassKey: corpus='{empty}' names no corpus; give text:<corpus>"):
            PassKey(context_length=1500, haystack="text", corpus=empty)
    with pytest.raises(ValueError, match=r"PassKey: corpus is not valid text \(it cannot be written as UTF-8\)"):
        PassKey(context_length=1500, haystack="text", corpus="filler \ud800 text " * 20)  # (JSON can give "\ud800")
    # results.json keeps a corpus's name (literal filler text is abbreviated to its length)
    from miras.evaluate import _task_record

    assert _task_record(task)["corpus"] == f"text:{folder}"
    assert _task_record(inline)["corpus"] == f"<{len(inline.corpus)} characters>"


@pytest.mark.parametrize("question", ["person", "object"])
def test_fact_qa_cannot_be_answered_without_reading_the_question(question):
    """Everyone in a story acts alike: guesses that ignore the question stay near chance. (The asked person
    used to follow a fixed plan of moves and the others to pick things up and drop them: "the last place of
    whoever moves most" answered 0.79 of person questions, "the last place of someone who never handles an
    object" 0.66.)"""
    task = FactQA(context_length=2000, question=question)
    hits = {"last place of the most frequent mover": 0, "place of the story's last move": 0}
    subjects, trials = set(), 300
    for seed in range(trials):
        example = generate(task, gen(seed))
        prompt, answer = split(example)
        events = FACT.findall(prompt)
        moves = [(person, thing) for person, verb, thing in events if verb in MOVES]
        counts = {person: sum(p == person for p, _ in moves) for person, _ in moves}
        busiest = max(counts, key=lambda person: (counts[person], person))
        hits["last place of the most frequent mover"] += [t for p, t in moves if p == busiest][-1] == answer
        hits["place of the story's last move"] += moves[-1][1] == answer
        subjects.add(re.search(r"Where is (?:the )?(\w+)\?", prompt).group(1))
        assert solve_fact_qa(prompt, task.facts) == answer
    for guess, count in hits.items():
        assert count / trials < 0.5, (guess, count / trials)
    assert len(subjects) > 6  # the question is about many different people / objects


@pytest.mark.parametrize("haystack", ["repeat", "text"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_needle_depth_is_respected(haystack, depth):
    corpus = CORPUS if haystack == "text" else None
    slack = LONGEST_CORPUS_SENTENCE if haystack == "text" else len("There and back again. ")
    cases = [
        (PassKey(context_length=4099, depth=depth, haystack=haystack, corpus=corpus), r"The pass key is \d+\. .*?\. "),
        (MultiKeyNeedle(context_length=4099, needles=5, depth=depth, haystack=haystack, corpus=corpus), None),
    ]
    for task, pattern in cases:
        prompt, _ = split(generate(task, gen(3)))
        haystack_end = prompt.rindex("\nWhat is")
        if pattern is None:  # the asked needle of a multi-key example
            key = re.search(r"What is the special magic number for ([\w-]+)\?", prompt).group(1)
            pattern = rf"One of the special magic numbers for {key} is: \d+\. "
        needles = list(re.finditer(r"The pass key is \d+\. .*?key\. |One of the special magic \w+ for .*?\. ",
                                   prompt[:haystack_end]))
        needle = re.search(pattern, prompt)
        filler = haystack_end - sum(m.end() - m.start() for m in needles)
        before = needle.start() - sum(m.end() - m.start() for m in needles if m.start() < needle.start())
        # the needle moves back to a sentence start: never after the requested point, never by more than a sentence
        assert 0 <= depth * filler - before <= slack, (depth, before, filler)


def test_a_text_haystack_without_sentences_keeps_the_depth_and_whole_characters():
    # no sentence end in the corpus: the needle goes to the last word start before its depth, also in the
    # first 256 bytes (it went to the very start there), and a corpus without spaces is never cut mid-character
    words = " ".join(["lorem ipsum dolor sit amet consectetur adipiscing elit"] * 300)
    for length, filler in ((400, 400 - 103), (600, 600 - 103)):
        task = PassKey(context_length=length, haystack="text", corpus=words, depth=0.5)
        for seed in range(5):
            raw = bytes(generate(task, gen(seed)).tokens.tolist())
            at = raw.index(b"The pass key")
            assert filler * 0.5 - 12 <= at <= filler * 0.5 and raw[at - 1:at] == b" ", (length, seed, at)
    chinese = "我们的长文本没有空格也没有英文句号" * 200
    emoji = "😀🎉 " * 300 + "\U00010348" * 50  # 4-byte characters, both leading with the byte F0
    for seed, corpus in ((seed, corpus) for seed in range(20) for corpus in (chinese, emoji)):
        for task in (PassKey(context_length=1500, haystack="text", corpus=corpus, depth=0.5),
                     MultiKeyNeedle(context_length=1501, needles=3, haystack="text", corpus=corpus)):
            example = generate(task, gen(seed))
            bytes(example.tokens.tolist()).decode("utf-8")  # raises on a cut character
            assert len(example.tokens) == task.context_length


PIECE = re.compile(r"The pass key is \d+\. Remember it\. \d+ is the pass key\. "
                   r"|One of the special magic \w+ for [\w-]+ is: [\w-]+\. |" + FACT.pattern)


def test_needles_and_facts_start_sentences():
    """Each needle or fact goes in at a sentence start of the filler: right after ". ", "! ", "? " or a newline,
    or at the filler's start, so that no filler sentence is cut. (A text haystack begins at a random offset,
    mid-sentence: a piece before the filler's first sentence end goes to a word start instead.)"""
    tasks = [PassKey(context_length=1000), MultiKeyNeedle(context_length=1500, needles=4),
             FactQA(context_length=1500, facts=6), PassKey(context_length=1500, haystack="text", corpus=CORPUS),
             PassKey(context_length=1500, haystack="text", corpus=LONG_SENTENCES),
             MultiKeyNeedle(context_length=2500, needles=4, haystack="text", corpus=LONG_SENTENCES),
             FactQA(context_length=2500, facts=6, haystack="text", corpus=LONG_SENTENCES)]
    for task in tasks:
        for seed in range(20):
            prompt, _ = split(generate(task, gen(seed)))
            haystack = prompt[: prompt.rindex("\nWh")]
            pieces = list(PIECE.finditer(haystack))
            assert len(pieces) == getattr(task, "needles", getattr(task, "facts", 1))
            for piece in pieces:
                filler = PIECE.sub("", haystack[: piece.start()])  # the filler before the piece
                in_first_sentence = task.haystack == "text" and not any(end in filler for end in SENTENCE_ENDS)
                assert (filler == "" or filler.endswith(SENTENCE_ENDS)
                        or (in_first_sentence and filler.endswith(" "))), (task, seed, filler[-40:])


def test_multikey_the_asked_needle_is_anywhere_among_the_needles():
    """The asked needle's depth is uniform like the others', and the needles go in in the order of their depths:
    the asked one is the first, second, third or fourth of 4 equally often (a model cannot learn to answer with
    the first needle of the text)."""
    task, trials = MultiKeyNeedle(context_length=1200, needles=4), 120
    places = [0] * 4
    for seed in range(trials):
        prompt, _ = split(generate(task, gen(seed)))
        asked = re.search(r"What is the special magic number for ([\w-]+)\?", prompt).group(1)
        places[re.findall(r"One of the special magic numbers for ([\w-]+) is: ", prompt).index(asked)] += 1
    assert all(15 <= n <= 45 for n in places), places  # 30 each expected (binomial sd 4.7)


def test_numbers_have_no_leading_zero_and_multikey_values_are_distinct():
    """A d-digit number is exactly d digits without a leading zero (every first digit 1-9 occurs, 0 never; 0-9
    after it), and a multi-key example's values are distinct, so that the asked key has one right answer: with
    nine one-digit needles they are 1, 2, ..., 9."""
    firsts, rests = set(), set()
    for seed in range(150):
        key = generate(PassKey(context_length=200, digits=3), gen(seed)).answer_text()
        assert re.fullmatch(r"\d{3}", key)
        firsts.add(key[0])
        rests.update(key[1:])
    assert firsts == set("123456789") and rests == set("0123456789")
    task = MultiKeyNeedle(context_length=1000, needles=9, digits=1)
    for seed in range(20):
        prompt, answer = split(generate(task, gen(seed)))
        values = re.findall(r"One of the special magic numbers for [\w-]+ is: (\d+)\. ", prompt)
        assert sorted(values) == list("123456789") and answer == solve_magic(prompt, 9)


def test_fact_qa_stories_have_the_given_number_of_people():
    for people in (2, 3):
        task = FactQA(context_length=1500, facts=10, people=people)
        counts = [len({name for name, _, _ in FACT.findall(split(generate(task, gen(seed)))[0])})
                  for seed in range(30)]
        assert max(counts) == people, (people, counts)


def test_fact_qa_facts_are_scattered_in_order_through_the_filler():
    """BABILong-style: the facts sit at sorted uniform depths, so the k-th of n is on average at the depth k / (n + 1)
    of the filler (the mean of the k-th smallest of n uniforms), not clumped together."""
    facts, trials = 8, 50
    task = FactQA(context_length=3000, facts=facts)
    depths = [0.0] * facts
    for seed in range(trials):
        prompt, _ = split(generate(task, gen(seed)))
        haystack = prompt[: prompt.rindex("\nWhere is")]
        found = list(FACT.finditer(haystack))
        filler, before = len(haystack) - sum(m.end() - m.start() for m in found), 0
        for k, fact in enumerate(found):
            depths[k] += (fact.start() - before) / filler / trials
            before += fact.end() - fact.start()
    # the k-th smallest of 8 uniforms has an sd <= 0.16: <= 0.023 for a mean of 50; a fact moves back <= 22 bytes
    for k, depth in enumerate(depths, 1):
        assert abs(depth - k / (facts + 1)) < 0.08, (k, depths)


def test_cutting_utf8_text_blanks_exactly_the_stray_bytes():
    """A slice of UTF-8 text at any byte offsets keeps every character it holds whole and turns each byte of a cut
    character into a space (checked against every slice of characters 1, 2, 3 and 4 bytes long)."""
    from miras.data.tasks.haystack import _whole_characters

    text = "aé€😀\U00010348 " * 3  # the 4-byte characters begin with F0, the lowest lead byte of their width
    encoded = text.encode()
    owner = [c for c, character in enumerate(text) for _ in character.encode()]  # the character of each byte
    for i in range(len(encoded)):
        for j in range(i, len(encoded) + 1):
            whole = {c for c in owner[i:j] if owner[i:j].count(c) == len(text[c].encode())}
            expected = bytes(encoded[k] if owner[k] in whole else 0x20 for k in range(i, j))
            assert _whole_characters(encoded[i:j]) == expected, (i, j)


# The shortest lengths, by hand from the longest draw: the longest key is 15 bytes ("ancient-glacier": adjective
# and noun of 7 letters), the longest word "umbrella", place "bathroom", name "Daniel", verb "journeyed to".
MINIMUMS = [
    (SelectiveCopy(context_length=100, content_tokens=16), 33),  # 16 content tokens, the separator, their copy
    (MQAR(context_length=100, pairs=4, queries=2), 12),  # 4 key-value pairs, 2 queries and their values
    # needle "The pass key is 12345. Remember it. 12345 is the pass key. " 59, question 39, answer 5
    (PassKey(context_length=1000), 103),
    # needle "One of the special magic uuids for <key> is: <uuid>. " 35 + 15 + 5 + 36 + 2 = 93, question
    # "\nWhat is the special magic uuid for <key>? The special magic uuid for <key> is: " 100, the uuid 36
    (WordNeedle(context_length=1000, kind="uuid"), 229),
    (WordNeedle(context_length=1000), 65 + 100 + 8),  # the same with "words" and "umbrella"
    (NumberNeedle(context_length=1000), 66 + 104 + 7),  # "numbers" (2 more bytes than "uuids") and 7 digits
    (MultiKeyNeedle(context_length=1000, needles=3, digits=2), 3 * 61 + 104 + 2),
    # facts of up to 34 bytes ("Daniel journeyed to the bathroom. "), the question "\nWhere is the football?
    # Answer: " 32 and "bathroom" 8 (for any question: a person's is shorter)
    (FactQA(context_length=1000, facts=1), 74),
    (FactQA(context_length=1000, facts=3, question="object"), 3 * 34 + 32 + 8),
]


@pytest.mark.parametrize("task, minimum", MINIMUMS, ids=lambda x: getattr(x, "name", str(x)))
def test_minimum_lengths_are_exact(task, minimum):
    """The minimum is accepted (and every draw fits there), one token less is refused."""
    with pytest.raises(ValueError, match=rf"context_length={minimum - 1} is too short.* at least {minimum} tokens"):
        dataclasses.replace(task, context_length=minimum - 1)
    shortest = dataclasses.replace(task, context_length=minimum)
    for seed in range(10):
        check_answer(generate(shortest, gen(seed)), shortest)


def test_the_longest_draw_fills_the_minimum_length():
    """At its minimum length, an example of the longest draw has no noise or filler at all: the minimum is no
    larger than it must be. (A pass-key needle is always that long; a magic needle when its key is 15 bytes.)"""
    example = generate(SelectiveCopy(context_length=33, content_tokens=16), gen(0))
    assert all(t >= 128 for t in example.tokens[:16].tolist()) and example.tokens[16] == 0
    prompt, _ = split(generate(PassKey(context_length=103), gen(0)))
    assert re.fullmatch(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\. \nWhat is the pass key\? "
                        r"The pass key is ", prompt)
    for task in (WordNeedle(context_length=229, kind="uuid"), NumberNeedle(context_length=177)):
        longest = 0
        for seed in range(400):
            prompt, answer = split(generate(task, gen(seed)))
            key = re.search(r"What is the special magic \w+ for ([\w-]+)\?", prompt).group(1)
            longest += len(key) == 15
            if len(key) == 15:
                assert re.fullmatch(rf"One of the special magic \w+s for {key} is: {answer}\. \nWhat is the special "
                                    rf"magic \w+ for {key}\? The special magic \w+ for {key} is: ", prompt)
        assert longest > 0


def test_too_short_contexts_and_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match=r"context_length=64 is too short.*at least 103 tokens.*needle"):
        PassKey(context_length=64)
    with pytest.raises(ValueError, match=r"MQAR: context_length=20 is too short.*at least 24"):
        MQAR(context_length=20, pairs=8, queries=4)
    need = FactQA(context_length=10_000, facts=20).minimum_length()
    with pytest.raises(ValueError, match=f"at least {need} tokens to hold 20 facts"):
        FactQA(context_length=need - 1, facts=20)
    for task in configs(10_000):  # every draw fits in exactly the minimum length, haystack empty or not
        shortest = dataclasses.replace(task, context_length=task.minimum_length())
        for seed in range(5):
            example = generate(shortest, gen(seed))
            assert example.tokens.shape == (shortest.context_length,)
            check_answer(example, shortest)
    bad = [
        (lambda: NumberNeedle(context_length=1000, haystack="text"), r"haystack='text'.*corpus.*none given"),
        (lambda: NumberNeedle(context_length=1000, corpus="words"), r"corpus.*only read with haystack='text'"),
        (lambda: WordNeedle(context_length=1000, haystack="book"), r"haystack must be one of 'repeat', 'text'"),
        (lambda: WordNeedle(context_length=1000, kind="emoji"), r"kind must be one of 'word', 'uuid'"),
        (lambda: PassKey(context_length=1000, depth=1.5), r"depth must be a number in \[0, 1\] or None"),
        # (JSON's true is no depth: a bool would pass as 1.0)
        (lambda: PassKey(context_length=1000, depth=True), r"depth must be a number .*; got True"),
        (lambda: PassKey(context_length=1000, digits=0), r"digits must be an int in \[1, 64\], got 0"),
        (lambda: MQAR(context_length=100, pairs=4, queries=5), r"queries must be an int in \[1, 4\], got 5"),
        (lambda: MultiKeyNeedle(context_length=9000, needles=20, digits=1), r"needles must be an int in \[2, 9\]"),
        (lambda: FactQA(context_length=1000, facts=1, question="object"), r"facts must be an int >= 2"),
        # (one person: the last move answers every question unread)
        (lambda: FactQA(context_length=1000, people=1), r"people must be an int in \[2, 8\], got 1"),
        (lambda: SelectiveCopy(context_length=1.5), r"context_length must be an int >= 2"),
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            make()


def test_registry_names_params_and_round_trip():
    assert sorted(TASKS) == ["fact_qa", "mqar", "multikey_needle", "number_needle", "passkey", "selective_copy",
                             "word_needle"]
    with pytest.raises(ValueError, match=r"unknown task 'niah'; valid names: fact_qa, mqar, .*word_needle"):
        make_task("niah", context_length=100)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) digit; valid parameters: context_length, "
                                         r"haystack, corpus, digits, depth"):
        make_task("passkey", context_length=1000, digit=3)
    with pytest.raises(ValueError, match=r"missing required parameter\(s\) context_length"):
        make_task("mqar", pairs=4)
    for task in configs(500):
        rebuilt = make_task(**{"name": task.name, **dataclasses.asdict(task)})
        assert rebuilt == task and hash(rebuilt) == hash(task)
        assert torch.equal(generate(rebuilt, gen(0)).tokens, generate(task, gen(0)).tokens)


def perfect_logits(example: Example, seed: int, length: int | None = None) -> torch.Tensor:
    """Random logits, except that row t - 1 puts its largest value on tokens[t] at every answer position t."""
    logits = torch.randn(len(example.tokens), 256, generator=gen(seed))
    for t in example.answer.nonzero().flatten().tolist():
        logits[t - 1, example.tokens[t]] = 50.0
    return logits[:length]


def test_score_is_teacher_forced_exact_match():
    for task in [MQAR(context_length=64, pairs=6, queries=3), PassKey(context_length=300), FactQA(context_length=400,
                                                                                                    facts=3)]:
        example = generate(task, gen(0))
        logits = perfect_logits(example, seed=1)
        assert score(logits, example) == 1.0
        assert score(logits[:-1], example) == 1.0  # logits over inputs (tokens[:-1]) only
        where = example.answer.nonzero().flatten().tolist()
        for t in (where[0], where[len(where) // 2], where[-1]):  # one wrong answer token is a wrong example
            wrong = logits.clone()
            wrong[t - 1, (example.tokens[t] + 1) % 256] = 99.0
            assert score(wrong, example) == 0.0
    others = [generate(task, gen(seed)) for seed in (5, 6, 7, 8)]
    batch = torch.stack([perfect_logits(e, seed) for seed, e in enumerate(others)])
    t = int(others[2].answer.nonzero()[0])
    batch[2, t - 1, (others[2].tokens[t] + 7) % 256] = 99.0
    assert exact_match(batch, others).tolist() == [True, True, False, True]
    assert score(batch, others) == 0.75
    with pytest.raises(ValueError, match="expected 400 or 399"):
        score(batch[:, :100], others)


def test_task_batches_slice_by_rank_resume_and_targets():
    task = FactQA(context_length=400, facts=3)
    batches = TaskBatches(task, batch_size=4, seed=9)
    assert isinstance(batches, Batches) and batches.seq_len == 399
    inputs, targets = batches.batch(5)
    assert inputs.shape == targets.shape == (4, 399) and inputs.dtype == targets.dtype == torch.int64
    for rank in (0, 1):
        part = batches.batch(5, rank=rank, world=2)
        assert torch.equal(part[0], inputs[2 * rank : 2 * rank + 2]) and torch.equal(part[1], targets[2 * rank :][:2])
    resumed = TaskBatches(task, batch_size=4, seed=9).batch(5)  # a fresh source at the same step: same rows
    assert torch.equal(resumed[0], inputs) and torch.equal(resumed[1], targets)
    assert not torch.equal(batches.batch(6)[0], inputs)
    assert not torch.equal(TaskBatches(task, batch_size=4, seed=10).batch(5)[0], inputs)
    for row in range(4):
        example = batches.example(5, row)
        assert torch.equal(inputs[row], example.tokens[:-1])
        marked = targets[row] != IGNORE
        assert torch.equal(marked, example.answer[1:]) and marked.sum() == len(example.answer_text())
        assert torch.equal(targets[row][marked], example.tokens[1:][marked])
        assert bytes(targets[row][marked].tolist()).decode() == solve_fact_qa(split(example)[0], 3)
    with pytest.raises(ValueError, match="batch_size=4 must be divisible by world=3"):
        batches.batch(0, rank=0, world=3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\], got 2"):
        batches.batch(0, rank=2, world=2)


def test_task_batches_of_different_seeds_never_share_rows():
    """The row generator hashes seed, step and row as separate fields: run together, (seed 1, step 23) and
    (seed 12, step 3) would both be "123", and two runs of different seeds would train on the same rows."""
    task = MQAR(context_length=64, pairs=4, queries=2)
    for (seed, step), (other_seed, other_step) in (((1, 23), (12, 3)), ((2, 11), (21, 1))):
        for row in (0, 3):
            first = TaskBatches(task, batch_size=4, seed=seed).example(step, row)
            second = TaskBatches(task, batch_size=4, seed=other_seed).example(other_step, row)
            assert not torch.equal(first.tokens, second.tokens)


def test_an_example_refuses_malformed_tokens_and_answers():
    """tokens [T] int64 and answer [T] bool (a uint8 mask would index by value), answering >= 1 token and not
    token 0: nothing precedes it, so no logit predicts it and exact_match would pass it unscored."""
    tokens, answer = torch.arange(4), torch.tensor([False, False, True, True])
    assert Example(tokens, answer).answer_text() == "\x02\x03"
    for bad_tokens, bad_answer in ((tokens.int(), answer), (tokens.float(), answer), (tokens[None], answer[None]),
                                   (tokens, answer.to(torch.uint8))):
        with pytest.raises(ValueError, match=r"Example needs tokens \[T\] int64 and answer \[T\] bool"):
            Example(bad_tokens, bad_answer)
    for bad_answer in (torch.tensor([True, False, False, True]), torch.zeros(4, dtype=torch.bool),
                       torch.tensor([False, True, True])):
        with pytest.raises(ValueError, match="must have the shape of tokens, mark >= 1 token and not token 0"):
            Example(tokens, bad_answer)
