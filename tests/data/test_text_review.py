"""Corpora, the token cache, text batches and tokenizer loading: behaviour that a mutation review found unguarded
(miras.data.text, miras.data.tokenizers)."""

import itertools
import json
import os
import time

import numpy as np
import pytest
import torch

from miras.data.text import (
    Corpus,
    Document,
    TextBatches,
    _hash_fraction,
    cache_files,
    cached_tokens,
    clear_cache,
    from_path,
)
from miras.data.tokenizers import ByteTokenizer, load_tokenizer

# ------------------------------------------------------------------------------------------ corpora


def test_a_corpus_whose_hashes_all_fall_below_the_fraction_keeps_its_highest_hashed_document_for_training():
    documents = tuple(Document(f"d{i}", "x") for i in range(3))
    highest = max(documents, key=lambda d: _hash_fraction(d.name)).name
    fraction = (max(_hash_fraction(d.name) for d in documents) + 1) / 2  # above every hash
    corpus = Corpus("three", documents, fraction)
    assert [d.name for d in corpus.split("train")] == [highest]
    assert sorted(d.name for d in corpus.split("validation")) == sorted({"d0", "d1", "d2"} - {highest})


def test_empty_documents_belong_to_neither_split():
    documents = tuple(Document(f"doc{i}.txt", "" if i in (3, 7) else f"text {i}\n") for i in range(40))
    corpus = Corpus("x", documents, 0.25)
    names = [d.name for d in corpus.split("train") + corpus.split("validation")]
    assert sorted(names) == sorted(f"doc{i}.txt" for i in range(40) if i not in (3, 7))
    assert all(d.text for d in corpus.split("train") + corpus.split("validation"))


def test_one_text_file_beside_empty_ones_is_cut_like_a_single_file():
    text = "".join(f"line {i}\n" for i in range(100))
    corpus = Corpus("x", (Document("empty.txt", ""), Document("book.txt", text), Document("blank.txt", "")))
    (train,), (validation,) = corpus.split("train"), corpus.split("validation")
    assert (train.name, validation.name) == ("book.txt[train]", "book.txt[validation]")
    assert train.text + validation.text == text and validation.text.startswith("line ")


def test_a_single_file_is_cut_at_the_fraction_when_its_nearest_break_is_beyond_half_the_validation_part(tmp_path):
    """1000 characters, fraction 0.05: the target is 950 and a break may move it by up to 25 characters; the
    only break here is 39 before it."""
    path = tmp_path / "one.txt"
    path.write_text("x" * 910 + "\n" + "y" * 89)
    corpus = from_path(path)
    assert [len(d.text) for d in corpus.split("train")] == [950]
    assert [len(d.text) for d in corpus.split("validation")] == [50]
    path.write_text("x" * 930 + "\n" + "y" * 69)  # a break 19 before it: cut after it
    assert [len(d.text) for d in from_path(path).split("train")] == [931]


def test_hidden_files_in_a_folder_are_not_documents(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / ".notes.txt").write_text("hidden\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".swp").write_text("hidden too\n")
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    assert [d.name for d in from_path(tmp_path).documents] == ["a.txt", "sub/b.txt"]


# -------------------------------------------------------------------------------------- token cache


def test_corpora_whose_names_and_texts_join_to_the_same_bytes_do_not_share_a_cache(tmp_path):
    """The key hashes each document's lengths before its bytes: name "a" + text "b" then name "cd" + text "d", and
    name "a" + text "bc" then name "d" + text "d", are the same bytes run together."""
    fraction = 0.05
    held_out = next(f"v{i}" for i in itertools.count() if _hash_fraction(f"v{i}") < fraction)
    assert all(_hash_fraction(name) >= fraction for name in ("a", "cd", "d"))
    first = Corpus("first", (Document("a", "b"), Document("cd", "d"), Document(held_out, "v")), fraction)
    second = Corpus("second", (Document("a", "bc"), Document("d", "d"), Document(held_out, "v")), fraction)
    assert [d.name for d in first.split("train")] == ["a", "cd"]
    assert [d.name for d in second.split("train")] == ["a", "d"]
    assert bytes(cached_tokens(first, ByteTokenizer(), "train", cache_dir=tmp_path).astype(np.uint8)) == b"b\n\nd\n\n"
    assert bytes(cached_tokens(second, ByteTokenizer(), "train", cache_dir=tmp_path).astype(np.uint8)) == b"bc\n\nd\n\n"
    assert len(list(tmp_path.glob("*.uint16"))) == 2


class WideByteTokenizer(ByteTokenizer):
    """Byte ids, but a vocabulary of ``vocab_size`` (as a tokenizer with that many ids declares)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    @property
    def identity(self):
        return f"wide-{self.vocab_size}"


def test_the_cache_is_uint16_up_to_65536_ids_and_uint32_above(tmp_path):
    corpus = Corpus("x", (Document("a.txt", "hello\n" * 20),))
    assert cached_tokens(corpus, WideByteTokenizer(2**16), cache_dir=tmp_path).dtype == np.uint16
    wider = cached_tokens(corpus, WideByteTokenizer(2**16 + 1), cache_dir=tmp_path)
    assert wider.dtype == np.uint32 and bytes(wider.astype(np.uint8)).startswith(b"hello\n")
    assert sorted(p.suffix for p in tmp_path.glob("*.uint*")) == [".uint16", ".uint32"]


def test_clear_cache_keeps_a_temp_file_modified_within_the_hour(tmp_path):
    recent = tmp_path / f".{'1' * 32}.uint16.x9q1.tmp"
    recent.write_bytes(b"345")
    os.utime(recent, (time.time() - 1800,) * 2)  # half an hour ago: a long tokenisation may still be writing it
    old = tmp_path / f".{'2' * 32}.uint16.k2j4.tmp"
    old.write_bytes(b"12")
    os.utime(old, (time.time() - 3700,) * 2)
    assert clear_cache(tmp_path) == (1, 2)
    assert cache_files(tmp_path) == [recent]


# ------------------------------------------------------------------------------------------ batches


def test_text_batches_of_other_seeds_and_steps_do_not_coincide():
    """Row i of step s is drawn from (seed, s, i): seed 0 at step 1 is not seed 1 at step 0."""
    tokens = np.arange(5000, dtype=np.uint16)
    seed0_step1 = TextBatches(tokens, batch_size=8, seq_len=4, seed=0).batch(1)[0]
    seed1_step0 = TextBatches(tokens, batch_size=8, seq_len=4, seed=1).batch(0)[0]
    assert not torch.equal(seed0_step1, seed1_step0)
    starts = TextBatches(tokens, batch_size=8, seq_len=4, seed=0).offsets(1, range(8))
    expected = [np.random.default_rng((0, 1, row)).integers(5000 - 4) for row in range(8)]
    assert starts.tolist() == expected


# --------------------------------------------------------------------------------------- tokenizers


def test_a_saved_tokenizer_of_an_unknown_kind_is_a_value_error_naming_the_kinds(tmp_path):
    (tmp_path / "miras_tokenizer.json").write_text(json.dumps({"kind": "wordpiece", "vocab_size": 30000}))
    with pytest.raises(ValueError, match=rf"^tokenizer folder {str(tmp_path)!r}: unknown kind 'wordpiece'; "
                                         r"known: \['bpe', 'byte', 'hf'\]$"):
        load_tokenizer(tmp_path)
