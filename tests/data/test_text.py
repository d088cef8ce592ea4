"""Corpora, tokenizers, the token cache and text batches (miras.data.text, miras.data.tokenizers)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from miras.data.base import IGNORE, Batches
from miras.data.text import (
    Corpus,
    Document,
    TextBatches,
    cache_description,
    cache_files,
    cached_tokens,
    clear_cache,
    from_hf,
    from_path,
    load_corpus,
    stdlib,
    windows,
)
from miras.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
)

SAMPLE = "Héllo wörld — ünïcode ✓ 日本語\n\n\tdef f(x):\n        return x  # done\n"


@pytest.fixture
def folder(tmp_path):
    """20 text files in nested folders, one binary file, one non-UTF-8 file, one hidden folder."""
    for i in range(20):
        sub = tmp_path / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "words and more words\n" * (i + 1))
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    return tmp_path


# ------------------------------------------------------------------------------------------ corpora


def test_folder_corpus_splits_by_file_deterministically_and_skips_binary(folder):
    corpus = from_path(folder)
    names = [document.name for document in corpus.documents]
    assert len(names) == 20 and names == sorted(names)
    assert names[0] == "part0/doc00.txt" and all(name.endswith(".txt") for name in names)
    assert "latin1.txt" not in names and "image.bin" not in names
    assert corpus.skipped == (("image.bin", "it holds a NUL byte (a binary file)"),
                              ("latin1.txt", "it is not UTF-8 text (byte 3)"))
    assert corpus.skipped_note() == (f"note: corpus {str(folder)!r}: 2 files skipped (image.bin: it holds a NUL byte "
                                     "(a binary file); latin1.txt: it is not UTF-8 text (byte 3)); reading the 20 "
                                     "other files")
    assert Corpus("copy", corpus.documents).skipped_note() is None
    train, validation = corpus.split("train"), corpus.split("validation")
    assert len(train) >= 1 and len(validation) >= 1 and len(train) + len(validation) == 20
    # whole files, each in exactly one split, texts untouched
    assert sorted(d.name for d in train + validation) == names
    assert {d.text for d in train + validation} == {d.text for d in corpus.documents}
    again = from_path(folder)
    assert again.split("validation") == validation and again.split("train") == train
    # the split follows the file name, not the folder's location: a copy elsewhere splits the same way
    corpus_b = Corpus("copy", tuple(reversed(corpus.documents)))
    assert sorted(d.name for d in corpus_b.split("validation")) == sorted(d.name for d in validation)


def test_a_file_name_that_is_not_utf8_is_a_document_like_any_other(folder, tmp_path_factory):
    """Linux file names are bytes: b"caf\\xe9.txt" reaches Python as "caf\\udce9.txt", which utf-8 cannot
    encode. Hashing it for the split and the cache key failed the whole corpus with "surrogates not allowed"."""
    import os

    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("a file whose name is latin-1\n")
    corpus = from_path(folder)
    assert os.fsdecode(b"caf\xe9.txt") in [d.name for d in corpus.documents] and len(corpus.documents) == 21
    cache = tmp_path_factory.mktemp("cache")
    for split in ("train", "validation"):
        assert len(cached_tokens(corpus, ByteTokenizer(), split, cache)) > 0
    assert sum(len(corpus.split(split)) for split in ("train", "validation")) == 21


def test_larger_validation_fraction_moves_more_files_and_keeps_old_ones():
    documents = tuple(Document(f"file{i}.txt", f"text {i}") for i in range(200))
    small = {d.name for d in Corpus("x", documents, 0.05).split("validation")}
    large = {d.name for d in Corpus("x", documents, 0.5).split("validation")}
    assert 2 <= len(small) <= 25 and 70 <= len(large) <= 130
    assert small <= large  # thresholds on one hash: growing the fraction only adds files


def test_single_file_is_cut_at_a_line_break(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = from_path(path)
    (train,), (validation,) = corpus.split("train"), corpus.split("validation")
    assert train.text + validation.text == path.read_text()
    assert train.text.endswith("\n") and validation.text.startswith("line ")
    assert len(validation.text) == pytest.approx(0.05 * len(path.read_text()), abs=10)


def test_single_file_cut_at_the_nearest_line_break_or_at_the_fraction(tmp_path):
    """The cut is the line break nearest to 95% of the text, after it as well as before it; a long last
    line is cut through rather than handing (almost) all the text to validation."""
    def cut(text: str) -> tuple[int, int]:
        path = tmp_path / "one.txt"
        path.write_text(text)
        corpus = from_path(path)
        train, validation = corpus.split("train"), corpus.split("validation")
        assert "".join(d.text for d in train + validation) == text
        return len(train[0].text), sum(len(d.text) for d in validation)

    assert cut("title\n" + "x" * 10000) == (9505, 501)  # no break near 95%: cut at it (was 6 / 10000)
    assert cut("a\n" * 3 + "y" * 1000 + "\n") == (956, 51)
    # a break just after 95% is nearer than the one far before it
    assert cut("x" * 100 + "\n" + "y" * 850 + "\n" + "z" * 60) == (952, 60)


def test_a_file_name_with_glob_characters_and_unreadable_entries(tmp_path):
    """A real path holding "[" is read as that path, not as a glob; a dangling link in a folder is skipped."""
    folder = tmp_path / "run[1]"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\n")
    (folder / "b.txt").write_text("beta\n")
    (folder / "dangling.txt").symlink_to(tmp_path / "nowhere")
    assert [d.name for d in from_path(folder).documents] == ["a.txt", "b.txt"]
    assert [d.text for d in from_path(folder / "a.txt").documents] == ["alpha\n"]


def test_a_single_file_that_is_not_text_says_why(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"ab\0cd")
    with pytest.raises(ValueError, match=r"'.*latin.txt': the file is skipped: it is not UTF-8 text \(byte 3\)"):
        from_path(tmp_path / "latin.txt")
    with pytest.raises(ValueError, match=r"the file is skipped: it holds a NUL byte"):
        from_path(tmp_path / "blob.txt")
    # a folder of them names them (it read as an empty folder)
    with pytest.raises(ValueError, match=r"no text found \(2 files skipped \(blob.txt: it holds a NUL byte \(a binary "
                                         r"file\); latin.txt: it is not UTF-8 text \(byte 3\)\)\); expected"):
        from_path(tmp_path)


def test_glob(folder):
    corpus = from_path(str(folder / "part1" / "*.txt"))
    # names are relative to the glob's folder, so the split does not depend on where it lives
    assert [d.name for d in corpus.documents] == [f"doc{i:02d}.txt" for i in range(1, 20, 3)]
    recursive = load_corpus(str(folder / "**" / "doc1*.txt"))
    assert [d.name for d in recursive.documents] == sorted(f"part{i % 3}/doc{i}.txt" for i in range(10, 20))


def test_errors_say_what_was_given_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"'.*missing': no such file or folder; expected 'stdlib'"):
        load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"the glob matches no file; expected 'stdlib', 'hf:<name>"):
        load_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.dat").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match=r"no text found \(1 file skipped \(blob.dat: it holds a NUL byte \(a binary "
                                         r"file\)\)\); expected 'stdlib'"):
        load_corpus(str(tmp_path))
    (tmp_path / "blob.dat").unlink()
    with pytest.raises(ValueError, match=r"no text found; expected 'stdlib'"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match=r"split 'test'"):
        Corpus("x", (Document("a", "text"),)).split("test")


def test_a_split_without_documents_is_refused_without_a_cache_file(tmp_path):
    """A one-character corpus has no validation part: that was found only after an empty cache file (and its
    description) had been written. A one-document split names itself in singular."""
    corpus = Corpus("tiny", (Document("a.txt", "x"),))
    with pytest.raises(ValueError, match=r"^corpus 'tiny': the validation split has no tokens$"):
        cached_tokens(corpus, ByteTokenizer(), "validation", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    path = Path(cached_tokens(corpus, ByteTokenizer(), "train", cache_dir=tmp_path).filename)
    assert cache_description(path) == "tiny, train split, 1 document, byte"


def test_hf_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without it looks like
    with pytest.raises(ImportError, match="pip install datasets"):
        from_hf("wikitext")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("hf:wikitext:validation")


def test_hf_corpus_names_a_config_split_and_text_field(tmp_path, monkeypatch):
    """hf:<name>:<config>:<split>[:<field>]: wikitext, c4 and most corpora need a config, and not every dataset
    calls its text column "text". A local dataset folder with two configs stands in for the hub."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    root = tmp_path / "dataset"
    for config, rows in (("small", 4), ("big", 6)):
        (root / config).mkdir(parents=True)
        (root / config / "train.jsonl").write_text("".join(
            json.dumps({"body": f"{config} document {i}\n" * 3, "id": i}) + "\n" for i in range(rows)))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n" for c in ("small", "big"))
        + "---\n")
    corpus = load_corpus(f"hf:{root}:big:train:body")
    assert corpus.source == f"hf:{root}:big:train" and len(corpus.documents) == 6
    assert corpus.documents[1] == Document(f"{root}/big/train/1", "big document 1\n" * 3)
    assert [d.text for d in load_corpus(f"hf:{root}:small:train:body").documents][3] == "small document 3\n" * 3
    with pytest.raises(ValueError, match=r"corpus 'hf:.*:small:train': no field 'text'; the fields are "
                                         r"\['body', 'id'\] \(hf:<name>:<config>:<split>:<field> names another\)"):
        load_corpus(f"hf:{root}:small:train")
    with pytest.raises(ValueError, match=r"corpus 'hf:.*:small:train': field 'id' holds int64, not text; the fields "
                                         r"are \['body', 'id'\]"):
        load_corpus(f"hf:{root}:small:train:id")
    for spec, why in (("hf:", "no dataset name"), ("hf:a:b:c:d:e", "too many parts")):
        with pytest.raises(ValueError, match=rf"corpus '{spec}': {why}; expected 'stdlib', 'hf:<name>\[:<split>\]', "
                                             r"'hf:<name>:<config>:<split>\[:<field>\]'"):
            load_corpus(spec)


def test_hf_corpus_is_read_as_it_is_used_not_held_in_memory(tmp_path, monkeypatch):
    """An hf: corpus keeps its rows in the dataset's memory-mapped Arrow files: loading it, splitting it and caching
    its tokens hold a batch of rows at a time, not every row (Python's allocations stay far below the text's size),
    with the same split and tokens as the same rows held in memory."""
    import tracemalloc

    import datasets

    import miras.data.text
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(miras.data.text._Rows, "BATCH", 64)  # rows read at a time (1024: 2 MB of these rows)
    root = tmp_path / "dataset"
    root.mkdir()
    texts = [("" if i % 97 == 5 else f"row {i}: " + "lorem ipsum " * (150 + i % 40)) for i in range(4000)]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    size = sum(map(len, texts))  # ~8 MB
    load_corpus(f"hf:{root}")  # (the dataset's Arrow files are made once, outside the measurement)
    tracemalloc.start()
    try:
        corpus = load_corpus(f"hf:{root}")
        validation = [document.name for document in corpus.split("validation")]
        tokens = cached_tokens(corpus, ByteTokenizer(), "train", cache_dir=tmp_path / "cache", chunk_chars=1 << 13)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 8, (peak, size)
    assert [document.text for document in corpus.documents] == texts  # every row, in order
    assert corpus.documents[7] == Document(f"{root}/train/7", texts[7]) and len(corpus.documents) == len(texts)
    held = Corpus(corpus.source, tuple(corpus.documents))
    assert validation == [document.name for document in held.split("validation")] and 100 < len(validation) < 300
    assert np.array_equal(tokens, cached_tokens(held, ByteTokenizer(), "train", cache_dir=tmp_path / "held"))


def test_importing_miras_data_imports_no_optional_package():
    code = (
        "import sys, miras.data.text, miras.data.tokenizers; "
        "print(*(name in sys.modules for name in ('datasets', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_stdlib_corpus_tokenised_once_with_bytes(tmp_path):
    start = time.perf_counter()
    corpus = stdlib()
    names = [d.name for d in corpus.documents]
    assert len(names) > 300 and names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    skipped = {"test", "tests", "idle_test", "site-packages"}
    assert not any(skipped & set(name.split("/")[:-1]) for name in names)
    assert not any(part.startswith("test_") for name in names for part in name.split("/")[:-1])
    assert all(name.endswith(".py") for name in names)
    again = stdlib()
    assert [d.name for d in again.split("validation")] == [d.name for d in corpus.split("validation")]
    train = corpus.split("train")
    assert len(corpus.split("validation")) >= 10
    tokens = cached_tokens(corpus, ByteTokenizer(), "train", cache_dir=tmp_path)
    expected = sum(len(d.text.encode("utf-8")) + 2 for d in train)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == expected
    first = train[0].text.encode("utf-8")
    assert bytes(tokens[: len(first) + 2].astype(np.uint8)) == first + b"\n\n"
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_non_ascii(tmp_path):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(SAMPLE)
    assert ids[:3] == [72, 0xC3, 0xA9] and max(ids) < 256 and len(ids) == len(SAMPLE.encode("utf-8"))
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.decode([0xFF, 65]) == "\ufffdA"  # invalid UTF-8 from a model shows, not fails
    np.testing.assert_array_equal(tokenizer.encode_documents(["a", "é"]), [97, 10, 10, 0xC3, 0xA9, 10, 10])
    tokenizer.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer) and isinstance(tokenizer, Tokenizer)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)


def _bpe_texts():
    return [f"def function_{i}(value):\n    return value * {i} + offset  # café\n" * 3 for i in range(60)]


def test_bpe_is_deterministic_round_trips_and_reloads(tmp_path):
    first, second = BPETokenizer.train(_bpe_texts(), 400), BPETokenizer.train(_bpe_texts(), 400)
    text = "def function_7(value):\n    return value * 7 + offset  # café ✓\n"
    ids = first.encode(text)
    assert first.vocab_size == 400 and first.eos_id == 0
    assert ids == second.encode(text) and first.identity == second.identity
    # merges learnt: far fewer ids than bytes, and every string (even unseen characters) round-trips
    assert len(ids) < len(text.encode("utf-8")) / 2
    assert first.decode(ids) == text and first.decode(first.encode(SAMPLE)) == SAMPLE
    joined = first.encode_documents(["def a", "return b"])
    np.testing.assert_array_equal(joined, first.encode("def a") + [0] + first.encode("return b") + [0])
    first.save(tmp_path / "tokenizer")
    restored = load_tokenizer(tmp_path / "tokenizer")
    assert isinstance(restored, BPETokenizer) and restored.encode(text) == ids
    assert restored.identity == first.identity and restored.decode(ids) == text
    assert get_tokenizer(str(tmp_path / "tokenizer")).encode(text) == ids


def test_get_tokenizer_trains_bpe_on_the_train_split_only():
    # every document has its own word, so a BPE that saw the validation files would merge other pairs
    corpus = Corpus("x", tuple(Document(f"f{i}", f"common words {i * 7919:x}zq\n" * 5) for i in range(40)), 0.2)
    tokenizer = get_tokenizer("bpe:320", corpus)
    assert tokenizer.identity == BPETokenizer.train([d.text for d in corpus.split("train")], 320).identity
    assert tokenizer.identity != BPETokenizer.train([d.text for d in corpus.documents], 320).identity


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'bpe:big': the vocabulary size must be an integer"):
        get_tokenizer("bpe:big")
    with pytest.raises(ValueError, match="pass the corpus"):
        get_tokenizer("bpe:512")
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(["abc"], 100)
    with pytest.raises(ValueError, match=r"'gpt9': not a known kind and no such folder; expected 'byte'"):
        get_tokenizer("gpt9")
    for empty in ("", " "):  # not the working directory's tokenizer
        with pytest.raises(ValueError, match=rf"tokenizer '{empty}' is empty; expected 'byte'"):
            get_tokenizer(empty)
    with pytest.raises(ValueError, match="no miras_tokenizer.json"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_without_transformers_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it looks like
    with pytest.raises(ImportError, match="pip install transformers"):
        HFTokenizer(tmp_path)
    with pytest.raises(ImportError, match="pip install transformers"):
        get_tokenizer(str(tmp_path))
    with pytest.raises(ImportError, match="pip install transformers"):
        get_tokenizer("hf:gpt2")


def test_hf_tokenizer_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>")
    wrapped.save_pretrained(tmp_path / "hf")
    tokenizer = get_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 300 and tokenizer.eos_id == 0
    assert tokenizer.encode(SAMPLE) == bpe.encode(SAMPLE) and tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    np.testing.assert_array_equal(tokenizer.encode_documents(["a b", "c"]), bpe.encode_documents(["a b", "c"]))
    tokenizer.save(tmp_path / "run")
    restored = load_tokenizer(tmp_path / "run")
    assert isinstance(restored, HFTokenizer) and restored.identity == tokenizer.identity


def test_a_slow_hf_tokenizer_saved_with_a_run_keeps_its_identity(tmp_path):
    """A tokenizer without a fast backend (CTRL here) is identified by its vocabulary and settings; the length limit
    that HFTokenizer raises, and save() writes, is not one of them: a run resumed from its saved tokenizer must find
    the same token cache and the same data."""
    transformers = pytest.importorskip("transformers")
    vocab = {token: i for i, token in enumerate(["<unk>", "a", "b", "c", " ", "ab", "abc"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
    transformers.CTRLTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(
        tmp_path / "slow")
    tokenizer = get_tokenizer(str(tmp_path / "slow"))
    assert getattr(tokenizer.tokenizer, "backend_tokenizer", None) is None  # (the case under test)
    tokenizer.save(tmp_path / "run")
    restored = load_tokenizer(tmp_path / "run")
    assert restored.identity == tokenizer.identity and restored.encode("abc ab") == tokenizer.encode("abc ab")


def test_slow_hf_tokenizers_sharing_a_vocabulary_but_not_their_merges_have_different_identities(tmp_path):
    """A slow tokenizer's merges live in a file, not in its vocabulary or settings: the identity hashes that file."""
    transformers = pytest.importorskip("transformers")
    vocab = {token: i for i, token in enumerate(["<unk>", "a", "b", "c", " ", "ab", "bc"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    identities = []
    for name, merges in (("ab-first", "a b\nb c\n"), ("bc-first", "b c\na b\n")):
        (tmp_path / f"{name}.txt").write_text("#version: 0.2\n" + merges)
        transformers.CTRLTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / f"{name}.txt")).save_pretrained(
            tmp_path / name)
        identities.append(get_tokenizer(str(tmp_path / name)).identity)
    assert get_tokenizer(str(tmp_path / "ab-first")).identity == identities[0]  # stable
    assert identities[0] != identities[1]


def test_hf_tokenizers_sharing_a_vocabulary_but_not_a_pipeline_have_different_identities(tmp_path):
    """The identity keys the token cache: a lowercasing tokenizer must not reuse a cased one's tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"[UNK]": 95}
    identities = []
    for name, lower in (("cased", False), ("lower", True)):
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        if lower:
            backend.normalizer = normalizers.Lowercase()
        transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
            tmp_path / name)
        identities.append(get_tokenizer(str(tmp_path / name)).identity)
    assert get_tokenizer(str(tmp_path / "cased")).identity == identities[0]  # stable
    assert identities[0] != identities[1]


def test_hf_tokenizers_differing_only_in_their_end_marker_do_not_share_a_token_cache(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    bpe.tokenizer.add_special_tokens(["<eos>", "<end>"])  # the same backend either way
    corpus = Corpus("x", tuple(Document(f"d{i}", f"text {i}\n") for i in range(40)))
    caches = []
    for eos in ("<eos>", "<end>"):
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token=eos).save_pretrained(
            tmp_path / "hf")
        tokenizer = get_tokenizer(str(tmp_path / "hf"))
        cached = cached_tokens(corpus, tokenizer, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(cached, tokenizer.encode_documents([d.text for d in corpus.split("train")]))
        caches.append(np.array(cached))
    assert not np.array_equal(caches[0], caches[1]) and len(list((tmp_path / "cache").glob("*.uint16"))) == 2


def test_bpe_reads_its_end_marker_written_in_a_document_as_text():
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    text = 'EOS = "<|endoftext|>"\n'
    ids = bpe.encode_documents([text, "second"])
    assert list(ids).count(bpe.eos_id) == 2 and ids[-1] == bpe.eos_id  # one end per document, none inside
    assert bpe.decode(bpe.encode(text)) == text and bpe.eos_id not in bpe.encode(text)


def test_hf_tokenizer_reads_its_special_tokens_written_in_a_document_as_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    bpe.tokenizer.add_special_tokens(["<pad>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>",
                                         pad_token="<pad>").save_pretrained(tmp_path / "hf")
    tokenizer = get_tokenizer(str(tmp_path / "hf"))
    text = 'EOS = "<|endoftext|>"; PAD = "<pad>"\n'
    specials = {tokenizer.eos_id, tokenizer.tokenizer.pad_token_id}
    assert not specials & set(tokenizer.encode(text)) and tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode_documents([text, "second"])
    assert list(ids).count(tokenizer.eos_id) == 2 and ids[-1] == tokenizer.eos_id  # one end per document
    assert tokenizer.tokenizer.pad_token_id not in ids


def _crash_on_fsync(monkeypatch):
    """A crash mid-write: the data is written but never made durable or renamed into place."""
    import miras.files

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(miras.files.os, "fsync", crash)


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_bpe_save_is_atomic(tmp_path, monkeypatch):
    """A resumed run saves its tokenizer again: a crash then must leave the saved one whole, no temp files."""
    first, second = BPETokenizer.train(_bpe_texts(), 300), BPETokenizer.train(_bpe_texts()[:20], 400)
    first.save(tmp_path)
    before = _snapshot(tmp_path)
    assert sorted(before) == ["miras_tokenizer.json", "tokenizer.json"]
    assert json.loads(before["miras_tokenizer.json"]) == {"kind": "bpe", "vocab_size": 300}
    assert before["tokenizer.json"] == first.tokenizer.to_str(pretty=True).encode()  # as Tokenizer.save writes it
    assert (tmp_path / "tokenizer.json").stat().st_mode & 0o777 != 0o600  # a plain file's mode, not mkstemp's
    with monkeypatch.context() as patch:
        _crash_on_fsync(patch)
        with pytest.raises(OSError, match="disk full"):
            second.save(tmp_path)
        with pytest.raises(OSError, match="disk full"):
            ByteTokenizer().save(tmp_path)  # the metadata alone
    assert _snapshot(tmp_path) == before
    assert load_tokenizer(tmp_path).identity == first.identity
    second.save(tmp_path)
    assert load_tokenizer(tmp_path).identity == second.identity
    assert load_tokenizer(tmp_path).vocab_size == second.vocab_size != 300


def test_hf_save_is_atomic(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "hf")
    tokenizer = get_tokenizer(str(tmp_path / "hf"))
    tokenizer.save(tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    assert {"miras_tokenizer.json", "tokenizer.json", "tokenizer_config.json"} <= set(before)
    with monkeypatch.context() as patch:
        _crash_on_fsync(patch)
        with pytest.raises(OSError, match="disk full"):
            tokenizer.save(tmp_path / "run")
    assert _snapshot(tmp_path / "run") == before  # no half-written file, no temp file or folder left
    assert load_tokenizer(tmp_path / "run").identity == tokenizer.identity


def test_a_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    pytest.importorskip("transformers")
    allowed = ("expected 'byte', 'bpe:<vocab_size>', 'hf:<name>' (a tokenizer in the local HF cache) or a folder "
               "saved by miras (Tokenizer.save) or by transformers (save_pretrained)")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    (tmp_path / "junk" / "config.json").write_text("{}")
    for name in ("empty", "junk"):
        folder = str(tmp_path / name)
        with pytest.raises(ValueError) as error:
            get_tokenizer(folder)
        assert str(error.value) == f"tokenizer folder {folder!r} holds no tokenizer that miras or transformers " \
                                   f"can load; {allowed}"
    with pytest.raises(ValueError) as error:
        get_tokenizer("hf:no-such-org/no-such-tokenizer")
    assert str(error.value) == "tokenizer 'no-such-org/no-such-tokenizer' is neither a folder nor a Hugging Face " \
                               f"tokenizer in the local HF cache (nothing is downloaded); {allowed}"


def test_train_with_a_folder_without_a_tokenizer_says_so_in_one_line(tmp_path, capsys):
    """`miras train ... tokenizer=FOLDER`: one line, exit code 2, nothing written."""
    pytest.importorskip("transformers")
    from miras.cli import main

    (tmp_path / "text.txt").write_text("hello world\n" * 50)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    assert main(["train", "titans-lmm-tiny", f"data=text:{tmp_path / 'text.txt'}", f"tokenizer={tmp_path / 'empty'}",
                 "max_steps=1", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miras train: error: ") and err.count("\n") == 1
    assert f"tokenizer folder {str(tmp_path / 'empty')!r} holds no tokenizer that miras or transformers can load; " \
           "expected 'byte', 'bpe:<vocab_size>', 'hf:<name>'" in err
    assert not out.exists()


# -------------------------------------------------------------------------------------- token cache


class CountingByteTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls = 0

    def encode_documents(self, texts):
        self.calls += any(texts)  # the cache key encodes one empty document (the end marker): not the corpus
        return super().encode_documents(texts)


def test_cache_is_written_once_reused_and_holds_the_concatenated_tokens(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    corpus, tokenizer = from_path(folder), CountingByteTokenizer()
    tokens = cached_tokens(corpus, tokenizer, "train", cache_dir=cache, chunk_chars=100)
    calls = tokenizer.calls
    assert calls > 1  # chunked: several small encode calls, one file
    (path,) = cache.glob("*.uint16")
    assert not list(cache.glob("*.tmp")) and sorted(p.name for p in cache.iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name])
    assert cache_description(path) == f"{corpus.source}, train split, {len(corpus.split('train')):,} documents, byte"
    expected = b"".join(d.text.encode("utf-8") + b"\n\n" for d in corpus.split("train"))
    assert bytes(np.asarray(tokens, dtype=np.uint8)) == expected
    modified = path.stat().st_mtime_ns
    again = cached_tokens(from_path(folder), tokenizer, "train", cache_dir=cache)
    assert tokenizer.calls == calls and path.stat().st_mtime_ns == modified
    np.testing.assert_array_equal(again, tokens)
    # a changed file or another split or tokenizer is another cache, never a stale one
    cached_tokens(corpus, tokenizer, "validation", cache_dir=cache)
    (folder / corpus.split("train")[0].name).write_text("changed")
    changed = cached_tokens(from_path(folder), tokenizer, "train", cache_dir=cache)
    bpe = BPETokenizer.train(_bpe_texts(), 300)
    bpe_tokens = cached_tokens(corpus, bpe, "train", cache_dir=cache)
    assert len(list(cache.glob("*.uint16"))) == 4 and len(list(cache.glob("*.json"))) == 4
    assert len(changed) != len(tokens) or not np.array_equal(changed, tokens)
    np.testing.assert_array_equal(bpe_tokens, bpe.encode_documents([d.text for d in corpus.split("train")]))


def test_cache_defaults_to_the_environment_folder(folder, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("env_cache")
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(cache))
    cached_tokens(from_path(folder), ByteTokenizer(), "validation")
    assert len(list(cache.glob("*.uint16"))) == 1
    (cache / "a-file").write_text("")
    monkeypatch.setenv("MIRAS_CACHE_DIR", str(cache / "a-file"))  # a file where the folder should be: say which
    with pytest.raises(OSError, match=rf"^cannot make the token cache folder {cache / 'a-file'} \(File exists; it "
                                      r"is \$MIRAS_CACHE_DIR, or ~/.cache/miras/tokens without it\)$"):
        cached_tokens(from_path(folder), ByteTokenizer(), "validation")


def test_cache_files_are_listed_and_cleared_and_nothing_else(folder, tmp_path_factory):
    """A changed corpus leaves its old cache behind (never read again); clear_cache deletes the cache's files,
    a killed write's temp file among them, and leaves anything else in the folder alone."""
    cache = tmp_path_factory.mktemp("cache")
    tokenizer = CountingByteTokenizer()
    for split in ("train", "validation"):
        cached_tokens(from_path(folder), tokenizer, split, cache_dir=cache)
    leftover = cache / f".{'0' * 32}.uint16.k2j4.tmp"  # as files.atomic_write names its temp file
    leftover.write_bytes(b"12")
    os.utime(leftover, (time.time() - 2 * 3600,) * 2)  # left by a run killed two hours ago
    live = cache / f".{'1' * 32}.uint16.x9q1.tmp"  # a run tokenising now: listed, not deleted
    live.write_bytes(b"345")
    others = [cache / "notes.txt", cache / "0123.uint16", cache / f"{'a' * 32}.uint8", cache / f"{'b' * 32}.uint16.bak",
              cache / f"{'d' * 32}.json"]  # named like a description, but no token file beside it, not one
    for other in others:
        other.write_text("not the cache's")
    (cache / f"{'c' * 32}.uint32").mkdir()  # a folder, whatever its name
    found = cache_files(cache)  # two token files, their descriptions, two temp files
    assert len(found) == 6 and {leftover, live} <= set(found) and not set(others) & set(found)
    total = sum(path.stat().st_size for path in found if path != live)
    assert clear_cache(cache) == (3, total) and total > 2
    assert sorted(path.name for path in cache.iterdir()) == sorted([*(o.name for o in others), "c" * 32 + ".uint32",
                                                                    live.name])
    assert cache_files(cache) == [live] and clear_cache(cache) == (0, 0)
    assert clear_cache(cache / "absent") == (0, 0) and cache_files(cache / "absent") == []
    calls = tokenizer.calls
    cached_tokens(from_path(folder), tokenizer, "train", cache_dir=cache)
    assert tokenizer.calls > calls  # tokenised again


def test_interrupted_cache_leaves_no_file(folder, tmp_path_factory):
    class Failing(CountingByteTokenizer):
        """Interrupted on the corpus's second chunk, while the cache's temp file is being written (the cache
        key's encoding of an empty document passes)."""

        def encode_documents(self, texts):
            if self.calls == 1 and any(texts):
                raise KeyboardInterrupt
            return super().encode_documents(texts)

    cache = tmp_path_factory.mktemp("cache")
    tokenizer = Failing()
    with pytest.raises(KeyboardInterrupt):
        cached_tokens(from_path(folder), tokenizer, "train", cache_dir=cache, chunk_chars=100)
    assert tokenizer.calls == 1  # one chunk was written before the interrupt
    assert list(cache.iterdir()) == []


# ------------------------------------------------------------------------------------------ batches


def test_text_batches_are_deterministic_rank_sliced_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = TextBatches(tokens, batch_size=6, seq_len=17, seed=3)
    assert isinstance(batches, Batches)
    inputs, targets = batches.batch(5)
    assert inputs.shape == targets.shape == (6, 17) and inputs.dtype == targets.dtype == torch.int64
    # consecutive tokens: each row is a real window, and targets are inputs shifted by one
    assert torch.equal(targets, inputs + 1) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[:, 1:] - inputs[:, :-1], torch.ones(6, 16, dtype=torch.int64))
    assert int(inputs.min()) >= 0 and int(targets.max()) <= 999
    again = TextBatches(tokens, 6, 17, 3).batch(5)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    assert len(set(inputs[:, 0].tolist())) > 3  # rows differ
    assert not torch.equal(batches.batch(6)[0], inputs)
    assert not torch.equal(TextBatches(tokens, 6, 17, seed=4).batch(5)[0], inputs)
    for world in (2, 3, 6):
        b = 6 // world
        for rank in range(world):
            part_inputs, part_targets = batches.batch(5, rank, world)
            assert torch.equal(part_inputs, inputs[rank * b : (rank + 1) * b])
            assert torch.equal(part_targets, targets[rank * b : (rank + 1) * b])


def test_text_batches_cover_the_whole_array_with_a_memmap(tmp_path):
    path = tmp_path / "tokens.uint16"
    np.arange(30, dtype=np.uint16).tofile(path)
    batches = TextBatches(np.memmap(path, dtype=np.uint16, mode="r"), batch_size=8, seq_len=29, seed=0)
    inputs, targets = batches.batch(0)  # the only window that fits: all 30 tokens
    assert torch.equal(inputs, torch.arange(29).expand(8, 29)) and torch.equal(targets, inputs + 1)
    starts = {int(TextBatches(np.arange(30), 4, 5, 0).batch(step)[0][row, 0]) for step in range(50) for row in range(4)}
    assert starts == set(range(25))  # every start from 0 to len - seq_len - 1 is drawn


def test_text_batches_errors():
    batches = TextBatches(np.arange(100), batch_size=6, seq_len=8, seed=0)
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by world=4"):
        batches.batch(0, rank=0, world=4)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world=2\)"):
        batches.batch(0, rank=2, world=2)
    with pytest.raises(ValueError, match=r"rank=0 must be in \[0, world=0\)"):  # not a division by zero
        batches.batch(0, rank=0, world=0)
    with pytest.raises(ValueError, match=r"seq_len=100 needs at least 101 tokens .* the corpus has 100"):
        TextBatches(np.arange(100), batch_size=2, seq_len=100, seed=0)


def test_windows_predict_every_token_once_in_order():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens: 22 targets
    batches = list(windows(tokens, seq_len=5, batch_size=2))
    assert [inputs.shape[0] for inputs, _ in batches] == [2, 2, 1]
    inputs = torch.cat([inputs for inputs, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    assert torch.equal(targets[targets != IGNORE], torch.arange(2, 24))
    assert torch.equal(inputs[0], torch.arange(1, 6)) and torch.equal(targets[0], torch.arange(2, 7))
    assert targets[-1].tolist() == [22, 23, IGNORE, IGNORE, IGNORE] and inputs[-1].tolist() == [21, 22, 0, 0, 0]
    exact = list(windows(np.arange(11), seq_len=5))
    assert len(exact) == 2 and torch.equal(exact[-1][1], torch.arange(6, 11)[None])



def test_the_split_follows_names_and_the_cache_follows_contents(folder, tmp_path_factory):
    """Editing files moves none of them across the split (it is by name), and an edit that keeps a file's
    length still makes a new cache (the key hashes the contents: one keyed on lengths passed every test).
    A corpus whose hashes all lie above the fraction sends its lowest-hashed document to validation."""
    from miras.data.text import _hash_fraction

    corpus = from_path(folder)
    names = {split: [d.name for d in corpus.split(split)] for split in ("train", "validation")}
    cache = tmp_path_factory.mktemp("cache")
    before = np.asarray(cached_tokens(corpus, ByteTokenizer(), "train", cache_dir=cache)).copy()
    for name in names["train"] + names["validation"]:  # every file: same length, other contents
        text = (folder / name).read_text()
        (folder / name).write_text(("W" if text[0] != "W" else "V") + text[1:])
    again = from_path(folder)
    assert {split: [d.name for d in again.split(split)] for split in ("train", "validation")} == names
    after = np.asarray(cached_tokens(again, ByteTokenizer(), "train", cache_dir=cache))
    assert len(after) == len(before) and not np.array_equal(after, before)
    assert bytes(after.astype(np.uint8)) == b"".join(d.text.encode() + b"\n\n" for d in again.split("train"))
    documents = tuple(Document(f"d{i}", "x") for i in range(3))
    lowest = min(documents, key=lambda d: _hash_fraction(d.name)).name
    fraction = min(_hash_fraction(d.name) for d in documents) / 2  # below every hash
    small = Corpus("three", documents, fraction)
    assert [d.name for d in small.split("validation")] == [lowest]
    assert len(small.split("train")) == 2
