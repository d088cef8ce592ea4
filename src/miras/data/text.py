"""Text corpora, a token cache and language-modelling batches.

Three sources, one :class:`Corpus` (a sequence of named documents), chosen by :func:`load_corpus`:

- ``"stdlib"`` — the embedded default that exists on every machine: the ``*.py`` sources of the
  running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), without its test
  suites (``test``, ``tests``, ``idle_test``, ``test_*`` folders) and without ``site-packages``.
  On CPython 3.11 that is ~730 files, ~12 MB of real, varied, long-range-structured text.
- a text file, a folder (recursive; hidden entries, files with NUL bytes and files that are not
  UTF-8 are skipped) or a glob.
- ``"hf:<name>[:<split>]"`` or ``"hf:<name>:<config>:<split>[:<field>]"`` — a Hugging Face dataset, when
  ``datasets`` is installed (e.g. ``hf:wikitext:wikitext-103-raw-v1:train``; the text column is ``text``
  unless ``<field>`` names another). Its rows are not held in memory: they stay in the dataset's memory-mapped
  Arrow files and are read a batch at a time (splitting, hashing and tokenising read them in order).

**Train/validation split by document.** A document goes to validation when a stable hash
(SHA-256) of its name — the file path relative to the folder given, so the split does not depend
on where the folder lives — falls below ``validation_fraction`` (default 0.05). Adding a file never
moves another file across the split, except in a corpus so small that no hash falls below the
fraction (or every one does): with two or more documents each split gets at least one, so then the
lowest hash is moved to validation (or the highest to train), and a new file can take that place.
A corpus of a single document is cut at the line break nearest to ``1 - validation_fraction`` of its
text instead, or at that point itself when no line break is within half the validation part of it.

**Token cache.** :func:`cached_tokens` tokenises a split once into a flat ``np.memmap`` (uint16 when
the vocabulary fits, else uint32) under ``~/.cache/miras/tokens`` (or ``$MIRAS_CACHE_DIR``), named by
a hash of the split's document names and contents, of the tokenizer's identity and of the ids it
writes between documents, so a changed file or tokenizer gives a new cache and never a stale one.
The files a changed corpus leaves behind are never read again and never deleted by a run:
``miras cache`` lists the folder's cache files, ``miras cache --clear`` (:func:`clear_cache`) deletes them.
Each document is followed by the tokenizer's end-of-document marker (see ``tokenizers.py``). The
file is written to a temporary name and renamed (``os.replace``) so that an interrupted run never
leaves a partial cache.

**Batches.** :class:`TextBatches` draws row ``i`` of step ``s`` as a window of ``seq_len + 1``
tokens at an offset from a generator seeded by ``(seed, s, i)``: a pure function of its arguments,
so any rank and any resumed step see the same rows. :func:`windows` walks a split in order for
perplexity, predicting every token after the first exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import sysconfig
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write, atomic_write_bytes
from .base import IGNORE
from .tokenizers import Tokenizer

SPLITS = ("train", "validation")
ALLOWED = ("expected 'stdlib', 'hf:<name>[:<split>]', 'hf:<name>:<config>:<split>[:<field>]', a text file, a folder "
           "of text files or a glob")
STDLIB_SKIPPED = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
CACHE_FORMAT = 3  # bump when the cache layout or its ids change, to orphan old files (2: BPE reads a literal
# "<|endoftext|>" in a document as text, not as the end marker; 3: so does an HF tokenizer)


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: the path relative to the folder given, or "<dataset>/<split>/<row>"
    text: str


def _hash_fraction(name: str) -> float:
    """A uniform number in [0, 1) fixed by ``name`` (unlike ``hash()``, the same in every process)."""
    return int.from_bytes(hashlib.sha256(_name_bytes(name)).digest()[:8], "big") / 2**64


def _name_bytes(name: str) -> bytes:
    """A document name's bytes; a file name that is not UTF-8 (``caf\\xe9.txt``) reached Python as lone
    surrogates and is given back its bytes, as the file system has them."""
    return name.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Corpus:
    """Named documents with a deterministic train/validation split by document (see module doc)."""

    source: str                       # what was loaded: "stdlib", the path or glob, "hf:<name>"
    documents: Sequence[Document]     # a tuple, or an HF dataset's rows read as they are used (_Rows)
    validation_fraction: float = 0.05
    skipped: tuple[tuple[str, str], ...] = ()  # (file, why) for each file of a folder or glob that is not text

    def __post_init__(self):
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction}: must be in (0, 1)")
        if not any(document.text for document in self.documents):
            skipped = f" ({self._skipped_files()})" if self.skipped else ""
            raise ValueError(f"corpus {self.source!r}: no text found{skipped}; {ALLOWED}")

    def skipped_note(self) -> str | None:
        """One line naming the files of a folder or glob that were left out, and why (None: none were)."""
        if not self.skipped:
            return None
        read = len(self.documents)
        return (f"note: corpus {self.source!r}: {self._skipped_files()}; reading the {read} other "
                f"file{'s' * (read != 1)}")

    def _skipped_files(self) -> str:
        shown = "; ".join(f"{name}: {why}" for name, why in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return f"{len(self.skipped)} file{'s' * (len(self.skipped) != 1)} skipped ({shown}{more})"

    def split(self, name: str) -> Sequence[Document]:
        """The documents of split ``name`` ("train" or "validation"), in corpus order."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: expected one of {SPLITS}")
        return self._splits[name]

    @functools.cached_property
    def _splits(self) -> dict[str, Sequence[Document]]:
        # one pass, keeping each non-empty document's position and hash (16 bytes), not the document: an HF corpus
        # reads its rows here
        positions, fractions = array("q"), array("d")
        for i, document in enumerate(self.documents):
            if document.text:
                positions.append(i)
                fractions.append(_hash_fraction(document.name))
        if len(positions) == 1:
            return _cut_document(self.documents[positions[0]], self.validation_fraction)
        positions, fractions = np.frombuffer(positions, dtype=np.int64), np.frombuffer(fractions)
        validation = fractions < self.validation_fraction
        if not validation.any():
            validation[fractions.argmin()] = True
        if validation.all():
            validation[fractions.argmax()] = False
        return {"train": _take(self.documents, positions[~validation]),
                "validation": _take(self.documents, positions[validation])}


def _take(documents: Sequence[Document], positions: np.ndarray) -> Sequence[Document]:
    """The documents at ``positions``: a tuple, or for an HF corpus the same rows still unread."""
    if isinstance(documents, _Rows):
        return documents.take(positions)
    return tuple(documents[i] for i in positions.tolist())


class _Rows(Sequence):
    """A Hugging Face dataset's rows as documents, read when used: the rows stay in the dataset's memory-mapped
    Arrow files and iterating reads ``BATCH`` of them at a time. ``indices``: the dataset rows this holds, in order.
    Document names are ``<prefix>/<row>``; a missing text (null) reads as ""."""

    BATCH = 1024

    def __init__(self, dataset, field: str, prefix: str, indices: np.ndarray | None = None):
        self.dataset, self.field, self.prefix = dataset, field, prefix
        self.indices = np.arange(len(dataset), dtype=np.int64) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        row = int(self.indices[item])
        return self._document(row, self.dataset[row][self.field])

    def __iter__(self) -> Iterator[Document]:
        for start in range(0, len(self.indices), self.BATCH):
            rows = self.indices[start : start + self.BATCH].tolist()
            for row, text in zip(rows, self.dataset[rows][self.field]):
                yield self._document(row, text)

    def _document(self, row: int, text: str | None) -> Document:
        return Document(f"{self.prefix}/{row}", "" if text is None else text)

    def take(self, positions: np.ndarray) -> _Rows:
        """The rows at ``positions`` of this sequence (positions in it, not dataset rows)."""
        return _Rows(self.dataset, self.field, self.prefix, self.indices[positions])


def _cut_document(document: Document, validation_fraction: float) -> dict[str, tuple[Document, ...]]:
    """Split one document's text at the line break nearest to ``1 - validation_fraction`` of it, or at
    that point when the nearest is further than half the validation part (a long last line)."""
    text = document.text
    target = int(len(text) * (1 - validation_fraction))
    breaks = [cut for cut in (text.rfind("\n", 0, target) + 1, text.find("\n", target) + 1) if 0 < cut < len(text)]
    cut = min(breaks, key=lambda cut: abs(cut - target), default=target)
    if abs(cut - target) > len(text) * validation_fraction / 2 or not 0 < cut < len(text):
        cut = min(max(target, 1), len(text))
    train = (Document(document.name + "[train]", text[:cut]),)
    validation = (Document(document.name + "[validation]", text[cut:]),) if cut < len(text) else ()
    return {"train": train, "validation": validation}


# ------------------------------------------------------------------------------------------ sources


def _why_not_text(path: Path) -> tuple[str | None, str]:
    """(the file's text, "") or (None, why it is skipped)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"it cannot be read ({error.strerror or error})"
    if b"\0" in data:
        return None, "it holds a NUL byte (a binary file)"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as error:
        return None, f"it is not UTF-8 text (byte {error.start})"


def _walk(root: Path, skipped: frozenset[str] = frozenset(), skip_test_folders: bool = False) -> list[Path]:
    """Every file under ``root``, sorted, not entering hidden or ``skipped`` folders."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [
            name for name in subfolders
            if not name.startswith(".") and name not in skipped
            and not (skip_test_folders and name.startswith("test_"))
        ]
        # regular files only: a dangling link or a FIFO would fail or block on reading
        files.extend(Path(folder) / name for name in names
                     if not name.startswith(".") and (Path(folder) / name).is_file())
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _corpus(source: str, paths: Sequence[Path], root: Path, validation_fraction: float) -> Corpus:
    """The files that are text (``_why_not_text``) as documents named by their path under ``root``; the
    others are listed as skipped."""
    documents, skipped = [], []
    for path in paths:
        text, why = _why_not_text(path)
        name = path.relative_to(root).as_posix()
        if text is None:
            skipped.append((name, why))
        else:
            documents.append(Document(name, text))
    return Corpus(source, tuple(documents), validation_fraction, tuple(skipped))


def _glob_root(pattern: str) -> Path:
    """The folder a glob starts from: its leading parts without wildcards."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def from_path(path_or_glob: str | Path, validation_fraction: float = 0.05) -> Corpus:
    """A text file, a folder of text files (recursive) or a glob such as ``"books/**/*.txt"``."""
    spec = str(path_or_glob)
    path = Path(spec).expanduser()
    if path.is_file():  # before the glob: a real name may hold "[", "*" or "?"
        text, why = _why_not_text(path)
        if text is None:
            raise ValueError(f"corpus {spec!r}: the file is skipped: {why}; {ALLOWED}")
        return Corpus(spec, (Document(path.name, text),), validation_fraction)
    if path.is_dir():
        return _corpus(spec, _walk(path), path, validation_fraction)
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not paths:
            raise ValueError(f"corpus {spec!r}: the glob matches no file; {ALLOWED}")
        return _corpus(spec, paths, _glob_root(str(path)), validation_fraction)
    raise ValueError(f"corpus {spec!r}: no such file or folder; {ALLOWED}")


def stdlib(validation_fraction: float = 0.05) -> Corpus:
    """The running interpreter's standard-library ``*.py`` sources, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [path for path in _walk(root, STDLIB_SKIPPED, skip_test_folders=True) if path.suffix == ".py"]
    return _corpus("stdlib", paths, root, validation_fraction)


def from_hf(
    name: str, split: str = "train", text_field: str = "text", validation_fraction: float = 0.05,
    limit: int | None = None, config: str | None = None,
) -> Corpus:
    """Rows of a Hugging Face dataset (read as they are used, not held in memory; ``limit`` keeps the first rows);
    ``config``: the dataset's configuration (``"wikitext-103-raw-v1"`` of ``wikitext``), None for its default."""
    source = f"hf:{name}" + (f":{config}" if config else "") + f":{split}"
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"corpus {source!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    dataset = datasets.load_dataset(name, config or None, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(f"corpus {source!r}: no field {text_field!r}; the fields are {dataset.column_names} "
                         f"(hf:<name>:<config>:<split>:<field> names another)")
    feature = dataset.features[text_field]
    kind = getattr(feature, "dtype", type(feature).__name__)  # a Value's dtype, or e.g. "List"
    if kind not in ("string", "large_string"):
        raise ValueError(f"corpus {source!r}: field {text_field!r} holds {kind}, not text; the fields are "
                         f"{dataset.column_names} (hf:<name>:<config>:<split>:<field> names another)")
    rows = dataset.select_columns([text_field])
    rows = rows if limit is None else rows.select(range(min(limit, len(rows))))
    prefix = f"{name}/{config}" if config else name
    return Corpus(source, _Rows(rows, text_field, f"{prefix}/{split}"), validation_fraction)


def load_corpus(spec: str, validation_fraction: float = 0.05) -> Corpus:
    """``"stdlib"`` | ``"hf:<name>[:<split>]"`` | ``"hf:<name>:<config>:<split>[:<field>]"`` (an empty config:
    the dataset's default; field: the text column, default "text") | a text file, folder or glob."""
    if spec == "stdlib":
        return stdlib(validation_fraction)
    if spec.startswith("hf:"):
        parts = spec.removeprefix("hf:").split(":")
        if not parts[0] or len(parts) > 4:
            raise ValueError(f"corpus {spec!r}: {'no dataset name' if not parts[0] else 'too many parts'}; {ALLOWED}")
        if len(parts) <= 2:
            parts = [parts[0], "", *parts[1:]]
        name, config, split, field = (parts + ["", ""])[:4]
        return from_hf(name, split or "train", field or "text", validation_fraction, config=config or None)
    return from_path(spec, validation_fraction)


# -------------------------------------------------------------------------------------- token cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIRAS_CACHE_DIR", "~/.cache/miras/tokens")).expanduser()


# a cache file: a token file <key>.uint16 / .uint32 (the key's 32 hex digits, the dtype) and its description
# <key>.json (what it holds, for `miras cache`); an interrupted write's temp file (files.atomic_write)
_CACHE_FILE = re.compile(r"[0-9a-f]{32}\.(uint16|uint32|json)")
# what a description holds (cached_tokens writes it)
_DESCRIBED = ("corpus", "split", "documents", "tokenizer")
_CACHE_TEMP = re.compile(r"\.[0-9a-f]{32}\.(uint16|uint32|json)\..+\.tmp")


def cache_files(cache_dir: str | Path | None = None) -> list[Path]:
    """The token cache's files (and temp files a killed write left), oldest first; nothing else in the
    folder: ``$MIRAS_CACHE_DIR`` may point at a folder that holds other files too."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_file() and not path.is_symlink()
             and (_CACHE_FILE.fullmatch(path.name) or _CACHE_TEMP.fullmatch(path.name))
             and (path.suffix != ".json" or _is_description(path))]
    return sorted(found, key=lambda path: (path.stat().st_mtime, path.name))


def is_token_file(path: Path) -> bool:
    """Whether a file of ``cache_files`` holds tokens (or is a token file being written), not a description."""
    return ".json" not in path.name


def _is_description(path: Path) -> bool:
    """A ``<key>.json`` the cache wrote: beside its token file, or reading as a description (a foreign file
    named like it is left alone)."""
    return any(path.with_suffix(suffix).exists() for suffix in (".uint16", ".uint32")) or bool(_described(path))


def _described(path: Path) -> dict:
    """The description in the ``<key>.json`` at ``path`` ({} when it is missing or is not one)."""
    try:
        about = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return about if isinstance(about, dict) and set(_DESCRIBED) <= set(about) else {}


def cache_description(path: Path) -> str:
    """What the token file ``path`` holds (corpus, split, tokenizer), from the description written beside it;
    "" when there is none (a temp file)."""
    about = _described(path.with_suffix(".json"))
    if not about:
        return ""
    count = about["documents"]
    return f"{about['corpus']}, {about['split']} split, {count:,} document{'s' * (count != 1)}, {about['tokenizer']}"


# a temp file modified this recently may be a run's tokenisation in progress (it writes as it goes)
LIVE_TEMP_SECONDS = 3600


def clear_cache(cache_dir: str | Path | None = None) -> tuple[int, int]:
    """Delete the token cache's files (``cache_files``): (token files, bytes) freed, the token files counted
    without their descriptions and the bytes with them. A later run tokenises again;
    a process that has a cache file open keeps reading it (on POSIX the data lives until it is closed).
    A temp file modified in the last ``LIVE_TEMP_SECONDS`` is left: deleting a running tokenisation's file
    would fail that run when it finishes. A run that is just opening its cache can still lose it: clear
    while no run is starting."""
    files, freed = 0, 0
    now = time.time()
    for path in cache_files(cache_dir):
        with contextlib.suppress(FileNotFoundError):  # another process cleared it first
            stat = path.stat()
            if _CACHE_TEMP.fullmatch(path.name) and now - stat.st_mtime < LIVE_TEMP_SECONDS:
                continue
            path.unlink()
            files, freed = files + is_token_file(path), freed + stat.st_size
    return files, freed


def _cache_key(documents: Sequence[Document], tokenizer: Tokenizer, split: str) -> str:
    digest = hashlib.sha256(f"format={CACHE_FORMAT}\0{tokenizer.identity}\0{split}\0".encode())
    # the end marker written after each document: an HF tokenizer's eos is set apart from its vocabulary
    digest.update(np.asarray(tokenizer.encode_documents([""]), dtype=np.int64).tobytes() + b"\0")
    for document in documents:
        name, text = _name_bytes(document.name), document.text.encode("utf-8")
        # lengths first, so that no two different document lists hash the same bytes
        digest.update(f"{len(name)}:{len(text)}\0".encode() + name + text)
    return digest.hexdigest()[:32]


def cached_tokens(
    corpus: Corpus, tokenizer: Tokenizer, split: str = "train", cache_dir: str | Path | None = None,
    chunk_chars: int = 1 << 23,
) -> np.memmap:
    """The ids of ``corpus``'s ``split``, each document followed by its end marker, as a read-only memmap.

    Tokenised on the first call only; later calls open the file. ``chunk_chars`` bounds the text
    tokenised at once (memory), not the result.
    """
    documents = corpus.split(split)
    if not documents:  # (nothing to cache: a one-character corpus has no validation part)
        raise ValueError(f"corpus {corpus.source!r}: the {split} split has no tokens")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{_cache_key(documents, tokenizer, split)}.{dtype.name}"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot make the token cache folder {folder} ({error.strerror or error}; it is "
                          "$MIRAS_CACHE_DIR, or ~/.cache/miras/tokens without it)") from None

        def write(file) -> None:
            for texts in _chunks(documents, chunk_chars):
                tokenizer.encode_documents(texts).astype(dtype).tofile(file)

        atomic_write(path, write)
    description = path.with_suffix(".json")
    if not description.exists():  # (also for a token file cached before descriptions were written)
        with contextlib.suppress(OSError):  # only `miras cache` reads it: a read-only cache does without
            about = (corpus.source, split, len(documents), tokenizer.identity)
            atomic_write_bytes(description, json.dumps(dict(zip(_DESCRIBED, about))).encode())
    if path.stat().st_size == 0:
        raise ValueError(f"corpus {corpus.source!r}: the {split} split has no tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def _chunks(documents: Iterable[Document], chunk_chars: int) -> Iterator[list[str]]:
    """The documents' texts in consecutive lists of about ``chunk_chars`` characters (one pass)."""
    texts, size = [], 0
    for document in documents:
        texts.append(document.text)
        size += len(document.text)
        if size >= chunk_chars:
            yield texts
            texts, size = [], 0
    if texts:
        yield texts


# ------------------------------------------------------------------------------------------ batches


class TextBatches:
    """Random windows of a token array (``Batches``): row ``i`` of step ``s`` depends on (seed, s, i) only."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a flat array, got shape {tokens.shape}")
        if batch_size < 1 or seq_len < 1 or seed < 0:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len} must be >= 1 and seed={seed} >= 0")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} needs at least {seq_len + 1} tokens (inputs plus the next token); "
                f"the corpus has {len(tokens)}: use a shorter seq_len or a larger corpus"
            )
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def offsets(self, step: int, rows: range) -> np.ndarray:
        """Start of each row's window: one generator per (seed, step, row), so rows are independent."""
        high = len(self.tokens) - self.seq_len  # exclusive: the window's last token is tokens[high - 1 + seq_len]
        return np.array([np.random.default_rng((self.seed, step, row)).integers(high) for row in rows])

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        if not 0 <= rank < world or step < 0:
            raise ValueError(f"rank={rank} must be in [0, world={world}) and step={step} >= 0")
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world={world} (the number of ranks)")
        rows = self.batch_size // world
        starts = self.offsets(step, range(rank * rows, (rank + 1) * rows))
        window = np.stack([self.tokens[start : start + self.seq_len + 1] for start in starts]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]


def windows(tokens: np.ndarray, seq_len: int, batch_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive windows over ``tokens`` for perplexity: ``(inputs, targets)`` of ``[b, seq_len]`` int64.

    Window ``j`` reads tokens ``[j * seq_len, (j + 1) * seq_len + 1)``, so every token but the first is
    a target exactly once. The last window is padded after its real tokens (inputs with 0, targets
    with ``IGNORE``), which a causal model's real positions never see; the last batch may be smaller.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if len(tokens) < 2:
        raise ValueError(f"windows need at least 2 tokens (an input and its target), got {len(tokens)}")
    count = -(-(len(tokens) - 1) // seq_len)
    for first in range(0, count, batch_size):
        inputs = torch.zeros(min(batch_size, count - first), seq_len, dtype=torch.int64)
        targets = torch.full_like(inputs, IGNORE)
        for row, start in enumerate(range(first * seq_len, (first + len(inputs)) * seq_len, seq_len)):
            window = torch.from_numpy(np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64))
            inputs[row, : len(window) - 1] = window[:-1]
            targets[row, : len(window) - 1] = window[1:]
        yield inputs, targets
